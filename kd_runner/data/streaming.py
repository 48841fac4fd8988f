"""Streaming splits: images decoded per batch in DataLoader workers, for data too big to decode into memory.

The tensor path (:mod:`kd_runner.data.tensors`) decodes a dataset once into a uint8 ``Split``. This path
keeps only the file list and the labels in memory and decodes each batch when it is needed, with the same
decoder, so a :class:`StreamSplit` yields the same ``(idx, uint8 images, labels)`` batches as
``tensors.batches`` on the decoded ``Split``, for the same generator state and any worker count.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kd_runner.data import cifar, image_folder, mnist
from kd_runner.data.cache import source_fingerprint
from kd_runner.data.tensors import Split, batch_chunks, draw_order
from kd_runner.errors import UserError, choices

STREAMABLE = ("cifar10", "cifar100", "image_folder", "mnist")
DIGITS_BYTES = 1797 * 1 * 8 * 8  # scikit-learn's bundled digits: always this size
MNIST_BYTES = 70000 * 1 * 28 * 28
CIFAR10_BYTES = 60000 * 3 * 32 * 32
CIFAR100_BYTES = 60000 * 3 * 32 * 32  # 50,000 train + 10,000 test, as CIFAR-10
STATS_BATCH = 256


# --------------------------------------------------------------------------- item datasets


class ImageFiles(Dataset):
    """Files of an image tree, decoded per item by ``image_folder._decode`` (the tensor path's decoder).

    Paths are kept as one numpy array of bytes relative to ``root``, not a list of ``Path`` objects:
    forked workers that touch Python objects copy their memory pages (refcounts), which for a
    million-file list costs a copy of the list per worker; a numpy array is never touched that way.
    """

    def __init__(self, root: Path, items: list[tuple[Path, int]], mode: str, size: tuple[int, int]) -> None:
        self.root, self.mode, self.size = Path(root), mode, (int(size[0]), int(size[1]))
        self.paths = np.array([os.fsencode(self._relative(p)) for p, _ in items], dtype=np.bytes_)
        self.targets = torch.tensor([label for _, label in items], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def _relative(self, path: Path) -> str:
        """``path`` relative to ``root`` by string slicing (``Path.relative_to`` costs seconds per million)."""
        s, prefix = str(path), str(self.root).rstrip(os.sep) + os.sep
        return s[len(prefix):] if s.startswith(prefix) else str(path.relative_to(self.root))

    def _items(self, indices: list[int]) -> list[tuple[Path, int]]:
        return [(self.root / os.fsdecode(self.paths[i]), int(self.targets[i])) for i in indices]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        split = image_folder._decode(self._items([i]), self.mode, self.size)
        return split.images[0], int(split.labels[0])

    def read(self, indices: list[int]) -> Tensor:
        """uint8 (len(indices), C, H, W) in one allocation: the batch path, same decoder as an item."""
        return image_folder._decode(self._items(indices), self.mode, self.size).images

    def identity(self) -> dict:
        """What these items are without decoding them: files (path, label, size, mtime), mode and size."""
        items = self._items(range(len(self)))
        return {"kind": "image_files", "mode": self.mode, "size": list(self.size),
                **source_fingerprint(items, self.root)}


class TensorItems(Dataset):
    """A uint8 (N, C, H, W) array already in memory (torchvision's MNIST, CIFAR pickles) served per item.

    These readers load the whole file whatever we do, so streaming them saves no memory; wrapping them
    lets ``data_path=loader`` run every dataset through the same DataLoader code.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, images.shape
        self.images, self.targets = images, labels.long()

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])

    def read(self, indices: list[int]) -> Tensor:
        return self.images[torch.tensor(indices, dtype=torch.long)]

    def identity(self) -> dict:
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        return {"kind": "tensor", "shape": list(self.images.shape), "sha256": h.hexdigest()[:16]}


def _read(dataset: Dataset, indices: list[int]) -> Tensor:
    """A batch of uint8 images: the dataset's own batch reader when it has one, else its items stacked."""
    reader = getattr(dataset, "read", None)
    if callable(reader):
        return reader(indices)
    return torch.stack([dataset[i][0] for i in indices])


