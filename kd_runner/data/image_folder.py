"""Any ``root/{train,test}/<class>/*`` tree: classes, channels and size inferred."""

from __future__ import annotations

import os
import sys
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


GRAY_MODES = ("L", "1", "I", "I;16", "F")  # PIL modes decoded as one channel; any other mode is colour
_WARNED: set[tuple] = set()  # mixed-mode warnings already printed (scan_tree runs twice when sizing a tree)


def _check_classes(train_dir: Path, classes: list[str], train_items: list[tuple[Path, int]]) -> None:
    """Every train class folder must hold images, and a classifier needs two classes at least."""
    counts = [0] * len(classes)
    for _, label in train_items:
        counts[label] += 1
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        more = f" (and {len(empty) - 1} more: {_few(empty[1:])})" if len(empty) > 1 else ""
        raise UserError(
            f"dataset=image_folder: class folder '{train_dir / empty[0]}' holds no images{more}; every train class "
            f"needs images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove the folder"
        )
    if len(classes) < 2:
        raise UserError(
            f"dataset=image_folder: '{train_dir}' has {len(classes)} class folder ({classes[0]!r}); "
            "a classifier needs at least 2 class folders"
        )


def _first_images(classes: list[str], train_items: list[tuple[Path, int]]) -> list[tuple[str, Path]]:
    """``(class, its first train image)`` for every class (items are in class, then file-name order)."""
    firsts: dict[int, Path] = {}
    for path, label in train_items:
        firsts.setdefault(label, path)
    return [(classes[label], path) for label, path in sorted(firsts.items())]


def _infer_mode(root: Path, samples: list[tuple[str, Path]]) -> tuple[str, tuple[int, int]]:
    """``("RGB" if any sampled image is colour else "L", (H, W) of the first one)``; warn once on a mix."""
    from PIL import Image

    modes: list[tuple[str, str]] = []
    size = None
    for cls, path in samples:
        try:
            with Image.open(path) as im:
                modes.append((cls, im.mode))
                size = size or (im.size[1], im.size[0])
        except OSError as err:
            raise UserError(f"dataset: cannot decode image '{path}': {err}") from None
    gray = [c for c, m in modes if m in GRAY_MODES]
    colour = [c for c, m in modes if m not in GRAY_MODES]
    if gray and colour:
        marker = (str(root), tuple(modes))
        if marker not in _WARNED:
            _WARNED.add(marker)
            print(f"kd-train: warning: dataset=image_folder: '{root}' mixes grayscale and colour images (first "
                  f"image of {_few(gray)} is grayscale, of {_few(colour)} colour); decoding every image as RGB "
                  "(set dataset.channels=1 or 3 to choose)", file=sys.stderr)
    return ("RGB" if colour else "L"), size


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(c) for c in names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
    return f"class {shown}" if len(names) == 1 else f"classes {shown}"


def scan_tree(root: Path, channels: int | None, image_size: int | None) -> Tree:
    """Check the tree and settle classes, files, PIL mode and size, without decoding (both data paths use it).

    Train class folders must each hold images (a test folder may lack a class). Channels are inferred from
    the first image of every class: RGB if any of them is colour, grayscale if all are.
    """
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
    _check_classes(train_dir, classes, train_items)
    if channels not in (None, 1, 3):
        raise UserError(f"dataset.channels={channels} is invalid; valid: null (infer), 1, 3")
    if channels is None:
        mode, inferred_size = _infer_mode(root, _first_images(classes, train_items))
    else:  # only the size is needed: the first image
        mode = "L" if channels == 1 else "RGB"
        _, inferred_size = _infer_mode(root, _first_images(classes, train_items)[:1])
    size = (int(image_size), int(image_size)) if image_size else inferred_size
    return Tree(root, classes, train_items, test_items, mode, size)


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
