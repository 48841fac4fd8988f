"""Decode-once cache: a decoded dataset is saved as tensors and loaded in one read."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from kd_runner.data.tensors import Split
from kd_runner.utils import atomic_torch_save, stable_hash

Decoded = dict[str, object]


_ROOT: Path | None = None


def set_cache_dir(path: str | Path) -> None:
    """Use ``path`` (the run's ``paths.cache_dir``) for decoded datasets from now on."""
    global _ROOT
    _ROOT = Path(path).expanduser()


def cache_dir() -> Path:
    """Where decoded tensors go: ``paths.cache_dir`` once set, else ``KD_CACHE_DIR`` or ``outputs/.cache``."""
    return _ROOT if _ROOT is not None else Path(os.environ.get("KD_CACHE_DIR", "outputs/.cache")).expanduser()


def source_fingerprint(items: list[tuple[Path, int]], root: Path) -> dict:
    """Identity of a labelled file tree: every file's relative path, label, size and mtime.

    A moved (relabelled) image changes the key even though counts and sizes do not.
    """
    h = hashlib.sha256()
    prefix = len(str(root).rstrip(os.sep)) + 1
    for name, label in sorted((str(path), label) for path, label in items):
        st = os.stat(name)
        h.update(f"{name[prefix:]}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"files": len(items), "sha256": h.hexdigest()[:16]}


def cached_decode(key: dict, decode: Callable[[], Decoded], enabled: bool = True) -> tuple[Decoded, bool]:
    """Return ``decode()``'s result, from disk when the same ``key`` was decoded before.

    Returns ``(data, hit)``. Splits are stored as plain tensors.
    """
    if not enabled:
        return decode(), False
    path = cache_dir() / "datasets" / f"{key.get('kind', 'data')}-{stable_hash(key)}.pt"
    if path.is_file():
        try:
            # weights_only: tensors, dicts, lists, str and numbers only. The cache dir may be shared, and a
            # full unpickle of a planted file would run its code; such a file fails here and is overwritten.
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(raw, dict) and stable_hash(raw.get("key")) == stable_hash(key):
                return _unpack(raw), True
        except Exception:  # corrupt, foreign or unsafe cache entry: decode again and overwrite
            pass
    data = decode()
    atomic_torch_save(_pack(data, key), path)
    return data, False


def _pack(data: Decoded, key: dict) -> dict:
    out: dict = {"key": key}
    for k, v in data.items():
        out[k] = {"images": v.images, "labels": v.labels} if isinstance(v, Split) else v
    return out


def _unpack(raw: dict) -> Decoded:
    out: Decoded = {}
    for k, v in raw.items():
        if k == "key":
            continue
        out[k] = Split(v["images"], v["labels"]) if isinstance(v, dict) and "images" in v else v
    return out
