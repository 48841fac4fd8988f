"""Each ``experiment=`` config end to end on tiny on-disk data (KD_DATA_DIR), CPU, one epoch per phase."""

from __future__ import annotations

import pytest
import torch
from helpers import read_metrics


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return k * k * c_in * c_out + c_out


def linear(i: int, o: int) -> int:
    return i * o + o


EXPECTED = {
    "cifar10_tutorial": {
        "fixture": "cifar_tutorial_run", "dataset": "cifar10", "input_shape": [3, 32, 32],
        "method": {"T": 2.0, "soft_weight": 0.25, "ce_weight": 0.75},
        "arch": ("deep_nn", "light_nn"), "params": (1_186_986, 267_738),
    },
    "mnist_hinton": {
        "fixture": "mnist_hinton_run", "dataset": "mnist", "input_shape": [1, 28, 28],
        "method": {"T": 20.0, "soft_weight": 0.9, "ce_weight": 0.1},
        "arch": ("mlp", "mlp"),
        "params": (linear(784, 1200) + linear(1200, 1200) + linear(1200, 10),
                   linear(784, 800) + linear(800, 800) + linear(800, 10)),
    },
    "mnist_keras": {
        "fixture": "mnist_keras_run", "dataset": "mnist", "input_shape": [1, 28, 28],
        "method": {"T": 3.0, "soft_weight": 0.5, "ce_weight": 0.5, "t_squared": False, "kl_reduction": "batchmean"},
        "arch": ("keras_conv", "mlp"),
        "params": (conv(1, 256) + conv(256, 512) + linear(512 * 7 * 7, 10), linear(784, 28) + linear(28, 10)),
    },
    "cifar10_resnet50": {
        "fixture": "cifar_resnet_run", "dataset": "cifar10", "input_shape": [3, 32, 32],
        "method": {"T": 1.0, "soft_weight": 0.5, "ce_weight": 0.5, "t_squared": True, "kl_reduction": "mean"},
        "arch": ("torchvision", "demo_cnn"),
        # resnet18 has 11,689,512 params with its 1000-class head; the head is replaced by a 10-class one
        "params": (11_689_512 - linear(512, 1000) + linear(512, 10),
                   conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + linear(128, 32) + linear(32, 10)),
    },
    "mnist_hinton_bn_mlp": {
        "fixture": "mnist_hinton_bn_mlp_run", "dataset": "mnist", "input_shape": [1, 28, 28],
        "method": {"T": 20.0, "soft_weight": 800.7, "ce_weight": 0.3, "t_squared": False, "kl_reduction": "mean"},
        "arch": ("mlp", "mlp"),
        # Linear + BatchNorm1d (weight and bias) per hidden layer
        "params": (linear(784, 1200) + 2 * 1200 + linear(1200, 1200) + 2 * 1200 + linear(1200, 10),
                   linear(784, 800) + 2 * 800 + linear(800, 800) + 2 * 800 + linear(800, 10)),
    },
}


@pytest.fixture(scope="module")
def mnist_hinton_bn_mlp_run(tmp_path_factory, mnist_root):
    """The Hinton MNIST project's BN MLPs on tiny MNIST (its 10% val split: 6 of 64 images)."""
    from helpers import assert_ok, run_cli

    proc, run_dir = run_cli(["experiment=mnist_hinton_bn_mlp", "trainer.batch_size=16", "trainer.eval_batch_size=32"],
                            tmp_path_factory.mktemp("mnist_hinton_bn_mlp"), env={"KD_DATA_DIR": str(mnist_root)})
    return proc, run_dir, assert_ok(proc, run_dir)


@pytest.fixture(params=list(EXPECTED))
def experiment(request):
    exp = EXPECTED[request.param]
    return request.param, exp, request.getfixturevalue(exp["fixture"])


def test_experiment_report(experiment):
    name, exp, (_, run_dir, rep) = experiment
    assert rep["status"] == "complete"
    assert f"experiment={name}" in rep["command"]
    d = rep["dataset"]
    assert d["name"] == exp["dataset"] and d["input_shape"] == exp["input_shape"] and d["num_classes"] == 10
    assert rep["method"]["name"] == "kd"
    for k, v in exp["method"].items():
        assert rep["method"][k] == pytest.approx(v), k
    models = rep["models"]
    assert set(models) == {"teacher", "baseline", "student"}
    assert models["teacher"]["arch"]["arch"] == exp["arch"][0]
    assert models["student"]["arch"]["arch"] == exp["arch"][1]
    assert models["teacher"]["params"] == exp["params"][0]
    assert models["student"]["params"] == models["baseline"]["params"] == exp["params"][1]
    for m in models.values():
        assert 0.0 <= m["test_acc"] <= 100.0
    assert rep["same_init"] is True
    assert models["baseline"]["init_hash"] == models["student"]["init_hash"]
    assert rep["kd_gain_points"] == pytest.approx(models["student"]["test_acc"] - models["baseline"]["test_acc"],
                                                  abs=1e-3)
    assert rep["teacher"]["source"] == "trained"