class _Positions(Dataset):
    """What the DataLoader sees: a split's positions mapped through its subset indices.

    ``__getitems__`` decodes a whole batch in the worker; a decoding ``UserError`` comes back as its
    message (a value), because an exception crossing the worker boundary is re-raised with the worker's
    traceback folded into its text, and the user should see the one-line message.
    """

    def __init__(self, dataset: Dataset, indices: Tensor | None) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else int(self.indices.numel())

    def base(self, positions: list[int]) -> list[int]:
        if self.indices is None:
            return list(positions)
        return self.indices[torch.tensor(positions, dtype=torch.long)].tolist()

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        return self.dataset[self.base([position])[0]]

    def __getitems__(self, positions: list[int]) -> tuple[Tensor | None, str | None]:
        try:
            return _read(self.dataset, self.base(positions)), None
        except UserError as err:
            return None, str(err)


def _as_is(batch):
    """collate_fn: ``__getitems__`` already returns the batch (module level so spawned workers can pickle it)."""
    return batch


class _Chunks(Sampler):
    """batch_sampler of a persistent DataLoader: yields the chunk list set for the current epoch.

    The DataLoader calls ``iter()`` on it in the main process at the start of every epoch, so setting
    ``chunks`` before ``iter(loader)`` gives that epoch's order to workers that stay alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


# --------------------------------------------------------------------------- the split


@dataclass(eq=False)
class StreamSplit:
    """A split decoded on demand: ``dataset`` items, this split's int64 ``labels`` (known without decoding),
    optional ``indices`` into ``dataset`` (a subset), and the DataLoader ``num_workers``.

    Offers what the engine uses from ``Split``: ``len``, ``labels``, ``subset``, ``sample_shape``, ``head``,
    ``batches``, ``to``, ``resident_bytes``, ``on_host``, ``where``.
    """

    dataset: Dataset
    labels: Tensor
    indices: Tensor | None = None
    num_workers: int = 0
    _loaders: dict = field(default_factory=dict, init=False, repr=False)
    _busy: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels).long()
        if self.indices is not None:
            self.indices = torch.as_tensor(self.indices).long()
        expected = len(self.dataset) if self.indices is None else int(self.indices.numel())
        assert self.labels.numel() == expected, (self.labels.numel(), expected)
        if int(self.num_workers) < 0:
            raise UserError(f"data loader num_workers={self.num_workers} is invalid; it must be >= 0")
        self.num_workers = int(self.num_workers)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getstate__(self) -> dict:
        """Pickles without its DataLoaders (worker processes and threads do not pickle)."""
        return {**self.__dict__, "_loaders": {}, "_busy": False}

    def with_labels(self, labels: Tensor) -> StreamSplit:
        """The same items under other labels (as ``Split.with_labels``)."""
        return StreamSplit(self.dataset, labels, self.indices, self.num_workers)

    def subset(self, idx: Tensor) -> StreamSplit:
        """The items at positions ``idx`` of this split (as ``Split.subset``), sharing the dataset."""
        idx = torch.as_tensor(idx)
        base = torch.arange(len(self.dataset)) if self.indices is None else self.indices
        return StreamSplit(self.dataset, self.labels[idx], base[idx], self.num_workers)

    def _positions(self) -> _Positions:
        return _Positions(self.dataset, self.indices)

    @cached_property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W), from decoding the first item (models are built before any batch is drawn)."""
        if len(self) == 0:
            raise UserError("dataset: a split is empty; there is no image to take the shape from")
        c, h, w = self._positions()[0][0].shape
        return int(c), int(h), int(w)

    def head(self, n: int) -> Tensor:
        """The first ``n`` images as uint8 (n, C, H, W), decoded in this process (for shape probes)."""
        n = min(int(n), len(self))
        if n == 0:
            return torch.empty((0, *self.sample_shape), dtype=torch.uint8)
        images, err = self._positions().__getitems__(list(range(n)))
        if err is not None:
            raise UserError(err)
        return images

    def identity(self) -> dict:
        """Content identity without decoding (the dataset's files or bytes, the subset, the labels)."""
        ident = getattr(self.dataset, "identity", None)
        h = torch.cat([self.labels, self.indices if self.indices is not None else torch.empty(0, dtype=torch.long)])
        return {"dataset": ident() if callable(ident) else type(self.dataset).__name__, "items": len(self),
                "subset_sha256": hashlib.sha256(h.numpy().tobytes()).hexdigest()[:16]}

    def close(self) -> None:
        """Stop this split's persistent workers now rather than when the split is garbage collected."""
        self._loaders.clear()

    # the batching surface of ``tensors.Split``: a streamed split is never staged whole on a device

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                pin: bool = False, shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return stream_batches(self, batch_size, shuffle=shuffle, generator=generator, pin=pin, shard=shard)

    resident_bytes = None  # not held in memory: nothing to stage
    on_host = True

    def to(self, device: torch.device) -> StreamSplit:
        return self

    def where(self) -> str:
        return f"streamed by {self.num_workers} DataLoader workers"


