"""Dataset builders: each returns uint8 tensors; splits and normalisation are shared."""

from __future__ import annotations

from omegaconf import DictConfig

from kd_runner.data import cifar, digits, image_folder, mnist
from kd_runner.data.tensors import DataBundle, carve_val, channel_stats
from kd_runner.errors import UserError, choices

LOADERS = {"digits": digits.load, "mnist": mnist.load, "cifar10": cifar.load, "image_folder": image_folder.load}


def build_data(cfg: DictConfig) -> DataBundle:
    """Load the configured dataset, carve a val split seeded by ``split_seed``, settle normalisation."""
    name = str(cfg.name)
    if name not in LOADERS:
        raise UserError(f"dataset.name={name!r} is unknown; valid: {choices(LOADERS)}")
    out = LOADERS[name](cfg)
    train, val = carve_val(out["train"], float(cfg.get("val_fraction") or 0.0), int(cfg.get("split_seed", 0)))
    channels = int(train.images.shape[1])
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        mean, std = channel_stats(train.images)  # no published stats: use this train split's
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {channels} channel(s)"
        )
    return DataBundle(name=name, train=train, test=out["test"], val=val, classes=list(out["classes"]),
                      mean=mean, std=std, source=out["source"])
