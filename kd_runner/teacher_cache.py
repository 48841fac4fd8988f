"""Content-addressed teacher store: a sweep trains each distinct teacher once.

The key covers everything that changes the trained weights: dataset and split settings,
teacher config, the teacher's training settings, seed, and torch/torchvision major.minor.
Concurrent jobs with the same key serialise on a file lock; the first trains, the rest load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from kd_runner.utils import atomic_write_text, stable_hash

DATASET_LOCATION_KEYS = ("root", "download", "decode_cache", "verify_md5")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def teacher_key(cfg: DictConfig, data_fingerprint: dict) -> tuple[str, dict]:
    """Return ``(hash, the dict it hashes)`` for the teacher this config would train."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for k in DATASET_LOCATION_KEYS:
        dataset.pop(k, None)
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    teacher.pop("checkpoint", None)
    t = cfg.trainer
    material = {
        "dataset": dataset,
        "data": data_fingerprint,
        "teacher": teacher,
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "training": {"epochs": t.teacher_epochs, "batch_size": t.batch_size, "deterministic": t.deterministic},
        "seed": int(cfg.seed),
        "versions": {"torch": _major_minor(torch.__version__), "torchvision": _major_minor(torchvision.__version__)},
    }
    return stable_hash(material), material


class TeacherStore:
    """``<root>/<key>/teacher.pt`` plus ``meta.json``; ``<root>/<key>.lock`` guards training."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key / "teacher.pt"

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write_meta(self, key: str, meta: dict) -> None:
        atomic_write_text(self.root / key / "meta.json", json.dumps(meta, indent=2, default=str))

    def read_meta(self, key: str) -> dict:
        path = self.root / key / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else {}
