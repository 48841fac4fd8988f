"""summary.html (one self-contained page per sweep) and the export columns of summary.md/csv.

The sweep dir is built by hand as a multirun leaves it (job records, .hydra/overrides.yaml, report.json/md,
error.txt of a failed job): the numbers are chosen here, so every cell can be checked against them.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from omegaconf import OmegaConf

from kd_runner import summary

EVIL_T = "<script>alert(1)</script>"
EVIL_REASON = "method.T=<script>alert(1)</script> is invalid: <img src=x onerror=alert(2)> & more"


def export_entry(acc: float, ms: float, ips: float, parity: bool = True, fmt: str = "onnx") -> dict:
    """One ``models.<role>.export`` entry in kd_runner/export.py's schema."""
    return {"format": fmt, "file": f"export/model.{fmt}", "fallback": None, "atol": 1e-4,
            "max_abs_diff": 1e-6 if parity else 0.5, "parity": parity, "test_acc": acc, "runtime": "onnxruntime 1.32.0",
            "latency_ms": ms, "throughput_ips": ips, "torch_latency_ms": ms * 2, "torch_throughput_ips": ips / 2,
            "threads": 1, "input": {"name": "images", "shape": ["batch", 1, 8, 8], "dtype": "float32"}}


def fake_job(sweep: Path, num: int, overrides: list[str], student: float, exports: dict | None = None) -> dict:
    """A complete job dir as kd-train leaves it, and its multirun record; returns the report."""
    job_dir = sweep / str(num)
    (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = int(dict(o.split("=", 1) for o in overrides)["seed"])
    models = {"teacher": {"test_acc": 90.0 + seed}, "baseline": {"test_acc": 50.0 + seed},
              "student": {"test_acc": student, "best_val_acc": None}}
    for role, entry in (exports or {}).items():
        models[role]["export"] = entry
    rep = {"status": "complete", "config_hash": f"h{num}", "overrides": overrides, "seed": seed, "models": models,
           "kd_gain_points": round(student - models["baseline"]["test_acc"], 4),
           "phase_seconds": {"total": 2.0**num},  # 1 .. 128 s: in text order 128 comes before 16
           "teacher": {"source": "cache"}}
    (job_dir / "report.json").write_text(json.dumps(rep, indent=2))
    (job_dir / "report.md").write_text(f"# report of job {num}\n")
    summary.write_job_record(sweep, num, str(num), overrides, "complete", config_hash=f"h{num}")
    return rep


def build_sweep(sweep: Path, with_exports: bool = True) -> dict[int, dict]:
    """method.T=1,4 x method.soft_weight=0.25,0.75 x seed=0,1 (8 complete jobs, exported when T=1) and a
    failed job 8 whose override value and reason are HTML."""
    summary.reset_job_records(sweep)
    reps, num = {}, 0
    for t in (1, 4):
        for w in (0.25, 0.75):
            for seed in (0, 1):
                acc = 60.0 + 3 * t + 8 * w + 1.5 * seed + (0.25 if w == 0.75 and seed else 0.0)
                exports = None
                if with_exports and t == 1:
                    exports = {"student": export_entry(acc - 0.5 * seed, 0.2 + num / 100, 5000.0 + num,
                                                       parity=num != 1),
                               "teacher": export_entry(90.0, 1.5 + num / 10, 800.0 + num)}
                overrides = [f"method.T={t}", f"method.soft_weight={w}", f"seed={seed}", "trainer.student_epochs=1"]
                reps[num] = fake_job(sweep, num, overrides, acc, exports)
                num += 1
    bad = [f"method.T={EVIL_T}", "method.soft_weight=0.25", "seed=0", "trainer.student_epochs=1"]
    (sweep / "8").mkdir()
    (sweep / "8" / "error.txt").write_text(EVIL_REASON + "\n")
    summary.write_job_record(sweep, 8, "8", bad, "failed", EVIL_REASON, "user")
    return reps


class Page(HTMLParser):
    """The parts of summary.html a test reads: tables (headers, cells with their sort value and links), every
    src/href, the scripts, the text of ``#counts``."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.scripts: list[str] = []
        self.counts = ""
        self._table = self._cell = None
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [(tag, k, v) for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), {"cols": [], "heads": [], "rows": [], "sorted": [],
                                                              "classes": a.get("class", "")})
        elif tag == "th" and self._table is not None:
            self._table["cols"].append(a.get("data-col"))
            self._table["sorted"].append(a.get("class"))
            self._cell = {"text": ""}
            self._in = "th"
        elif tag == "tr" and self._table is not None:
            self._row_class = a.get("class")
        elif tag == "td" and self._table is not None:
            self._cell = {"text": "", "v": a.get("data-v"), "links": []}
            self._in = "td"
        elif tag == "a" and self._cell is not None and self._in == "td":
            self._cell["links"].append(a["href"])
        elif tag == "script":
            self.scripts.append("")
            self._in = "script"
        elif tag == "p" and a.get("id") == "counts":
            self._in = "counts"

    def handle_endtag(self, tag):
        if tag == "th" and self._in == "th":
            self._table["heads"].append(self._cell["text"].strip())
            self._cell = self._in = None
        elif tag == "td" and self._in == "td":
            self._cell["text"] = self._cell["text"].strip()
            rows = self._table["rows"]
            if not rows or rows[-1]["done"]:
                rows.append({"cells": [], "class": self._row_class, "done": False})
            rows[-1]["cells"].append(self._cell)
            self._cell = self._in = None
        elif tag == "tr" and self._table is not None and self._table["rows"]:
            self._table["rows"][-1]["done"] = True
        elif tag == "table":
            self._table = None
        elif tag in ("script", "p"):
            self._in = None

    def handle_data(self, data):
        if self._in in ("th", "td"):
            self._cell["text"] += data
        elif self._in == "script":
            self.scripts[-1] += data
        elif self._in == "counts":
            self.counts += data

    def column(self, table: str, head: str) -> list[dict]:
        t = self.tables[table]
        i = t["heads"].index(head)
        return [r["cells"][i] for r in t["rows"]]


def kd_summarize(sweep: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_runner.summary", str(sweep)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def swept():
    """The sweep, summarised through the ``kd-summarize`` command: (sweep dir, reports by job, page, html text)."""
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        reps = build_sweep(sweep)
        proc = kd_summarize(sweep)
        assert proc.returncode == 0, proc.stderr
        text = (sweep / "summary.html").read_text(encoding="utf-8")
        yield sweep, reps, Page(text), text


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} \u00b1 {statistics.stdev(values):.2f}"


def test_grouped_table_holds_mean_and_std_over_seeds(swept):
    sweep, reps, page, _ = swept
    groups = page.tables["groups"]
    assert groups["heads"] == ["method.T", "method.soft_weight", "n", "teacher %", "baseline %", "student %",
                               "KD gain"]
    assert "sortable" in groups["classes"]
    assert len(groups["rows"]) == 4
    for row in groups["rows"]:
        t, w, n, teacher, baseline, student, gain = (c["text"] for c in row["cells"])
        members = [r for r in reps.values() if r["overrides"][:2] == [f"method.T={t}", f"method.soft_weight={w}"]]
        assert n == "2" and len(members) == 2
        assert teacher == mean_std([r["models"]["teacher"]["test_acc"] for r in members])
        assert baseline == mean_std([r["models"]["baseline"]["test_acc"] for r in members])
        assert student == mean_std([r["models"]["student"]["test_acc"] for r in members])
        assert gain == mean_std([r["kd_gain_points"] for r in members])
        # the sort value is the mean itself, not its rounded text
        assert float(row["cells"][5]["v"]) == pytest.approx(
            statistics.fmean(r["models"]["student"]["test_acc"] for r in members))
    # the same numbers as summary.md
    md = (sweep / "summary.md").read_text()
    for row in groups["rows"]:
        assert " | ".join(c["text"].replace("\u00b1", "+-") for c in row["cells"]) in md


def test_per_job_table_matches_every_report_and_names_the_failed_job(swept):
    sweep, reps, page, _ = swept
    jobs = page.tables["jobs"]
    assert jobs["heads"][:11] == ["job", "status", "method.T", "method.soft_weight", "seed", "teacher %",
                                  "baseline %", "student %", "KD gain", "wall s", "student ort acc"]
    assert [c["text"] for c in page.column("jobs", "job")] == [str(i) for i in range(9)]
    for i, rep in reps.items():
        row = {h: c for h, c in zip(jobs["heads"], jobs["rows"][i]["cells"], strict=True)}
        assert row["status"]["text"] == "complete" and row["seed"]["text"] == str(rep["seed"])
        assert row["student %"]["text"] == f"{rep['models']['student']['test_acc']:.2f}"
        assert float(row["student %"]["v"]) == rep["models"]["student"]["test_acc"]
        assert row["teacher %"]["text"] == f"{rep['models']['teacher']['test_acc']:.2f}"
        assert row["KD gain"]["text"] == f"{rep['kd_gain_points']:+.2f}"
        assert row["wall s"]["text"] == f"{rep['phase_seconds']['total']:.1f}"
        assert row["report"]["links"] == [f"{i}/report.md", f"{i}/report.json"]
    failed = {h: c for h, c in zip(jobs["heads"], jobs["rows"][8]["cells"], strict=True)}
    assert jobs["rows"][8]["class"] == "failed"
    assert failed["status"]["text"] == "failed" and failed["student %"]["text"] == ""
    assert failed["method.T"]["text"] == EVIL_T and failed["note"]["text"] == EVIL_REASON
    assert failed["report"]["links"] == ["8/error.txt"]
    assert page.counts.startswith("8 complete jobs, 1 failed. Shared overrides: trainer.student_epochs=1")


def test_export_columns_show_the_runtime_figures_of_exported_jobs(swept):
    sweep, reps, page, _ = swept
    heads = ["student ort acc", "student ms (bs1)", "teacher ms (bs1)", "student img/s (bs64)",
             "teacher img/s (bs64)", "export"]
    assert page.tables["jobs"]["heads"][10:16] == heads
    md_rows = {line.split(" | ")[0].strip("| "): line for line in (sweep / "summary.md").read_text().splitlines()
               if " | complete | " in line}
    assert "| " + " | ".join(heads) + " |" in (sweep / "summary.md").read_text()
    with (sweep / "summary.csv").open() as f:
        csv_rows = {r["job"]: r for r in csv.DictReader(f)}
    for i, rep in reps.items():
        cells = {h: page.column("jobs", h)[i]["text"] for h in heads}
        if "export" not in rep["models"]["student"]:
            assert set(cells.values()) == {""} and csv_rows[str(i)]["student_export_acc"] == ""
            continue
        s, t = rep["models"]["student"]["export"], rep["models"]["teacher"]["export"]
        expect = [f"{s['test_acc']:.2f}", f"{s['latency_ms']:.3f}", f"{t['latency_ms']:.3f}",
                  f"{s['throughput_ips']:.0f}", f"{t['throughput_ips']:.0f}"]
        assert list(cells.values())[:5] == expect
        assert " | ".join(expect) in md_rows[str(i)]
        assert float(csv_rows[str(i)]["student_export_acc"]) == pytest.approx(s["test_acc"])
        assert float(csv_rows[str(i)]["teacher_export_ips"]) == pytest.approx(t["throughput_ips"])
        # a model whose runtime outputs do not match PyTorch's is flagged: its figures are not the trained model's
        assert cells["export"] == ("onnx; parity failed: student (max diff 0.5)" if i == 1 else "onnx")


def test_page_is_self_contained_and_its_links_resolve(swept):
    sweep, _, page, text = swept
    imgs = [v for tag, k, v in page.urls if tag == "img"]
    assert len(imgs) == 2  # accuracy/gain vs T and the T x soft_weight heatmap
    on_disk = {(sweep / name).read_bytes() for name in ("summary_vs_method_T.png", "summary_heatmap.png")}
    assert {base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in imgs} == on_disk
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    links = [url for tag, _, url in page.urls if tag != "img"]
    assert len(links) > 2 * 9
    for url in links:  # relative paths to files of the sweep dir, nothing on a network
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
        assert (sweep / unquote(parts.path)).is_file(), url
    assert "http:" not in text and "https:" not in text and "<link" not in text
    assert [tag for tag, _, _ in page.urls if tag == "script"] == []  # no script src: the only script is inline


def test_user_text_is_escaped_and_the_sort_script_is_there(swept):
    _, _, page, text = swept
    assert EVIL_T not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(page.scripts) == 1 and "addEventListener('click'" in page.scripts[0] and "#|&)sort=" in page.scripts[0]
    jobs = page.tables["jobs"]
    assert None not in jobs["cols"] and jobs["cols"][:3] == ["job", "status", "method.T"]
    assert "student_acc" in jobs["cols"] and "student_acc" in page.tables["groups"]["cols"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browser_dom(url: str, profile: Path) -> Page:
    """The page's DOM after its scripts ran in headless Chromium."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<table" in proc.stdout, proc.stderr[-2000:]
    return Page(proc.stdout)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary")
def test_a_browser_sorts_by_the_url_and_by_clicks(swept, tmp_path):
    sweep, _, _, text = swept
    page = browser_dom((sweep / "summary.html").as_uri() + "#sort=-student_acc", tmp_path / "profile1")
    accs = [float(c["text"]) for c in page.column("jobs", "student %")[:8]]
    assert accs == sorted(accs, reverse=True) and page.column("jobs", "job")[8]["text"] == "8"  # no number: last
    groups = [float(c["v"]) for c in page.column("groups", "student %")]
    assert groups == sorted(groups, reverse=True)
    jobs = page.tables["jobs"]
    assert jobs["sorted"][jobs["heads"].index("student %")] == "desc" and jobs["sorted"].count(None) == \
        len(jobs["heads"]) - 1
    # a click sorts by wall time as numbers (2 < 16 < 128), a second click reverses
    clicks = "document.querySelector('#jobs th[data-col=wall_s]')"
    page_file = tmp_path / "summary.html"
    for n, expect in ((1, [0, 1, 2, 3, 4, 5, 6, 7, 8]), (2, [7, 6, 5, 4, 3, 2, 1, 0, 8])):
        page_file.write_text(text.replace("</body>", f"<script>{f'{clicks}.click();' * n}</script></body>"))
        page = browser_dom(page_file.as_uri(), tmp_path / f"profile_click{n}")
        assert [int(c["text"]) for c in page.column("jobs", "job")] == expect
        assert page.tables["jobs"]["sorted"][page.tables["jobs"]["heads"].index("wall s")] == \
            ("asc" if n == 1 else "desc")


def test_no_export_columns_when_no_job_was_exported(tmp_path):
    sweep = tmp_path / "sweep"
    build_sweep(sweep, with_exports=False)
    summary.write_summary(sweep)
    page = Page((sweep / "summary.html").read_text())
    assert page.tables["jobs"]["heads"] == ["job", "status", "method.T", "method.soft_weight", "seed", "teacher %",
                                            "baseline %", "student %", "KD gain", "wall s", "teacher from", "report",
                                            "note"]
    assert "bs1" not in (sweep / "summary.md").read_text()
    assert "student_export_acc" not in (sweep / "summary.csv").read_text()


def test_mixed_export_formats_name_no_single_runtime(tmp_path):
    sweep = tmp_path / "sweep"
    summary.reset_job_records(sweep)
    fake_job(sweep, 0, ["method.T=1", "seed=0"], 70.0, {"student": export_entry(70.0, 0.2, 5000.0)})
    fake_job(sweep, 1, ["method.T=2", "seed=0"], 71.0, {"student": export_entry(71.0, 0.3, 4000.0, fmt="torchscript")})
    summary.write_summary(sweep)
    heads = Page((sweep / "summary.html").read_text()).tables["jobs"]["heads"]
    assert "student runtime acc" in heads and "student ms (bs1)" in heads
    assert "teacher ms (bs1)" not in heads  # no teacher was exported: no empty column


def test_the_summary_after_a_multirun_writes_the_page_too(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    build_sweep(sweep, with_exports=False)
    shutil.rmtree(sweep / "8")  # a job that failed before making its dir: listed, no link
    summary.SummaryCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert "(8 jobs; 1 failed)" in capsys.readouterr().out
    page = Page((sweep / "summary.html").read_text())
    assert len(page.tables["jobs"]["rows"]) == 9 and page.column("jobs", "report")[8]["links"] == []
    assert len(page.tables["groups"]["rows"]) == 4
