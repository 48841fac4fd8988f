"""Experiment trackers (``logger=``): what each tracker stored, read back through the tracker's own API (MLflow's
client, TensorBoard's event reader, W&B's offline-log reader), resume into the same tracker run, a failing tracker
costing one warning, and the one-line errors before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_runner.errors import UserError
from kd_runner.loggers import STATE_FILE, build_trackers, check_loggers
from kd_runner.loggers.common import HPARAMS_METRICS, REPORT_FILES, flatten

ROWS = [
    {"phase": "teacher", "epoch": 1, "lr": 1e-3, "train_loss": 1.9, "train_ce": 1.9, "train_acc": 40.0,
     "epoch_seconds": 0.5},
    {"phase": "teacher", "epoch": 2, "lr": 1e-3, "train_loss": 0.9, "train_ce": 0.9, "train_acc": 80.0,
     "epoch_seconds": 0.4},
    {"phase": "baseline", "epoch": 1, "lr": 1e-3, "train_loss": 2.0, "train_ce": 2.0, "train_acc": 35.0,
     "epoch_seconds": 0.2},
    {"phase": "baseline", "epoch": 2, "lr": 5e-4, "train_loss": 1.2, "train_ce": 1.2, "train_acc": 60.0,
     "epoch_seconds": 0.2},
    {"phase": "student", "epoch": 1, "lr": 1e-3, "train_loss": 1.5, "train_ce": 2.0, "train_kd": 1.0,
     "train_acc": 38.0, "val_acc": 41.0, "val_loss": 1.7, "epoch_seconds": 0.3},
    {"phase": "student", "epoch": 2, "lr": 5e-4, "train_loss": 0.7, "train_ce": 1.1, "train_kd": 0.3,
     "train_acc": 66.0, "val_acc": 64.5, "val_loss": 1.1, "epoch_seconds": 0.3},
]


def compose_cfg(out: Path, *loggers: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    """The real composed config (every group, ~100 keys) with these loggers, writing under ``out``."""
    with initialize_config_dir(config_dir=str(helpers.CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"logger=[{','.join(loggers)}]", *overrides])
    cfg.paths.output_dir = str(out)
    return cfg


def report(cfg: DictConfig, run_dir: Path) -> dict:
    """A report.json as pipeline writes it, and its files (report.md/json, metrics.csv, a real PNG)."""
    from PIL import Image

    models = {role: {"test_acc": acc, "test_acc_best_val": acc - 1, "params": 21690, "size_bytes": 90000,
                     "latency_ms": 0.25, "throughput_ips": 9000.0, "train_seconds": 0.5}
              for role, acc in (("teacher", 90.0), ("baseline", 80.0), ("student", 83.25))}
    models["student"]["export"] = {"format": "onnx", "parity": True, "test_acc": 83.25, "latency_ms": 0.1,
                                   "file": "export/student.onnx"}
    rep = {"config": OmegaConf.to_container(cfg, resolve=True), "config_hash": "abc", "models": models,
           "kd_gain_points": 3.25, "kd_gain_points_best_val": 3.25, "phase_seconds": {"total": 9.5}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(rep))
    (run_dir / "report.md").write_text("# kd-runner report\n\n| model | test acc % |\n|---|---|\n| student | 83.25 |\n")
    (run_dir / "metrics.csv").write_text("phase,epoch,train_loss\nstudent,1,1.5\n")
    Image.new("RGB", (40, 20), (200, 30, 30)).save(run_dir / "curves.png")
    return rep


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One paths.output_dir (so one MLflow SQLite store, created once) for the in-process tests."""
    return tmp_path_factory.mktemp("trackers_out")


# --------------------------------------------------------------------------- checks before training


def test_unknown_logger_and_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match=r"logger='neptune' is not a known logger; valid: csv, mlflow, tensorboard"):
        check_loggers(OmegaConf.create({"neptune": {}}))
    with pytest.raises(UserError, match=r"logger.mlflow.tracking_url is not a setting .* valid: .*tracking_uri"):
        check_loggers(OmegaConf.create({"mlflow": {"tracking_url": "http://x"}}))
    with pytest.raises(UserError, match=r"logger.wandb.mode='cloud' is invalid; valid: disabled, offline, online"):
        check_loggers(OmegaConf.create({"wandb": {"mode": "cloud"}}))
    with pytest.raises(UserError, match=r"logger.tensorboard.hparams='yes' is invalid; it must be true or false"):
        check_loggers(OmegaConf.create({"tensorboard": {"hparams": "yes"}}))
    with pytest.raises(UserError, match=r"logger.wandb.tags=.* must be a list of strings"):
        check_loggers(OmegaConf.create({"wandb": {"tags": "kd"}}))
    with initialize_config_dir(config_dir=str(helpers.CONF), version_base="1.3"):  # every shipped YAML is valid
        check_loggers(compose(config_name="config", overrides=["logger=[csv,tensorboard,mlflow,wandb]"]).logger)


