"""scikit-learn's bundled 8x8 handwritten digits: the offline quick-start dataset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from kd_runner.data.tensors import Split
from kd_runner.errors import UserError, number

DIGITS_IMAGES = 1797  # always this many


def count_test_images(test_fraction, n: int = DIGITS_IMAGES) -> int:
    """How many of the ``n`` images go to the test split; a one-line error unless both splits get some."""
    frac = number(test_fraction, "dataset.test_fraction")
    if not 0.0 < frac < 1.0:
        raise UserError(f"dataset.test_fraction={test_fraction!r} is invalid; it must be in (0, 1), e.g. 0.2")
    n_test = int(round(n * frac))
    if not 0 < n_test < n:
        raise UserError(
            f"dataset.test_fraction={test_fraction!r} leaves {'no test' if n_test == 0 else 'no training'} images "
            f"of the {n}; both splits need at least one, e.g. 0.2"
        )
    return n_test


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 8, 8) float64 in 0..16, targets)``: scikit-learn's ``digits.csv.gz`` read as its
    ``load_digits`` reads it, without importing scikit-learn (1.4 s of every kd-train process on digits)."""
    spec = importlib.util.find_spec("sklearn")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(where[0]) / "datasets" / "data" / "digits.csv.gz" if where else None
    if path is None or not path.is_file():  # an unusual install: let scikit-learn find its own file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load(cfg) -> dict:
    """1,797 images, 16 grey levels, split by a fixed seed into train/test."""
    pixels, targets = bundled_digits()
    images = torch.from_numpy(pixels).float().mul(255.0 / 16.0).round().to(torch.uint8)
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(targets).long()
    n_test = count_test_images(cfg.get("test_fraction", 0.2), len(labels))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))
    return {
        "train": Split(images[perm[n_test:]], labels[perm[n_test:]]),
        "test": Split(images[perm[:n_test]], labels[perm[:n_test]]),
        "classes": [str(i) for i in range(10)],
        "source": "sklearn.datasets.load_digits",
    }
