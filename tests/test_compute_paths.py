"""The data and compute paths through the real CLI: the DataLoader (streaming) path trains the same
models as the decode-once tensor path, and the report names the path that ran."""

from __future__ import annotations

import helpers
import pytest
from helpers import CIFAR_CLASSES, assert_ok, run_many

from kd_runner.data import choose_path
from kd_runner.errors import UserError


@pytest.fixture(scope="module")
def path_runs(tmp_path_factory):
    """hint (taps + a trained regressor) on a tiny CIFAR-10 image-folder copy, through both data paths."""
    base = tmp_path_factory.mktemp("paths")
    data = base / "data"
    helpers.write_image_tree(data / "cifar10", CIFAR_CLASSES, {"train": 6, "test": 3}, 3, 32, 32, ".jpg")
    common = ["dataset=cifar10", "method=hint", "dataset.val_fraction=0.2", "trainer.num_threads=1"]
    jobs = {
        name: {"args": [*common, f"trainer.data_path={path}", *extra], "tmp_path": base / name,
               "env": {"KD_DATA_DIR": str(data)}}
        for name, path, extra in (("tensor", "tensor", []), ("loader", "loader", ["trainer.num_workers=2"]),
                                  ("loader0", "loader", ["trainer.num_workers=0"]))
    }
    return {name: assert_ok(proc, run_dir) for name, (proc, run_dir) in run_many(jobs).items()}


def _accuracies(rep: dict) -> dict:
    models = rep["models"]
    return {role: (m["test_acc"], m.get("best_val_acc"), m.get("test_acc_best_val")) for role, m in models.items()}


def test_loader_path_trains_the_same_models_as_the_tensor_path(path_runs):
    tensor = _accuracies(path_runs["tensor"])
    assert _accuracies(path_runs["loader"]) == tensor
    assert _accuracies(path_runs["loader0"]) == tensor  # worker count does not change the batches
    init = {name: rep["models"]["student"]["init_hash"] for name, rep in path_runs.items()}
    assert init["loader"] == init["tensor"]


def test_report_names_the_data_path_that_ran(path_runs):
    tensor, loader = path_runs["tensor"]["execution"]["data"], path_runs["loader"]["execution"]["data"]
    assert tensor["path"] == "tensor" and tensor["batches"] == "gathered in host memory"
    assert loader["path"] == "loader" and "2 DataLoader workers" in loader["train_residency"]
    assert "decoded per batch" in loader["source"]


def test_report_names_the_compute_path_that_ran(path_runs):
    compute = path_runs["tensor"]["execution"]["compute"]
    # on a CPU: float32 (bf16 autocast is slower without native bf16), NHWC for the conv models, no graphs
    assert compute["amp"] == "off"
    assert compute["channels_last_models"] == ["student", "teacher"]
    assert compute["cuda_graphs"] == "not a CUDA device"
    assert compute["inference_mode"] is True


def test_auto_picks_the_tensor_path_when_the_decoded_set_fits(tmp_path):
    from omegaconf import OmegaConf

    helpers.write_image_tree(tmp_path / "cifar10", CIFAR_CLASSES, {"train": 2, "test": 1}, 3, 32, 32, ".png")
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path)})
    size = 30 * 3 * 32 * 32
    assert choose_path(cfg, "auto", budget_bytes=size) == "tensor"
    assert choose_path(cfg, "auto", budget_bytes=size - 1) == "loader"
    assert choose_path(cfg, "loader") == "loader"
    with pytest.raises(UserError, match="trainer.data_path='disk'"):
        choose_path(cfg, "disk")


def test_channels_last_off_and_bf16_on_cpu_are_honoured(tmp_path):
    # bf16 on a CPU without native bf16 is slow: a small slice of digits is enough to see the path taken
    (proc, run_dir), = run_many({"x": {"args": ["trainer.channels_last=off", "trainer.amp=bf16",
                                                 "trainer.num_threads=1", "dataset.train_subset=256",
                                                 "dataset.test_subset=128", "trainer.bench_iters=0"],
                                       "tmp_path": tmp_path}}).values()
    compute = assert_ok(proc, run_dir)["execution"]["compute"]
    assert compute["channels_last_models"] == [] and compute["amp"] == "bfloat16"
