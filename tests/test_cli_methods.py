"""End-to-end ``kd-train`` runs on digits (the default dataset) for each method: ce, kd, cosine, hint."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import read_metrics
from omegaconf import OmegaConf

from kd_runner.models.tutorial import LightNN

# digits: 1,797 images, 20% test (359), 1x8x8, 10 classes; hand-computed parameter counts
DIGITS = {"name": "digits", "train": 1438, "test": 359, "num_classes": 10, "input_shape": [1, 8, 8]}
DEEP_NN_DIGITS = (9 * 1 * 128 + 128) + (9 * 128 * 64 + 64) + (9 * 64 * 64 + 64) + (9 * 64 * 32 + 32) \
    + (32 * 4 * 512 + 512) + (512 * 10 + 10)
LIGHT_NN_DIGITS = (9 * 1 * 16 + 16) + (9 * 16 * 16 + 16) + (16 * 4 * 256 + 256) + (256 * 10 + 10)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSS_PARTS = {"ce": ["train_ce"], "kd": ["train_soft", "train_ce"], "cosine": ["train_hidden", "train_ce"],
              "hint": ["train_hint", "train_ce"]}
WEIGHTS = {"kd": ("soft_weight", "train_soft"), "cosine": ("hidden_weight", "train_hidden"),
           "hint": ("hint_weight", "train_hint")}


@pytest.fixture(params=["kd", "cosine", "hint"])
def distill_run(request):
    fixture = {"kd": "kd_digits_run", "cosine": "cosine_val_run", "hint": "hint_digits_run"}[request.param]
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture(params=["ce", "kd", "cosine", "hint"])
def any_run(request):
    fixture = {"ce": "ce_run", "kd": "kd_digits_run", "cosine": "cosine_val_run",
               "hint": "hint_digits_run"}[request.param]
    return request.param, request.getfixturevalue(fixture)


# --------------------------------------------------------------------------- every method


def test_report_basics(any_run):
    method, (proc, run_dir, rep) = any_run
    assert rep["status"] == "complete"
    assert rep["method"]["name"] == method
    assert rep["seed"] == 42
    assert rep["device"] == "cpu"
    for key, value in DIGITS.items():
        if key == "train":  # minus the validation split, if any
            assert rep["dataset"]["train"] + rep["dataset"]["val"] == value
        else:
            assert rep["dataset"][key] == value, key
    assert rep["dataset"]["source"] == "sklearn.datasets.load_digits"
    assert len(rep["config_hash"]) >= 8
    assert rep["config"]["method"]["name"] == method
    assert (run_dir / "report.md").read_text().startswith("# kd-runner report: digits, method " + method)
    assert str(run_dir / "report.md") in proc.stdout


def test_models_params_and_accuracy(any_run):
    method, (_, run_dir, rep) = any_run
    expected_roles = {"student"} if method == "ce" else {"teacher", "baseline", "student"}
    assert set(rep["models"]) == expected_roles
    for role, m in rep["models"].items():
        assert m["params"] == (DEEP_NN_DIGITS if role == "teacher" else LIGHT_NN_DIGITS), role
        assert 0.0 <= m["test_acc"] <= 100.0
        assert m["checkpoint"] == f"checkpoints/{role}.pt"
        assert (run_dir / m["checkpoint"]).is_file()
        assert m["size_bytes"] == (run_dir / m["checkpoint"]).stat().st_size
        assert isinstance(m["latency_ms"], float)  # measured (bench_iters=2), value not checked
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt") if "_best" not in p.name) == sorted(
        f"{r}.pt" for r in expected_roles)


def test_ce_has_no_teacher_no_baseline_no_gain(ce_run):
    _, run_dir, rep = ce_run
    assert rep["teacher"] == {}
    assert rep["kd_gain_points"] is None and rep["same_init"] is None
    assert {r["phase"] for r in read_metrics(run_dir)} == {"student"}


def test_kd_gain_and_same_init(distill_run):
    _, (_, _, rep) = distill_run
    models = rep["models"]
    assert rep["same_init"] is True
    assert models["baseline"]["init_hash"] == models["student"]["init_hash"]
    assert rep["kd_gain_points"] == pytest.approx(models["student"]["test_acc"] - models["baseline"]["test_acc"],
                                                  abs=1e-3)
    assert rep["teacher"]["source"] == "trained"
    assert rep["teacher"]["outputs"] == "cache"


def test_metrics_rows_per_phase_per_epoch_with_loss_parts(any_run):
    method, (_, run_dir, rep) = any_run
    rows = read_metrics(run_dir)
    cfg = rep["config"]["trainer"]
    epochs = {"student": cfg["student_epochs"]}
    if method != "ce":
        epochs.update(teacher=cfg["teacher_epochs"], baseline=cfg["student_epochs"])
    for phase, n in epochs.items():
        got = [int(r["epoch"]) for r in rows if r["phase"] == phase]
        assert got == list(range(1, n + 1)), (phase, got)
        assert rep["models"][phase]["epochs"] == n
    assert len(rows) == sum(epochs.values())
    student_rows = [r for r in rows if r["phase"] == "student"]
    for row in student_rows:
        for col in ["train_loss", "train_acc", *LOSS_PARTS[method]]:
            assert math.isfinite(float(row[col])), (col, row)
        assert 0.0 <= float(row["train_acc"]) <= 100.0
    if method in WEIGHTS:
        weight, part = WEIGHTS[method]
        w_part, w_ce = rep["method"][weight], rep["method"]["ce_weight"]
        for row in student_rows:  # the logged total is the weighted sum of the logged parts
            expected = w_part * float(row[part]) + w_ce * float(row["train_ce"])
            assert float(row["train_loss"]) == pytest.approx(expected, rel=1e-4)
        # the CE-only phases never log the distillation term
        assert all(r[part] == "" for r in rows if r["phase"] in ("teacher", "baseline"))


def test_curves_png(any_run):
    _, (_, run_dir, _) = any_run
    data = (run_dir / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


# --------------------------------------------------------------------------- per-method details


def test_kd_report_echoes_method_params(kd_digits_run):
    _, _, rep = kd_digits_run
    assert rep["method"]["T"] == 3.0
    assert rep["method"]["soft_weight"] == 0.5
    assert rep["method"]["ce_weight"] == 0.5


def test_student_checkpoint_reproduces_reported_accuracy(kd_digits_run):
    """Load checkpoints/student.pt into a fresh LightNN and score the digits test split by hand."""
    from kd_runner.data import digits

    _, run_dir, rep = kd_digits_run
    payload = torch.load(run_dir / "checkpoints" / "student.pt", map_location="cpu", weights_only=True)
    assert payload["model_cfg"]["arch"] == "light_nn"
    assert payload["input_shape"] == [1, 8, 8] and payload["num_classes"] == 10
    model = LightNN((1, 8, 8), 10)
    model.load_state_dict(payload["model"])
    model.eval()
    test = digits.load(OmegaConf.create(rep["config"]["dataset"]))["test"]
    mean = torch.tensor(rep["dataset"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(rep["dataset"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = model((test.images.float() / 255.0 - mean) / std).argmax(1)
    acc = 100.0 * float((pred == test.labels).sum()) / len(test)
    assert acc == pytest.approx(rep["models"]["student"]["test_acc"], abs=1e-3)


def test_cosine_params_and_hidden_loss(cosine_val_run):
    _, _, rep = cosine_val_run
    m = rep["method"]
    assert (m["student_layer"], m["teacher_layer"], m["hidden_weight"], m["ce_weight"]) == (
        "features", "features", 0.25, 0.75)


def test_val_fraction_gives_best_val_numbers(cosine_val_run):
    _, run_dir, rep = cosine_val_run
    assert rep["dataset"]["val"] == 288 and rep["dataset"]["train"] == 1438 - 288
    rows = read_metrics(run_dir)
    for role in ("teacher", "baseline", "student"):
        m = rep["models"][role]
        assert 0.0 <= m["best_val_acc"] <= 100.0
        assert 0.0 <= m["test_acc_best_val"] <= 100.0
        vals = [float(r["val_acc"]) for r in rows if r["phase"] == role]
        assert m["best_val_acc"] == pytest.approx(max(vals), abs=1e-3)
        assert vals[m["best_epoch"] - 1] == pytest.approx(max(vals), abs=1e-3)
        assert (run_dir / "checkpoints" / f"{role}_best.pt").is_file()
    s, b = rep["models"]["student"], rep["models"]["baseline"]
    assert rep["kd_gain_points_best_val"] == pytest.approx(s["test_acc_best_val"] - b["test_acc_best_val"], abs=1e-3)


def test_no_val_split_means_no_best_val_numbers(kd_digits_run):
    _, run_dir, rep = kd_digits_run
    assert rep["dataset"]["val"] == 0
    assert all("test_acc_best_val" not in m for m in rep["models"].values())
    assert rep["kd_gain_points_best_val"] is None
    assert not list((run_dir / "checkpoints").glob("*_best.pt"))


def test_hint_regressor_is_trained_and_saved_with_the_student(hint_digits_run):
    _, run_dir, rep = hint_digits_run
    assert rep["method"]["hint_weight"] == 0.25 and rep["method"]["student_layer"] == "features"
    student = torch.load(run_dir / "checkpoints" / "student.pt", map_location="cpu", weights_only=True)
    baseline = torch.load(run_dir / "checkpoints" / "baseline.pt", map_location="cpu", weights_only=True)
    # student features on digits: 16 x 2 x 2; teacher (DeepNN) features: 32 x 2 x 2 -> 3x3 conv 16 -> 32
    weights = [v for k, v in student["extra"].items() if k.endswith("weight")]
    assert [tuple(w.shape) for w in weights] == [(32, 16, 3, 3)]
    assert baseline["extra"] == {}
