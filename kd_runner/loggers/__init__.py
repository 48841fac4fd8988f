"""Experiment trackers (``logger=`` config group): TensorBoard, MLflow and W&B beside metrics.csv and the reports.

``logger=csv`` (the default) adds nothing: metrics.csv, report.json/md and curves.png are always written.
Every call into a tracker is guarded: a tracker that fails (a server gone, a full disk) prints one warning and
is dropped; the run and its own files never depend on it. Tracker packages are imported only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from kd_runner.errors import UserError, choices
from kd_runner.loggers.common import SETTINGS, RunInfo, run_info

# name -> (module with its tracker, the package it needs = the kd-runner extra naming it)
TRACKERS = {
    "tensorboard": ("kd_runner.loggers.tb_logger", "tensorboard"),
    "mlflow": ("kd_runner.loggers.mlflow_logger", "mlflow"),
    "wandb": ("kd_runner.loggers.wandb_logger", "wandb"),
}
STATE_FILE = "trackers.json"
WANDB_MODES = ("online", "offline", "disabled", "shared")
_STRINGS = {"log_dir", "tracking_uri", "experiment_name", "run_name", "project", "entity", "group", "name",
            "job_type"}

__all__ = ["STATE_FILE", "TRACKERS", "Tracker", "Trackers", "build_trackers", "check_loggers"]


class Tracker(Protocol):
    """One started tracker run (see tb_logger, mlflow_logger, wandb_logger)."""

    name: str

    def ids(self) -> dict: ...  # what a resumed run needs to continue this tracker run (trackers.json)
    def log_epoch(self, row: dict) -> None: ...
    def log_report(self, rep: dict, run_dir: Path) -> None: ...
    def close(self, status: str) -> None: ...


def _names(logger_cfg: Any) -> list[str]:
    if logger_cfg is None:
        return []
    if not OmegaConf.is_dict(logger_cfg) and not isinstance(logger_cfg, dict):
        raise UserError(f"logger={logger_cfg!r} is invalid; choose loggers from: csv, {choices(TRACKERS)} "
                        "(several: logger=[tensorboard,mlflow])")
    return [str(k) for k in logger_cfg]


def check_loggers(logger_cfg: DictConfig | None) -> None:
    """Before any training: every logger is known, its settings valid and its package installed."""
    for name in _names(logger_cfg):
        if name not in SETTINGS:
            raise UserError(f"logger={name!r} is not a known logger; valid: {choices(SETTINGS)}")
        settings = logger_cfg[name]
        if settings is not None and not OmegaConf.is_dict(settings) and not isinstance(settings, dict):
            raise UserError(f"logger.{name}={settings!r} is invalid; it must hold the {name} logger's settings")
        for key, value in (settings or {}).items():
            _check_setting(name, str(key), value)
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][1]) is None:
            raise UserError(f"logger={name} needs the {TRACKERS[name][1]} package; "
                            f"install it with: pip install 'kd-runner[{name}]'")


def _check_setting(name: str, key: str, value: Any) -> None:
    where = f"logger.{name}.{key}"
    if key not in SETTINGS[name]:
        valid = choices(SETTINGS[name]) or "none"
        raise UserError(f"{where} is not a setting of the {name} logger; valid: {valid}")
    if value is None:
        return
    if key in _STRINGS and not isinstance(value, str):
        raise UserError(f"{where}={value!r} is invalid; it must be a string (or null)")
    if key == "mode" and value not in WANDB_MODES:
        raise UserError(f"{where}={value!r} is invalid; valid: {choices(WANDB_MODES)}")
    if key == "hparams" and not isinstance(value, bool):
        raise UserError(f"{where}={value!r} is invalid; it must be true or false")
    if key == "tags" and name == "mlflow" and not (OmegaConf.is_dict(value) or isinstance(value, dict)):
        raise UserError(f"{where}={value!r} is invalid; it must map tag names to values, e.g. {{team: vision}}")
    if key == "tags" and name == "wandb" and (
            not (OmegaConf.is_list(value) or isinstance(value, list)) or not all(isinstance(t, str) for t in value)):
        raise UserError(f"{where}={value!r} is invalid; it must be a list of strings, e.g. [kd, digits]")


def warn_failed(name: str, exc: BaseException) -> None:
    """The one line a failing tracker costs."""
    text = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    print(f"kd-train: warning: {name} tracker failed ({what}); the run goes on without it", file=sys.stderr,
          flush=True)


class Trackers:
    """The trackers of one run, fed the same rows and report as metrics.csv and report.json."""

    def __init__(self, trackers: list[Tracker], state_path: Path | None = None, state: dict | None = None) -> None:
        self.trackers = list(trackers)
        self.state_path = state_path
        self.state = state if state is not None else {}
        self.closed = False
        self._save_failed = False

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never costs the run
                self.trackers.remove(tracker)
                warn_failed(tracker.name, exc)

    def _save(self) -> None:
        if self.state_path is None or not self.state:
            return
        from kd_runner.utils import atomic_write_text

        try:
            atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
        except OSError as err:
            if not self._save_failed:
                print(f"kd-train: warning: cannot write {self.state_path} ({err.strerror}); a resumed run will "
                      "start new tracker runs", file=sys.stderr, flush=True)
            self._save_failed = True

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row; an epoch already logged (a resumed run replaying a stored phase) is skipped."""
        if not self.trackers:
            return
        phase, epoch = str(row["phase"]), int(row["epoch"])
        logged = self.state.setdefault("logged", {})
        if epoch <= logged.get(phase, 0):
            return
        self._call("log_epoch", row)
        logged[phase] = epoch
        self._save()

    def log_history(self, rows: list[dict]) -> None:
        """The stored history of a phase loaded rather than trained here (a reused teacher or baseline)."""
        for row in rows:
            self.log_epoch(row)

    def log_report(self, rep: dict, run_dir: Path) -> None:
        """Final metrics, the config as parameters, the report files as artifacts."""
        self._call("log_report", rep, Path(run_dir))

    def close(self, status: str) -> None:
        """End every tracker run as ``status`` ("complete", "failed", "stopped"); a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        self._call("close", status)
        self.trackers = []
        if self.state:  # trackers were started (some may have failed since): a complete run is not continued
            self.state["status"] = status
            self._save()


def _read_state(path: Path, cfg_hash: str) -> dict:
    """The tracker ids of an unfinished run of this config in this run dir (a resume), else {}."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("config_hash") != cfg_hash or state.get("status") == "complete":
        return {}
    return state