@pytest.mark.parametrize("name", ["mlflow", "tensorboard", "wandb"])
def test_missing_tracker_package_names_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # what `import <name>` sees when the package is not installed
    with pytest.raises(UserError) as err:
        check_loggers(OmegaConf.create({name: {}}))
    msg = str(err.value)
    assert msg == f"logger={name} needs the {name} package; install it with: pip install 'kd-runner[{name}]'"
    assert "\n" not in msg


def test_csv_alone_starts_no_tracker(tmp_path):
    cfg = compose_cfg(tmp_path, "csv")
    trackers = build_trackers(cfg, tmp_path / "run")
    trackers.log_epoch(ROWS[0])
    trackers.close("complete")
    assert trackers.names == [] and not (tmp_path / "run" / STATE_FILE).exists()


# --------------------------------------------------------------------------- MLflow


def test_mlflow_run_reads_back_and_a_resume_continues_it(out):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run_dir = out / "runs" / "mlflow_run"
    cfg = compose_cfg(out, "mlflow")
    with open_dict(cfg):
        cfg.notes = "x" * 7000  # longer than MLflow's 6000-char limit on a param value
        cfg.extra = {f"k{i}": i for i in range(250)}  # a config of ~300 keys: 100 params per log_batch call
    trackers = build_trackers(cfg, run_dir)
    assert trackers.names == ["mlflow"]
    for row in ROWS[:3]:
        trackers.log_epoch(row)
    trackers.close("stopped")  # SIGTERM mid-baseline
    first = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    client = MlflowClient(first["tracking_uri"])
    assert first["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    assert client.get_run(first["run_id"]).info.status == "KILLED"

    trackers = build_trackers(cfg, run_dir)  # the rerun: same run dir, same config
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"] == first["run_id"]
    assert client.get_run(first["run_id"]).info.status == "RUNNING"
    trackers.log_history(ROWS[:2])  # the teacher, now loaded from the store: already logged, not logged twice
    for row in ROWS[2:]:
        trackers.log_epoch(row)
    rep = report(cfg, run_dir)
    trackers.log_report(rep, run_dir)
    trackers.close("complete")
    trackers.close("complete")  # idempotent

    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mlflow_run"  # no Hydra overrides: the run dir's name
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "kd-runner" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(client.search_runs([exp.experiment_id])) == 1  # continued, not duplicated
    for phase in ("teacher", "baseline", "student"):
        hist = client.get_metric_history(run.info.run_id, f"{phase}/train_loss")
        want = [(r["epoch"], r["train_loss"]) for r in ROWS if r["phase"] == phase]
        assert sorted((m.step, m.value) for m in hist) == want
    assert [m.value for m in client.get_metric_history(run.info.run_id, "student/val_acc")] == [41.0, 64.5]
    metrics = run.data.metrics
    assert metrics["final/student_test_acc"] == 83.25 and metrics["final/teacher_test_acc"] == 90.0
    assert metrics["final/kd_gain_points"] == 3.25 and metrics["final/student_latency_ms"] == 0.25
    assert metrics["final/student_export_latency_ms"] == 0.1 and metrics["final/student_export_parity"] == 1.0
    params = run.data.params
    flat = flatten(rep["config"])
    assert len(flat) > 300 and set(params) == set(flat)
    assert params["method.T"] == "2.0" and params["optimizer.name"] == "adam"
    assert params["augment.phases"] == '["teacher", "baseline", "student"]'
    assert params["notes"] == "x" * 6000
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == sorted(REPORT_FILES)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(out / "mlartifacts")


# --------------------------------------------------------------------------- TensorBoard


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_and_hparams_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import api_pb2, metadata

    run_dir = tmp_path / "run"
    cfg = compose_cfg(tmp_path, "tensorboard", overrides=("method.T=4",))
    trackers = build_trackers(cfg, run_dir)
    for row in ROWS[:2]:
        trackers.log_epoch(row)
    trackers.close("failed")
    trackers = build_trackers(cfg, run_dir)  # resumed: appends to the same event dir
    trackers.log_history(ROWS[:2])
    for row in ROWS[2:]:
        trackers.log_epoch(row)
    trackers.log_report(report(cfg, run_dir), run_dir)
    trackers.close("complete")

    assert json.loads((run_dir / STATE_FILE).read_text())["tensorboard"]["log_dir"] == str(run_dir / "tensorboard")
    acc = read_events(run_dir / "tensorboard")
    for phase in ("teacher", "baseline", "student"):
        events = acc.Scalars(f"{phase}/train_loss")
        assert [(e.step, e.value) for e in events] == [
            (r["epoch"], pytest.approx(r["train_loss"])) for r in ROWS if r["phase"] == phase]
    assert [e.value for e in acc.Scalars("final/student_test_acc")] == [pytest.approx(83.25)]
    assert [e.value for e in acc.Scalars("final/kd_gain_points")] == [pytest.approx(3.25)]
    assert "curves" in acc.Tags()["images"]
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    starts = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert starts.hparams["method.T"].number_value == 4.0
    assert starts.hparams["method.name"].string_value == "kd"
    assert starts.hparams["student.arch"].string_value == "light_nn"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == set(starts.hparams)  # the HParams tab's columns
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAMS_METRICS)
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS


