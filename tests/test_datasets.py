"""Dataset loaders on tiny files in the real on-disk formats: MNIST IDX, CIFAR pickles, image folders."""

from __future__ import annotations

import gzip
import shutil

import helpers
import numpy as np
import pytest
import torch
from helpers import CIFAR_CLASSES, assert_ok, assert_user_error, run_many
from omegaconf import OmegaConf

from kd_runner.data import build_data, cache, cifar, image_folder, mnist
from kd_runner.errors import UserError


@pytest.fixture
def no_decode_cache(tmp_path, monkeypatch):
    """Point the decoded-tensor cache at this test's tmp dir (in-process loads)."""
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "decode-cache")
    return tmp_path / "decode-cache"


def folder_cfg(root, **kw):
    cfg = {"name": "image_folder", "root": str(root), "channels": None, "image_size": None, "decode_cache": False,
           "mean": None, "std": None, "val_fraction": 0.0}
    cfg.update(kw)
    return OmegaConf.create(cfg)


# --------------------------------------------------------------------------- MNIST (IDX files)


def test_mnist_idx_files_load_pixel_exact(tmp_path):
    written = helpers.write_mnist(tmp_path)
    out = mnist.load(OmegaConf.create({"root": str(tmp_path), "download": False}))
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = written[prefix]
        assert out[split].images.shape == (len(labels), 1, 28, 28)
        assert out[split].images.dtype == torch.uint8
        assert np.array_equal(out[split].images.numpy(), images)
        assert np.array_equal(out[split].labels.numpy(), labels)
    assert out["classes"] == [str(i) for i in range(10)]


def test_mnist_through_build_data_uses_published_normalisation(mnist_root):
    cfg = OmegaConf.load(helpers.CONF / "dataset" / "mnist.yaml")
    cfg.root = str(mnist_root)
    data = build_data(cfg)
    assert (len(data.train), len(data.test), data.num_classes) == (64, 32, 10)
    assert data.input_shape() == (1, 28, 28)
    assert data.mean == [0.1307] and data.std == [0.3081]


def test_mnist_missing_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="MNIST"):
        mnist.load(OmegaConf.create({"root": str(tmp_path), "download": False}))


def test_mnist_gzipped_file_under_the_raw_name_is_a_user_error(tmp_path):
    """A still-gzipped (or otherwise non-IDX) file must give a one-line error, not an AssertionError traceback."""
    helpers.write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(gzip.compress(raw.read_bytes()))
    with pytest.raises(UserError, match="train-images-idx3-ubyte|MNIST"):
        mnist.load(OmegaConf.create({"root": str(tmp_path), "download": False}))


# --------------------------------------------------------------------------- CIFAR-10 (pickles)


def test_cifar_pickles_load_pixel_exact_without_md5(tmp_path):
    written = helpers.write_cifar_batches(tmp_path, per_batch=4, n_test=6)
    out = cifar.load(OmegaConf.create({"root": str(tmp_path), "download": False, "verify_md5": False}))
    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert out["train"].images.shape == (20, 3, 32, 32)
    assert np.array_equal(out["train"].images.numpy(), train_images)  # (N, 3072) rows are R, G, B planes
    assert np.array_equal(out["train"].labels.numpy(), train_labels)
    assert np.array_equal(out["test"].images.numpy(), written["test_batch"][0])
    assert out["classes"] == CIFAR_CLASSES
    assert "md5 not verified" in out["source"]


def test_cifar_md5_mismatch_is_a_user_error_naming_the_file(cifar_batches_root):
    with pytest.raises(UserError) as info:
        cifar.load(OmegaConf.create({"root": str(cifar_batches_root), "download": False, "verify_md5": True}))
    assert "data_batch_1" in str(info.value) and "md5" in str(info.value)


def test_cli_cifar_default_verify_md5_fails_in_one_line(dataset_runs, cifar_batches_root):
    proc, run_dir = dataset_runs["md5"]
    line = assert_user_error(proc, run_dir, "data_batch_1", "md5", "verify_md5=false")
    assert str(cifar_batches_root) in line


