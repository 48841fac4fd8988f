"""CIFAR-10 and CIFAR-100 from torchvision's pickled batches or from ``{train,test}/<class>/*`` image folders."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_runner.data import image_folder
from kd_runner.data.download import offline_guard
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError

BATCHES_DIR = "cifar-10-batches-py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100_DIR = "cifar-100-python"
# the ``fine_label_names`` of cifar-100-python/meta, in label order (alphabetical, as image folders sort)
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


@dataclass(frozen=True)
class Spec:
    """What differs between CIFAR-10 and CIFAR-100 on disk."""

    name: str                  # dataset.name
    title: str                 # in messages
    batches_dir: str           # torchvision's folder under dataset.root
    folders: tuple[str, ...]   # image-folder copies tried under dataset.root (then dataset.root itself)
    classes: tuple[str, ...]

    def tv_class(self):
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.name == "cifar10" else CIFAR100


CIFAR10_SPEC = Spec("cifar10", "CIFAR-10", BATCHES_DIR, ("cifar10", "CIFAR10"), tuple(CLASSES))
CIFAR100_SPEC = Spec("cifar100", "CIFAR-100", CIFAR100_DIR, ("cifar100", "CIFAR100"), tuple(CIFAR100_CLASSES))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _checked(path: Path, md5: str, verify_md5: bool, spec: Spec, what: str = "batch file") -> Path:
    if not path.is_file():
        raise UserError(f"dataset={spec.name}: missing {what} '{path}'")
    if verify_md5 and _md5(path) != md5:
        raise UserError(
            f"dataset={spec.name}: '{path}' fails torchvision's md5 check (expected {md5}); "
            "re-download it, or set dataset.verify_md5=false for a deliberately modified copy"
        )
    return path


def _read_batches(folder: Path, entries: list[list[str]], verify_md5: bool, spec: Spec = CIFAR10_SPEC) -> Split:
    """Read pickled batches; with ``verify_md5`` each file must match torchvision's checksum.

    CIFAR-10 batches hold ``labels``, CIFAR-100's ``fine_labels`` (the 100-class task; its ``coarse_labels``,
    the 20 superclasses, are not used).
    """
    images, labels = [], []
    for name, md5 in entries:
        path = _checked(folder / name, md5, verify_md5, spec)
        try:
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as err:
            raise UserError(f"dataset={spec.name}: '{path}' is not a CIFAR pickle batch: {err}") from None
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))


def _read_meta(folder: Path, verify_md5: bool, spec: Spec) -> list[str]:
    """The class names in label order from torchvision's meta file (``fine_label_names`` for CIFAR-100)."""
    meta = spec.tv_class().meta
    path = _checked(folder / meta["filename"], meta["md5"], verify_md5, spec, "meta file")
    try:
        with path.open("rb") as f:
            names = [str(n) for n in pickle.load(f, encoding="latin1")[meta["key"]]]
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"dataset={spec.name}: '{path}' is not a CIFAR meta file: {err}") from None
    if len(names) != len(spec.classes):
        raise UserError(f"dataset={spec.name}: '{path}' lists {len(names)} classes, not {spec.title}'s "
                        f"{len(spec.classes)}")
    return names


def folder_root(cfg, spec: Spec = CIFAR10_SPEC) -> Path | None:
    """The ``{train,test}/<class>/*`` image-folder copy of the dataset under ``dataset.root``, if there is one."""
    root = Path(str(cfg.root)).expanduser()
    for candidate in (*(root / f for f in spec.folders), root):
        found = image_folder.find_root(candidate)
        if found is not None:
            return found
    return None


def check_classes(classes: list[str], spec: Spec = CIFAR10_SPEC) -> None:
    if list(classes) == list(spec.classes):
        return
    if len(spec.classes) <= 10:
        raise UserError(f"dataset={spec.name}: class folders {classes} are not {spec.title}'s {list(spec.classes)}")
    missing = [c for c in spec.classes if c not in classes]
    extra = [c for c in classes if c not in spec.classes]
    raise UserError(
        f"dataset={spec.name}: the {len(classes)} class folders are not {spec.title}'s {len(spec.classes)} classes "
        f"(missing: {', '.join(missing[:8]) or 'none'}{' ...' if len(missing) > 8 else ''}; "
        f"unexpected: {', '.join(extra[:8]) or 'none'}{' ...' if len(extra) > 8 else ''}); "
        "for other classes use dataset=image_folder"
    )


def check_labels(split: Split, classes: list[str], path: Path, spec: Spec) -> None:
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= len(classes)):
        raise UserError(f"dataset={spec.name}: labels in '{path}' run outside 0..{len(classes) - 1}")


def load_spec(cfg, spec: Spec) -> dict:
    root = Path(str(cfg.root)).expanduser()
    folder = folder_root(cfg, spec)
    if folder is not None:
        out = image_folder.load_tree(folder, 3, 32, bool(cfg.get("decode_cache", True)))
        check_classes(out["classes"], spec)
        return out
    batches = root / spec.batches_dir
    tv = spec.tv_class()
    if not batches.is_dir():
        if not cfg.download:
            raise UserError(
                f"dataset={spec.name}: found neither '{batches}' (torchvision format) nor "
                f"'{root / spec.folders[0]}/{{train,test}}/<class>' image folders, and download=false; "
                "point KD_DATA_DIR (or paths.data_dir) at the data, or set dataset.download=true (needs network)"
            )
        with offline_guard(spec.title, root):
            tv(str(root), train=True, download=True)
    verify = bool(cfg.get("verify_md5", True))
    out = {"train": _read_batches(batches, tv.train_list, verify, spec),
           "test": _read_batches(batches, tv.test_list, verify, spec)}
    # CIFAR-10's batches.meta is not read (its names are CLASSES); CIFAR-100's meta gives the fine label names
    classes = list(CLASSES) if spec.name == "cifar10" else _read_meta(batches, verify, spec)
    for split in ("train", "test"):
        check_labels(out[split], classes, batches, spec)
    return {
        **out,
        "classes": classes,
        "source": f"torchvision {spec.title} batches at {batches}" + ("" if verify else " (md5 not verified)"),
    }


def load(cfg) -> dict:
    """CIFAR-10: ``cifar-10-batches-py`` or ``cifar10/{train,test}/<class>/`` under ``dataset.root``."""
    return load_spec(cfg, CIFAR10_SPEC)


def load100(cfg) -> dict:
    """CIFAR-100 (fine labels): ``cifar-100-python/{train,test,meta}`` or ``cifar100/{train,test}/<class>/``."""
    return load_spec(cfg, CIFAR100_SPEC)
