"""In-memory uint8 image tensors: decode once, normalise batched on the training device."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])

    def with_labels(self, labels: torch.Tensor) -> Split:
        """The same images under other labels (e.g. ``IGNORE`` for the unlabelled ones)."""
        return Split(self.images, labels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what models are built for."""
        return tuple(int(v) for v in self.images.shape[1:])

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images (shape probes); a view, no copy."""
        return self.images[:n]

    # the batching surface the engine uses; ``streaming.StreamSplit`` offers the same one

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                pin: bool = False, shard: tuple[int, int] | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return batches(self, batch_size, shuffle=shuffle, generator=generator, pin=pin, shard=shard)

    @property
    def resident_bytes(self) -> int:
        """Bytes the whole split takes in memory (what staging it on a GPU would cost)."""
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    @property
    def on_host(self) -> bool:
        return self.images.device.type == "cpu"

    def where(self) -> str:
        return "host" if self.on_host else "device"


@dataclass
class DataBundle:
    """Everything a run needs to know about its data."""

    name: str
    train: Split  # or a streaming split (data.streaming.StreamSplit) with the same surface
    test: Split
    val: Split | None
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str
    path: str = "tensor"  # tensor: decoded once, in memory | loader: decoded per batch by DataLoader workers
    extra: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.train.sample_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.sample_shape[1], self.train.sample_shape[2]

    def close(self) -> None:
        """Stop streaming splits' loader workers (tensor splits hold none)."""
        for split in (self.train, self.val, self.test):
            if hasattr(split, "close"):
                split.close()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    @cached_property
    def fingerprint(self) -> dict:
        """Identity of what a model trains on: split sizes and a hash of the training tensors (hashed once).

        A streaming split is identified by its files (path, label, size, mtime) instead: hashing its
        pixels would cost a full decode. The two paths therefore store teachers under different keys.
        """
        if not isinstance(self.train, Split):
            return {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,
                    "train_identity": self.train.identity(), "mean": self.mean, "std": self.std}
        h = hashlib.sha256()
        h.update(self.train.images.contiguous().numpy().tobytes())
        h.update(self.train.labels.contiguous().numpy().tobytes())
        return {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,
                "train_sha256": h.hexdigest()[:16], "mean": self.mean, "std": self.std}


class Normalizer:
    """uint8 batch -> float, (x/255 - mean) / std, on whatever device the batch is on."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float().div_(255.0) - self.mean) / self.std


def draw_order(n: int, *, shuffle: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The epoch's sample order, drawn on the CPU from ``generator`` only (both data paths use it,
    so a streamed split and its decoded twin give the same batches and leave the generator alike)."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def global_batch_sizes(n: int, batch_size: int, world: int = 1) -> list[int]:
    """Sizes of the global batches an epoch over ``n`` images makes. Split over ``world`` ranks, a last batch too
    small to give every rank two images (BatchNorm needs two) is dropped: at most ``2 * world - 1`` images an
    epoch."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if world > 1 and sizes and sizes[-1] < 2 * world:
        sizes.pop()
    return sizes


def batch_chunks(order: torch.Tensor, batch_size: int, shard: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """The epoch's batches of sample indices; with ``shard=(rank, world)`` this rank's contiguous part of each global
    batch (``distributed.shard_bounds``), so the ranks together see exactly the batches one process would."""
    from kd_runner.distributed import shard_bounds

    world = shard[1] if shard is not None else 1
    chunks = [order[start : start + size] for start, size in
              zip(range(0, len(order), batch_size), global_batch_sizes(len(order), batch_size, world), strict=False)]
    if world == 1:
        return chunks
    return [c[slice(*shard_bounds(len(c), shard[0], world))] for c in chunks]


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    pin: bool = False,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, uint8 images, labels)``; the order comes from ``generator`` only (``shard``: this
    rank's part of each batch, see ``batch_chunks``).

    The order is drawn on the CPU whatever the split's device, so a GPU-resident split gives
    the same batches as a host one. ``pin`` gathers host batches into page-locked memory so the
    copy to the GPU can overlap compute (the caching host allocator keeps each buffer until its
    copy has finished).
    """
    n = len(split)
    order = draw_order(n, shuffle=shuffle, generator=generator).to(split.images.device)
    for idx in batch_chunks(order, batch_size, shard):
        if pin:
            images = torch.empty((len(idx), *split.images.shape[1:]), dtype=split.images.dtype, pin_memory=True)
            torch.index_select(split.images, 0, idx, out=images)
            yield idx, images, split.labels[idx].pin_memory()
        else:
            yield idx, split.images[idx], split.labels[idx]


def carve_val(train: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Seeded split of the training set into train/val for model selection."""
    if fraction <= 0:
        return train, None
    n = len(train)
    n_val = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val])


def stratified_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded, class-balanced ``fraction`` of a split (at least one image per class present):
    the labelled subset a student trains on in a scarce-label setting."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        n = max(1, int(round(len(members) * fraction)))
        keep.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.cat(keep).sort().values


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units, computed in chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], 4096):
        x = images[start : start + 4096].double().div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
