"""Weights & Biases tracker: one W&B run per kd-train run (``dir=<run_dir>``), offline by default so it works
with no network or account (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later); a sweep's jobs
share a group. A resumed run continues the W&B run id it recorded."""

from __future__ import annotations

from pathlib import Path

from kd_runner.loggers.common import RunInfo, epoch_metrics, final_metrics, report_files

DEFAULT_PROJECT = "kd-runner"


class WandbTracker:
    name = "wandb"

    def __init__(self, run) -> None:
        self.run = run
        self.phases: set[str] = set()

    def ids(self) -> dict:
        return {"run_id": self.run.id, "project": self.run.project, "mode": self.run.settings.mode}

    def log_epoch(self, row: dict) -> None:
        phase = str(row["phase"])
        if phase not in self.phases:  # each phase's curves against its own epoch, not W&B's global step
            self.run.define_metric(f"{phase}/epoch", hidden=True)
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/epoch")
            self.phases.add(phase)
        self.run.log({**epoch_metrics(row), f"{phase}/epoch": int(row["epoch"])})

    def log_report(self, rep: dict, run_dir: Path) -> None:
        import wandb

        self.run.summary.update(final_metrics(rep))
        files = report_files(run_dir)
        if files:
            artifact = wandb.Artifact(f"report-{self.run.id}", type="kd-report",
                                      description=f"report files of {run_dir}")
            for path in files:
                artifact.add_file(str(path), name=path.name, policy="immutable")  # final files: no staging copy
            self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.summary["kd_status"] = status
        self.run.finish(exit_code=0 if status == "complete" else 1)


def start(settings: dict, info: RunInfo, previous: dict | None) -> WandbTracker:
    """Start the W&B run, or continue (``resume="allow"``) the one a resumed run recorded."""
    import wandb

    run_id = (previous or {}).get("run_id")
    group = settings.get("group") or (info.sweep_label if info.multirun else None)
    info.run_dir.mkdir(parents=True, exist_ok=True)
    # finish_previous: a sequential multirun runs every job in this process; never hand a job the last one's run
    run = wandb.init(
        project=settings.get("project") or DEFAULT_PROJECT, entity=settings.get("entity"), dir=str(info.run_dir),
        id=run_id, resume="allow" if run_id else None, name=settings.get("name") or info.run_name, group=group,
        job_type=settings.get("job_type"), tags=list(settings.get("tags") or []) or None, mode=settings.get("mode"),
        config=info.config, reinit="finish_previous", settings=wandb.Settings(quiet=True),
    )
    return WandbTracker(run)
