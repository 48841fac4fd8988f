"""dataset=cifar100: torchvision's cifar-100-python pickles (tiny files in the real Python 2 pickle format) or
``cifar100/{train,test}/<fine label>/`` image folders, on both data paths."""

from __future__ import annotations

import hashlib
import pickle

import helpers
import numpy as np
import pytest
import torch
from helpers import CIFAR100_CLASSES, assert_ok, assert_user_error, run_many
from omegaconf import OmegaConf

from kd_runner.data import LOADERS, build_data, cache, cifar, streaming
from kd_runner.data.streaming import STREAM_LOADERS, estimate_decoded_bytes, load_stream
from kd_runner.errors import UserError

RECIPE_MEAN = [0.5071, 0.4867, 0.4408]
RECIPE_STD = [0.2675, 0.2565, 0.2761]


@pytest.fixture(scope="module")
def c100_root(tmp_path_factory):
    """KD_DATA_DIR holding cifar-100-python (60 train, 40 test), md5s not torchvision's."""
    root = tmp_path_factory.mktemp("cifar100_pickles")
    helpers.write_cifar100(root, n_train=60, n_test=40)
    return root


@pytest.fixture(scope="module")
def c100_tree(tmp_path_factory):
    """KD_DATA_DIR holding cifar100/{train,test}/<100 fine labels>/*.png (1 each)."""
    root = tmp_path_factory.mktemp("cifar100_tree")
    helpers.write_cifar100_tree(root / "cifar100")
    return root


@pytest.fixture
def no_decode_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "decode-cache")


def cfg(root, **kw):
    base = OmegaConf.load(helpers.CONF / "dataset" / "cifar100.yaml")
    base.root = str(root)
    base.decode_cache = False
    for k, v in kw.items():
        base[k] = v
    return base


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the helper writes the real format


