"""Summarise a sweep: one row per job, mean +- std over seeds per setting, plots vs the swept values.

Used by ``kd-summarize DIR`` and, after every multirun, by :class:`SummaryCallback`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from kd_runner.errors import UserError
from kd_runner.utils import atomic_write_text, save_figure

METRICS = ("teacher_acc", "baseline_acc", "student_acc", "kd_gain", "student_best_val", "wall_s")
SEED_KEYS = ("seed",)


def _overrides(job_dir: Path, rep: dict) -> dict[str, str]:
    """The job's overrides as its report recorded them (``.hydra/`` may describe a later, failed rerun)."""
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    items = rep.get("overrides")
    if items is None:
        items = yaml.safe_load(path.read_text()) if path.is_file() else []
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            out[key] = value
    return out


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job directory holding a complete report.json."""
    rows = []
    for rep_path in sorted(sweep_dir.rglob("report.json"), key=lambda p: _job_sort_key(p.parent.name)):
        try:
            rep = json.loads(rep_path.read_text())
        except json.JSONDecodeError:
            continue
        if rep.get("status") != "complete":
            continue
        m = rep["models"]
        rows.append({
            "job": str(rep_path.parent.relative_to(sweep_dir)),
            "overrides": _overrides(rep_path.parent, rep),
            "teacher_acc": m.get("teacher", {}).get("test_acc"),
            "baseline_acc": m.get("baseline", {}).get("test_acc"),
            "student_acc": m["student"]["test_acc"],
            "kd_gain": rep.get("kd_gain_points"),
            "student_best_val": m["student"].get("best_val_acc"),
            "wall_s": rep["phase_seconds"].get("total"),
            "teacher_source": rep.get("teacher", {}).get("source"),
        })
    return rows


def _job_sort_key(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def _num(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def varying_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["overrides"] if k not in keys]
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


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


def write_summary(sweep_dir: Path) -> dict:
    """Write summary.csv, summary.md and plots into ``sweep_dir``; return what was written."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep dir '{sweep_dir}' does not exist")
    rows = collect(sweep_dir)
    if not rows:
        raise UserError(f"no complete report.json under '{sweep_dir}'; nothing to summarise")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["overrides"] if k not in keys]
    grouped = group(rows)
    gkeys = list(grouped[0]["setting"])
    _write_csv(sweep_dir / "summary.csv", ["job", *keys, *METRICS, "teacher_source"],
               [[r["job"], *(r["overrides"].get(k, "") for k in keys), *(_fmt(r[m], ".4f") for m in METRICS),
                 r["teacher_source"]] for r in rows])
    _write_csv(sweep_dir / "summary_groups.csv",
               [*gkeys, "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))],
               [[*(g["setting"][k] or "" for k in gkeys), g["n"],
                 *(_fmt(g[f"{m}_{s}"], ".4f") for m in METRICS for s in ("mean", "std"))] for g in grouped])
    plots = _plots(sweep_dir, grouped, gkeys)
    atomic_write_text(sweep_dir / "summary.md", _markdown(rows, grouped, varying_keys(rows), gkeys, plots))
    return {"rows": rows, "groups": grouped, "plots": plots}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _markdown(rows, grouped, keys, gkeys, plots) -> str:
    fixed = {k: v for k, v in rows[0]["overrides"].items() if k not in keys}
    lines = ["# Sweep summary", "", f"{len(rows)} complete jobs. Shared overrides: "
             + (", ".join(f"`{k}={v}`" for k, v in fixed.items()) or "none") + ".", "", "## Per job", ""]
    head = ["job", *keys, "teacher %", "baseline %", "student %", "KD gain", "wall s", "teacher from"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["job"], *(r["overrides"].get(k, "") for k in keys), _fmt(r["teacher_acc"]),
                                        _fmt(r["baseline_acc"]), _fmt(r["student_acc"]), _fmt(r["kd_gain"], "+.2f"),
                                        _fmt(r["wall_s"], ".1f"), str(r["teacher_source"])]) + " |")
    lines += ["", "## Mean +- std over seeds", ""]
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
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            out = write_summary(Path(config.hydra.sweep.dir))
            print(f"summary: {Path(config.hydra.sweep.dir) / 'summary.md'} ({len(out['rows'])} jobs)")
        except UserError as err:
            print(f"kd-summarize: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-summarize", description="Summarise a kd-train multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        out = write_summary(args.sweep_dir)
    except UserError as err:
        print(f"kd-summarize: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.sweep_dir / 'summary.md'}: {len(out['rows'])} jobs, {len(out['groups'])} settings")


if __name__ == "__main__":
    main()
