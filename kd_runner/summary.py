"""Summarise a sweep: one row per job, mean +- std over seeds per setting, plots vs the swept values.

Used by ``kd-summarize DIR`` and, after every multirun, by :class:`SummaryCallback`. Writes summary.csv,
summary_groups.csv, summary.md, the plots and summary.html (one self-contained page: sortable tables, plots
inline, links to each job's report; rendered by :mod:`kd_runner.summary_html`) into the sweep dir.

Every job of a multirun records how it ended in ``<sweep_dir>/.kd-jobs/<num>.json`` (written by the job,
wherever it runs: this process, a joblib worker, a Slurm node). The records of the last multirun into a
sweep dir say which job dirs belong to its grid: the summary written after a multirun covers those jobs
alone (job dirs left from an earlier grid are named, not mixed in); ``kd-summarize DIR`` by hand lists
every job dir and marks reports that do not belong to the last multirun as stale.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from hydra.experimental.callback import Callback

from kd_runner.errors import UserError
from kd_runner.utils import atomic_write_text, save_figure

METRICS = ("teacher_acc", "baseline_acc", "student_acc", "kd_gain", "student_best_val", "wall_s")
SEED_KEYS = ("seed",)
# command-line keys that say how to run, not what a job computes: never a column of the summary
RUN_KEYS = ("overwrite",)
JOBS_DIR = ".kd-jobs"
DONE = ("complete", "skipped")  # job record statuses that leave a complete report.json
# the multirun under way in this process (set when it starts): kd-train reads its job records when it ends
ACTIVE_SWEEP: dict[str, Path] = {}
# deployable-model figures per job, from report.json's models.<role>.export (kd_runner/export.py):
# (column, role, export key, header with {rt} for the runtime, format spec); shown only when a job has them
EXPORT_COLUMNS = (
    ("student_export_acc", "student", "test_acc", "student {rt} acc", ".2f"),
    ("student_export_ms", "student", "latency_ms", "student ms (bs1)", ".3f"),
    ("teacher_export_ms", "teacher", "latency_ms", "teacher ms (bs1)", ".3f"),
    ("student_export_ips", "student", "throughput_ips", "student img/s (bs64)", ".0f"),
    ("teacher_export_ips", "teacher", "throughput_ips", "teacher img/s (bs64)", ".0f"),
)
RUNTIME_NAMES = {"onnx": "ort", "torchscript": "torchscript"}


# --------------------------------------------------------------------------- job records


def reset_job_records(sweep_dir: Path) -> None:
    """Start the job records of a new multirun into ``sweep_dir`` (older records describe an older grid)."""
    records = Path(sweep_dir) / JOBS_DIR
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True, exist_ok=True)


def write_job_record(sweep_dir: Path, num: int, job_dir: str, overrides: list[str], status: str,
                     reason: str | None = None, kind: str | None = None, config_hash: str | None = None) -> None:
    """Record how sweep job ``num`` (in ``sweep_dir/job_dir``) stands: running, complete, skipped or failed."""
    import os
    import socket

    record = {"num": num, "dir": job_dir, "overrides": list(overrides), "status": status, "reason": reason,
              "kind": kind, "config_hash": config_hash, "host": socket.gethostname(), "pid": os.getpid(),
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(Path(sweep_dir) / JOBS_DIR / f"{num}.json", json.dumps(record, indent=1) + "\n")


def read_job_records(sweep_dir: Path) -> dict[str, dict] | None:
    """``{job dir relative to sweep_dir: record}`` of the last multirun into ``sweep_dir``; None when no job
    of a multirun has recorded itself there (an older sweep, or a multirun that never launched a job)."""
    folder = Path(sweep_dir) / JOBS_DIR
    if not folder.is_dir():
        return None
    out = {}
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
            out[str(rec["dir"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out or None


def failed_jobs(records: dict[str, dict]) -> list[dict]:
    """The records of jobs that did not end with a complete report, in job order."""
    bad = [r for r in records.values() if r.get("status") not in DONE]
    return sorted(bad, key=lambda r: _job_sort_key(str(r.get("dir"))))


# --------------------------------------------------------------------------- reading job dirs


class BadReport(Exception):
    """A report.json that cannot be summarised; the message says why."""


def warn(message: str, prog: str = "kd-summarize") -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr)


def read_report(path: Path) -> dict:
    """A complete report.json's contents, or :class:`BadReport` saying what is wrong with the file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadReport(f"cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadReport(f"is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})") from None
    if not text.strip():
        raise BadReport("is empty")
    try:
        rep = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadReport(f"is not valid JSON, truncated or corrupt ({err.msg} at line {err.lineno} "
                        f"column {err.colno})") from None
    if not isinstance(rep, dict):
        raise BadReport(f"holds a JSON {_json_type(rep)}, not a kd-train report object")
    if rep.get("status") != "complete":
        raise BadReport(f"has status {rep.get('status')!r}, not 'complete'")
    _get(rep, "models.student.test_acc", required=True)
    return rep


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _get(rep: dict, path: str, required: bool = False, number: bool = True):
    """``rep[a][b][c]`` for ``path="a.b.c"``: None when absent, :class:`BadReport` when required or not numeric."""
    node = rep
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if required:
                raise BadReport(f"lacks the key '{path}'")
            return None
        node = node[part]
    if number and node is not None and (isinstance(node, bool) or not isinstance(node, (int, float))
                                        or not math.isfinite(node)):
        raise BadReport(f"has a non-numeric '{path}' ({node!r})")
    return node


