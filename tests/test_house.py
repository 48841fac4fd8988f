"""The house for many methods and models: module boundaries, store keys, the teacher-output cache budget,
safe resume state, optimizer/scheduler options."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_ok, assert_user_error, run_cli
from omegaconf import OmegaConf

from kd_runner.errors import UserError
from kd_runner.optim import build_optimizer, build_scheduler, scheduler_step


def _python(code: str, *paths: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_engine_and_step_do_not_load_the_method_registry():
    """The loop imports the interface only: no method module is loaded by importing the engine."""
    loaded = _python("import sys, kd_runner.engine, kd_runner.step; "
                     "print(sorted(m for m in sys.modules if m.startswith('kd_runner.methods')))", REPO)
    assert loaded == "['kd_runner.methods', 'kd_runner.methods.base']"


def test_store_key_code_hash_ignores_methods_but_not_the_loop(tmp_path):
    """Adding or editing a distillation method keeps stored teachers; editing the training loop does not."""
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "kd_runner", pkg / "kd_runner", ignore=shutil.ignore_patterns("__pycache__", "conf"))
    # load utils.py of the copy itself (an editable install would otherwise import the checkout's package)
    code = ("import importlib.util as u; s = u.spec_from_file_location('copy_utils', "
            f"{str(pkg / 'kd_runner' / 'utils.py')!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.code_hash())")
    before = _python(code, pkg)
    (pkg / "kd_runner" / "methods" / "brand_new.py").write_text("X = 1\n")
    with open(pkg / "kd_runner" / "methods" / "kd.py", "a") as f:
        f.write("\n# an edited method\n")
    assert _python(code, pkg) == before
    with open(pkg / "kd_runner" / "engine.py", "a") as f:
        f.write("\n# an edited loop\n")
    assert _python(code, pkg) != before


def test_teacher_output_cache_too_large_falls_back_to_live_before_training(tmp_path):
    proc, run_dir = run_cli(["trainer.teacher_outputs_max_gb=0.000001", "trainer.progress=true"], tmp_path)
    rep = assert_ok(proc, run_dir)
    assert rep["teacher"]["outputs"] == "live"
    assert "teacher-output cache would take" in rep["teacher"]["outputs_note"]
    out = proc.stdout
    note = out.index("teacher-output cache would take")
    assert note < out.index("[teacher]"), "the fallback must be announced before the teacher trains"
    big = run_cli(["trainer.teacher_outputs_max_gb=1"], tmp_path / "fits")
    assert assert_ok(*big)["teacher"]["outputs"] == "cache"


class _Boom:
    """Unpickling this runs a shell command: what a planted file would do under weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_resume_state_is_not_executed(tmp_path):
    """A crafted state file in a run dir is refused in one line, and its code never runs."""
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    state = run_dir / "state"
    state.mkdir(parents=True)
    (state / "teacher.pt").write_bytes(pickle.dumps({"tag": _Boom(marker)}))
    proc, _ = run_cli(["trainer.teacher_cache=false"], tmp_path, run_dir=run_dir)
    assert_user_error(proc, run_dir, "teacher.pt", "not a kd-train state")
    assert not marker.exists()


def test_state_of_another_seed_is_not_resumed(tmp_path):
    """State written by seed 0 is never continued by seed 1 in the same run dir."""
    run_dir = tmp_path / "run"
    proc, _ = run_cli(["seed=0", "trainer.teacher_cache=false"], tmp_path, run_dir=run_dir)
    assert_ok(proc, run_dir)
    # put back a state file from an unfinished seed-0 run, as if it had been stopped mid-way
    from kd_runner.engine import (
        PhaseResult,
        _save_state,  # the writer the engine uses, so the format is real
    )

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    state = run_dir / "state"
    state.mkdir(exist_ok=True)
    _save_state(state / "baseline.pt", "config deadbeef, seed 0, teacher_seed 42", model, torch.nn.ModuleDict(),
                opt, None, torch.Generator(), PhaseResult(history=[{"epoch": 1}]))
    (run_dir / "report.json").unlink()
    proc, _ = run_cli(["seed=1", "trainer.teacher_cache=false", "trainer.baseline_cache=false",
                       "trainer.progress=true"], tmp_path, run_dir=run_dir)
    assert_user_error(proc, run_dir, "written by another run", "seed 0")
    assert "[teacher]" not in proc.stdout, "refused before any training"


