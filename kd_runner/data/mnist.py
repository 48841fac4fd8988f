"""MNIST through torchvision's reader (IDX files under ``<root>/MNIST/raw``)."""

from __future__ import annotations

from pathlib import Path

from kd_runner.data.download import offline_guard
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError


def load(cfg) -> dict:
    from torchvision.datasets import MNIST

    root = Path(cfg.root)
    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            with offline_guard("MNIST", root):
                ds = MNIST(str(root), train=train, download=bool(cfg.download))
        except RuntimeError as err:
            if "not found" in str(err).lower():
                raise UserError(
                    f"dataset=mnist: no MNIST IDX files under '{root / 'MNIST' / 'raw'}' and download=false; "
                    "point KD_DATA_DIR (or paths.data_dir) at the folder that holds MNIST/raw, "
                    "or set dataset.download=true (needs network)"
                ) from None
            raise UserError(f"dataset=mnist: cannot read '{root / 'MNIST' / 'raw'}': {err}") from None
        except (AssertionError, ValueError, OSError) as err:  # torchvision asserts on a non-IDX file
            raise UserError(
                f"dataset=mnist: the files in '{root / 'MNIST' / 'raw'}' are not uncompressed IDX files "
                f"({type(err).__name__}{': ' + str(err) if str(err) else ''}); gunzip them or re-download"
            ) from None
        splits[name] = Split(ds.data.unsqueeze(1).contiguous(), ds.targets)
    return {**splits, "classes": [str(i) for i in range(10)], "source": f"torchvision MNIST at {root}"}