def test_cli_cifar_without_md5_check_says_so_in_report(cifar_tutorial_run, cifar_batches_root):
    _, _, rep = cifar_tutorial_run
    d = rep["dataset"]
    assert d["name"] == "cifar10"
    assert "md5 not verified" in d["source"] and str(cifar_batches_root) in d["source"]
    assert (d["train"], d["test"], d["num_classes"], d["input_shape"]) == (50, 20, 10, [3, 32, 32])
    assert d["mean"] == [0.485, 0.456, 0.406] and d["std"] == [0.229, 0.224, 0.225]


def test_cifar_batch_that_is_not_a_pickle_is_a_user_error(tmp_path):
    helpers.write_cifar_batches(tmp_path, per_batch=2, n_test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_text("not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        cifar.load(OmegaConf.create({"root": str(tmp_path), "download": False, "verify_md5": False}))


# --------------------------------------------------------------------------- CIFAR-10 (JPEG folders)


def test_cifar_jpeg_tree_loads_as_cifar10(cifar_jpeg_root, no_decode_cache):
    out = cifar.load(OmegaConf.create({"root": str(cifar_jpeg_root), "download": False, "verify_md5": True,
                                       "decode_cache": False}))
    assert out["classes"] == CIFAR_CLASSES
    assert out["train"].images.shape == (30, 3, 32, 32) and out["test"].images.shape == (20, 3, 32, 32)
    # files are written class by class in label order: label i*3..i*3+2 == i
    assert out["train"].labels.tolist() == [i // 3 for i in range(30)]


def test_cifar_jpeg_tree_with_other_classes_is_a_user_error(tmp_path):
    helpers.write_image_tree(tmp_path / "cifar10", ["cats", "dogs"], {"train": 1, "test": 1}, 3, 32, 32, ".jpg")
    with pytest.raises(UserError, match="not CIFAR-10's"):
        cifar.load(OmegaConf.create({"root": str(tmp_path), "download": False, "decode_cache": False}))


def test_cli_cifar_jpeg_tree_in_report(cifar_resnet_run, cifar_jpeg_root):
    _, _, rep = cifar_resnet_run
    d = rep["dataset"]
    assert d["name"] == "cifar10" and "image folders" in d["source"]
    assert (d["train"], d["test"], d["num_classes"], d["input_shape"]) == (30, 20, 10, [3, 32, 32])


# --------------------------------------------------------------------------- image_folder


def test_image_folder_grayscale_png_pixel_exact(tmp_path):
    written = helpers.write_image_tree(tmp_path, ["b_class", "a_class"], {"train": 2, "test": 1}, 1, 12, 12)
    out = image_folder.load(folder_cfg(tmp_path))
    assert out["classes"] == ["a_class", "b_class"]  # sorted folder names
    imgs, labels = written["train"]
    # folder a_class holds the images written with label 1, b_class those with label 0
    order = [i for i in range(len(labels)) if labels[i] == 1] + [i for i in range(len(labels)) if labels[i] == 0]
    assert out["train"].images.shape == (4, 1, 12, 12)
    assert np.array_equal(out["train"].images.numpy(), imgs[order])
    assert out["train"].labels.tolist() == [0, 0, 1, 1]


def test_image_folder_rgb_non_square_keeps_height_and_width(rgb_tree):
    out = image_folder.load(folder_cfg(rgb_tree))
    assert out["classes"] == ["ant", "bee", "cat", "dog"]
    assert out["train"].images.shape == (24, 3, 10, 14)
    assert out["test"].images.shape == (12, 3, 10, 14)


def test_image_folder_channels_and_size_overrides(gray_tree):
    out = image_folder.load(folder_cfg(gray_tree, channels=3, image_size=16))
    assert out["train"].images.shape == (24, 3, 16, 16)


def test_image_folder_decode_cache_round_trip(gray_tree, no_decode_cache):
    first = image_folder.load(folder_cfg(gray_tree, decode_cache=True))
    assert "decoded now" in first["source"]
    assert list(no_decode_cache.glob("datasets/image_folder-*.pt"))
    second = image_folder.load(folder_cfg(gray_tree, decode_cache=True))
    assert "decoded-tensor cache" in second["source"]
    assert torch.equal(first["train"].images, second["train"].images)
    assert torch.equal(first["test"].labels, second["test"].labels)


def test_image_folder_test_split_missing_a_class_is_not_a_crash(tmp_path):
    """A class with no test folder must load (zero test images of it) or fail in one line, never crash."""
    helpers.write_image_tree(tmp_path, ["a", "b", "c"], {"train": 2, "test": 1}, 1, 8, 8)
    shutil.rmtree(tmp_path / "test" / "c")
    try:
        out = image_folder.load(folder_cfg(tmp_path))
    except UserError:
        return
    assert out["classes"] == ["a", "b", "c"] and len(out["test"]) == 2


def test_image_folder_corrupt_first_image_is_a_user_error(tmp_path):
    """The first training image is opened to infer channels/size: a corrupt one must be a one-line error too."""
    helpers.write_image_tree(tmp_path, ["a", "b"], {"train": 2, "test": 1}, 1, 8, 8)
    first = sorted((tmp_path / "train" / "a").iterdir())[0]
    first.write_bytes(b"")
    with pytest.raises(UserError, match=first.name):
        image_folder.load(folder_cfg(tmp_path))


def test_image_folder_corrupt_later_image_is_a_user_error(tmp_path):
    helpers.write_image_tree(tmp_path, ["a", "b"], {"train": 2, "test": 1}, 1, 8, 8)
    bad = sorted((tmp_path / "train" / "b").iterdir())[-1]
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match=bad.name):
        image_folder.load(folder_cfg(tmp_path))


@pytest.fixture(scope="module")
def dataset_runs(tmp_path_factory, gray_tree, rgb_tree, cifar_batches_root) -> dict:
    bases = {n: tmp_path_factory.mktemp(n) for n in ("gray", "rgb", "md5")}
    return run_many({
        # the decoded cache must go where paths.cache_dir says (KD_CACHE_DIR is set too)
        "gray": {"args": ["dataset=image_folder", f"dataset.root={gray_tree}", "method=ce",
                          f"paths.cache_dir={bases['gray'] / 'configured-cache'}"], "tmp_path": bases["gray"]},
        "rgb": {"args": ["dataset=image_folder", f"dataset.root={rgb_tree}", "method=ce"], "tmp_path": bases["rgb"]},
        # default dataset.verify_md5=true on the tiny pickles
        "md5": {"args": ["experiment=cifar10_tutorial"], "tmp_path": bases["md5"],
                "env": {"KD_DATA_DIR": str(cifar_batches_root)}},
    })


@pytest.fixture(scope="module")
def gray_run(dataset_runs):
    proc, run_dir = dataset_runs["gray"]
    return run_dir.parent, run_dir, assert_ok(proc, run_dir)


@pytest.fixture(scope="module")
def rgb_run(dataset_runs):
    proc, run_dir = dataset_runs["rgb"]
    return run_dir.parent, run_dir, assert_ok(proc, run_dir)


def test_cli_image_folder_grayscale_inferred(gray_run, gray_tree):
    _, _, rep = gray_run
    d = rep["dataset"]
    assert (d["name"], d["num_classes"], d["input_shape"], d["train"], d["test"]) == (
        "image_folder", 3, [1, 12, 12], 24, 12)
    assert str(gray_tree) in d["source"]
    assert len(d["mean"]) == 1 and len(d["std"]) == 1  # per-channel stats of the train split


def test_cli_image_folder_rgb_inferred(rgb_run):
    _, _, rep = rgb_run
    d = rep["dataset"]
    assert (d["num_classes"], d["input_shape"], d["train"], d["test"]) == (4, [3, 10, 14], 24, 12)
    assert len(d["mean"]) == 3
    assert 0.0 <= rep["models"]["student"]["test_acc"] <= 100.0


def test_cli_decoded_cache_goes_to_configured_cache_dir(gray_run):
    base, _, _ = gray_run
    assert list((base / "configured-cache").glob("datasets/image_folder-*.pt"))
    assert not list((base / "cache").glob("datasets/*.pt"))  # KD_CACHE_DIR lost to paths.cache_dir
    assert not (base / "outputs" / ".cache").exists()


def test_digits_read_without_scikit_learn_are_load_digits():
    """dataset=digits reads scikit-learn's bundled file itself (no 1.4 s sklearn import): the same arrays."""
    from sklearn.datasets import load_digits

    from kd_runner.data.digits import bundled_digits

    images, targets = bundled_digits()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(targets, ref.target)