def _clean_overrides(items) -> dict[str, str] | None:
    if not isinstance(items, list):
        return None
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra") and key not in RUN_KEYS:
            out[key] = value
    return out


def _hydra_overrides(job_dir: Path) -> dict[str, str] | None:
    """The overrides Hydra saved when the job dir was last run (``.hydra/overrides.yaml``)."""
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        return _clean_overrides(yaml.safe_load(path.read_text())) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _overrides(job_dir: Path, rep: dict) -> dict[str, str]:
    """The job's overrides as its report recorded them (``.hydra/`` may describe a later, failed rerun)."""
    found = _clean_overrides(rep.get("overrides"))
    return found if found is not None else (_hydra_overrides(job_dir) or {})


def _exports(rep: dict) -> dict[str, dict]:
    """``{role: models.<role>.export}`` for the roles that were exported; a malformed entry is left out
    (the accuracies still summarise), a non-numeric figure in one reads as absent."""
    models = rep.get("models")
    out = {}
    for role, info in (models.items() if isinstance(models, dict) else ()):
        entry = info.get("export") if isinstance(info, dict) else None
        if isinstance(entry, dict):
            out[role] = {k: (v if k in ("format", "file", "parity") or _is_number(v) else None)
                         for k, v in entry.items()}
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _row(job: str, job_dir: Path, rep: dict) -> dict:
    seed = rep.get("seed")
    return {
        "job": job,
        "status": "complete",
        "reason": None,
        "overrides": _overrides(job_dir, rep),
        "seed": seed if _is_number(seed) else None,
        "export": _exports(rep),
        "teacher_acc": _get(rep, "models.teacher.test_acc"),
        "baseline_acc": _get(rep, "models.baseline.test_acc"),
        "student_acc": _get(rep, "models.student.test_acc"),
        "kd_gain": _get(rep, "kd_gain_points"),
        "student_best_val": _get(rep, "models.student.best_val_acc"),
        "wall_s": _get(rep, "phase_seconds.total"),
        "teacher_source": _get(rep, "teacher.source", number=False),
    }


def _failed_row(job: str, overrides: dict[str, str], reason: str) -> dict:
    return {"job": job, "status": "failed", "reason": reason, "overrides": overrides, "seed": overrides.get("seed"),
            "export": {}, **dict.fromkeys(METRICS), "teacher_source": None}


def _first_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[0] if lines else None


def _job_dirs(sweep_dir: Path, records: dict[str, dict] | None) -> list[str]:
    """Job dirs under ``sweep_dir`` (relative): those with a report or an error, and those the records name."""
    found = set(records or {})
    for name in ("report.json", "error.txt"):
        for path in sweep_dir.rglob(name):
            rel = path.parent.relative_to(sweep_dir)
            if not any(part.startswith(".") for part in rel.parts):
                found.add(str(rel))
    return sorted(found, key=_job_sort_key)


