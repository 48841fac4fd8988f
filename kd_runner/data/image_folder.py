"""Any ``root/{train,test}/<class>/*`` tree: classes, channels and size inferred."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_runner.data.cache import cached_decode, source_fingerprint
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _list(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` in class order, then file-name order (what torchvision's ImageFolder gives)."""
    items = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():  # a split may lack a class (e.g. a small test set)
            continue
        with os.scandir(folder) as it:  # names as strings: sorting 50k Path objects costs seconds
            names = sorted(e.name for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
        items.extend((folder / name, label) for name in names)
    return items


def _decode(items: list[tuple[Path, int]], mode: str, size: tuple[int, int]) -> Split:
    import numpy as np
    from PIL import Image

    images = torch.empty((len(items), 1 if mode == "L" else 3, *size), dtype=torch.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as err:
            raise UserError(f"dataset: cannot decode image '{path}': {err}") from None
        t = torch.from_numpy(arr.copy())
        images[i] = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return Split(images, torch.tensor([label for _, label in items], dtype=torch.long))


def find_root(root: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` class folders, if ``root`` is (or holds) one."""
    return root if (root / "train").is_dir() and (root / "test").is_dir() else None


@dataclass
class Tree:
    """A checked ``root/{train,test}/<class>/*`` tree and how its images decode."""

    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    mode: str
    size: tuple[int, int]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def scan_tree(root: Path, channels: int | None, image_size: int | None) -> Tree:
    """Check the tree and settle classes, files, PIL mode and size, without decoding (both data paths use it)."""
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise UserError(
            f"dataset=image_folder: '{root}' must contain train/<class>/* and test/<class>/* folders"
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"dataset=image_folder: no class folders in '{train_dir}'")
    missing = [c for c in sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if c not in classes]
    if missing:
        raise UserError(f"dataset=image_folder: test classes {missing} are not in train classes {classes}")
    train_items, test_items = _list(train_dir, classes), _list(test_dir, classes)
    if not train_items or not test_items:
        raise UserError(f"dataset=image_folder: no images under '{train_dir}' or '{test_dir}'")

    from PIL import Image

    try:
        with Image.open(train_items[0][0]) as first:
            inferred_channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
            inferred_size = (first.size[1], first.size[0])
    except OSError as err:
        raise UserError(f"dataset: cannot decode image '{train_items[0][0]}': {err}") from None
    if channels not in (None, 1, 3):
        raise UserError(f"dataset.channels={channels} is invalid; valid: null (infer), 1, 3")
    channels = channels or inferred_channels
    size = (int(image_size), int(image_size)) if image_size else inferred_size
    return Tree(root, classes, train_items, test_items, "L" if channels == 1 else "RGB", size)


def load_tree(root: Path, channels: int | None, image_size: int | None, use_cache: bool = True) -> dict:
    tree = scan_tree(root, channels, image_size)
    key = {"kind": "image_folder", "root": str(root.resolve()), "mode": tree.mode, "size": tree.size,
           "fingerprint": source_fingerprint(tree.train + tree.test, root), "classes": tree.classes}

    def decode() -> dict:
        return {"train": _decode(tree.train, tree.mode, tree.size), "test": _decode(tree.test, tree.mode, tree.size)}

    data, hit = cached_decode(key, decode, enabled=use_cache)
    return {**data, "classes": tree.classes,
            "source": f"image folders at {root} ({'decoded-tensor cache' if hit else 'decoded now'})"}


def checked_root(cfg) -> Path:
    """``dataset.root`` of an image_folder config, which must be an existing folder."""
    if cfg.get("root") in (None, "", "???"):
        raise UserError("dataset=image_folder needs dataset.root=<folder with train/ and test/>")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root='{root}' does not exist; give a folder with train/ and test/")
    return root


def load(cfg) -> dict:
    return load_tree(checked_root(cfg), cfg.get("channels"), cfg.get("image_size"), bool(cfg.get("decode_cache", True)))