def build_trackers(cfg: DictConfig, run_dir: Path) -> Trackers:
    """Start every tracker named in ``cfg.logger`` (continuing the runs recorded in ``<run_dir>/trackers.json``
    when this is a resume of the same config); a tracker that cannot start is left out with one warning."""
    names = [n for n in _names(cfg.get("logger")) if n in TRACKERS]
    if not names:
        return Trackers([])
    from kd_runner.report import config_hash

    run_dir = Path(run_dir)
    try:
        cfg_hash = config_hash(cfg)
        previous = _read_state(run_dir / STATE_FILE, cfg_hash)
        info: RunInfo = run_info(OmegaConf.to_container(cfg, resolve=True), run_dir)
    except Exception as exc:  # noqa: BLE001 - a bug here must not cost the run either
        warn_failed(" and ".join(names), exc)
        return Trackers([])
    trackers: list[Tracker] = []
    state: dict = {"config_hash": cfg_hash, "status": "running", "logged": dict(previous.get("logged") or {})}
    for name in names:
        settings = OmegaConf.to_container(cfg.logger[name], resolve=True) or {}
        try:
            module = importlib.import_module(TRACKERS[name][0])
            tracker = module.start(settings, info, previous.get(name))
            state[name] = tracker.ids()
        except Exception as exc:  # noqa: BLE001 - a tracker never costs the run
            warn_failed(name, exc)
            continue
        trackers.append(tracker)
    out = Trackers(trackers, run_dir / STATE_FILE, state)
    out._save()
    return out
