"""Any ``root/{train,test}/<class>/*`` tree: classes, channels and size inferred."""

from __future__ import annotations

from pathlib import Path

import torch

from kd_runner.data.cache import cached_decode, source_fingerprint
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _list(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        if not (split_dir / cls).is_dir():  # a split may lack a class (e.g. a small test set)
            continue
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((p, label) for p in files)
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


def load_tree(root: Path, channels: int | None, image_size: int | None, use_cache: bool = True) -> dict:
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
    mode = "L" if channels == 1 else "RGB"

    key = {"kind": "image_folder", "root": str(root.resolve()), "mode": mode, "size": size,
           "fingerprint": source_fingerprint(train_items + test_items, root), "classes": classes}

    def decode() -> dict:
        return {"train": _decode(train_items, mode, size), "test": _decode(test_items, mode, size)}

    data, hit = cached_decode(key, decode, enabled=use_cache)
    return {**data, "classes": classes,
            "source": f"image folders at {root} ({'decoded-tensor cache' if hit else 'decoded now'})"}


def load(cfg) -> dict:
    if cfg.get("root") in (None, "", "???"):
        raise UserError("dataset=image_folder needs dataset.root=<folder with train/ and test/>")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root='{root}' does not exist; give a folder with train/ and test/")
    return load_tree(root, cfg.get("channels"), cfg.get("image_size"), bool(cfg.get("decode_cache", True)))
