"""TensorBoard tracker: one event dir per run (``<run_dir>/tensorboard``), so ``tensorboard --logdir <sweep dir>``
shows every job; the hparams plugin gets the swept and key config values and the final accuracies as metrics,
so its HParams tab compares the jobs of a sweep."""

from __future__ import annotations

import time
from pathlib import Path

from kd_runner.loggers.common import HPARAMS_METRICS, RunInfo, epoch_metrics, final_metrics, report_files

LOG_DIR = "tensorboard"


def _plugin_summary(tag: str, **data):
    """A summary record of TensorBoard's hparams plugin (its own protos; no TensorFlow needed)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])


def _experiment_summary(hparams: dict):
    """The HParams tab's columns: these hparams, typed but with no domain (TensorBoard fills the filters from
    every job's values) and only the final accuracies and KD gain as metrics, not every curve of the run."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    kinds = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=kinds[type(v)]) for k, v in hparams.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in HPARAMS_METRICS])
    return _plugin_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def _session_start_summary(hparams: dict):
    """This run's hparam values (the HParams tab's row)."""
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_pb(hparams, start_time_secs=time.time())


def _session_end_summary():
    """The session-end record of a complete run (the HParams tab's session status)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _plugin_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, writer, log_dir: Path, hparams: bool) -> None:
        self.writer, self.log_dir, self.hparams = writer, log_dir, hparams

    def ids(self) -> dict:
        return {"log_dir": str(self.log_dir)}

    def log_epoch(self, row: dict) -> None:
        for tag, value in epoch_metrics(row).items():
            self.writer.add_scalar(tag, value, int(row["epoch"]))
        self.writer.flush()

    def log_report(self, rep: dict, run_dir: Path) -> None:
        for tag, value in final_metrics(rep).items():  # the HParams tab's metrics: the latest value of each tag
            self.writer.add_scalar(tag, value, 0)
        md = run_dir / "report.md"
        if md.is_file():
            self.writer.add_text("report", md.read_text(), 0)
        curves = run_dir / "curves.png"
        if curves.is_file():
            import numpy as np
            from PIL import Image

            with Image.open(curves) as img:
                self.writer.add_image("curves", np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        self.writer.add_text("files", "\n".join(f"- `{p}`" for p in report_files(run_dir)), 0)
        self.writer.flush()

    def close(self, status: str) -> None:
        # TensorBoard keeps the first record of a tag in a run: a failed end would outlive the resume that
        # completes the run, so only a complete run records its end
        if self.hparams and status == "complete":
            self.writer.file_writer.add_summary(_session_end_summary())
        self.writer.close()


def _log_dir(root: str | None, info: RunInfo) -> Path:
    """``<run_dir>/tensorboard``; with ``logger.tensorboard.log_dir`` set, one dir per run under that root
    (named like the run dir under ``paths.output_dir``), so one ``tensorboard --logdir`` shows every run."""
    if not root:
        return info.run_dir / LOG_DIR
    try:
        name = info.run_dir.relative_to(info.output_dir)
    except ValueError:
        name = Path(info.run_dir.name)
    return Path(root).absolute() / name


def start(settings: dict, info: RunInfo, previous: dict | None) -> TensorBoardTracker:
    """Open the run's event dir (a resumed run appends to the one it recorded) and record its hparams."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path((previous or {}).get("log_dir") or _log_dir(settings.get("log_dir"), info))
    hparams = settings.get("hparams", True) is not False
    writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)
    if hparams:
        values = info.hparams()
        writer.file_writer.add_summary(_experiment_summary(values))
        writer.file_writer.add_summary(_session_start_summary(values))
        writer.flush()
    return TensorBoardTracker(writer, log_dir, hparams)
