"""scikit-learn's bundled 8x8 handwritten digits: the offline quick-start dataset."""

from __future__ import annotations

import torch

from kd_runner.data.tensors import Split


def load(cfg) -> dict:
    """1,797 images, 16 grey levels, split by a fixed seed into train/test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().mul(255.0 / 16.0).round().to(torch.uint8)
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).long()
    n_test = int(round(len(labels) * float(cfg.get("test_fraction", 0.2))))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))
    return {
        "train": Split(images[perm[n_test:]], labels[perm[n_test:]]),
        "test": Split(images[perm[:n_test]], labels[perm[:n_test]]),
        "classes": [str(i) for i in range(10)],
        "source": "sklearn.datasets.load_digits",
    }
