"""Teacher outputs stored like teachers: the frozen teacher's logits over the training split (fixed views) or over
every crop/flip view (the view table), computed once and shared by every later job of a sweep and every later run.

Keyed by the teacher's weights (however it was obtained: trained, stored, a checkpoint), the training data, the
mode and views, the compute path that produced the numbers (device type, autocast, memory format) and the training
code; ``<cache_dir>/teacher_outputs/<key>/outputs.pt`` plus ``meta.json`` with its size and sha256. A jobs racing
for one key wait on its lock and load what the first one wrote; a corrupt entry is set aside and recomputed.
Methods that read teacher layers (fixed views only) store the tapped maps too, as the method reduces them: their
key adds the taps and what the reduction depends on (``Method.reduce_identity``: AT's p and grids, VID's grids).
An entry is the logits tensor, or ``{"logits": tensor, "feats": {tap: tensor}}`` with taps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_runner import distributed
from kd_runner.model_store import ModelStore, _file_digest, _major_minor, _verify
from kd_runner.utils import code_hash, stable_hash, weights_hash

OUTPUTS_FILE = "outputs.pt"


def outputs_key(teacher: nn.Module, data_fingerprint: dict, mode: str, augment, compute: dict,
                device_type: str, reads: dict | None = None) -> tuple[str, dict]:
    """``(hash, the dict it hashes)`` of the outputs ``teacher`` gives over the training split in ``mode``: its logits,
    plus with ``reads`` (the method's taps and ``reduce_identity``) the tapped maps as the method reduces them."""
    material = {"teacher_weights": weights_hash(teacher), "data": data_fingerprint, "mode": mode,
                "views": repr(augment) if mode == "views" else None, "compute": compute, "device": device_type,
                "versions": {"torch": _major_minor(torch.__version__), "kd_runner_code": code_hash()}}
    if reads is not None:  # absent for logits: keys of logits-only entries stay as they were
        material["reads"] = reads
    return stable_hash(material), material


Payload = Tensor | dict  # the logits, or {"logits": tensor, "feats": {tap: tensor}}


def _well_formed(payload) -> bool:
    if isinstance(payload, Tensor):
        return True
    feats = payload.get("feats") if isinstance(payload, dict) else None
    return (isinstance(feats, dict) and isinstance(payload.get("logits"), Tensor)
            and all(isinstance(v, Tensor) for v in feats.values()))


def _load(store: ModelStore, key: str, where: torch.device) -> Payload | None:
    """The stored payload, or None when absent; an entry that fails the model store's checks (size and sha256 of
    what meta.json recorded) or does not load as a payload is set aside."""
    status, reason, _ = _verify(store.entry_dir(key), OUTPUTS_FILE)
    if status == "absent":
        return None
    if status == "ok":
        try:
            logits = torch.load(store.entry_dir(key) / OUTPUTS_FILE, map_location=where, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt entry
            logits, reason = None, f"{OUTPUTS_FILE} does not load ({type(err).__name__})"
        if _well_formed(logits):
            return logits
        reason = reason or f"{OUTPUTS_FILE} holds no teacher outputs"
    aside = store.set_aside(key)
    print(f"kd-train: stored teacher outputs {key} are corrupt ({reason}); set aside to {aside}; recomputing",
          file=sys.stderr, flush=True)
    return None


def _to_host(payload: Payload) -> Payload:
    if isinstance(payload, Tensor):
        return payload.detach().cpu().contiguous()
    return {"logits": _to_host(payload["logits"]), "feats": {k: _to_host(v) for k, v in payload["feats"].items()}}


def load_or_compute(root: Path, key: tuple[str, dict], compute: Callable[[Payload | None], Payload],
                    where: torch.device) -> tuple[Payload, dict]:
    """``compute(stored payload or None)`` under the key's lock; store what it returns when nothing was stored.

    Returns ``(payload, info)``; ``info["source"]`` is ``store`` or ``computed``."""
    key, material = key
    store = ModelStore(root)
    with store.locked(key):  # data-parallel: rank 0 claims the key, checks and writes; every rank computes its shard
        stored = distributed.found_on_main(lambda: _load(store, key, where))
        logits = compute(stored)
        info = {"source": "store" if stored is not None else "computed", "key": key}
        if stored is None and distributed.is_main():
            folder = store.entry_dir(key)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{OUTPUTS_FILE}.{os.getpid()}.tmp"
            torch.save(_to_host(logits), tmp)
            shape = logits.shape if isinstance(logits, Tensor) else logits["logits"].shape
            store.write_meta(key, {"files": {OUTPUTS_FILE: _file_digest(tmp)}, "key_material": material,
                                   "shape": list(shape)})
            os.replace(tmp, folder / OUTPUTS_FILE)
        info["path"] = str((store.entry_dir(key) / OUTPUTS_FILE).resolve())
    return logits, info