def test_plateau_follows_its_monitor():
    """monitor=val_loss lowers the lr when the val loss stops falling, even while val accuracy rises."""
    rows = [{"val_loss": 1.0 + 0.1 * e, "val_acc": 50.0 + e, "train_loss": 1.0, "train_acc": 50.0} for e in range(4)]
    for monitor, drops in (("val_loss", True), ("val_acc", False)):
        opt = build_optimizer(OmegaConf.create({"name": "adam", "lr": 1.0}), [torch.nn.Parameter(torch.zeros(1))])
        sched = build_scheduler(OmegaConf.create({"name": "plateau", "monitor": monitor, "factor": 0.1,
                                                  "patience": 1}), opt, 4)
        for row in rows:
            scheduler_step(sched, row, monitor)
        assert (opt.param_groups[0]["lr"] < 1.0) is drops, monitor
    with pytest.raises(UserError, match="scheduler.monitor='val_top5'"):
        build_scheduler(OmegaConf.create({"name": "plateau", "monitor": "val_top5", "factor": 0.1, "patience": 1}),
                        opt, 4)


def test_adam_eps_is_passed_and_checked():
    opt = build_optimizer(OmegaConf.create({"name": "adam", "lr": 0.01, "eps": 1e-7}),
                          [torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["eps"] == 1e-7
    with pytest.raises(UserError, match="optimizer.eps=0 is invalid"):
        build_optimizer(OmegaConf.create({"name": "adam", "lr": 0.01, "eps": 0}), [torch.nn.Parameter(torch.zeros(1))])


def test_val_loss_is_logged_per_epoch(tmp_path):
    proc, run_dir = run_cli(["dataset.val_fraction=0.2", "scheduler=plateau", "scheduler.monitor=val_loss"], tmp_path)
    assert_ok(proc, run_dir)
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows and all(float(r["val_loss"]) > 0 for r in rows)


def test_dataset_subsets_are_seeded_and_bounded():
    from kd_runner.data import take_subset
    from kd_runner.data.tensors import Split

    split = Split(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    a, b = take_subset(split, 10, 0, "dataset.train_subset"), take_subset(split, 10, 0, "dataset.train_subset")
    assert len(a) == 10 and torch.equal(a.labels, b.labels) and len(set(a.labels.tolist())) == 10
    assert not torch.equal(a.labels, take_subset(split, 10, 1, "dataset.train_subset").labels)
    assert take_subset(split, None, 0, "dataset.train_subset") is split
    with pytest.raises(UserError, match="dataset.train_subset=51 is invalid"):
        take_subset(split, 51, 0, "dataset.train_subset")


def test_multistep_scheduler_drops_at_milestones_and_checks_them():
    opt = build_optimizer(OmegaConf.create({"name": "sgd", "lr": 0.05, "momentum": 0.9}),
                          [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(OmegaConf.create({"name": "multistep", "milestones": [2, 4], "gamma": 0.1}), opt, 5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        scheduler_step(sched, {}, None)
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005])
    with pytest.raises(UserError, match=r"scheduler.milestones=\[180, 150\] is invalid"):
        build_scheduler(OmegaConf.create({"name": "multistep", "milestones": [180, 150], "gamma": 0.1}), opt, 5)


def test_student_optimizer_overrides_only_the_student_phases(tmp_path):
    """The recipe's lr 0.01 for MobileNetV2/ShuffleNet students leaves the teacher (and its store key) alone."""
    import csv

    plain = assert_ok(*run_cli([], tmp_path / "plain"))
    proc, run_dir = run_cli(["+student_optimizer.lr=0.0005"], tmp_path / "low")
    rep = assert_ok(proc, run_dir)
    lrs = {r["phase"]: float(r["lr"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))}
    assert lrs == {"teacher": 0.001, "baseline": 0.0005, "student": 0.0005}
    assert rep["teacher"]["key"] == plain["teacher"]["key"]
    proc, run_dir = run_cli(["+student_optimizer.momentum=0.9"], tmp_path / "bad")
    assert_user_error(proc, run_dir, "student_optimizer.momentum", "optimizer=adam")
