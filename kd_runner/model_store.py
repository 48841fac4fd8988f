"""Content-addressed model store: a sweep trains each distinct teacher (and CE baseline) once.

A key covers everything that changes the trained weights: the training data, the model config
(or, for the baseline, its initial weights), the training settings, the seed, and
torch/torchvision major.minor. Concurrent jobs with the same key serialise on a file lock;
the first trains, the rest load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner import __version__, checkpoints
from kd_runner.data.tensors import DataBundle
from kd_runner.engine import PhaseResult
from kd_runner.utils import atomic_torch_save, atomic_write_text, code_hash, resolve_device, stable_hash

DATASET_LOCATION_KEYS = ("root", "download", "decode_cache", "verify_md5")


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
        "versions": {"torch": _major_minor(torch.__version__), "torchvision": _major_minor(torchvision.__version__),
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


def baseline_key(cfg: DictConfig, data_fingerprint: dict, init_hash: str, augment=None) -> tuple[str, dict]:
    """Key of the CE baseline: same initial weights + same training = same baseline, whatever the method."""
    material = {**_training_material(cfg, cfg.trainer.student_epochs, data_fingerprint, augment),
                "student": OmegaConf.to_container(cfg.student, resolve=True), "init_hash": init_hash,
                "seed": int(cfg.seed)}
    return stable_hash(material), material


class ModelStore:
    """``<root>/<key>/model.pt`` (+ ``best.pt``) and ``meta.json``; ``<root>/<key>.lock`` guards training."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key / "model.pt"

    def best_entry(self, key: str) -> Path:
        return self.root / key / "best.pt"

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
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}


def load_or_train(root: Path, key: tuple[str, dict] | None, model: nn.Module, model_cfg: DictConfig,
                  data: DataBundle, run_dir: Path, train: Callable[[], PhaseResult]) -> tuple[dict, PhaseResult]:
    """Load ``model`` from the store at ``root`` under ``key``, or ``train()`` it and store it there."""
    if key is None:
        return {"source": "trained"}, train()
    key, material = key
    store = ModelStore(root)
    entry = store.entry(key)
    with store.locked(key):
        meta = store.read_meta(key)
        if entry.is_file() and meta:
            checkpoints.load_weights(entry, model, f"{root.name} cache entry")
            res = PhaseResult(history=meta.get("history", []), best_val_acc=meta.get("best_val_acc"),
                              best_epoch=meta.get("best_epoch"), train_seconds=meta.get("train_seconds", 0.0))
            if store.best_entry(key).is_file():
                best = torch.load(store.best_entry(key), map_location="cpu", weights_only=True)
                res.best_state = {"model": best["model"], "extra": {}}
            return {"source": "cache", "key": key, "path": str(entry.resolve()),
                    "trained_in": meta.get("trained_in")}, res
        res = train()
        # model.pt goes last: an entry counts only once it and meta.json are both there
        if res.best_state is not None:
            atomic_torch_save({"model": res.best_state["model"]}, store.best_entry(key))
        store.write_meta(key, {"trained_in": str(run_dir.resolve()), "train_seconds": round(res.train_seconds, 3),
                               "history": res.history, "best_val_acc": res.best_val_acc,
                               "best_epoch": res.best_epoch, "key_material": material})
        checkpoints.save(entry, model, model_cfg, data.input_shape(), data.num_classes)
    return {"source": "trained", "key": key, "path": str(entry.resolve())}, res
