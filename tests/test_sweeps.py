"""Sweeps that cost one teacher: stores, summary, launchers, resume after SIGTERM, skip complete jobs."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest

GRID = ["method.T=1,4", "method.soft_weight=0.25,0.75", "seed=0,1", "trainer.bench_iters=0"]


def multirun(args: list[str], base: Path, fast: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = base / "sweep"
    cmd = [sys.executable, "-m", "kd_runner.train", "-m", *helpers.merge_overrides(args, fast),
           f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=base, env=helpers.cli_env(base), capture_output=True, text=True,
                          timeout=helpers.CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, sweep_dir


def reports(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/report.json"))]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid")
    proc, sweep_dir = multirun(GRID, base)
    return base, sweep_dir, proc


def test_grid_trains_one_teacher_and_one_baseline_per_seed(grid_sweep):
    base, sweep_dir, _ = grid_sweep
    reps = reports(sweep_dir)
    assert len(reps) == 8
    assert [r["teacher"]["source"] for r in reps].count("trained") == 1
    assert len({r["teacher"]["key"] for r in reps}) == 1
    assert len(list((base / "cache" / "teachers").glob("*/model.pt"))) == 1
    baseline_sources = [r["models"]["baseline"]["source"]["source"] for r in reps]
    assert baseline_sources.count("trained") == 2  # one CE baseline per student seed
    # a cached teacher/baseline is the same model: identical accuracies across the grid
    assert len({r["models"]["teacher"]["test_acc"] for r in reps}) == 1
    for seed in (0, 1):
        assert len({r["models"]["baseline"]["test_acc"] for r in reps if r["seed"] == seed}) == 1


def test_summary_rows_and_group_statistics(grid_sweep):
    _, sweep_dir, proc = grid_sweep
    assert "summary:" in proc.stdout
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 8
    by_job = {r["job"]: r for r in rows}
    for rep_path in sweep_dir.glob("*/report.json"):
        rep = json.loads(rep_path.read_text())
        row = by_job[rep_path.parent.name]
        assert float(row["student_acc"]) == pytest.approx(rep["models"]["student"]["test_acc"], abs=1e-4)
        assert float(row["kd_gain"]) == pytest.approx(rep["kd_gain_points"], abs=1e-4)
        assert float(row["method.T"]) == rep["method"]["T"]
    groups = read_csv(sweep_dir / "summary_groups.csv")
    assert len(groups) == 4 and all(g["n"] == "2" for g in groups)
    for g in groups:
        members = [float(r["student_acc"]) for r in rows
                   if r["method.T"] == g["method.T"] and r["method.soft_weight"] == g["method.soft_weight"]]
        assert float(g["student_acc_mean"]) == pytest.approx(statistics.fmean(members), abs=1e-3)
        assert float(g["student_acc_std"]) == pytest.approx(statistics.stdev(members), abs=1e-3)
    for png in ("summary_vs_method_T.png", "summary_heatmap.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Mean +- std over seeds" in (sweep_dir / "summary.md").read_text()


def test_rerunning_a_multirun_skips_complete_jobs(grid_sweep):
    base, sweep_dir, _ = grid_sweep
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/report.json")}
    proc, _ = multirun(GRID, base)
    assert proc.stdout.count("already holds a complete report") == 8
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/report.json")} == before


def test_kd_summarize_cli(grid_sweep, tmp_path):
    _, sweep_dir, _ = grid_sweep
    ok = subprocess.run([sys.executable, "-m", "kd_runner.summary", str(sweep_dir)], capture_output=True, text=True)
    assert ok.returncode == 0 and "8 jobs, 4 settings" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "kd_runner.summary", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no complete report.json" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("launcher", ["local_parallel", "submitit_cpu"])
def test_parallel_and_cluster_launchers_share_one_teacher(launcher, tmp_path):
    args = [f"hydra/launcher={launcher}", "method.T=1,4", "trainer.bench_iters=0"]
    if launcher == "local_parallel":
        args = [a for a in helpers.merge_overrides(args) if not a.startswith("trainer.num_threads")]
    _, sweep_dir = multirun(args, tmp_path, fast=launcher != "local_parallel")
    reps = reports(sweep_dir)
    assert len(reps) == 2
    assert sorted(r["teacher"]["source"] for r in reps) == ["cache", "trained"]
    assert len(read_csv(sweep_dir / "summary.csv")) == 2
    if launcher == "local_parallel":  # 2 jobs: each gets half the cores, not all of them
        cores = len(os.sched_getaffinity(0))
        assert {r["torch_threads"] for r in reps} == {max(1, cores // 2)}
    else:
        assert list(sweep_dir.glob(".submitit/*"))


RESUME_ARGS = ["trainer.teacher_epochs=2", "trainer.student_epochs=12", "trainer.batch_size=16",
               "dataset.val_fraction=0.2", "trainer.bench_iters=0"]


def test_sigterm_mid_student_then_rerun_matches_uninterrupted_run(tmp_path):
    full_proc, full_dir = helpers.run_cli(RESUME_ARGS, tmp_path / "full")
    full = helpers.assert_ok(full_proc, full_dir)

    base = tmp_path / "cut"
    base.mkdir()
    run_dir = base / "run"
    proc = start_and_stop(RESUME_ARGS, base, run_dir, "student.pt")
    err = proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("kd-train: stopped by SIGTERM") and "Traceback" not in err
    assert not (run_dir / "report.json").exists()

    again, _ = helpers.run_cli(RESUME_ARGS, base, run_dir=run_dir)
    resumed = helpers.assert_ok(again, run_dir)
    for role in ("teacher", "baseline", "student"):
        for key in ("test_acc", "test_acc_best_val", "best_val_acc", "best_epoch"):
            assert resumed["models"][role][key] == full["models"][role][key], (role, key)
    assert helpers.loss_columns(helpers.read_metrics(run_dir)) == helpers.loss_columns(helpers.read_metrics(full_dir))


def start_and_stop(args: list[str], base: Path, run_dir: Path, state_file: str) -> subprocess.CompletedProcess:
    """Start a run, SIGTERM it once ``state/<state_file>`` exists, and return the finished process."""
    cmd = [sys.executable, "-m", "kd_runner.train", *helpers.merge_overrides(args), f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=base, env=helpers.cli_env(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (run_dir / "state" / state_file).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_state_of_another_config_is_refused_and_a_complete_run_cleans_it(tmp_path):
    run_dir = tmp_path / "run"
    stopped = start_and_stop(RESUME_ARGS, tmp_path, run_dir, "teacher.pt")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    proc, _ = helpers.run_cli([*RESUME_ARGS, "method=hint"], tmp_path, run_dir=run_dir)
    helpers.assert_user_error(proc, run_dir, "different config")
    proc, _ = helpers.run_cli(RESUME_ARGS, tmp_path, run_dir=run_dir)  # the original config resumes and finishes
    helpers.assert_ok(proc, run_dir)
    assert not (run_dir / "state").exists() and not (run_dir / "error.txt").exists()


def test_one_bad_job_does_not_stop_the_sweep(tmp_path):
    base = tmp_path
    cmd = [sys.executable, "-m", "kd_runner.train", "-m", *helpers.merge_overrides(["optimizer.lr=-1,0.001",
                                                                                      "trainer.bench_iters=0"]),
           f"hydra.sweep.dir={base / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=base, env=helpers.cli_env(base), capture_output=True, text=True,
                          timeout=helpers.CLI_TIMEOUT_S)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optimizer.lr=-1" in (base / "sweep" / "0" / "error.txt").read_text()
    assert (base / "sweep" / "1" / "report.json").is_file()
    assert len(read_csv(base / "sweep" / "summary.csv")) == 1


def test_optuna_search_writes_best_setting(tmp_path):
    _, sweep_dir = multirun(["hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", "trainer.bench_iters=0"],
                            tmp_path)
    import yaml

    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"method.T", "method.soft_weight"}
    best = max(r["models"]["student"]["best_val_acc"] for r in reports(sweep_dir))
    assert result["best_value"] == pytest.approx(best)
