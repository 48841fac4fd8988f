"""The streaming path against the tensor path on tiny real-format data: same pixels, labels, batches, errors."""

from __future__ import annotations

import pickle

import helpers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kd_runner.data import cifar, digits, image_folder, mnist, streaming
from kd_runner.data.streaming import StreamSplit, estimate_decoded_bytes, load_stream, stream_batches
from kd_runner.data.tensors import batches, carve_val, channel_stats
from kd_runner.errors import UserError

WORKERS = [0, 2]


def folder_cfg(root, **kw):
    return OmegaConf.create({"name": "image_folder", "root": str(root), "channels": None, "image_size": None,
                             "decode_cache": False, **kw})


def cfg_for(kind: str, roots: dict):
    """(config, tensor-path loader) for each data layout under test."""
    if kind == "gray_png":
        return folder_cfg(roots["gray_tree"]), image_folder.load
    if kind == "rgb_png_resized_to_gray":  # convert("L") and a BILINEAR resize of a non-square image
        return folder_cfg(roots["rgb_tree"], channels=1, image_size=8), image_folder.load
    if kind == "jpeg_folder":
        return folder_cfg(roots["cifar_jpeg_root"] / "cifar10"), image_folder.load
    if kind == "cifar10_jpeg":
        return OmegaConf.create({"name": "cifar10", "root": str(roots["cifar_jpeg_root"]), "download": False,
                                 "decode_cache": False}), cifar.load
    if kind == "cifar10_pickles":
        return OmegaConf.create({"name": "cifar10", "root": str(roots["cifar_batches_root"]), "download": False,
                                 "verify_md5": False}), cifar.load
    if kind == "mnist":
        return OmegaConf.create({"name": "mnist", "root": str(roots["mnist_root"]), "download": False}), mnist.load
    raise AssertionError(kind)


KINDS = ["gray_png", "rgb_png_resized_to_gray", "jpeg_folder", "cifar10_jpeg", "cifar10_pickles", "mnist"]


@pytest.fixture(scope="module")
def roots(gray_tree, rgb_tree, cifar_jpeg_root, cifar_batches_root, mnist_root) -> dict:
    return {"gray_tree": gray_tree, "rgb_tree": rgb_tree, "cifar_jpeg_root": cifar_jpeg_root,
            "cifar_batches_root": cifar_batches_root, "mnist_root": mnist_root}


@pytest.fixture(scope="module")
def decoded(roots) -> dict:
    """The tensor path's result per layout, decoded once for the module."""
    out = {}
    for kind in KINDS:
        cfg, load = cfg_for(kind, roots)
        out[kind] = load(cfg)
    return out


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (ia, xa, ya), (ib, xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib)
        assert xb.dtype == torch.uint8 and torch.equal(xa, xb)
        assert yb.dtype == torch.long and torch.equal(ya, yb)


def epochs_match(split, stream: StreamSplit, batch_size: int, seed: int = 3, epochs: int = 2) -> None:
    """``epochs`` shuffled passes and one ordered pass give the tensor path's batches and generator states."""
    g_tensor, g_stream = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        assert_same_batches(list(batches(split, batch_size, shuffle=True, generator=g_tensor)),
                            list(stream_batches(stream, batch_size, shuffle=True, generator=g_stream)))
        assert torch.equal(g_tensor.get_state(), g_stream.get_state())
    assert_same_batches(list(batches(split, batch_size, shuffle=False)),
                        list(stream_batches(stream, batch_size, shuffle=False)))


# --------------------------------------------------------------------------- (a) same labels and pixels