def _new_loader(split: StreamSplit, pin: bool, persistent: bool) -> tuple[DataLoader, _Chunks]:
    chunks = _Chunks()
    workers = split.num_workers
    loader = DataLoader(
        split._positions(), batch_sampler=chunks, num_workers=workers, collate_fn=_as_is,
        pin_memory=pin, persistent_workers=persistent and workers > 0,
        # the DataLoader draws a worker base seed from this on every new iterator; without its own
        # generator it would draw from the global RNG and shift dropout etc. away from the tensor path
        generator=torch.Generator().manual_seed(0),
    )
    return loader, chunks


def _load(split: StreamSplit, chunks: list[list[int]], pin: bool) -> Iterator[Tensor]:
    """uint8 images of each chunk of positions, in chunk order.

    Uses the split's persistent loader unless another pass over this split is still open (an unfinished
    generator); that pass would lose its batches if the shared workers were reset, so this one gets a
    loader of its own.
    """
    pin = pin and torch.cuda.is_available()
    shared = not split._busy
    if shared:
        if pin not in split._loaders:
            split._loaders[pin] = _new_loader(split, pin, persistent=True)
        loader, sampler = split._loaders[pin]
        split._busy = True
    else:
        loader, sampler = _new_loader(split, pin, persistent=False)
    sampler.chunks = chunks
    try:
        for images, err in loader:
            if err is not None:
                raise UserError(err)
            yield images
    finally:
        if shared:
            split._busy = False