# --------------------------------------------------------------------------- W&B


def wandb_records(run_dir: Path, *flags: str) -> list:
    """Each offline run's records (with ``--summary``: its state), read with W&B's own reader of the run's
    transaction log (``wandb leet inspect --json``)."""
    out = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out.append(json.loads(proc.stdout) if "--summary" in flags else
                   [json.loads(line) for line in proc.stdout.splitlines() if line.strip()])
    return out


WANDB_DIRS = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own settings, cache and staging dirs inside the test's tmp dir; no WANDB_MODE: our YAML's default."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in WANDB_DIRS:
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def test_wandb_offline_run_reads_back_and_a_resume_keeps_its_id(tmp_path, wandb_home):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    cfg = compose_cfg(tmp_path, "wandb", overrides=("method.T=4",))
    assert cfg.logger.wandb.mode == "offline"
    trackers = build_trackers(cfg, run_dir)
    for row in ROWS[:4]:
        trackers.log_epoch(row)
    trackers.close("stopped")
    run_id = json.loads((run_dir / STATE_FILE).read_text())["wandb"]["run_id"]
    trackers = build_trackers(cfg, run_dir)
    assert json.loads((run_dir / STATE_FILE).read_text())["wandb"]["run_id"] == run_id
    for row in ROWS[4:]:
        trackers.log_epoch(row)
    trackers.log_report(report(cfg, run_dir), run_dir)
    trackers.close("complete")

    first, second = wandb_records(run_dir, "--summary")
    assert first["run_id"] == second["run_id"] == run_id  # the resumed part is the same W&B run
    summary = second
    assert summary["project"] == "kd-runner" and summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["config"]["method"]["T"] == 4.0
    assert summary["summary"]["final/student_test_acc"] == 83.25 and summary["summary"]["final/kd_gain_points"] == 3.25

    records = [r for part in wandb_records(run_dir) for r in part]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    got = {}
    for item in history:  # one history row per logged epoch: its phase's epoch and losses
        (phase,) = {k.split("/")[0] for k in item if k.endswith("/epoch")}
        got[(phase, item[f"{phase}/epoch"])] = item[f"{phase}/train_loss"]
    assert len(history) == len(ROWS) and got == {(r["phase"], r["epoch"]): r["train_loss"] for r in ROWS}
    steps = {r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in records if r["type"] == "metric"}
    assert steps["student/*"] == "student/epoch"  # each phase's curves against its own epochs
    artifact = next(r["artifact"] for r in records if r["type"] == "artifact")
    assert sorted(c["path"] for c in artifact["manifest"]["contents"]) == sorted(REPORT_FILES)


# --------------------------------------------------------------------------- failures