@pytest.mark.parametrize("kind", KINDS)
def test_labels_classes_and_pixels_match_the_tensor_path(kind, roots, decoded):
    cfg, _ = cfg_for(kind, roots)
    stream, tensor = load_stream(cfg, 0), decoded[kind]
    assert stream["classes"] == tensor["classes"]
    for name in ("train", "test"):
        s, t = stream[name], tensor[name]
        assert isinstance(s, StreamSplit) and len(s) == len(t)
        assert s.labels.dtype == torch.long and torch.equal(s.labels, t.labels)
        assert s.sample_shape == tuple(t.images.shape[1:])
        assert torch.equal(s.head(2), t.images[:2])
        assert torch.equal(s.head(len(s) + 5), t.images)  # every image, bit for bit
        image, label = s.dataset[len(s) - 1]  # the item contract: (uint8 (C, H, W), int)
        assert image.dtype == torch.uint8 and torch.equal(image, t.images[-1]) and label == int(t.labels[-1])


# --------------------------------------------------------------------------- (b) same batches, same generator use


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_batches_and_generator_state_match_the_tensor_path(kind, workers, roots, decoded):
    cfg, _ = cfg_for(kind, roots)
    stream = load_stream(cfg, workers)
    rng = torch.get_rng_state()
    epochs_match(decoded[kind]["train"], stream["train"], batch_size=7)
    epochs_match(decoded[kind]["test"], stream["test"], batch_size=64, epochs=1)  # one batch > split
    assert torch.equal(rng, torch.get_rng_state())  # the loader leaves the global RNG (dropout's) alone


def test_persistent_loader_is_reused_and_an_overlapping_pass_gets_its_own(roots, decoded):
    cfg, _ = cfg_for("gray_png", roots)
    split, stream = decoded["gray_png"]["train"], load_stream(cfg, 2)["train"]
    epochs_match(split, stream, batch_size=5)
    loader = stream._loaders[False][0]
    workers = [w.pid for w in loader._iterator._workers]
    epochs_match(split, stream, batch_size=5)
    assert stream._loaders[False][0] is loader and [w.pid for w in loader._iterator._workers] == workers

    # a pass opened while another is still open must not reset the shared workers under it
    outer = stream_batches(stream, 5, shuffle=False)
    first = next(outer)
    inner = list(stream_batches(stream, 4, shuffle=True, generator=torch.Generator().manual_seed(9)))
    assert_same_batches(inner, list(batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(9))))
    assert_same_batches([first, *outer], list(batches(split, 5, shuffle=False)))

    # an abandoned pass leaves nothing behind for the next one
    abandoned = stream_batches(stream, 3, shuffle=False)
    next(abandoned)
    abandoned.close()
    epochs_match(split, stream, batch_size=6, epochs=1)
    stream.close()
    assert not stream._loaders
    epochs_match(split, stream, batch_size=6, epochs=1)  # a closed split starts new workers when used again


# --------------------------------------------------------------------------- (c) subset


@pytest.mark.parametrize("workers", WORKERS)
def test_subset_and_val_carve_match_the_tensor_path(workers, roots, decoded):
    cfg, _ = cfg_for("jpeg_folder", roots)
    stream, split = load_stream(cfg, workers)["train"], decoded["jpeg_folder"]["train"]
    s_train, s_val = carve_val(stream, 0.25, seed=5)  # carve_val only needs len() and subset()
    t_train, t_val = carve_val(split, 0.25, seed=5)
    for s, t in ((s_train, t_train), (s_val, t_val)):
        assert isinstance(s, StreamSplit) and s.num_workers == workers
        assert torch.equal(s.labels, t.labels) and torch.equal(s.head(len(s)), t.images)
        epochs_match(t, s, batch_size=4)
    idx = torch.tensor([3, 0, 2])
    assert torch.equal(s_train.subset(idx).head(3), t_train.subset(idx).images)  # a subset of a subset
    mask = t_val.labels == t_val.labels[0]
    assert torch.equal(s_val.subset(mask).labels, t_val.subset(mask).labels)


# --------------------------------------------------------------------------- stats and size


@pytest.mark.parametrize("kind", ["rgb_png_resized_to_gray", "jpeg_folder", "mnist"])
def test_channel_stats_over_every_item_equal_the_tensor_path(kind, roots, decoded):
    cfg, _ = cfg_for(kind, roots)
    mean, std = streaming.stream_channel_stats(load_stream(cfg, 0)["train"])
    t_mean, t_std = channel_stats(decoded[kind]["train"].images)
    assert mean == pytest.approx(t_mean, abs=2e-6) and std == pytest.approx(t_std, abs=2e-6)


