"""Per-run report: report.json, report.md, metrics.csv, curves.png and a console table."""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kd_runner import __version__
from kd_runner.data.tensors import DataBundle
from kd_runner.methods.base import Method
from kd_runner.utils import DATASET_LOCATION_KEYS, atomic_write_text, save_figure, stable_hash

ROLES = ("teacher", "baseline", "student")
# keys that say where things are, how loud the run is, where it is tracked or how it is delivered, not what it
# computes: a rerun with another logger resumes, and one that only adds export=... finds the run complete
HASH_EXCLUDED = ("paths", "overwrite", "logger", "export")


def config_hash(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in HASH_EXCLUDED:
        resolved.pop(key, None)
    for key in ("progress", "teacher_outputs_store"):  # how a run shows progress or reuses outputs, not its result
        resolved.get("trainer", {}).pop(key, None)
    for key in DATASET_LOCATION_KEYS:  # where the data sits is not what the run computes (a requeue may move it)
        resolved.get("dataset", {}).pop(key, None)
    return stable_hash(resolved)


def versions() -> dict:
    from kd_runner.utils import torchvision_version

    return {"kd_runner": __version__, "torch": torch.__version__, "torchvision": torchvision_version(),
            "python": platform.python_version()}


def _task_overrides() -> list[str]:
    """This job's own overrides (a sweep's point), as Hydra recorded them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _gain(models: dict, key: str) -> float | None:
    s, b = models.get("student", {}).get(key), models.get("baseline", {}).get(key)
    return None if s is None or b is None else round(s - b, 4)


def write(run_dir: Path, *, cfg: DictConfig, data: DataBundle, labelled: int | None = None, method: Method,
          models: dict, teacher: dict, histories: list[dict], timings: dict, device: torch.device,
          execution: dict | None = None) -> dict:
    """Write every report file; report.json goes last so its presence means the run completed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rep = {
        "status": "complete",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": int(cfg.seed),
        "teacher_seed": int(cfg.teacher_seed),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "device_name": _device_name(device),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "overrides": _task_overrides(),
        "config_hash": config_hash(cfg),
        "dataset": {"name": data.name, "source": data.source, "train": len(data.train),
                    "val": len(data.val) if data.val is not None else 0, "test": len(data.test),
                    "labelled": len(data.train) if labelled is None else labelled,
                    "num_classes": data.num_classes, "input_shape": list(data.input_shape()),
                    "mean": data.mean, "std": data.std},
        "method": {"name": method.name, **method.describe()},
        "teacher": teacher,
        "execution": execution or {},
        "models": models,
        "kd_gain_points": _gain(models, "test_acc"),
        "kd_gain_points_best_val": _gain(models, "test_acc_best_val"),
        "same_init": (models.get("baseline", {}).get("init_hash") == models.get("student", {}).get("init_hash")
                      if "baseline" in models else None),
        "phase_seconds": {k: round(v, 3) for k, v in timings.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    _write_metrics(run_dir / "metrics.csv", histories)
    _plot(run_dir / "curves.png", histories)
    atomic_write_text(run_dir / "report.md", markdown(rep))
    atomic_write_text(run_dir / "report.json", json.dumps(rep, indent=2, default=str))
    (run_dir / "error.txt").unlink(missing_ok=True)
    print(console_table(rep))
    return rep


def _write_metrics(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _plot(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(r["phase"] for r in rows):
        pr = [r for r in rows if r["phase"] == phase]
        epochs = [r["epoch"] for r in pr]
        ax_loss.plot(epochs, [r["train_loss"] for r in pr], marker="o", label=phase)
        ax_acc.plot(epochs, [r["train_acc"] for r in pr], marker="o", label=f"{phase} train")
        if "val_acc" in pr[0]:
            ax_acc.plot(epochs, [r["val_acc"] for r in pr], marker="s", linestyle="--", label=f"{phase} val")
    ax_loss.set(xlabel="epoch", ylabel="train loss (method total)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _rows(rep: dict) -> list[list[str]]:
    rows = []
    for role in ROLES:
        m = rep["models"].get(role)
        if m is None:
            continue
        rows.append([role, m["arch"]["arch"] if m["arch"].get("arch") != "torchvision" else m["arch"]["name"],
                     f"{m['params']:,}", _fmt(m["test_acc"]), _fmt(m.get("test_acc_best_val")),
                     f"{m['size_bytes'] / 1e6:.2f}", _fmt(m.get("latency_ms"), ".3f"),
                     _fmt(m.get("throughput_ips"), ".0f"), _fmt(m.get("train_seconds"), ".1f")])
    return rows


HEADER = ["model", "arch", "params", "test acc %", "test acc @best val %", "size MB", "latency ms (bs 1)",
          "throughput img/s", "train s"]


def markdown(rep: dict) -> str:
    lines = [f"# kd-runner report: {rep['dataset']['name']}, method {rep['method']['name']}, seed {rep['seed']}", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(rep)]
    lines += ["", f"- KD gain (student - baseline, test acc): {_fmt(rep['kd_gain_points'], '+.2f')} points"]
    if rep["kd_gain_points_best_val"] is not None:
        lines.append(f"- KD gain at best-val checkpoints: {_fmt(rep['kd_gain_points_best_val'], '+.2f')} points")
    if rep["same_init"] is not None:
        lines.append(f"- baseline and student start from identical weights: {rep['same_init']} "
                     f"(init hash {rep['models']['student']['init_hash']})")
    if rep["teacher"]:
        lines.append(f"- teacher: {rep['teacher'].get('source')}"
                     + (f" ({rep['teacher']['path']})" if rep["teacher"].get("path") else "")
                     + f"; outputs for the student: {rep['teacher'].get('outputs')}")
    d = rep["dataset"]
    part = (f" ({d['labelled']} labelled: the baseline trains on those, the student on all with the teacher's "
            "outputs)" if d.get("labelled") not in (None, d["train"]) else "")
    lines.append(f"- data: {d['source']}; train {d['train']}{part}, val {d['val']}, test {d['test']}, "
                 f"input {d['input_shape']}")
    lines.append(f"- method: {json.dumps(rep['method'])}")
    if rep.get("execution"):
        lines.append(f"- data and compute paths: {json.dumps(rep['execution'])}")
    lines.append("- wall time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rep["phase_seconds"].items()))
    lines.append(f"- device: {rep['device']} ({rep['device_name']}); versions: {json.dumps(rep['versions'])}")
    lines.append(f"- config hash: {rep['config_hash']}; command: `{rep['command']}`")
    if any("export" in m for m in rep["models"].values()):
        from kd_runner.export import markdown_lines

        lines += ["", "## Deployable models (CPU)", "", *markdown_lines(rep)]
    return "\n".join(lines) + "\n"


def console_table(rep: dict) -> str:
    rows = [HEADER[:5] + ["train s"]] + [r[:5] + [r[8]] for r in _rows(rep)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    if rep["kd_gain_points"] is not None:
        d = rep["dataset"]
        if d.get("labelled", d["train"]) < d["train"]:
            same = (f"same initial weights, as many optimizer steps; the twin learns from the {d['labelled']} labelled "
                    f"training images, the student also from the teacher's outputs on the other "
                    f"{d['train'] - d['labelled']}")
        else:
            same = "same initial weights, same images, same batch order; only the loss differs"
        out += [f"KD gain: {rep['kd_gain_points']:+.2f} points: the {rep['method']['name']} student's test accuracy "
                f"minus its CE-only twin's ({same})",
                "One run's gain moves with the seed by about as much as the gain itself on small data; for the mean "
                "+- std over seeds run e.g. `kd-train -m seed=0,1,2,3,4` (summary.md in the sweep dir)"]
    return "\n".join(out)