def collect(sweep_dir: Path, current_only: bool = False, prog: str = "kd-summarize") -> dict:
    """Classify every job dir under ``sweep_dir``.

    Returns ``{"rows": complete jobs, "stale": reports not of the last multirun's grid, "failed": jobs of
    that grid without a complete report, "left_out": older job dirs not summarised}``. With
    ``current_only`` (the summary after a multirun) older job dirs are left out instead of listed as stale.
    A report.json that cannot be read is named in a warning on stderr and left out.
    """
    sweep_dir = Path(sweep_dir)
    records = read_job_records(sweep_dir)
    out: dict[str, list] = {"rows": [], "stale": [], "failed": [], "left_out": []}
    for job in _job_dirs(sweep_dir, records):
        job_dir = sweep_dir / job
        rep_path = job_dir / "report.json"
        rep, row, problem = None, {}, None
        if rep_path.is_file():
            try:
                rep = read_report(rep_path)
                row = _row(job, job_dir, rep)
            except BadReport as err:
                rep, problem = None, str(err)
                warn(f"{rep_path} {problem}; left out of the summary", prog)
        rec = records.get(job) if records is not None else None
        if rec is not None:  # a job of the last multirun: its record says how it ended
            overrides = _clean_overrides(rec.get("overrides")) or {}
            status = rec.get("status")
            if status in DONE and rep is not None and rec.get("config_hash") in (None, rep.get("config_hash")):
                out["rows"].append(row)
            elif status in DONE:
                why = problem or ("is missing" if rep is None else "is of another config")
                out["failed"].append(_failed_row(job, overrides, f"ended {status} but its report.json {why}"))
            elif status == "running":
                out["failed"].append(_failed_row(job, overrides, "did not finish: no result was recorded "
                                                                 "(the process was killed or is still running)"))
            else:
                out["failed"].append(_failed_row(job, overrides, str(rec.get("reason") or "failed")))
        elif records is not None:  # a job dir left from an earlier multirun with another grid
            if current_only or rep is None:
                overrides = row["overrides"] if rep is not None else (_hydra_overrides(job_dir) or {})
                out["left_out"].append({"job": job, "overrides": overrides, "complete": rep is not None})
            else:
                out["stale"].append({**row, "status": "stale",
                                     "reason": "not a job of the last multirun into this dir"})
        elif rep is not None:  # no multirun record (older sweeps): .hydra/ says what last ran in the dir
            last = _hydra_overrides(job_dir)
            if last is not None and last != row["overrides"]:
                latest = " ".join(f"{k}={v}" for k, v in last.items()) or "no overrides"
                out["stale"].append({**row, "status": "stale",
                                     "reason": f"the dir was run again later with other overrides ({latest})"})
            else:
                out["rows"].append(row)
        elif (reason := _first_line(job_dir / "error.txt")) is not None:
            out["failed"].append(_failed_row(job, _hydra_overrides(job_dir) or {}, reason))
    return out


def _job_sort_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _num(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["overrides"] if k not in keys]
    return keys


def varying_keys(rows: list[dict]) -> list[str]:
    return [k for k in _keys(rows) if len({r["overrides"].get(k) for r in rows}) > 1]


