"""CIFAR-10 from torchvision's pickled batches or from ``{train,test}/<class>/*`` image folders."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from kd_runner.data import image_folder
from kd_runner.data.download import offline_guard
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError

BATCHES_DIR = "cifar-10-batches-py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read_batches(folder: Path, entries: list[list[str]], verify_md5: bool) -> Split:
    """Read pickled batches; with ``verify_md5`` each file must match torchvision's checksum."""
    images, labels = [], []
    for name, md5 in entries:
        path = folder / name
        if not path.is_file():
            raise UserError(f"dataset=cifar10: missing batch file '{path}'")
        if verify_md5 and _md5(path) != md5:
            raise UserError(
                f"dataset=cifar10: '{path}' fails torchvision's md5 check (expected {md5}); "
                "re-download it, or set dataset.verify_md5=false for a deliberately modified copy"
            )
        try:
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as err:
            raise UserError(f"dataset=cifar10: '{path}' is not a CIFAR pickle batch: {err}") from None
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels))


def folder_root(cfg) -> Path | None:
    """The ``{train,test}/<class>/*`` image-folder copy of CIFAR-10 under ``dataset.root``, if there is one."""
    root = Path(str(cfg.root)).expanduser()
    for candidate in (root / "cifar10", root / "CIFAR10", root):
        found = image_folder.find_root(candidate)
        if found is not None:
            return found
    return None


def check_classes(classes: list[str]) -> None:
    if classes != CLASSES:
        raise UserError(f"dataset=cifar10: class folders {classes} are not CIFAR-10's {CLASSES}")


def load(cfg) -> dict:
    from torchvision.datasets import CIFAR10

    root = Path(str(cfg.root)).expanduser()
    folder = folder_root(cfg)
    if folder is not None:
        out = image_folder.load_tree(folder, 3, 32, bool(cfg.get("decode_cache", True)))
        check_classes(out["classes"])
        return out
    batches = root / BATCHES_DIR
    if not batches.is_dir():
        if not cfg.download:
            raise UserError(
                f"dataset=cifar10: found neither '{batches}' (torchvision format) nor "
                f"'{root / 'cifar10'}/{{train,test}}/<class>' image folders, and download=false; "
                "point KD_DATA_DIR (or paths.data_dir) at the data, or set dataset.download=true (needs network)"
            )
        with offline_guard("CIFAR-10", root):
            CIFAR10(str(root), train=True, download=True)
    verify = bool(cfg.get("verify_md5", True))
    return {
        "train": _read_batches(batches, CIFAR10.train_list, verify),
        "test": _read_batches(batches, CIFAR10.test_list, verify),
        "classes": CLASSES,
        "source": f"torchvision CIFAR-10 batches at {batches}" + ("" if verify else " (md5 not verified)"),
    }
