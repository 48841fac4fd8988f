"""What every tracker needs to know about a run: where it is, whether it is a sweep job, its config as flat
parameters, and the final numbers of its report. No tracker package is imported here."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# settings each tracker accepts under logger.<name> (a typo is refused before training)
SETTINGS = {
    "csv": (),
    "tensorboard": ("log_dir", "hparams"),
    "mlflow": ("tracking_uri", "experiment_name", "run_name", "tags"),
    "wandb": ("project", "entity", "mode", "group", "name", "tags", "job_type"),
}

# config values shown as hparams (TensorBoard's HParams tab) besides whatever a sweep varies
KEY_HPARAMS = ("dataset.name", "teacher.arch", "student.arch", "method.name", "method.T", "method.soft_weight",
               "method.ce_weight", "optimizer.name", "optimizer.lr", "trainer.student_epochs", "seed")
# per-role numbers of report.json's models.<role> logged as final metrics "<role>/<key>"
ROLE_METRICS = ("test_acc", "test_acc_best_val", "best_val_acc", "best_epoch", "epochs", "params", "size_bytes",
                "latency_ms", "throughput_ips", "train_seconds", "eval_seconds")
# the final metrics a sweep is judged by: the columns of TensorBoard's HParams tab
HPARAMS_METRICS = ("final/student_test_acc", "final/student_test_acc_best_val", "final/kd_gain_points",
                   "final/kd_gain_points_best_val", "final/baseline_test_acc", "final/teacher_test_acc")
# the run's own files, attached to each tracker run once report.json is written
REPORT_FILES = ("report.md", "report.json", "metrics.csv", "curves.png")


@dataclass
class RunInfo:
    """The run as trackers name and group it; read from Hydra's runtime when Hydra runs the job."""

    run_dir: Path
    output_dir: Path
    config: dict
    multirun: bool = False
    sweep_dir: Path | None = None
    job_num: int | None = None
    overrides: list[str] = field(default_factory=list)
    swept: set[str] = field(default_factory=set)  # the keys a multirun varies (its sweep overrides, its search space)

    @property
    def run_name(self) -> str:
        """The job's own overrides (in a multirun: of the keys it sweeps), else the run dir's name."""
        return " ".join(self.config_overrides) or self.run_dir.name

    @property
    def config_overrides(self) -> list[str]:
        """The job's overrides that tell it apart: in a multirun those of the swept keys, else all of them but
        the tracker choice (``logger=...``: how the run is watched, not what it computes)."""
        def key(o: str) -> str:
            return o.lstrip("+~").partition("=")[0]

        if self.swept:
            return [o for o in self.overrides if key(o) in self.swept]
        return [o for o in self.overrides if key(o).split(".")[0] != "logger"]

    @property
    def sweep_label(self) -> str | None:
        """The sweep dir relative to ``paths.output_dir`` (its absolute path when outside): one sweep, one label."""
        if self.sweep_dir is None:
            return None
        try:
            return str(self.sweep_dir.relative_to(self.output_dir))
        except ValueError:
            return str(self.sweep_dir)

    @property
    def params(self) -> dict[str, str]:
        return flatten(self.config)

    def hparams(self) -> dict[str, bool | float | str]:
        """Swept values and a few key config values, typed for TensorBoard's hparams plugin."""
        flat = dict(_flat_items(self.config))
        out: dict[str, bool | float | str] = {}
        for ovr in self.config_overrides:
            key, _, value = ovr.lstrip("+~").partition("=")
            if key.startswith("hydra.") or not key:
                continue
            out[key] = _hparam_value(flat[key]) if key in flat else value
        for key in KEY_HPARAMS:
            if key in flat and key not in out:
                out[key] = _hparam_value(flat[key])
        return out


def run_info(config: dict, run_dir: Path) -> RunInfo:
    """:class:`RunInfo` for ``run_dir``, with the sweep dir, job number and overrides from Hydra when it runs."""
    output_dir = Path(os.path.abspath(str(config.get("paths", {}).get("output_dir") or ".")))
    info = RunInfo(Path(os.path.abspath(run_dir)), output_dir, config)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return info
    if not HydraConfig.initialized():
        return info
    hc = HydraConfig.get()
    info.overrides = [str(o) for o in hc.overrides.task]
    if hc.mode == RunMode.MULTIRUN:
        info.multirun = True
        info.sweep_dir = Path(os.path.abspath(str(hc.sweep.dir)))
        info.job_num = int(hc.job.num)
        info.swept = swept_keys(info.sweep_dir, hc.sweeper.get("params"))
    return info


def swept_keys(sweep_dir: Path, search_space=None) -> set[str]:
    """The keys a multirun varies: its sweep overrides (``method.T=1,4``, as Hydra saved them in
    ``<sweep dir>/multirun.yaml`` before launching the jobs) and its sweeper's search space (Optuna's params)."""
    keys = {str(k).lstrip("+~") for k in (search_space or {})}
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # noqa: BLE001 - no multirun.yaml (another sweeper), or one Hydra cannot parse: none known
        return keys
    return keys | {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def _flat_items(d: dict, prefix: str = ""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flat_items(value, name + ".")
        else:
            yield name, value


def param_text(value: Any) -> str:
    """A config value as a parameter string: strings as they are, everything else as JSON (true, null, [..])."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, default=str)


def flatten(config: dict) -> dict[str, str]:
    """The resolved config as dotted keys, e.g. ``{"method.T": "4.0", "augment.phases": '["teacher", ...]'}``."""
    return {k: param_text(v) for k, v in _flat_items(config)}


def _hparam_value(value: Any) -> bool | float | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return param_text(value)


def number(value: Any) -> float | None:
    """``value`` as a finite float for a metric, else None (strings, None, NaN)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def epoch_metrics(row: dict) -> dict[str, float]:
    """A metrics.csv row as ``{"<phase>/<column>": value}`` (phase and epoch are the name and the step)."""
    phase = row["phase"]
    return {f"{phase}/{k}": v for k, v in ((k, number(v)) for k, v in row.items() if k not in ("phase", "epoch"))
            if v is not None}


def final_metrics(rep: dict) -> dict[str, float]:
    """The numbers of report.json a sweep is compared by, as ``final/<role>_<key>``: each role's test accuracy
    (last and best-val epoch), size, latency, throughput, export figures; and the KD gain."""
    out: dict[str, float] = {}
    for role, model in (rep.get("models") or {}).items():
        for key in ROLE_METRICS:
            if (v := number(model.get(key))) is not None:
                out[f"final/{role}_{key}"] = v
        for key, value in (model.get("export") or {}).items():
            if (v := number(value)) is not None:
                out[f"final/{role}_export_{key}"] = v
    for key in ("kd_gain_points", "kd_gain_points_best_val"):
        if (v := number(rep.get(key))) is not None:
            out[f"final/{key}"] = v
    if (v := number((rep.get("phase_seconds") or {}).get("total"))) is not None:
        out["final/total_seconds"] = v
    return out


def report_files(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in REPORT_FILES if (run_dir / name).is_file()]