def test_channel_stats_on_a_sample_are_seeded(roots, decoded):
    cfg, _ = cfg_for("cifar10_jpeg", roots)
    split = load_stream(cfg, 2)["train"]
    a = streaming.stream_channel_stats(split, max_items=12, seed=1)
    assert a == streaming.stream_channel_stats(split, max_items=12, seed=1)
    assert a != streaming.stream_channel_stats(split, max_items=12, seed=2)
    full = channel_stats(decoded["cifar10_jpeg"]["train"].images)
    assert a[0] == pytest.approx(full[0], abs=0.1) and a[1] == pytest.approx(full[1], abs=0.1)


@pytest.mark.parametrize("kind", ["gray_png", "rgb_png_resized_to_gray", "jpeg_folder", "cifar10_jpeg", "mnist"])
def test_decoded_bytes_estimate_equals_the_decoded_size(kind, roots, decoded):
    cfg, _ = cfg_for(kind, roots)
    out = decoded[kind]
    assert estimate_decoded_bytes(cfg) == out["train"].images.nbytes + out["test"].images.nbytes


def test_decoded_bytes_estimate_without_files(tmp_path):
    out = digits.load(OmegaConf.create({"name": "digits"}))
    assert estimate_decoded_bytes(OmegaConf.create({"name": "digits"})) == (
        out["train"].images.nbytes + out["test"].images.nbytes)
    assert estimate_decoded_bytes(OmegaConf.create({"name": "mnist", "root": str(tmp_path)})) == 70000 * 28 * 28
    assert estimate_decoded_bytes(OmegaConf.create({"name": "cifar10", "root": str(tmp_path)})) == 60000 * 3072
    assert estimate_decoded_bytes(folder_cfg(tmp_path / "absent")) is None
    assert estimate_decoded_bytes(folder_cfg(tmp_path)) is None  # no train/test: the loader says why


# --------------------------------------------------------------------------- (d) errors


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _valid(root):
    helpers.write_image_tree(root, ["a", "b"], {"train": 1, "test": 1}, 1, 6, 6)


def _no_dirs(root):
    (root / "train").mkdir(parents=True)


def _no_classes(root):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()


def _extra_test_class(root):
    _valid(root)
    (root / "test" / "zebra").mkdir()


def _no_images(root):
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    (root / "train" / "a" / "notes.txt").write_text("not an image")


def _corrupt_first(root):
    helpers.write_image_tree(root, ["a", "b"], {"train": 2, "test": 1}, 3, 6, 6)
    (root / "train" / "a" / "000.png").write_bytes(b"not a png")


BAD_TREES = {"no_train_test": (_no_dirs, {}), "no_class_folders": (_no_classes, {}),
             "test_class_not_in_train": (_extra_test_class, {}), "no_images": (_no_images, {}),
             "corrupt_first_image": (_corrupt_first, {}), "bad_channels": (_valid, {"channels": 2})}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_bad_trees_give_the_tensor_paths_one_line_error(case, tmp_path):
    make, kw = BAD_TREES[case]
    make(tmp_path)
    cfg = folder_cfg(tmp_path, **kw)
    with pytest.raises(UserError) as tensor_err:
        image_folder.load(cfg)
    with pytest.raises(UserError) as stream_err:
        load_stream(cfg, 0)
    assert one_line(stream_err) == one_line(tensor_err)


@pytest.mark.parametrize("root", [None, "missing"])
def test_bad_roots_give_the_tensor_paths_error(root, tmp_path):
    cfg = folder_cfg(tmp_path / root if root else "???")
    with pytest.raises(UserError) as tensor_err:
        image_folder.load(cfg)
    with pytest.raises(UserError) as stream_err:
        load_stream(cfg, 0)
    assert one_line(stream_err) == one_line(tensor_err)


