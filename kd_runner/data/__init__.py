"""Dataset builders: each returns uint8 tensors; splits and normalisation are shared."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from kd_runner.data import cifar, digits, image_folder, mnist
from kd_runner.data.streaming import estimate_decoded_bytes, load_stream, stream_channel_stats
from kd_runner.data.tensors import DataBundle, Split, carve_val, channel_stats
from kd_runner.errors import UserError, choices, number

LOADERS = {"digits": digits.load, "mnist": mnist.load, "cifar10": cifar.load, "cifar100": cifar.load100,
           "image_folder": image_folder.load}


DATA_PATHS = ("auto", "tensor", "loader")


def choose_path(cfg: DictConfig, requested: str, budget_bytes: int | None = None) -> str:
    """``auto``: the decode-once tensor path when the decoded images fit in half the machine's memory."""
    if requested not in DATA_PATHS:
        raise UserError(f"trainer.data_path={requested!r} is invalid; valid: {choices(DATA_PATHS)}")
    if requested != "auto":
        return requested
    if str(cfg.name) == "digits":
        return "tensor"
    size = estimate_decoded_bytes(cfg)
    budget = budget_bytes if budget_bytes is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return "tensor" if size is None or size <= budget else "loader"


def take_subset(split: Split, size, seed: int, key: str) -> Split:
    """A seeded random subset of ``size`` items (quick runs on a slice of a big dataset); all when ``size`` is null."""
    if size is None:
        return split
    n = number(size, key, int)
    if not 1 <= n <= len(split):
        raise UserError(f"{key}={size!r} is invalid; it must be between 1 and the split's {len(split)} images, or null")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))
    return split.subset(order[:n].sort().values)


def build_data(cfg: DictConfig, data_path: str = "tensor", num_workers: int = 2) -> DataBundle:
    """Load the configured dataset, carve a val split seeded by ``split_seed``, settle normalisation."""
    name = str(cfg.name)
    if name not in LOADERS:
        raise UserError(f"dataset.name={name!r} is unknown; valid: {choices(LOADERS)}")
    path = choose_path(cfg, data_path)
    out = load_stream(cfg, num_workers) if path == "loader" else LOADERS[name](cfg)
    train, val = carve_val(out["train"], float(cfg.get("val_fraction") or 0.0), int(cfg.get("split_seed", 0)))
    train = take_subset(train, cfg.get("train_subset"), int(cfg.get("split_seed", 0)), "dataset.train_subset")
    test = take_subset(out["test"], cfg.get("test_subset"), int(cfg.get("split_seed", 0)), "dataset.test_subset")
    channels = train.sample_shape[0]
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:  # no published stats: use this train split's
        mean, std = channel_stats(train.images) if isinstance(train, Split) else stream_channel_stats(train)
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {channels} channel(s)"
        )
    return DataBundle(name=name, train=train, test=test, val=val, classes=list(out["classes"]),
                      mean=mean, std=std, source=out["source"], path=path)
