"""Fixtures: tiny datasets in real on-disk formats and CLI runs shared by several test modules.

Every CLI run is a subprocess (``python -m kd_runner.train``) with cwd, outputs, caches and data
inside pytest's tmp dirs, forced onto the CPU and toy-sized (see ``helpers.FAST``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's in-process tests (restored after): tiny batches gain nothing from
    more, and on a shared CPU idle worker threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cli():
    """``run_cli(args, tmp_path, env=None, run_dir=None)`` -> ``(proc, run_dir)``."""
    return helpers.run_cli


# --------------------------------------------------------------------------- datasets on disk


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """KD_DATA_DIR holding MNIST/raw with 64 train / 32 test IDX images."""
    root = tmp_path_factory.mktemp("mnist_data")
    helpers.write_mnist(root)
    return root


@pytest.fixture(scope="session")
def cifar_batches_root(tmp_path_factory) -> Path:
    """KD_DATA_DIR holding cifar-10-batches-py (5 x 10 train, 20 test), md5s not torchvision's."""
    root = tmp_path_factory.mktemp("cifar_batches")
    helpers.write_cifar_batches(root)
    return root


@pytest.fixture(scope="session")
def cifar_jpeg_root(tmp_path_factory) -> Path:
    """KD_DATA_DIR holding cifar10/{train,test}/<10 CIFAR classes>/*.jpg (3 train, 2 test per class)."""
    root = tmp_path_factory.mktemp("cifar_jpeg")
    helpers.write_image_tree(root / "cifar10", helpers.CIFAR_CLASSES, {"train": 3, "test": 2}, 3, 32, 32,
                             suffix=".jpg")
    return root


@pytest.fixture(scope="session")
def gray_tree(tmp_path_factory) -> Path:
    """image_folder root: 3 classes of 12x12 grayscale PNGs."""
    root = tmp_path_factory.mktemp("gray_tree")
    helpers.write_image_tree(root, ["circle", "square", "triangle"], {"train": 8, "test": 4}, 1, 12, 12)
    return root


@pytest.fixture(scope="session")
def rgb_tree(tmp_path_factory) -> Path:
    """image_folder root: 4 classes of RGB PNGs, 10 high x 14 wide (non-square on purpose)."""
    root = tmp_path_factory.mktemp("rgb_tree")
    helpers.write_image_tree(root, ["ant", "bee", "cat", "dog"], {"train": 6, "test": 3}, 3, 10, 14)
    return root


# --------------------------------------------------------------------------- shared CLI runs
# Runs read by several test modules. Each group runs its jobs side by side (helpers.run_many);
# the per-run fixtures below check success, so one failing run fails only the tests that read it.

KD_DIGITS_ARGS, HINT_DIGITS_ARGS = helpers.KD_DIGITS_ARGS, helpers.HINT_DIGITS_ARGS
SMALL_BATCHES = ["trainer.batch_size=16", "trainer.eval_batch_size=32"]


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory) -> dict:
    """One run per method on digits (the default dataset)."""
    jobs = {
        "kd": {"args": KD_DIGITS_ARGS},
        "hint": {"args": HINT_DIGITS_ARGS},
        "ce": {"args": ["method=ce", "trainer.student_epochs=2"]},
        # cosine with a 20% validation split: best-on-val numbers must appear
        "cosine": {"args": ["method=cosine", "dataset.val_fraction=0.2", "trainer.student_epochs=2"]},
    }
    for name, job in jobs.items():
        job["tmp_path"] = tmp_path_factory.mktemp(f"{name}_digits")
    return helpers.run_many(jobs)


def _ok(runs: dict, name: str):
    proc, run_dir = runs[name]
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def kd_digits_run(digits_runs):
    """digits, kd (T=3, 0.5/0.5), 1 teacher / 2 student epochs, teacher outputs cached: (proc, run_dir, report)."""
    return _ok(digits_runs, "kd")


@pytest.fixture(scope="session")
def hint_digits_run(digits_runs):
    """digits, hint (features -> features), 2 student epochs, teacher outputs cached."""
    return _ok(digits_runs, "hint")


@pytest.fixture(scope="session")
def ce_run(digits_runs):
    return _ok(digits_runs, "ce")


@pytest.fixture(scope="session")
def cosine_val_run(digits_runs):
    return _ok(digits_runs, "cosine")


@pytest.fixture(scope="session")
def experiment_runs(tmp_path_factory, cifar_batches_root, cifar_jpeg_root, mnist_root) -> dict:
    """Every experiment config on tiny data; cifar10_resnet50 offline (resnet18, no weights, 32 px)."""
    jobs = {
        # pickled batches; these tiny files cannot match torchvision's md5s
        "cifar10_tutorial": {"args": ["experiment=cifar10_tutorial", "dataset.verify_md5=false", *SMALL_BATCHES],
                             "env": {"KD_DATA_DIR": str(cifar_batches_root)}},
        # the cifar10/{train,test}/<class>/*.jpg tree
        "cifar10_resnet50": {"args": ["experiment=cifar10_resnet50", "teacher.weights=null", "teacher.name=resnet18",
                                      "student.resize=null",
                                      "teacher.resize=32", *SMALL_BATCHES],
                             "env": {"KD_DATA_DIR": str(cifar_jpeg_root)}},
        "mnist_hinton": {"args": ["experiment=mnist_hinton", *SMALL_BATCHES], "env": {"KD_DATA_DIR": str(mnist_root)}},
        "mnist_keras": {"args": ["experiment=mnist_keras", *SMALL_BATCHES], "env": {"KD_DATA_DIR": str(mnist_root)}},
    }
    for name, job in jobs.items():
        job["tmp_path"] = tmp_path_factory.mktemp(name)
    return helpers.run_many(jobs)


@pytest.fixture(scope="session")
def cifar_tutorial_run(experiment_runs):
    return _ok(experiment_runs, "cifar10_tutorial")


@pytest.fixture(scope="session")
def cifar_resnet_run(experiment_runs):
    return _ok(experiment_runs, "cifar10_resnet50")


@pytest.fixture(scope="session")
def mnist_hinton_run(experiment_runs):
    return _ok(experiment_runs, "mnist_hinton")


@pytest.fixture(scope="session")
def mnist_keras_run(experiment_runs):
    return _ok(experiment_runs, "mnist_keras")
