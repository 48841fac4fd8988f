"""Content-addressed model store: a sweep trains each distinct teacher (and CE baseline) once.

A key covers everything that changes the trained weights: the training data, the model config
(or, for the baseline, its initial weights), the training settings, the seed, and
torch/torchvision major.minor. Concurrent jobs with the same key, on one machine or on several sharing the store
over NFS, serialise on the key's claim file (:mod:`kd_runner.store_lock`); the first trains, the rest load.

Each entry's ``meta.json`` records the size and sha256 of its files; an entry that fails that check (or,
written before sizes and hashes were recorded, does not load) is set aside, kept, and trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner import __version__, checkpoints, distributed
from kd_runner.data.tensors import DataBundle
from kd_runner.engine import PhaseResult
from kd_runner.errors import UserError
from kd_runner.store_lock import claimed, lock_timing
from kd_runner.utils import (
    DATASET_LOCATION_KEYS,
    atomic_write_bytes,
    atomic_write_text,
    code_hash,
    resolve_device,
    stable_hash,
    torchvision_version,
)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _training_material(cfg: DictConfig, epochs: int, data_fingerprint: dict, augment) -> dict:
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for k in DATASET_LOCATION_KEYS:
        dataset.pop(k, None)
    return {
        "dataset": dataset,
        "data": data_fingerprint,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "training": {"epochs": epochs, "batch_size": cfg.trainer.batch_size,
                     "deterministic": cfg.trainer.deterministic, "augment": repr(augment),
                     # bf16 autocast changes the weights a run ends with; "auto" resolves per device (below)
                     "amp": str(cfg.trainer.get("amp", "auto"))},
        "versions": {"torch": _major_minor(torch.__version__), "torchvision": _major_minor(torchvision_version()),
                     "kd_runner": __version__, "kd_runner_code": code_hash()},
        "device": resolve_device(str(cfg.trainer.device)).type,
    }


def teacher_key(cfg: DictConfig, data_fingerprint: dict, augment=None) -> tuple[str, dict]:
    """Return ``(hash, the dict it hashes)`` for the teacher this config would train."""
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    teacher.pop("checkpoint", None)
    material = {**_training_material(cfg, cfg.trainer.teacher_epochs, data_fingerprint, augment),
                "teacher": teacher, "seed": int(cfg.teacher_seed)}
    return stable_hash(material), material


def baseline_key(cfg: DictConfig, data_fingerprint: dict, init_hash: str, augment=None,
                 epochs: int | None = None) -> tuple[str, dict]:
    """Key of the CE baseline: same initial weights + same training = same baseline, whatever the method."""
    epochs = cfg.trainer.student_epochs if epochs is None else epochs
    material = {**_training_material(cfg, epochs, data_fingerprint, augment),
                "student": OmegaConf.to_container(cfg.student, resolve=True), "init_hash": init_hash,
                "seed": int(cfg.seed)}
    return stable_hash(material), material


class CorruptEntry(Exception):
    """A store entry that cannot be trusted; ``str()`` says why (one line)."""


MODEL_FILE, BEST_FILE, META_FILE = "model.pt", "best.pt", "meta.json"


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_digest(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class ModelStore:
    """``<root>/<key>/model.pt`` (+ ``best.pt``) and ``meta.json``; ``<root>/<key>.claim`` guards training.

    ``meta.json`` records the size and sha256 of every file of the entry when it is written; an entry
    whose files are missing, differ from that record or do not load is corrupt: :meth:`set_aside` moves
    it to ``<root>/<key>.corrupt-<time>/`` (kept, never deleted) so the key can be trained again.
    ``stale_after_s``/``heartbeat_s``: when a dead holder's claim is taken over (see :mod:`kd_runner.store_lock`).
    """

    def __init__(self, root: Path, stale_after_s: float | None = None, heartbeat_s: float | None = None) -> None:
        self.root = Path(root)
        self.stale_after_s, self.heartbeat_s = lock_timing(stale_after_s, heartbeat_s)

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def entry(self, key: str) -> Path:
        return self.root / key / MODEL_FILE

    def best_entry(self, key: str) -> Path:
        return self.root / key / BEST_FILE

    @contextlib.contextmanager
    def locked(self, key: str, timeout_s: float | None = None) -> Iterator[None]:
        """Hold ``key`` for the body, waiting while another job (on any machine) holds it and taking over the
        claim of a dead one; ``store_lock.ClaimTimeout`` (a TimeoutError) after ``timeout_s`` (None: no limit).
        A data-parallel job holds it through rank 0; its other ranks pass straight in."""
        if not distributed.is_main():
            yield
            return
        with claimed(self.root, key, stale_after_s=self.stale_after_s, heartbeat_s=self.heartbeat_s,
                     timeout_s=timeout_s):
            yield

    def write_meta(self, key: str, meta: dict) -> None:
        atomic_write_text(self.root / key / META_FILE, json.dumps(meta, indent=2, default=str))

    def read_meta(self, key: str) -> dict:
        path = self.root / key / META_FILE
        try:
            meta = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def load(self, key: str, model: nn.Module) -> tuple[dict, dict | None] | None:
        """Load the entry ``key`` into ``model``; return ``(meta, best state dict or None)``.

        ``None`` when nothing is stored under ``key`` (a ``best.pt`` left by an interrupted write counts as
        nothing); :class:`CorruptEntry` when something is stored but cannot be trusted. ``model`` is only
        touched once the entry has passed every check.
        """
        folder, model_pt, best_pt = self.entry_dir(key), self.entry(key), self.best_entry(key)
        status, reason, meta = _verify(folder)
        if status == "absent":
            return None
        if status == "corrupt":
            raise CorruptEntry(reason)
        # written before hashes were recorded ("unverified"): a readable entry is all that can be checked
        has_best = BEST_FILE in meta["files"] if status == "ok" else best_pt.is_file()
        state = _read_state(model_pt, model, MODEL_FILE, whole_checkpoint=True)
        best = _read_state(best_pt, model, BEST_FILE, whole_checkpoint=False) if has_best else None
        model.load_state_dict(state)
        return meta, best

    def set_aside(self, key: str) -> Path:
        """Move the entry ``key`` to ``<root>/<key>.corrupt-<time>`` (never deleted); return where it went."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.root / f"{key}.corrupt-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.root / f"{key}.corrupt-{stamp}-{n}"
        try:
            os.replace(self.entry_dir(key), target)
        except OSError as err:
            raise UserError(f"store entry '{self.entry_dir(key)}' is corrupt and cannot be moved aside "
                            f"({err.strerror or err}); move or remove it by hand") from None
        return target

    def store(self, key: str, model_bytes: bytes, best_bytes: bytes | None, meta: dict) -> None:
        """Write the entry with every file's size and sha256 in ``meta.json``; ``model.pt`` goes last."""
        files = {MODEL_FILE: _digest(model_bytes)}
        if best_bytes is not None:
            files[BEST_FILE] = _digest(best_bytes)
            atomic_write_bytes(self.best_entry(key), best_bytes)
        else:  # a best.pt left by an interrupted write is not this model's
            self.best_entry(key).unlink(missing_ok=True)
        self.write_meta(key, {**meta, "files": files})
        atomic_write_bytes(self.entry(key), model_bytes)


