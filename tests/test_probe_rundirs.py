"""Who owns a run dir, and what kd-train does with one that holds something: concurrent runs, default dirs,
reruns with another config, sweeps into an old sweep dir, failed and crashed sweep jobs (basic and joblib
launchers), unwritable output paths, SIGTERM during a multirun. Every run is a real CLI subprocess."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers
import pytest

TINY = ["trainer.bench_iters=0"]
# long enough to be caught mid-run: 2 teacher epochs, 12 student epochs on 16-image batches
SLOW = ["trainer.teacher_epochs=2", "trainer.student_epochs=12", "trainer.batch_size=16", "trainer.bench_iters=0"]


def kd_train(args: list[str], base: Path, env: dict | None = None, fast: bool = True, wrap: list[str] | None = None,
             popen: bool = False):
    """``python -m kd_runner.train ARGS`` in ``base`` (no hydra.run.dir added); a finished process or a Popen."""
    flags = [a for a in args if a.startswith("-")]  # Hydra's argparse wants -m before the overrides
    overrides = helpers.merge_overrides([a for a in args if not a.startswith("-")], fast)
    cmd = [*(wrap or []), sys.executable, "-m", "kd_runner.train", *flags, *overrides]
    kw = {"cwd": base, "env": helpers.cli_env(base, **(env or {})), "stdout": subprocess.PIPE,
          "stderr": subprocess.PIPE, "text": True}
    if popen:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=helpers.CLI_TIMEOUT_S, **kw)


def one_error_line(proc, *needles: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, the last stderr line the only ``kd-train: error:`` line, naming every needle."""
    detail = f"rc={proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr, detail
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("kd-train: error:"), detail
    assert sum(ln.startswith("kd-train: error:") for ln in lines) == 1, detail
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in: {lines[-1]}"
    return lines[-1]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended before {what}: rc={proc.returncode}\n{err[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def lock_holder(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("pid") else None


def hold_lock(run_dir: Path, base: Path) -> subprocess.Popen:
    """Another kd-train process holding ``run_dir``'s lock (kd-train's own lock call), until killed."""
    code = ("import sys, time; from pathlib import Path; from kd_runner.train import lock_run_dir; "
            "lock_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=base, env=helpers.cli_env(base),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------- 1. one run per run dir


def test_a_second_run_on_a_busy_run_dir_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = kd_train([*SLOW, "seed=1", f"hydra.run.dir={run_dir}"], tmp_path, popen=True)
    try:
        wait_for(lambda: (run_dir / "state").is_dir(), first, "the first run to start training")
        second = kd_train([*SLOW, "seed=2", f"hydra.run.dir={run_dir}"], tmp_path)
        assert first.poll() is None, "the first run ended before the second was refused; the race proved nothing"
    finally:
        out, err = first.communicate(timeout=helpers.CLI_TIMEOUT_S)
    holder = lock_holder(run_dir / ".kd-train.lock")
    one_error_line(second, str(run_dir), f"pid {first.pid} on host", "is in use by another kd-train",
                   "hydra.run.dir")
    assert first.returncode == 0, err[-3000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["seed"] == 1  # the first run's, untouched by the second
    assert "seed=1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert not (run_dir / "error.txt").exists()
    assert holder is None  # released (emptied) when the run ended


def test_identical_commands_launched_together_get_their_own_dirs(tmp_path):
    runs = [kd_train(TINY, tmp_path, popen=True) for _ in range(2)]
    sweeps = [kd_train(["-m", "method.T=0"], tmp_path, popen=True) for _ in range(2)]  # fail fast, dirs made
    results = [(p, *p.communicate(timeout=helpers.CLI_TIMEOUT_S)) for p in runs + sweeps]
    for p, _, err in results[:2]:
        assert p.returncode == 0, err[-3000:]
    for p, _, err in results[2:]:
        assert p.returncode == 2, err[-3000:]
    run_dirs = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(run_dirs) == 2, run_dirs
    assert all((d / "report.json").is_file() for d in run_dirs)
    sweep_dirs = sorted((tmp_path / "outputs" / "multiruns").glob("*/*"))
    assert len(sweep_dirs) == 2, sweep_dirs
    assert all((d / "0" / "error.txt").is_file() for d in sweep_dirs)


def test_a_busy_job_dir_fails_that_job_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    holder = hold_lock(sweep / "1", tmp_path)
    try:
        proc = kd_train(["-m", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    line = one_error_line(proc, "1 of 2 sweep jobs failed", "job 1", f"pid {holder.pid}", "hydra.sweep.dir")
    assert "job 0" not in line
    assert (sweep / "0" / "report.json").is_file()
    assert not (sweep / "1" / "error.txt").exists()  # nothing written into a dir another run holds
    assert len(read_csv(sweep / "summary.csv")) == 1


def test_a_second_multirun_into_a_busy_sweep_dir_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    holder = hold_lock(sweep, tmp_path)
    try:
        proc = kd_train(["-m", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    one_error_line(proc, f"sweep dir '{sweep}'", f"pid {holder.pid}", "hydra.sweep.dir")
    assert sorted(p.name for p in sweep.iterdir()) == [".kd-train.lock"]


# --------------------------------------------------------------------------- 2. failed and crashed sweep jobs


def test_a_failed_job_fails_a_joblib_sweep_with_its_reason(tmp_path):
    args = ["-m", "hydra/launcher=local_parallel", "method.T=2,-1", *TINY]
    proc = kd_train(["-m", *(a for a in helpers.merge_overrides(args[1:]) if not a.startswith("trainer.num_threads"))],
                    tmp_path, fast=False)
    one_error_line(proc, "1 of 2 sweep jobs failed", "job 1 (method.T=-1)", "method.T=-1 is invalid")
    (sweep,) = (tmp_path / "outputs" / "multiruns").glob("*/*")  # the default dir; workers wrote into it too
    assert (sweep / "0" / "report.json").is_file()
    assert "method.T=-1" in (sweep / "1" / "error.txt").read_text()
    assert [r["method.T"] for r in read_csv(sweep / "summary.csv")] == ["2"]
    failed = read_csv(sweep / "summary_failed.csv")
    assert [(r["job"], r["status"]) for r in failed] == [("1", "failed")] and "method.T=-1" in failed[0]["reason"]
    assert "| 1 | failed | -1 |" in (sweep / "summary.md").read_text()


CRASH_HOOK = """
    import os
    if os.environ.get("KD_TEST_CRASH_SEED"):  # a bug in one job: pipeline.run raises for that seed
        import kd_runner.pipeline as _pipeline
        _run = _pipeline.run
        def run(cfg, run_dir):
            if int(cfg.seed) == int(os.environ["KD_TEST_CRASH_SEED"]):
                raise RuntimeError("injected crash for a test")
            return _run(cfg, run_dir)
        _pipeline.run = run
"""


@pytest.mark.parametrize("launcher", ["basic", "local_parallel"])
def test_a_crashing_job_leaves_error_files_and_the_summary_is_still_written(launcher, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(CRASH_HOOK))  # every process, joblib workers too
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra/launcher={launcher}", "seed=13,14", *TINY, f"hydra.sweep.dir={sweep}"]
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    proc = kd_train(args, tmp_path, env={"PYTHONPATH": pythonpath, "KD_TEST_CRASH_SEED": "13"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd-train: error: 1 of 2 sweep jobs failed: job 0 (seed=13): RuntimeError: injected")
    assert (sweep / "0" / "error.txt").read_text().strip() == "RuntimeError: injected crash for a test"
    assert "Traceback" in (sweep / "0" / "error_traceback.txt").read_text()
    assert (sweep / "1" / "report.json").is_file()
    assert [r["seed"] for r in read_csv(sweep / "summary.csv")] == ["14"]
    md = (sweep / "summary.md").read_text()
    assert "| 0 | failed | 13 |" in md and "RuntimeError: injected crash for a test" in md


# --------------------------------------------------------------------------- 3. reruns into a complete run dir


def test_a_rerun_with_another_config_never_touches_a_complete_run(tmp_path):
    run_dir = tmp_path / "run"
    base_args = [*TINY, f"hydra.run.dir={run_dir}"]
    first = kd_train([*base_args, "dataset.val_fraction=0.2"], tmp_path)
    rep = helpers.assert_ok(first, run_dir)
    watched = ["report.json", "report.md", "metrics.csv", ".hydra/config.yaml", ".hydra/overrides.yaml",
               "checkpoints/student.pt", "checkpoints/student_best.pt"]
    before = {name: (run_dir / name).read_bytes() for name in watched}

    bad = kd_train([*base_args, "method.T=-1"], tmp_path)  # an invalid value: refused before anything
    one_error_line(bad, "method.T=-1")
    other = kd_train([*base_args, "method.T=8"], tmp_path)  # valid, but another config
    one_error_line(other, f"run dir '{run_dir}'", "holds a complete run of another config",
                   f"hash {rep['config_hash']}", "overwrite=true", "hydra.run.dir")
    assert {name: (run_dir / name).read_bytes() for name in watched} == before
    assert not (run_dir / "report.superseded.json").exists() and not (run_dir / "error.txt").exists()

    same = kd_train([*base_args, "dataset.val_fraction=0.2"], tmp_path)
    assert same.returncode == 0 and "already holds a complete report of this config" in same.stdout

    replaced = kd_train([*base_args, "method.T=8", "overwrite=true"], tmp_path)
    new = helpers.assert_ok(replaced, run_dir)
    assert new["method"]["T"] == 8 and new["config_hash"] != rep["config_hash"]
    assert "overwrite" not in new["config"]
    assert not (run_dir / "checkpoints" / "student_best.pt").exists()  # no file of the replaced run is left
    again = kd_train([*base_args, "method.T=8"], tmp_path)  # overwrite is no part of the config hash
    assert again.returncode == 0 and "already holds a complete report of this config" in again.stdout

    typo = kd_train([*base_args, "overwrite=yes"], tmp_path)
    one_error_line(typo, "overwrite='yes'", "true or false")


# --------------------------------------------------------------------------- 4. a sweep into an old sweep dir


def test_a_sweep_into_an_old_sweep_dir_summarises_only_its_own_grid(tmp_path):
    sweep = tmp_path / "sweep"
    grid = [*TINY, f"hydra.sweep.dir={sweep}"]
    first = kd_train(["-m", "method.T=2,4", *grid], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    old_report = (sweep / "0" / "report.json").read_bytes()

    refused = kd_train(["-m", "method.T=8", *grid], tmp_path)  # job 0 holds the complete T=2 run
    one_error_line(refused, "1 of 1 sweep jobs failed", "job 0", "holds a complete run of another config")
    assert (sweep / "0" / "report.json").read_bytes() == old_report
    assert read_csv(sweep / "summary.csv") == []  # neither the old T=2 nor the old T=4 numbers
    md = (sweep / "summary.md").read_text()
    assert "| 0 | failed |" in md and "1 (method.T=4)" in md

    replaced = kd_train(["-m", "method.T=8", "overwrite=true", *grid], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [(r["job"], r["method.T"]) for r in read_csv(sweep / "summary.csv")] == [("0", "8")]
    assert "Left out: 1 job dir(s)" in (sweep / "summary.md").read_text()

    by_hand = subprocess.run([sys.executable, "-m", "kd_runner.summary", str(sweep)], capture_output=True,
                             text=True, timeout=120)
    assert by_hand.returncode == 0, by_hand.stderr
    rows = {r["job"]: (r["status"], r["method.T"]) for r in read_csv(sweep / "summary.csv")}
    assert rows == {"0": ("complete", "8"), "1": ("stale", "4")}


# --------------------------------------------------------------------------- 6. output paths


def _file(base: Path) -> Path:
    path = base / "a-file"
    path.write_text("not a directory\n")
    return path


# id -> (overrides, env, needles); "{f}" is a regular file under tmp_path
PATH_CASES = {
    "output_dir_under_a_file": (["paths.output_dir={f}/x"], {}, ["paths.output_dir='{f}/x'", "'{f}' is a file"]),
    "output_dir_is_a_file": ([], {"KD_OUTPUT_DIR": "{f}"}, ["paths.output_dir='{f}' is a file", "KD_OUTPUT_DIR"]),
    "run_dir_under_a_file": (["hydra.run.dir={f}/run"], {}, ["hydra.run.dir='{f}/run'", "'{f}' is a file"]),
    "cache_dir_under_a_file": ([], {"KD_CACHE_DIR": "{f}/cache"}, ["paths.cache_dir='{f}/cache'", "KD_CACHE_DIR"]),
    "sweep_dir_under_a_file": (["-m", "seed=1,2", "hydra.sweep.dir={f}/sweep"], {},
                               ["hydra.sweep.dir='{f}/sweep'", "'{f}' is a file"]),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_an_output_path_that_cannot_be_created_is_one_line(case, tmp_path):
    f = str(_file(tmp_path))
    args, env, needles = PATH_CASES[case]
    proc = kd_train([a.replace("{f}", f) for a in args], tmp_path, env={k: v.replace("{f}", f) for k, v in env.items()})
    one_error_line(proc, *(n.replace("{f}", f) for n in needles))
    assert not (tmp_path / "outputs").exists()  # before Hydra made a single dir


def _read_only_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "d=$(mktemp -d) && mount --bind -o ro $d $d && "
                            "! touch $d/x 2>/dev/null"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mount_works(), reason="needs unshare -m and a read-only bind mount (root)")
@pytest.mark.parametrize("case", ["output_dir", "run_dir", "cache_dir"])
def test_a_read_only_output_path_is_one_line(case, tmp_path):
    """A read-only file system stops root too (chmod does not): the dir is bind-mounted read-only."""
    ro = tmp_path / "ro"
    ro.mkdir()
    args, env, needles = {
        "output_dir": ([], {"KD_OUTPUT_DIR": str(ro)}, [f"paths.output_dir='{ro}'", "read-only"]),
        "run_dir": ([f"hydra.run.dir={ro}/run"], {}, [f"hydra.run.dir='{ro}/run'", f"'{ro}' is on a read-only"]),
        "cache_dir": ([], {"KD_CACHE_DIR": str(ro / "cache")}, [f"paths.cache_dir='{ro}/cache'", "read-only"]),
    }[case]
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{ro}" "{ro}" && exec "$@"', "sh"]
    proc = kd_train(args, tmp_path, env=env, wrap=wrap)
    one_error_line(proc, *needles)
    assert not (tmp_path / "outputs").exists()


def test_unwritable_dir_is_reported_without_root(tmp_path, monkeypatch):
    """What os.access says for a non-root user on a chmod 555 dir (root passes access checks)."""
    from kd_runner import train
    from kd_runner.errors import UserError

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(train.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert train.dir_problem(locked / "a" / "b") == (locked, "is not writable")
    with pytest.raises(UserError, match=r"paths.output_dir='.*locked' is not writable; set KD_OUTPUT_DIR"):
        train.check_dirs([("hydra.run.dir", locked / "runs" / "x", "choose another hydra.run.dir")], locked)
    assert train.dir_problem(tmp_path / "fresh" / "dir") is None


# --------------------------------------------------------------------------- 7. SIGTERM during a multirun


def test_sigterm_during_a_multirun_says_to_rerun_with_the_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=5", *SLOW, f"hydra.sweep.dir={sweep}"]
    proc = kd_train(args, tmp_path, popen=True)
    wait_for(lambda: (sweep / "0" / "state" / "student.pt").exists(), proc, "the student's first epoch")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("kd-train: stopped by SIGTERM") and "Traceback" not in err
    assert f"the same hydra.sweep.dir ({sweep})" in last and "hydra.run.dir" not in last
    again = kd_train(args[:1] + args[1:], tmp_path)  # what the message says: the same command, same sweep dir
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((sweep / "0" / "report.json").read_text())["seed"] == 5