def test_helper_writes_python2_pickles_with_byte_string_keys(tmp_path):
    helpers.write_cifar100(tmp_path, n_train=5, n_test=3)
    folder = tmp_path / "cifar-100-python"
    with (folder / "train").open("rb") as f:
        entry = pickle.load(f, encoding="bytes")  # as the CIFAR page's unpickle() reads it
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"} <= set(entry)
    assert entry[b"data"].shape == (5, 3072) and entry[b"data"].dtype == np.uint8
    with (folder / "meta").open("rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"fine_label_names"][:2] == [b"apple", b"aquarium_fish"] and len(meta[b"fine_label_names"]) == 100


def test_torchvision_reads_the_helper_files_as_we_do(c100_root, monkeypatch):
    """torchvision's CIFAR100 (md5 checks off) and dataset=cifar100 see the same pixels, labels and classes."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ours = cifar.load100(cfg(c100_root, verify_md5=False))
    for split, train in (("train", True), ("test", False)):
        tv = tv_cifar.CIFAR100(str(c100_root), train=train)
        assert np.array_equal(ours[split].images.numpy(), tv.data.transpose(0, 3, 1, 2))
        assert ours[split].labels.tolist() == list(tv.targets)
        assert ours["classes"] == tv.classes


# --------------------------------------------------------------------------- pickles


def test_pickles_load_pixel_exact_with_fine_labels(tmp_path):
    written = helpers.write_cifar100(tmp_path, n_train=30, n_test=20)
    out = cifar.load100(cfg(tmp_path, verify_md5=False))
    for split in ("train", "test"):
        images, labels = written[split]
        assert out[split].images.dtype == torch.uint8 and out[split].images.shape == (len(labels), 3, 32, 32)
        assert np.array_equal(out[split].images.numpy(), images)
        assert out[split].labels.tolist() == labels.tolist()  # fine labels, not the 20 coarse ones
    assert out["classes"] == CIFAR100_CLASSES
    assert "CIFAR-100" in out["source"] and "md5 not verified" in out["source"]


def test_md5_mismatch_is_a_user_error_naming_the_file(c100_root):
    with pytest.raises(UserError) as info:
        cifar.load100(cfg(c100_root, verify_md5=True))
    msg = str(info.value)
    assert "\n" not in msg
    assert "dataset=cifar100" in msg and "cifar-100-python/train" in msg and "md5" in msg
    assert "16019d7e3df5f24257cddd939b257f8d" in msg and "verify_md5=false" in msg  # torchvision's train md5


def test_md5s_are_torchvisions_and_cover_train_test_and_meta(c100_root, monkeypatch):
    """With torchvision's md5 table pointed at these files the check passes; one changed byte in any fails."""
    from torchvision.datasets import CIFAR100

    folder = c100_root / "cifar-100-python"
    assert CIFAR100.train_list == [["train", "16019d7e3df5f24257cddd939b257f8d"]]
    assert CIFAR100.test_list == [["test", "f0ef6b0ae62326f3e7ffdfab6717acfc"]]
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    out = cifar.load100(cfg(c100_root, verify_md5=True))
    assert "md5" not in out["source"] and len(out["train"]) == 60
    for name in ("test", "meta"):
        monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
        monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
        if name == "test":
            monkeypatch.setattr(CIFAR100, "test_list", [["test", "0" * 32]])
        else:
            monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": "0" * 32})
        with pytest.raises(UserError, match=f"cifar-100-python/{name}' fails torchvision's md5 check"):
            cifar.load100(cfg(c100_root, verify_md5=True))


def test_missing_data_names_both_layouts(tmp_path):
    with pytest.raises(UserError) as info:
        cifar.load100(cfg(tmp_path))
    msg = str(info.value)
    assert "cifar-100-python" in msg and f"{tmp_path / 'cifar100'}/{{train,test}}/<class>" in msg
    assert "download=false" in msg


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_file_that_is_not_a_pickle_is_a_user_error(tmp_path, name):
    helpers.write_cifar100(tmp_path, n_train=4, n_test=4)
    (tmp_path / "cifar-100-python" / name).write_text("not a pickle")
    with pytest.raises(UserError, match=f"cifar-100-python/{name}' is not a CIFAR"):
        cifar.load100(cfg(tmp_path, verify_md5=False))


def test_missing_meta_is_a_user_error(tmp_path):
    helpers.write_cifar100(tmp_path, n_train=4, n_test=4)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(UserError, match="missing meta file"):
        cifar.load100(cfg(tmp_path, verify_md5=False))


def test_meta_with_other_class_count_and_labels_out_of_range_are_user_errors(tmp_path):
    helpers.write_cifar100(tmp_path, n_train=4, n_test=4)
    meta = tmp_path / "cifar-100-python" / "meta"
    meta.write_bytes(helpers._py2_pickle({"fine_label_names": CIFAR100_CLASSES[:20]}))
    with pytest.raises(UserError, match="lists 20 classes, not CIFAR-100's 100"):
        cifar.load100(cfg(tmp_path, verify_md5=False))
    meta.write_bytes(helpers._py2_pickle({"fine_label_names": CIFAR100_CLASSES}))
    train = tmp_path / "cifar-100-python" / "train"
    images = np.zeros((2, 3072), dtype=np.uint8)
    train.write_bytes(helpers._py2_pickle({"data": images, "fine_labels": [0, 100], "coarse_labels": [0, 19]}))
    with pytest.raises(UserError, match=r"labels .* outside 0..99"):
        cifar.load100(cfg(tmp_path, verify_md5=False))


# --------------------------------------------------------------------------- image folders


def test_image_folders_load_as_cifar100(c100_tree, no_decode_cache):
    out = cifar.load100(cfg(c100_tree))
    assert out["classes"] == CIFAR100_CLASSES
    assert out["train"].images.shape == (100, 3, 32, 32) and out["test"].images.shape == (100, 3, 32, 32)
    assert sorted(out["train"].labels.tolist()) == list(range(100))
    assert "image folders" in out["source"]


def test_image_folders_with_other_classes_are_a_user_error(tmp_path):
    helpers.write_image_tree(tmp_path / "cifar100", ["cat", "dog"], {"train": 1, "test": 1}, 3, 32, 32)
    for load in (cifar.load100, lambda c: load_stream(c, 0)):
        with pytest.raises(UserError) as info:
            load(cfg(tmp_path))
        msg = str(info.value)
        assert "not CIFAR-100's 100 classes" in msg and "missing: apple" in msg and "unexpected: cat, dog" in msg


def test_cifar10_folders_are_not_taken_for_cifar100(tmp_path, cifar_jpeg_root):
    """A data dir with cifar10/ only: dataset=cifar100 says its data is missing, it never loads CIFAR-10."""
    with pytest.raises(UserError, match="dataset=cifar100: found neither"):
        cifar.load100(cfg(cifar_jpeg_root))


# --------------------------------------------------------------------------- both data paths


def test_registered_for_both_data_paths():
    assert LOADERS["cifar100"] is cifar.load100
    assert "cifar100" in STREAM_LOADERS and "cifar100" in streaming.STREAMABLE


@pytest.mark.parametrize("layout", ["pickles", "folders"])
def test_loader_path_yields_the_tensor_paths_batches(layout, c100_root, c100_tree, no_decode_cache):
    c = cfg(c100_root, verify_md5=False) if layout == "pickles" else cfg(c100_tree)
    tensor = cifar.load100(c)
    stream = load_stream(c, 0)
    assert stream["classes"] == tensor["classes"] == CIFAR100_CLASSES
    assert ("in memory" in stream["source"]) == (layout == "pickles")
    for split in ("train", "test"):
        s, t = stream[split], tensor[split]
        assert isinstance(s, streaming.StreamSplit) and s.sample_shape == (3, 32, 32)
        got = list(s.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3)))
        want = list(t.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3)))
        assert len(got) == len(want)
        for (gi, gx, gy), (wi, wx, wy) in zip(got, want, strict=True):
            assert torch.equal(gi, wi) and torch.equal(gx, wx) and torch.equal(gy, wy)