def _read_state(path: Path, model: nn.Module, name: str, whole_checkpoint: bool) -> dict:
    """The state dict in ``path``, checked to fit ``model`` (same keys and shapes); CorruptEntry if not."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or garbled file
        raise CorruptEntry(f"{name} is unreadable ({type(err).__name__})") from None
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict) and whole_checkpoint and isinstance(payload, dict):
        state = payload  # a bare state dict
    if not isinstance(state, dict):
        raise CorruptEntry(f"{name} holds no state dict")
    want = model.state_dict()
    if set(state) != set(want) or any(
        isinstance(v, torch.Tensor) and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
        for k, v in want.items()
    ):
        raise CorruptEntry(f"{name} does not fit {type(model).__name__}")
    return state


def load_or_train(root: Path, key: tuple[str, dict] | None, model: nn.Module, model_cfg: DictConfig,
                  data: DataBundle, run_dir: Path, train: Callable[[], PhaseResult]) -> tuple[dict, PhaseResult]:
    """Load ``model`` from the store at ``root`` under ``key``, or ``train()`` it and store it there.

    A corrupt entry is set aside (kept under ``<root>/<key>.corrupt-<time>``), reported on stderr, and the
    model is trained and stored again; jobs waiting on the key's lock then load the new entry.
    """
    if key is None:
        return {"source": "trained"}, train()
    key, material = key
    store = ModelStore(root)
    entry = store.entry(key)
    info: dict = {}


    def check_and_load() -> tuple[dict, dict | None] | None:
        try:
            return store.load(key, model)
        except CorruptEntry as err:
            aside = store.set_aside(key)
            print(f"kd-train: store entry {key} is corrupt ({err}); set aside to {aside}; retraining",
                  file=sys.stderr, flush=True)
            info["corrupt_entry"] = {"reason": str(err), "set_aside": str(aside)}
            return None

    with store.locked(key):  # data-parallel: rank 0 claims the key, checks and writes; every rank trains
        found = distributed.found_on_main(check_and_load, lambda: store.load(key, model))
        if found is not None:
            meta, best = found
            res = PhaseResult(history=meta.get("history", []), best_val_acc=meta.get("best_val_acc"),
                              best_epoch=meta.get("best_epoch"), train_seconds=meta.get("train_seconds", 0.0))
            if best is not None:
                res.best_state = {"model": best, "extra": {}}
            return {"source": "cache", "key": key, "path": str(entry.resolve()),
                    "trained_in": meta.get("trained_in")}, res
        res = train()
        if distributed.is_main():
            best_bytes = _torch_bytes({"model": res.best_state["model"]}) if res.best_state is not None else None
            model_bytes = _torch_bytes(checkpoints.payload(model, model_cfg, data.input_shape(), data.num_classes))
            store.store(key, model_bytes, best_bytes,
                        {"trained_in": str(run_dir.resolve()), "train_seconds": round(res.train_seconds, 3),
                         "history": res.history, "best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
                         "key_material": material})
    return {"source": "trained", "key": key, "path": str(entry.resolve()), **info}, res


# --------------------------------------------------------------------------- read helpers (kd-store)


def file_digest(path: Path) -> dict:
    """``{"size", "sha256"}`` of the file at ``path``, read in chunks (the record ``meta.json`` keeps)."""
    return _file_digest(Path(path))


def entry_keys(root: Path) -> list[str]:
    """Keys of the entries under a store ``root``, sorted; none when ``root`` does not exist.

    An entry is a directory named by its key: claim files (``<key>.claim*``), old lock files, entries set aside
    (``<key>.corrupt-<time>``) and hidden directories (a kd-store import in progress) are not entries.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and "." not in p.name)