def stream_batches(
    split: StreamSplit,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    pin: bool = False,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(indices, uint8 images, labels)`` exactly as ``tensors.batches`` does on the decoded split
    (``shard``: this rank's part of each batch; its workers decode only that).

    The order is drawn once, up front, in this process, from ``generator`` only, so the generator is left
    in the same state as by the tensor path (augmentation draws from it next). Workers only decode the
    chunks they are given, in order, so the batches do not depend on ``split.num_workers``. Labels come
    from ``split.labels``. ``pin`` returns page-locked images and labels (CUDA only, as in the tensor path).
    """
    pin = pin and torch.cuda.is_available()
    n = len(split)
    order = draw_order(n, shuffle=shuffle, generator=generator)
    idxs = batch_chunks(order, batch_size, shard)
    images = _load(split, [idx.tolist() for idx in idxs], pin)
    for idx, xb in zip(idxs, images, strict=True):
        yb = split.labels[idx]
        yield idx, xb, (yb.pin_memory() if pin else yb)


def stream_channel_stats(split: StreamSplit, max_items: int = 10000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units (as ``tensors.channel_stats``) over a seeded sample of items.

    Decoding every image of a large set just for normalisation would cost a full pass; ``max_items``
    images give the statistics to about 3 decimals. With ``max_items >= len(split)`` every image is used
    (same values as ``channel_stats`` on the decoded split, to its 6-decimal rounding). The sums are
    integer histograms, exact whatever the sample size.
    """
    n = len(split)
    if n == 0:
        raise UserError("dataset: cannot compute mean/std of an empty split; set dataset.mean and dataset.std")
    k = min(n, int(max_items))
    if k == n:
        positions = torch.arange(n)
    else:
        positions = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k].sort().values
    chunks = [positions[s : s + STATS_BATCH].tolist() for s in range(0, k, STATS_BATCH)]
    counts: Tensor | None = None
    for images in _load(split, chunks, pin=False):
        c = images.shape[1]
        if counts is None:
            counts = torch.zeros((c, 256), dtype=torch.long)
        for ch in range(c):
            counts[ch] += torch.bincount(images[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.long)
    pixels = counts.sum(1).double()
    mean = (counts * values).sum(1).double() / pixels / 255.0
    mean_sq = (counts * values * values).sum(1).double() / pixels / (255.0 * 255.0)
    std = (mean_sq - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


# --------------------------------------------------------------------------- builders


def _files(tree: image_folder.Tree, items: list[tuple[Path, int]], num_workers: int) -> StreamSplit:
    ds = ImageFiles(tree.root, items, tree.mode, tree.size)
    return StreamSplit(ds, ds.targets, None, num_workers)


def _wrap(split: Split, num_workers: int) -> StreamSplit:
    return StreamSplit(TensorItems(split.images, split.labels), split.labels, None, num_workers)


def stream_tree(root: Path, channels: int | None, image_size: int | None, num_workers: int) -> dict:
    """``image_folder.load_tree``'s result with streaming splits in place of decoded ones."""
    tree = image_folder.scan_tree(root, channels, image_size)
    return {"train": _files(tree, tree.train, num_workers), "test": _files(tree, tree.test, num_workers),
            "classes": tree.classes,
            "source": f"image folders at {root} (decoded per batch by {num_workers} loader workers)"}


def _load_image_folder(cfg, num_workers: int) -> dict:
    root = image_folder.checked_root(cfg)
    return stream_tree(root, cfg.get("channels"), cfg.get("image_size"), num_workers)


def _load_cifar(cfg, num_workers: int, spec: cifar.Spec) -> dict:
    folder = cifar.folder_root(cfg, spec)
    if folder is not None:
        out = stream_tree(folder, 3, 32, num_workers)
        cifar.check_classes(out["classes"], spec)
        return out
    out = cifar.load_spec(cfg, spec)  # the pickles: no folder here, so this reads (and checks) the batches
    return {**out, "train": _wrap(out["train"], num_workers), "test": _wrap(out["test"], num_workers),
            "source": f"{out['source']} (in memory, served by {num_workers} loader workers)"}


def _load_cifar10(cfg, num_workers: int) -> dict:
    return _load_cifar(cfg, num_workers, cifar.CIFAR10_SPEC)


def _load_cifar100(cfg, num_workers: int) -> dict:
    return _load_cifar(cfg, num_workers, cifar.CIFAR100_SPEC)


def _load_mnist(cfg, num_workers: int) -> dict:
    out = mnist.load(cfg)  # torchvision reads the whole IDX file into memory whatever we do
    return {**out, "train": _wrap(out["train"], num_workers), "test": _wrap(out["test"], num_workers),
            "source": f"{out['source']} (in memory, served by {num_workers} loader workers)"}


STREAM_LOADERS = {"cifar10": _load_cifar10, "cifar100": _load_cifar100, "image_folder": _load_image_folder,
                  "mnist": _load_mnist}


def load_stream(cfg, num_workers: int) -> dict:
    """``{"train", "test": StreamSplit, "classes", "source"}`` for ``cfg.name``, like the tensor loaders."""
    name = str(cfg.name)
    if name == "digits":
        raise UserError("dataset=digits is held in memory by scikit-learn; data_path=loader does not apply")
    if name not in STREAM_LOADERS:
        raise UserError(f"dataset.name={name!r} is unknown; valid: {choices([*STREAM_LOADERS, 'digits'])}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"data loader num_workers={num_workers!r} is invalid; it must be an integer >= 0")
    return STREAM_LOADERS[name](cfg, num_workers)


# --------------------------------------------------------------------------- size before decoding


def _idx_bytes(raw: Path) -> int | None:
    """Pixels in MNIST's two IDX image files, read from their 16-byte headers."""
    total = 0
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        try:
            with (raw / name).open("rb") as f:
                magic, n, h, w = struct.unpack(">iiii", f.read(16))
        except (OSError, struct.error):
            return None
        if magic != 2051:
            return None
        total += n * h * w
    return total


def _tree_bytes(root: Path, channels: int | None, image_size: int | None) -> int | None:
    try:
        tree = image_folder.scan_tree(root, channels, image_size)
    except UserError:
        return None  # the loader reports what is wrong
    return (len(tree.train) + len(tree.test)) * tree.channels * tree.size[0] * tree.size[1]


def estimate_decoded_bytes(cfg) -> int | None:
    """Bytes of the uint8 train + test image tensors the tensor path would decode, without decoding.

    Image trees: file count x C x H x W of the first image (or the configured channels/size), which is
    what the tensor path allocates. ``None`` when the data cannot be sized (missing or malformed); the
    loader then reports why. Lists every file of a tree (seconds for a million files), opens one.
    """
    name = str(cfg.get("name"))
    if name == "digits":
        return DIGITS_BYTES
    if name == "mnist":
        return _idx_bytes(Path(str(cfg.root)).expanduser() / "MNIST" / "raw") or MNIST_BYTES
    if name in ("cifar10", "cifar100"):
        spec = cifar.CIFAR10_SPEC if name == "cifar10" else cifar.CIFAR100_SPEC
        folder = cifar.folder_root(cfg, spec)
        return _tree_bytes(folder, 3, 32) if folder is not None else (
            CIFAR10_BYTES if name == "cifar10" else CIFAR100_BYTES)
    if name == "image_folder":
        root = cfg.get("root")
        if root in (None, "", "???") or not Path(str(root)).expanduser().is_dir():
            return None
        return _tree_bytes(Path(str(root)).expanduser(), cfg.get("channels"), cfg.get("image_size"))
    return None
