"""Every registered method, end to end through ``kd-train`` on tiny data: a complete report and every loss part
in metrics.csv. Methods come from the registry, so a new method file is tested here without editing this file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

from kd_runner.methods.registry import methods

# a CIFAR zoo pair on digits (1x8x8): every method's default layers resolve on it (stages, preact, embedding)
PAIR = ["teacher=resnet14", "student=resnet8", "trainer.student_epochs=2", "trainer.bench_iters=0"]
# options a method needs on 1,438 training images (its defaults are the paper's, sized for CIFAR)
TINY = {"crd": ["method.nce_k=64"]}
NOT_DISTILLATION = {"ce"}
BOOKKEEPING = {"train_loss", "train_acc", "train_ce"}


def sweep_methods() -> list[str]:
    return sorted(set(methods()) - NOT_DISTILLATION - set(TINY))


@pytest.fixture(scope="module")
def method_sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    base = tmp_path_factory.mktemp("methods")
    sweep_dir = base / "sweep"
    args = helpers.merge_overrides([f"method={','.join(sweep_methods())}", *PAIR])
    cmd = [sys.executable, "-m", "kd_runner.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=base, env=helpers.cli_env(base), capture_output=True, text=True,
                          timeout=2 * helpers.CLI_TIMEOUT_S)
    return proc, sweep_dir


def check_run(run_dir: Path, name: str) -> None:
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["status"] == "complete" and rep["method"]["name"] == name
    assert {"teacher", "baseline", "student"} <= set(rep["models"])
    student = [r for r in helpers.read_metrics(run_dir) if r["phase"] == "student"]
    assert len(student) == 2
    parts = sorted(k for k in student[0] if k.startswith("train_") and k not in BOOKKEEPING and student[0][k] != "")
    assert parts, f"{name}: no distillation loss part in metrics.csv"
    for row in student:
        for k in [*parts, "train_loss", "train_ce"]:
            assert math.isfinite(float(row[k])), (name, k, row[k])
    assert (run_dir / "report.md").is_file() and (run_dir / "checkpoints" / "student.pt").is_file()


def test_every_registered_method_runs_end_to_end(method_sweep):
    proc, sweep_dir = method_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = {}
    for rep_path in sweep_dir.glob("*/report.json"):
        done[json.loads(rep_path.read_text())["method"]["name"]] = rep_path.parent
    assert sorted(done) == sweep_methods()
    for name, run_dir in done.items():
        check_run(run_dir, name)


@pytest.mark.parametrize("name", sorted(TINY))
def test_methods_needing_options_on_tiny_data_run_composed_with_kd(run_cli, tmp_path, name):
    proc, run_dir = run_cli([f"method={name}+kd", *PAIR, *TINY[name]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(run_dir, f"{name}+kd")
    student = [r for r in helpers.read_metrics(run_dir) if r["phase"] == "student"]
    assert all(float(r["train_kd.soft"]) > 0 for r in student)


@pytest.mark.parametrize(("args", "needles"), [
    (["method=crd"], ["method.nce_k=16384", "training split", "valid"]),  # memory bank larger than the data
    (["method=at", "method.student_layers=[stage1,stage2,nope]"], ["'nope'", "stage1", ":input"]),
    (["method=at", "method.student_layers=[stage1]"], ["1 student layers", "3 teacher layers"]),
    (["method=dkd", "method.beta=-1"], ["method.beta=-1", ">= 0"]),
    (["method=ofd", "teacher=deep_nn", "student=light_nn"], ["BatchNorm"]),
    (["method=reviewkd", "teacher=vgg8"], ["layers", "same number"]),
    (["method=kd+at+nosuch"], ["'nosuch' is not a known option"]),
])
def test_bad_method_values_end_in_one_line_before_training(run_cli, tmp_path, args, needles):
    proc, run_dir = run_cli([*PAIR, *args], tmp_path)
    helpers.assert_user_error(proc, run_dir, *needles)
    assert not list(run_dir.glob("checkpoints/*.pt"))