def set_aside_entries(root: Path) -> list[Path]:
    """Entries moved aside as corrupt (``<key>.corrupt-<time>``) under ``root``, sorted; kept, never deleted."""
    root = Path(root)
    return sorted(p for p in root.glob("*.corrupt-*") if p.is_dir()) if root.is_dir() else []


def check_entry(folder: Path) -> tuple[str, str]:
    """``(status, reason)`` of the entry in ``folder``, from its bytes alone: nothing is unpickled.

    ``"ok"``: ``meta.json`` is readable and every file it records has the recorded size and sha256.
    ``"corrupt"``: something :meth:`ModelStore.load` would refuse on the same grounds (``reason`` says what).
    ``"unverified"``: written before sizes and hashes were recorded; only loading it could tell.
    ``"absent"``: nothing stored (at most a ``best.pt`` left by an interrupted write).
    """
    status, reason, _ = _verify(folder)
    return status, reason


def _verify(folder: Path, main: str = MODEL_FILE) -> tuple[str, str, dict]:
    """:func:`check_entry`'s ``(status, reason)`` plus the entry's meta (``{}`` when unreadable); ``main`` is the
    file the entry exists for (``model.pt``; the output store's ``outputs.pt``)."""
    folder = Path(folder)
    model_pt, meta_path = folder / main, folder / META_FILE
    if not model_pt.exists() and not meta_path.exists():
        return "absent", "nothing stored", {}
    if not meta_path.is_file():
        return "corrupt", f"{META_FILE} is missing", {}
    meta = ModelStore(folder.parent).read_meta(folder.name)
    if not meta:
        return "corrupt", f"{META_FILE} is unreadable", meta
    if not model_pt.is_file():
        return "corrupt", f"{main} is missing", meta
    files = meta.get("files")
    if files is None:
        return "unverified", "written before sizes and hashes were recorded", meta
    if not isinstance(files, dict) or not isinstance(files.get(main), dict):
        return "corrupt", f"{META_FILE} has no valid file record", meta
    for name, want in files.items():
        path = folder / str(name)
        if not isinstance(want, dict) or not path.is_file():
            return "corrupt", f"{name} is missing", meta
        try:
            got = _file_digest(path)
        except OSError as err:
            return "corrupt", f"{name} cannot be read ({err.strerror or err})", meta
        if got["size"] != want.get("size"):
            return "corrupt", f"{name} is {got['size']} bytes, {want.get('size')} were written", meta
        if got["sha256"] != want.get("sha256"):
            return "corrupt", (f"{name} has sha256 {got['sha256'][:12]}..., "
                               f"{str(want.get('sha256'))[:12]}... was written"), meta
    return "ok", "", meta
