"""MLflow tracker: one MLflow run per kd-train run; a sweep is one experiment, so MLflow's compare view lines up
each job's config (T, weights, seed) against its accuracies.

Default store: ``sqlite:///<paths.output_dir>/mlflow.db`` with artifacts in ``<paths.output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` or ``logger.mlflow.tracking_uri`` point elsewhere (a server, another file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from kd_runner.loggers.common import RunInfo, epoch_metrics, final_metrics, flatten, report_files

STATUS = {"complete": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
# MLflow's limits (mlflow.utils.validation): longer values are cut, longer keys left out
MAX_PARAM_VALUE, MAX_KEY, PARAMS_PER_BATCH, METRICS_PER_BATCH = 6000, 250, 100, 1000
# a server that went away costs ~15 s of retries (MLflow's default: 7 retries, minutes) unless the user set these
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(settings: dict, info: RunInfo) -> str:
    """``logger.mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in ``paths.output_dir``."""
    return (settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{info.output_dir / 'mlflow.db'}")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers and other stores)."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    return Path(os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0]))


@contextlib.contextmanager
def store_lock(db: Path | None) -> Iterator[None]:
    """Serialise access to a local SQLite store across processes (parallel sweep jobs): creating it runs
    MLflow's schema migrations, which two processes must not run at once, and SQLite allows one writer."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class MlflowTracker:
    name = "mlflow"

    def __init__(self, client, uri: str, run_id: str, experiment_id: str, db: Path | None) -> None:
        self.client, self.uri, self.run_id, self.experiment_id, self.db = client, uri, run_id, experiment_id, db
        self.params: dict[str, str] = {}

    def ids(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}

    def _log(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
        """Metrics, params and tags in as few ``log_batch`` calls as MLflow's per-call limits allow."""
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        ms = [Metric(k[:MAX_KEY], v, ts, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v[:MAX_PARAM_VALUE]) for k, v in (params or {}).items() if len(k) <= MAX_KEY]
        tg = [RunTag(k, str(v)[:MAX_PARAM_VALUE]) for k, v in (tags or {}).items() if len(k) <= MAX_KEY]
        batches = ([{"params": ps[i:i + PARAMS_PER_BATCH]} for i in range(0, len(ps), PARAMS_PER_BATCH)]
                   + [{"tags": tg[i:i + PARAMS_PER_BATCH]} for i in range(0, len(tg), PARAMS_PER_BATCH)]
                   + [{"metrics": ms[i:i + METRICS_PER_BATCH]} for i in range(0, len(ms), METRICS_PER_BATCH)])
        with store_lock(self.db):
            for batch in batches:
                self.client.log_batch(self.run_id, **batch)

    def log_params(self, params: dict[str, str]) -> None:
        """Parameters not logged yet (MLflow refuses to change a logged one)."""
        new = {k: v for k, v in params.items() if k not in self.params}
        if new:
            self._log(params=new)
            self.params.update(new)

    def log_epoch(self, row: dict) -> None:
        self._log(epoch_metrics(row), step=int(row["epoch"]))

    def log_report(self, rep: dict, run_dir: Path) -> None:
        self.log_params(flatten(rep.get("config") or {}))
        self._log(final_metrics(rep), step=0, tags={"kd.config_hash": rep.get("config_hash", "")})
        with store_lock(self.db):
            for path in report_files(run_dir):
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        with store_lock(self.db):
            self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))


def _experiment_name(settings: dict, info: RunInfo) -> str:
    if settings.get("experiment_name"):
        return str(settings["experiment_name"])
    return f"kd-runner/{info.sweep_label}" if info.multirun and info.sweep_label else "kd-runner"


def _experiment_id(client, name: str, db: Path | None) -> str:
    """The experiment called ``name``, created if needed (artifacts beside a SQLite store, not in the cwd)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    try:  # the experiment kind MLflow's UI reads to open the runs table (model training), not its GenAI pages
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException:  # another job of the sweep created it a moment ago (a server store: no lock)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start(settings: dict, info: RunInfo, previous: dict | None) -> MlflowTracker:
    """Start the MLflow run of this kd-train run, or continue the one a resumed run recorded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(settings, info)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    db = sqlite_path(uri)
    run = None
    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..." on a new store
        logging.getLogger(name).setLevel(logging.WARNING)
    with store_lock(db):
        client = MlflowClient(tracking_uri=uri)  # opening a new SQLite store creates its tables: under the lock
        if previous and previous.get("tracking_uri") == uri and previous.get("run_id"):
            try:
                run = client.get_run(previous["run_id"])
            except MlflowException:
                run = None  # gone from the store: start a new one
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            experiment_id = run.info.experiment_id
        else:
            experiment_id = _experiment_id(client, _experiment_name(settings, info), db)
            tags = {"kd.run_dir": str(info.run_dir), "kd.overrides": " ".join(info.overrides),
                    "mlflow.source.name": "kd-train"}
            tags.update({str(k): str(v) for k, v in (settings.get("tags") or {}).items()})
            if info.multirun:
                tags.update({"kd.sweep_dir": str(info.sweep_dir), "kd.job_num": str(info.job_num)})
            run = client.create_run(experiment_id, run_name=settings.get("run_name") or info.run_name, tags=tags)
    tracker = MlflowTracker(client, uri, run.info.run_id, experiment_id, db)
    if run.data.params:
        tracker.params.update(run.data.params)
    tracker.log_params(info.params)
    return tracker
