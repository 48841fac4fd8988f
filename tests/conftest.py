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

KD_DIGITS_ARGS = ["method=kd", "method.T=3.0", "method.soft_weight=0.5", "method.ce_weight=0.5",
                  "trainer.teacher_epochs=2", "trainer.student_epochs=2", "trainer.teacher_outputs=cache"]
HINT_DIGITS_ARGS = ["method=hint", "trainer.student_epochs=2", "trainer.teacher_outputs=cache"]


@pytest.fixture(scope="session")
def kd_digits_run(tmp_path_factory):
    """digits (default dataset), kd, 2 epochs, teacher outputs cached: ``(proc, run_dir, report)``."""
    base = tmp_path_factory.mktemp("kd_digits")
    proc, run_dir = helpers.run_cli(KD_DIGITS_ARGS, base)
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def hint_digits_run(tmp_path_factory):
    """digits, hint (features -> features), 2 student epochs, teacher outputs cached."""
    base = tmp_path_factory.mktemp("hint_digits")
    proc, run_dir = helpers.run_cli(HINT_DIGITS_ARGS, base)
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def cifar_tutorial_run(tmp_path_factory, cifar_batches_root):
    """experiment=cifar10_tutorial on the tiny pickled batches with dataset.verify_md5=false."""
    base = tmp_path_factory.mktemp("cifar_tutorial")
    proc, run_dir = helpers.run_cli(
        ["experiment=cifar10_tutorial", "dataset.verify_md5=false", "trainer.batch_size=16",
         "trainer.eval_batch_size=32"],
        base, env={"KD_DATA_DIR": str(cifar_batches_root)})
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def cifar_resnet_run(tmp_path_factory, cifar_jpeg_root):
    """experiment=cifar10_resnet50 offline (resnet18, no weights, 32px) on the cifar10 JPEG tree."""
    base = tmp_path_factory.mktemp("cifar_resnet")
    proc, run_dir = helpers.run_cli(
        ["experiment=cifar10_resnet50", "teacher.weights=null", "teacher.name=resnet18", "teacher.resize=32",
         "trainer.batch_size=16", "trainer.eval_batch_size=32"],
        base, env={"KD_DATA_DIR": str(cifar_jpeg_root)})
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def mnist_hinton_run(tmp_path_factory, mnist_root):
    base = tmp_path_factory.mktemp("mnist_hinton")
    proc, run_dir = helpers.run_cli(["experiment=mnist_hinton", "trainer.batch_size=16",
                                     "trainer.eval_batch_size=32"],
                                    base, env={"KD_DATA_DIR": str(mnist_root)})
    return proc, run_dir, helpers.assert_ok(proc, run_dir)


@pytest.fixture(scope="session")
def mnist_keras_run(tmp_path_factory, mnist_root):
    base = tmp_path_factory.mktemp("mnist_keras")
    proc, run_dir = helpers.run_cli(["experiment=mnist_keras", "trainer.batch_size=16",
                                     "trainer.eval_batch_size=32"],
                                    base, env={"KD_DATA_DIR": str(mnist_root)})
    return proc, run_dir, helpers.assert_ok(proc, run_dir)