@pytest.mark.parametrize("workers", WORKERS)
def test_an_undecodable_image_fails_its_batch_with_the_tensor_paths_error(workers, tmp_path):
    """Found only when its batch is decoded (in a worker): one line in the main process, not a worker traceback."""
    helpers.write_image_tree(tmp_path, ["a", "b"], {"train": 3, "test": 1}, 3, 6, 6, suffix=".jpg")
    (tmp_path / "train" / "b" / "004.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = folder_cfg(tmp_path)
    with pytest.raises(UserError) as tensor_err:
        image_folder.load(cfg)
    split = load_stream(cfg, workers)["train"]
    with pytest.raises(UserError) as stream_err:
        list(stream_batches(split, 2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert one_line(stream_err) == one_line(tensor_err) and "004.jpg" in one_line(stream_err)
    with pytest.raises(UserError) as head_err:
        split.head(len(split))
    assert one_line(head_err) == one_line(tensor_err)
    with pytest.raises(UserError):  # the split stays usable for a retry, which fails the same way
        list(stream_batches(split, 2, shuffle=False))


def test_cifar_and_mnist_errors_are_the_tensor_paths(tmp_path):
    mnist_cfg = OmegaConf.create({"name": "mnist", "root": str(tmp_path), "download": False})
    cifar_cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "download": False})
    for cfg, load in ((mnist_cfg, mnist.load), (cifar_cfg, cifar.load)):
        with pytest.raises(UserError) as tensor_err:
            load(cfg)
        with pytest.raises(UserError) as stream_err:
            load_stream(cfg, 0)
        assert one_line(stream_err) == one_line(tensor_err)
    helpers.write_image_tree(tmp_path / "cifar10", ["cat", "dog"], {"train": 1, "test": 1}, 3, 32, 32)
    with pytest.raises(UserError, match="not CIFAR-10's"):
        load_stream(cifar_cfg, 0)


@pytest.mark.parametrize(("cfg", "workers", "needle"), [
    ({"name": "digits"}, 0, "dataset=digits is held in memory"),
    ({"name": "imagenet"}, 0,
     "dataset.name='imagenet' is unknown; valid: cifar10, cifar100, digits, image_folder, mnist"),
    ({"name": "mnist", "root": "."}, -1, "num_workers=-1 is invalid"),
    ({"name": "mnist", "root": "."}, True, "num_workers=True is invalid"),
])
def test_config_errors(cfg, workers, needle):
    with pytest.raises(UserError) as err:
        load_stream(OmegaConf.create(cfg), workers)
    assert needle in one_line(err)


def test_a_generic_item_dataset_is_stacked(tmp_path):
    """Any Dataset returning (uint8 (C, H, W), label) streams; PIL-decoded files here, via __getitem__ only."""
    helpers.write_image_tree(tmp_path, ["a", "b"], {"train": 3, "test": 1}, 3, 5, 7)

    class Items(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i][0]) as im:
                arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
            return arr.permute(2, 0, 1), self.paths[i][1]

    items = image_folder._list(tmp_path / "train", ["a", "b"])
    split = StreamSplit(Items(items), torch.tensor([label for _, label in items]), num_workers=0)
    tensor = image_folder.load(folder_cfg(tmp_path))["train"]
    assert split.sample_shape == (3, 5, 7)
    epochs_match(tensor, split, batch_size=4)


def test_a_split_pickles_without_its_workers(roots, decoded):
    """Spawn/forkserver workers receive the dataset pickled; a pickled split drops its live DataLoaders."""
    cfg, _ = cfg_for("jpeg_folder", roots)
    stream = load_stream(cfg, 2)["train"]
    epochs_match(decoded["jpeg_folder"]["train"], stream, batch_size=8, epochs=1)
    copy = pickle.loads(pickle.dumps(stream))
    assert copy._loaders == {} and stream._loaders
    epochs_match(decoded["jpeg_folder"]["train"], copy, batch_size=8, epochs=1)