def test_failing_trackers_cost_one_warning_each_and_the_run_goes_on(out, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    cfg = compose_cfg(out, "tensorboard", "mlflow")
    trackers = build_trackers(cfg, run_dir)
    assert trackers.names == ["tensorboard", "mlflow"]
    tb, ml = trackers.trackers

    def server_gone(*_a, **_k):
        raise ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded\nsecond line")

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    trackers.log_epoch(ROWS[0])
    monkeypatch.setattr(ml, "log_epoch", server_gone)
    trackers.log_epoch(ROWS[1])
    trackers.log_epoch(ROWS[2])
    assert trackers.names == ["tensorboard"]
    monkeypatch.setattr(tb.writer, "add_scalar", disk_full)
    trackers.log_epoch(ROWS[3])
    trackers.log_report(report(cfg, run_dir), run_dir)
    trackers.close("complete")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kd-train:")]
    assert lines == [
        "kd-train: warning: mlflow tracker failed (ConnectionError: HTTPConnectionPool(host='mlflow', port=5000): "
        "Max retries exceeded); the run goes on without it",
        "kd-train: warning: tensorboard tracker failed (OSError: [Errno 28] No space left on device); "
        "the run goes on without it",
    ]
    monkeypatch.undo()
    acc = read_events(run_dir / "tensorboard")  # what tensorboard logged before the disk filled up
    assert [e.step for e in acc.Scalars("teacher/train_loss")] == [1, 2]


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = compose_cfg(tmp_path, "tensorboard", "mlflow", overrides=("logger.mlflow.tracking_uri=http://127.0.0.1:9",))
    trackers = build_trackers(cfg, tmp_path / "run")  # nothing listens on port 9 (discard)
    assert trackers.names == ["tensorboard"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kd-train:")]
    assert len(err) == 1 and err[0].startswith("kd-train: warning: mlflow tracker failed (MlflowException: ")
    trackers.log_epoch(ROWS[0])
    trackers.close("complete")
    assert "mlflow" not in json.loads((tmp_path / "run" / STATE_FILE).read_text())


# --------------------------------------------------------------------------- kd-train: a sweep, as users run it


def test_a_multirun_feeds_every_tracker_and_is_one_mlflow_experiment(tmp_path):
    """``kd-train -m method.T=1,4 logger=[tensorboard,mlflow,wandb]`` with two jobs at once (joblib launcher): both
    create the fresh MLflow SQLite store at the same moment; each job's numbers read back from every tracker."""
    for pkg in ("mlflow", "tensorboard", "wandb"):
        pytest.importorskip(pkg)
    from mlflow import MlflowClient

    sweep_dir = tmp_path / "outputs" / "multiruns" / "t_sweep"
    args = [a for a in helpers.merge_overrides(["logger=[tensorboard,mlflow,wandb]", "method.T=1,4",
                                                "trainer.student_epochs=2", "trainer.bench_iters=0",
                                                "hydra/launcher=local_parallel"]) if "num_threads" not in a]
    env = helpers.cli_env(tmp_path, WANDB_MODE="offline", **{v: str(tmp_path / v.lower()) for v in WANDB_DIRS})
    proc = subprocess.run([sys.executable, "-m", "kd_runner.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=helpers.CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracker failed" not in proc.stderr, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert exp.name == "kd-runner/multiruns/t_sweep"  # one sweep, one experiment
    runs = {r.data.tags["kd.run_dir"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == [str(sweep_dir / "0"), str(sweep_dir / "1")]
    for job_dir, run in runs.items():
        job_dir = Path(job_dir)
        rep, rows = json.loads((job_dir / "report.json").read_text()), helpers.read_metrics(job_dir)
        state = json.loads((job_dir / STATE_FILE).read_text())
        test_acc, t = rep["models"]["student"]["test_acc"], rep["config"]["method"]["T"]
        # MLflow: status, the job's T as a param and in the run name, metrics as in report.json / metrics.csv
        assert run.info.status == "FINISHED" and run.info.run_id == state["mlflow"]["run_id"]
        assert run.data.params["method.T"] == str(t) and run.info.run_name == f"method.T={t}"  # what it sweeps
        assert run.data.metrics["final/student_test_acc"] == test_acc
        for phase in ("teacher", "baseline", "student"):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{phase}/train_loss"))
            want = [(int(r["epoch"]), float(r["train_loss"])) for r in rows if r["phase"] == phase]
            assert [s for s, _ in hist] == [s for s, _ in want]
            assert [v for _, v in hist] == pytest.approx([v for _, v in want])
        # TensorBoard: the job's event dir, its curves and its hparams
        acc = read_events(job_dir / "tensorboard")
        assert [e.step for e in acc.Scalars("student/train_loss")] == [1, 2]
        assert acc.Scalars("final/student_test_acc")[-1].value == pytest.approx(test_acc)
        from tensorboard.plugins.hparams import metadata

        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        assert metadata.parse_session_start_info_plugin_data(content).hparams["method.T"].number_value == t
        # W&B (offline): the job's run, grouped by sweep
        (summary,) = wandb_records(job_dir, "--summary")
        assert summary["run_id"] == state["wandb"]["run_id"] and summary["state"] == "finished"
        assert summary["summary"]["final/student_test_acc"] == test_acc and summary["config"]["method"]["T"] == t
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()  # nothing in the cwd
    assert os.path.isdir(tmp_path / "outputs" / "mlartifacts")
