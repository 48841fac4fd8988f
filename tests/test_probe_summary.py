"""``kd-summarize`` on damaged and mixed sweep dirs: a warning per bad report.json, the rest summarised,
stale reports marked, one-line errors with exit 2 for a bad argument. Reports are written by hand here
(no training): the numbers do not matter, only which jobs are summarised and how."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kd_runner import summary


def fake_job(job_dir: Path, overrides: list[str], student_acc: float, config_hash: str = "h") -> Path:
    """A job dir as kd-train leaves it: .hydra/overrides.yaml and a complete report.json."""
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rep = {"status": "complete", "config_hash": config_hash, "overrides": overrides, "seed": 0,
           "models": {"teacher": {"test_acc": 90.0}, "baseline": {"test_acc": 50.0},
                      "student": {"test_acc": student_acc, "best_val_acc": None}},
           "kd_gain_points": student_acc - 50.0, "phase_seconds": {"total": 1.5}, "teacher": {"source": "trained"}}
    (job_dir / "report.json").write_text(json.dumps(rep))
    return job_dir / "report.json"


def kd_summarize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_runner.summary", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- damaged reports


BAD_REPORTS = {
    "1": (b'{"status": "complete", "config_hash": "h"}', "lacks the key 'models.student.test_acc'"),
    "2": (b'[1, 2, 3]', "holds a JSON list, not a kd-train report object"),
    "3": (b'{"status": "complete", "note": "\xff\xfe caf\xe9"}', "is not UTF-8 text"),
    "4": (b'{"status": "complete", "models": {"student": {"test_a', "is not valid JSON, truncated or corrupt"),
    "5": (b'{"status": "complete", "models": {"student": {"test_acc": "high"}}}', "non-numeric"),
}


def test_damaged_reports_are_warned_about_and_the_rest_summarised(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ["method.T=1"], 60.0)
    fake_job(sweep / "6", ["method.T=2"], 70.0)
    for name, (data, _) in BAD_REPORTS.items():
        fake_job(sweep / name, [f"method.T={name}0"], 0.0)
        (sweep / name / "report.json").write_bytes(data)
    proc = kd_summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("kd-summarize: warning:")]
    assert len(warnings) == len(BAD_REPORTS), proc.stderr
    for name, (_, problem) in BAD_REPORTS.items():
        path = str(sweep / name / "report.json")
        assert any(path in w and problem in w for w in warnings), (name, warnings)
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["status"], r["method.T"]) for r in rows] == [("0", "complete", "1"), ("6", "complete", "2")]
    assert "2 jobs, 2 settings" in proc.stdout


def test_a_file_path_is_not_a_sweep_dir(tmp_path):
    report = fake_job(tmp_path / "run", ["seed=1"], 60.0)
    proc = kd_summarize(report)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kd-summarize: error: '{report}' is a file, not a sweep directory " \
                                  "(give the folder holding the job dirs)"
    missing = kd_summarize(tmp_path / "nope")
    assert missing.returncode == 2 and missing.stderr.strip() == \
        f"kd-summarize: error: sweep dir '{tmp_path / 'nope'}' does not exist"


def test_only_damaged_reports_is_an_error_with_warnings(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ["seed=1"], 60.0)
    (sweep / "0" / "report.json").write_bytes(b'{"status": "comp')
    proc = kd_summarize(sweep)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("kd-summarize: warning:") and "truncated" in lines[0]
    assert lines[-1].startswith("kd-summarize: error: no complete report.json")
    assert not (sweep / "summary.csv").exists()


# --------------------------------------------------------------------------- which jobs a summary covers


def old_and_new_grid(sweep: Path) -> None:
    """An old T=2,4 sweep, then a T=8 multirun into the same dir whose job 0 replaced the T=2 run."""
    fake_job(sweep / "0", ["method.T=8"], 80.0, config_hash="t8")
    fake_job(sweep / "1", ["method.T=4"], 40.0, config_hash="t4")
    summary.reset_job_records(sweep)
    summary.write_job_record(sweep, 0, "0", ["method.T=8"], "complete", config_hash="t8")


def test_summary_after_a_multirun_covers_its_grid_and_names_older_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    old_and_new_grid(sweep)
    summary.SummaryCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert "(1 jobs; 1 older job dirs left out)" in capsys.readouterr().out
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["status"], r["method.T"]) for r in rows] == [("0", "complete", "8")]
    md = (sweep / "summary.md").read_text()
    assert "Left out: 1 job dir(s) from an earlier multirun" in md and "1 (method.T=4)" in md
    assert "| 0 | complete | " in md and "| 1 | complete" not in md and "| 1 | stale" not in md


def test_kd_summarize_by_hand_lists_older_jobs_as_stale(tmp_path):
    sweep = tmp_path / "sweep"
    old_and_new_grid(sweep)
    proc = kd_summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["0"]["status"] == "complete"
    assert rows["1"]["status"] == "stale" and "not a job of the last multirun" in rows["1"]["reason"]
    groups = read_csv(sweep / "summary_groups.csv")  # means over the current grid only
    assert len(groups) == 1 and float(groups[0]["student_acc_mean"]) == pytest.approx(80.0)
    assert "1 stale report(s)" in (sweep / "summary.md").read_text()


def test_a_report_older_than_the_dirs_last_run_is_stale(tmp_path):
    """No multirun records (a sweep from before them): .hydra/ says a later run used other overrides."""
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ["method.T=2"], 60.0)
    fake_job(sweep / "1", ["method.T=4"], 40.0)
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["method.T=-1"]))
    (sweep / "1" / "error.txt").write_text("method.T=-1 is invalid\n")
    proc = kd_summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["0"]["status"] == "complete"
    assert rows["1"]["status"] == "stale" and "method.T=-1" in rows["1"]["reason"]


def test_failed_jobs_of_the_grid_are_listed_with_their_reason(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ["method.T=2"], 60.0, config_hash="t2")
    (sweep / "1").mkdir()
    summary.reset_job_records(sweep)
    summary.write_job_record(sweep, 0, "0", ["method.T=2"], "complete", config_hash="t2")
    summary.write_job_record(sweep, 1, "1", ["method.T=-1"], "failed", "method.T=-1 is invalid", "user")
    summary.write_job_record(sweep, 2, "2", ["method.T=3"], "running")  # its worker was killed
    out = summary.write_summary(sweep, current_only=True)
    assert [r["job"] for r in out["rows"]] == ["0"]
    failed = read_csv(sweep / "summary_failed.csv")
    assert [(r["job"], r["status"], r["method.T"]) for r in failed] == [("1", "failed", "-1"), ("2", "failed", "3")]
    assert failed[0]["reason"] == "method.T=-1 is invalid" and "did not finish" in failed[1]["reason"]
    md = (sweep / "summary.md").read_text()
    assert "| 1 | failed | -1 |" in md and "method.T=-1 is invalid" in md