def test_experiment_files(experiment):
    _, _, (_, run_dir, _) = experiment
    rows = read_metrics(run_dir)
    assert [(r["phase"], r["epoch"]) for r in rows] == [("teacher", "1"), ("baseline", "1"), ("student", "1")]
    student = rows[-1]
    assert float(student["train_soft"]) >= 0.0 and float(student["train_ce"]) > 0.0
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for role in ("teacher", "baseline", "student"):
        assert (run_dir / "checkpoints" / f"{role}.pt").is_file()
    assert (run_dir / "report.md").is_file()


def test_mnist_hinton_uses_dropout_teacher_and_cosine_schedule(mnist_hinton_run):
    _, _, rep = mnist_hinton_run
    t, s = rep["models"]["teacher"]["arch"], rep["models"]["student"]["arch"]
    assert t["hidden"] == [1200, 1200] and t["dropout"] == 0.5 and t["input_dropout"] == 0.2
    assert s["hidden"] == [800, 800] and s["dropout"] == 0.0
    assert rep["config"]["scheduler"]["name"] == "cosine"


def test_mnist_keras_student_is_dense_28(mnist_keras_run):
    _, _, rep = mnist_keras_run
    s, t = rep["models"]["student"]["arch"], rep["models"]["teacher"]["arch"]
    assert s["hidden"] == [28] and s["activation"] == "none" and s["init"] == "glorot_uniform"
    assert t["negative_slope"] == 0.2 and t["init"] == "glorot_uniform"
    cfg = rep["config"]
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["optimizer"]["eps"] == 1e-7
    assert cfg["dataset"]["mean"] == [0.0] and cfg["dataset"]["std"] == [1.0]
    assert cfg["scheduler"]["name"] == "none"


def test_mnist_hinton_bn_mlp_uses_bn_mlps_and_plateau_on_val_loss(mnist_hinton_bn_mlp_run):
    _, run_dir, rep = mnist_hinton_bn_mlp_run
    t, s = rep["models"]["teacher"]["arch"], rep["models"]["student"]["arch"]
    assert t["hidden"] == [1200, 1200] and t["batch_norm"] is True and t["dropout"] == 0.8
    assert s["hidden"] == [800, 800] and s["batch_norm"] is True and s["dropout"] == 0.0
    assert t["init"] == s["init"] == "normal" and t["init_std"] == s["init_std"] == 0.02
    cfg = rep["config"]
    assert cfg["scheduler"] == {"name": "plateau", "monitor": "val_loss", "factor": 0.1, "patience": 10}
    assert cfg["dataset"]["val_fraction"] == 0.1 and cfg["dataset"]["mean"] == [0.1307]
    assert all(r["val_loss"] for r in read_metrics(run_dir))  # the plateau scheduler's metric is logged


def test_resnet_experiment_offline_overrides_and_frozen_backbone(cifar_resnet_run):
    """teacher.weights=null etc. reach the model; with freeze_backbone only the new head is trained."""
    from omegaconf import OmegaConf

    from kd_runner.models import build_model
    from kd_runner.pipeline import SEED_TEACHER
    from kd_runner.utils import derive_seed, seed_everything

    _, run_dir, rep = cifar_resnet_run
    arch = rep["models"]["teacher"]["arch"]
    assert (arch["name"], arch["weights"], arch["resize"], arch["freeze_backbone"]) == ("resnet18", None, 32, True)
    trained = torch.load(run_dir / "checkpoints" / "teacher.pt", map_location="cpu", weights_only=True)["model"]
    seed_everything(derive_seed(rep["config"].get("teacher_seed", rep["seed"]), SEED_TEACHER))
    init = build_model(OmegaConf.create(arch), (3, 32, 32), 10).state_dict()
    assert set(trained) == set(init)
    changed = sorted(k for k in init if not torch.equal(init[k], trained[k]))
    assert changed == ["fc.bias", "fc.weight"]