def test_errors_are_the_same_on_both_paths(tmp_path):
    for c in (cfg(tmp_path), cfg(tmp_path / "absent")):
        with pytest.raises(UserError) as tensor_err:
            cifar.load100(c)
        with pytest.raises(UserError) as stream_err:
            load_stream(c, 0)
        assert str(stream_err.value) == str(tensor_err.value)
    helpers.write_cifar100(tmp_path, n_train=4, n_test=4)
    with pytest.raises(UserError, match="md5"):
        load_stream(cfg(tmp_path), 0)


def test_decoded_size_estimate(tmp_path, c100_tree, no_decode_cache):
    assert estimate_decoded_bytes(cfg(tmp_path)) == 60000 * 3 * 32 * 32  # pickles (or nothing yet): the real size
    out = cifar.load100(cfg(c100_tree))
    assert estimate_decoded_bytes(cfg(c100_tree)) == out["train"].images.nbytes + out["test"].images.nbytes


@pytest.mark.parametrize("path", ["tensor", "loader"])
def test_build_data_uses_the_published_normalisation(path, c100_root):
    data = build_data(cfg(c100_root, verify_md5=False, val_fraction=0.1), data_path=path, num_workers=0)
    assert (data.name, data.path, data.num_classes, data.input_shape()) == ("cifar100", path, 100, (3, 32, 32))
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 40)
    assert data.mean == RECIPE_MEAN and data.std == RECIPE_STD


def test_dataset_yaml():
    c = OmegaConf.load(helpers.CONF / "dataset" / "cifar100.yaml")
    assert c.name == "cifar100" and c.verify_md5 is True and c.download is False
    assert list(c.mean) == RECIPE_MEAN and list(c.std) == RECIPE_STD


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, c100_root, c100_tree):
    small = ["dataset=cifar100", "teacher=light_nn", "student=light_nn", "trainer.batch_size=32",
             "trainer.eval_batch_size=64", "trainer.num_workers=0"]
    bases = {n: tmp_path_factory.mktemp(f"c100_{n}") for n in ("md5", "tensor", "loader", "folders")}
    return run_many({
        "md5": {"args": ["dataset=cifar100"], "tmp_path": bases["md5"], "env": {"KD_DATA_DIR": str(c100_root)}},
        "tensor": {"args": [*small, "dataset.verify_md5=false", "trainer.data_path=tensor"],
                   "tmp_path": bases["tensor"], "env": {"KD_DATA_DIR": str(c100_root)}},
        "loader": {"args": [*small, "dataset.verify_md5=false", "trainer.data_path=loader"],
                   "tmp_path": bases["loader"], "env": {"KD_DATA_DIR": str(c100_root)}},
        "folders": {"args": [*small, "trainer.data_path=loader"], "tmp_path": bases["folders"],
                    "env": {"KD_DATA_DIR": str(c100_tree)}},
    }, workers=2)


def test_cli_default_md5_check_fails_in_one_line(cli_runs, c100_root):
    proc, run_dir = cli_runs["md5"]
    line = assert_user_error(proc, run_dir, "dataset=cifar100", "cifar-100-python/train", "md5", "verify_md5=false")
    assert str(c100_root) in line


@pytest.mark.parametrize("name", ["tensor", "loader", "folders"])
def test_cli_runs_on_both_data_paths(cli_runs, name):
    proc, run_dir = cli_runs[name]
    rep = assert_ok(proc, run_dir)
    d = rep["dataset"]
    assert (d["name"], d["num_classes"], d["input_shape"]) == ("cifar100", 100, [3, 32, 32])
    assert (d["train"], d["test"]) == ((60, 40) if name != "folders" else (100, 100))
    assert d["mean"] == RECIPE_MEAN and d["std"] == RECIPE_STD
    assert ("md5 not verified" in d["source"]) == (name != "folders")
    assert rep["execution"]["data"]["path"] == ("tensor" if name == "tensor" else "loader")
    for role in ("teacher", "baseline", "student"):
        assert 0.0 <= rep["models"][role]["test_acc"] <= 100.0  # percent


def test_cli_tensor_and_loader_paths_train_the_same_models(cli_runs):
    reps = {n: assert_ok(*cli_runs[n]) for n in ("tensor", "loader")}
    for role in ("teacher", "baseline", "student"):
        assert reps["tensor"]["models"][role]["test_acc"] == reps["loader"]["models"][role]["test_acc"], role