def group(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds for each setting of the other swept keys."""
    keys = [k for k in varying_keys(rows) if k not in SEED_KEYS]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["overrides"].get(k) for k in keys), []).append(r)
    out = []
    for setting, members in groups.items():
        g = {"setting": dict(zip(keys, setting, strict=True)), "n": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            g[f"{metric}_mean"] = statistics.fmean(values) if values else None
            g[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        out.append(g)
    return out


def _fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def write_summary(sweep_dir: Path, current_only: bool = False, prog: str = "kd-summarize") -> dict:
    """Write summary.csv, summary_groups.csv, summary.md, summary.html and plots into ``sweep_dir``; return what
    was written.

    summary.csv has one row per job with a report (status complete, or stale when summarising by hand);
    jobs that failed are listed in summary.md and summary_failed.csv with their reason. Means, std and
    plots cover complete jobs only.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise UserError(f"sweep dir '{sweep_dir}' does not exist")
    if not sweep_dir.is_dir():
        raise UserError(f"'{sweep_dir}' is a file, not a sweep directory (give the folder holding the job dirs)")
    found = collect(sweep_dir, current_only, prog)
    rows, stale, failed = found["rows"], found["stale"], found["failed"]
    if not (rows or stale or failed):
        raise UserError(f"no complete report.json under '{sweep_dir}'; nothing to summarise")
    listed = sorted(rows + stale, key=lambda r: _job_sort_key(r["job"]))
    keys = _keys(listed)
    grouped = group(rows) if rows else []
    gkeys = list(grouped[0]["setting"]) if grouped else []
    ecols = export_columns(listed)
    _write_csv(sweep_dir / "summary.csv", ["job", "status", *keys, *METRICS, *(c[0] for c in ecols),
                                           *(["export"] if ecols else []), "teacher_source", "reason"],
               [[r["job"], r["status"], *(r["overrides"].get(k, "") for k in keys),
                 *(_fmt(r[m], ".4f") for m in METRICS), *(_fmt(_export_value(r, c), ".4f") for c in ecols),
                 *([_export_note(r)] if ecols else []), r["teacher_source"], r["reason"] or ""] for r in listed])
    _write_csv(sweep_dir / "summary_groups.csv",
               [*gkeys, "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))],
               [[*(g["setting"][k] or "" for k in gkeys), g["n"],
                 *(_fmt(g[f"{m}_{s}"], ".4f") for m in METRICS for s in ("mean", "std"))] for g in grouped])
    fkeys = _keys(failed)
    if failed:
        _write_csv(sweep_dir / "summary_failed.csv", ["job", "status", *fkeys, "reason"],
                   [[r["job"], r["status"], *(r["overrides"].get(k, "") for k in fkeys), r["reason"]]
                    for r in failed])
    else:
        (sweep_dir / "summary_failed.csv").unlink(missing_ok=True)
    plots = _plots(sweep_dir, grouped, gkeys) if grouped else []
    for old in sweep_dir.glob("summary*.png"):  # plots of an earlier summary that this one did not redraw
        if old.name not in plots:
            old.unlink(missing_ok=True)
    atomic_write_text(sweep_dir / "summary.md", _markdown(found, grouped, gkeys, plots))
    from kd_runner import summary_html  # it imports this module's helpers: imported here, not at the top

    atomic_write_text(sweep_dir / "summary.html", summary_html.render(sweep_dir, found, grouped, gkeys, plots))
    return {**found, "groups": grouped, "plots": plots}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _describe(overrides: dict[str, str], keys: list[str] | None = None) -> str:
    """``k=v ...`` for ``keys`` (the swept ones), or for every override when none of them is set."""
    picked = {k: overrides[k] for k in keys or [] if k in overrides} or overrides
    return " ".join(f"{k}={v}" for k, v in picked.items()) or "no overrides"


def _differing(overrides: dict[str, str], shared: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in overrides.items() if shared.get(k) != v} or overrides


def counts(found: dict) -> str:
    """``8 jobs`` or ``8 jobs; 1 failed, 2 stale, 3 older job dirs left out``."""
    extra = [f"{len(found[k])} {k}" for k in ("failed", "stale") if found.get(k)]
    if found.get("left_out"):
        extra.append(f"{len(found['left_out'])} older job dirs left out")
    return f"{len(found['rows'])} jobs" + (f"; {', '.join(extra)}" if extra else "")


def _overview(found: dict) -> tuple[list[dict], list[str], dict[str, str]]:
    """Every listed job in job order, the swept keys to show per job, and the overrides all jobs share."""
    listed = sorted(found["rows"] + found["stale"] + found["failed"], key=lambda r: _job_sort_key(r["job"]))
    shown = varying_keys(listed) if len(listed) > 1 else []
    fixed = {k: v for k, v in listed[0]["overrides"].items() if k not in shown}
    return listed, shown, fixed


def _count_line(found: dict) -> str:
    """``8 complete jobs, 1 failed, 2 stale`` as summary.md opens."""
    failed, stale = found["failed"], found["stale"]
    return (f"{len(found['rows'])} complete jobs" + (f", {len(failed)} failed" if failed else "")
            + (f", {len(stale)} stale" if stale else ""))


def export_columns(rows: list[dict]) -> list[tuple]:
    """The :data:`EXPORT_COLUMNS` some job has a figure for, headers naming the runtime; [] when none was exported."""
    formats = {e.get("format") for r in rows for e in r["export"].values()}
    if not formats:
        return []
    runtime = RUNTIME_NAMES.get(next(iter(formats)), "runtime") if len(formats) == 1 else "runtime"
    return [(col, role, key, head.format(rt=runtime), spec) for col, role, key, head, spec in EXPORT_COLUMNS
            if any(_export_value(r, (col, role, key)) is not None for r in rows)]


def _export_value(row: dict, column: tuple):
    return row["export"].get(column[1], {}).get(column[2])


def _export_note(row: dict) -> str:
    """``onnx`` or ``onnx; parity failed: student (max diff 0.0123)``: the format, and which exported model does not
    match PyTorch (its runtime figures are then not the trained model's)."""
    entries = row["export"]
    if not entries:
        return ""
    formats = sorted({str(e.get("format")) for e in entries.values()})
    bad = [f"{role} (max diff {_fmt(e.get('max_abs_diff'), '.3g') or '?'})" for role, e in entries.items()
           if e.get("parity") is False]
    return "/".join(formats) + (f"; parity failed: {', '.join(bad)}" if bad else "")


def _markdown(found: dict, grouped, gkeys, plots) -> str:
    rows, stale, failed, left_out = found["rows"], found["stale"], found["failed"], found["left_out"]
    listed, shown, fixed = _overview(found)
    ecols = export_columns(listed)
    lines = ["# Sweep summary", "",
             _count_line(found) + ". Shared overrides: "
             + (", ".join(f"`{k}={v}`" for k, v in fixed.items()) or "none") + "."]
    if failed:
        lines += ["", f"**{len(failed)} job(s) failed** (no numbers; each job dir's error.txt holds the reason):"]
        lines += [f"- job {r['job']} ({_describe(r['overrides'], shown)}): {r['reason']}" for r in failed]
    if stale:
        lines += ["", f"**{len(stale)} stale report(s)**, listed but left out of the means and plots:"]
        lines += [f"- job {r['job']} ({_describe(r['overrides'], shown)}): {r['reason']}" for r in stale]
    if left_out:
        lines += ["", f"Left out: {len(left_out)} job dir(s) from an earlier multirun into this dir with another "
                      "grid: " + "; ".join(f"{j['job']} ({_describe(_differing(j['overrides'], fixed))})"
                                  for j in left_out)
                  + ". `kd-summarize DIR` lists them as stale."]
    lines += ["", "## Per job", ""]
    head = ["job", "status", *shown, "teacher %", "baseline %", "student %", "KD gain", "wall s",
            *(c[3] for c in ecols), *(["export"] if ecols else []), "teacher from", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in listed:
        lines.append("| " + " | ".join([r["job"], r["status"], *(r["overrides"].get(k, "") for k in shown),
                                        _fmt(r["teacher_acc"]), _fmt(r["baseline_acc"]), _fmt(r["student_acc"]),
                                        _fmt(r["kd_gain"], "+.2f"), _fmt(r["wall_s"], ".1f"),
                                        *(_fmt(_export_value(r, c), c[4]) for c in ecols),
                                        *([_export_note(r)] if ecols else []),
                                        str(r["teacher_source"] or ""),
                                        (r["reason"] or "").replace("|", "/")]) + " |")
    lines += ["", "## Mean +- std over seeds", ""]
    if not grouped:
        lines.append("No complete jobs.")
    else:
        if failed or stale:
            lines += [f"Over the {len(rows)} complete jobs only.", ""]
        head = [*gkeys, "n", "teacher %", "baseline %", "student %", "KD gain"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in grouped:
            cells = [f"{_fmt(g[f'{m}_mean'])} +- {_fmt(g[f'{m}_std'])}" if g[f"{m}_mean"] is not None else "-"
                     for m in ("teacher_acc", "baseline_acc", "student_acc", "kd_gain")]
            lines.append("| " + " | ".join([*(str(g["setting"][k]) for k in gkeys), str(g["n"]), *cells]) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(sweep_dir: Path, grouped: list[dict], varying: list[str]) -> list[str]:
    """Accuracy and KD gain vs the first numeric swept key (T preferred); a heatmap for a 2-D numeric grid."""
    numeric = [k for k in varying if all(isinstance(_num(g["setting"].get(k)), float) for g in grouped)]
    if not numeric:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "method.T" if "method.T" in numeric else numeric[0]
    others = [k for k in varying if k != x_key]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[tuple, list[dict]] = {}
    for g in grouped:
        lines.setdefault(tuple(g["setting"].get(k) for k in others), []).append(g)
    for label, members in lines.items():
        members.sort(key=lambda g: _num(g["setting"][x_key]))
        xs = [_num(g["setting"][x_key]) for g in members]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label, strict=True)) or "all"
        for ax, metric in zip(axes, ("student_acc", "kd_gain"), strict=True):
            ys = [g[f"{metric}_mean"] for g in members]
            if any(y is None for y in ys):
                continue
            ax.errorbar(xs, ys, yerr=[g[f"{metric}_std"] or 0.0 for g in members], marker="o", capsize=3, label=name)
    axes[0].set(xlabel=x_key, ylabel="student test accuracy (%)", title="Distilled student")
    axes[1].set(xlabel=x_key, ylabel="KD gain over CE baseline (points)", title="KD gain")
    axes[1].axhline(0.0, color="grey", linewidth=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, sweep_dir, f"summary_vs_{x_key.replace('.', '_')}.png"))
    if len(numeric) == 2 and len(varying) == 2:
        written.append(_heatmap(sweep_dir, grouped, numeric))
    return written


def _heatmap(sweep_dir: Path, grouped: list[dict], keys: list[str]) -> str:
    import matplotlib.pyplot as plt

    ys, xs = (sorted({_num(g["setting"][k]) for g in grouped}) for k in keys)
    grid = [[float("nan")] * len(xs) for _ in ys]
    for g in grouped:
        grid[ys.index(_num(g["setting"][keys[0]]))][xs.index(_num(g["setting"][keys[1]]))] = g["student_acc_mean"]
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set(xlabel=keys[1], ylabel=keys[0], title="Student test accuracy (%), mean over seeds")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, sweep_dir, "summary_heatmap.png")


def _save(fig, sweep_dir: Path, name: str) -> str:
    save_figure(fig, sweep_dir / name)
    return name


class SummaryCallback(Callback):
    """Hydra callback: start the job records when a multirun starts; summarise its jobs when it ends."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        ACTIVE_SWEEP["dir"] = sweep_dir
        try:
            reset_job_records(sweep_dir)
        except OSError:  # an unwritable sweep dir: the launcher reports it
            pass

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            out = write_summary(sweep_dir, current_only=True, prog="kd-train")
            print(f"summary: {sweep_dir / 'summary.md'} ({counts(out)})")
        except UserError as err:
            print(f"kd-summarize: {err}", file=sys.stderr)
        except OSError as err:
            print(f"kd-summarize: cannot write the summary into '{sweep_dir}': {err.strerror or err}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-summarize", description="Summarise a kd-train multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        out = write_summary(args.sweep_dir)
    except UserError as err:
        print(f"kd-summarize: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"kd-summarize: error: cannot write the summary into '{args.sweep_dir}': {err.strerror or err}",
              file=sys.stderr)
        sys.exit(2)
    extra = counts(out).partition("; ")[2]
    print(f"{args.sweep_dir / 'summary.md'}: {len(out['rows'])} jobs, {len(out['groups'])} settings"
          + (f"; {extra}" if extra else ""))


if __name__ == "__main__":
    main()
