"""``kd-train``: compose the Hydra config, run the pipeline, map user mistakes to one-line errors."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kd_runner.errors import UserError, choices

EXIT_USER_ERROR = 2
FAILED_JOBS: list[str] = []  # multirun jobs (run in this process) that ended with a user error


def config_dir() -> Path:
    """``conf/`` beside the package in a checkout, or ``kd_runner/conf`` in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(f"kd-runner's config folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def group_options(conf: Path) -> dict[str, list[str]]:
    """Config groups and their options, read from the config folder."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir()}


def check_overrides(args: list[str], conf: Path) -> None:
    """One-line errors for an unknown group option or config key (Hydra's own errors span many lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = group_options(conf)
    candidates = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException as err:
        raise UserError(f"cannot parse overrides {candidates}: {str(err).splitlines()[0]}") from None
    chosen = []
    for o in overrides:
        if o.key_or_group not in groups or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in groups[o.key_or_group] and v != "null":
                valid = choices(groups[o.key_or_group])
                raise UserError(f"{o.get_key_element()}={v!r} is not a known option; valid: {valid}")
        chosen.append(f"{o.get_key_element()}={values[0]}")
    keys = [o for o in overrides if o.key_or_group not in groups and o.is_force_add() is False and not o.is_add()
            and not o.is_delete()]
    if keys:
        _check_keys_exist(conf, chosen, [o.key_or_group for o in keys])


def _check_keys_exist(conf: Path, group_choices: list[str], keys: list[str]) -> None:
    """Compose with the chosen groups and check each overridden key is in the config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=group_choices)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or not OmegaConf.is_dict(node) or leaf not in node.keys():  # `in` is False for ???
            where = f"under {parent}" if parent and OmegaConf.is_dict(node) else "at the top level"
            valid = choices(node.keys()) if OmegaConf.is_dict(node) else choices(cfg.keys())
            raise UserError(f"{key} is not a config key; valid keys {where}: {valid} (prefix + to add a new key)")


def _report_user_error(err: UserError, run_dir: Path | None = None) -> None:
    print(f"kd-train: error: {err}", file=sys.stderr)
    if run_dir is not None and run_dir.is_dir():
        (run_dir / "error.txt").write_text(f"{err}\n")


class Stopped(BaseException):
    """Raised from a signal handler; a BaseException so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def completed_report(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The report of an earlier, complete run of this same config in ``run_dir``, if any."""
    from kd_runner.report import config_hash

    path = run_dir / "report.json"
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rep if rep.get("status") == "complete" and rep.get("config_hash") == config_hash(cfg) else None


def torch_threads_for_parallel_jobs() -> None:
    """Slurm: the task's CPUs; joblib launcher: ``cores // n_jobs`` threads per job instead of all cores."""
    import os

    import torch
    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # a Slurm job gets what it asked for
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        return
    launcher = HydraConfig.get().get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or -1)
    n_jobs = cores if n_jobs < 0 else max(1, n_jobs)
    torch.set_num_threads(max(1, cores // n_jobs))


def objective(rep: dict) -> float:
    """What a sweeper maximises: the student's best val accuracy, else its test accuracy."""
    student = rep["models"]["student"]
    return float(student["best_val_acc"] if student.get("best_val_acc") is not None else student["test_acc"])


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kd_runner import pipeline

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    done = completed_report(run_dir, cfg)
    if done is not None:
        print(f"kd-train: {run_dir} already holds a complete report of this config; skipping")
        return objective(done)
    if (run_dir / "report.json").is_file():  # another config's report: keep it, but not as this run's
        (run_dir / "report.json").replace(run_dir / "report.superseded.json")
    if cfg.trainer.get("num_threads") is None:
        torch_threads_for_parallel_jobs()
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rep = pipeline.run(cfg, run_dir)
    except UserError as err:
        _report_user_error(err, run_dir)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # let the other jobs of the sweep run
            FAILED_JOBS.append(str(run_dir))
            return float("nan")
        sys.exit(EXIT_USER_ERROR)
    except Stopped as stop:
        print(f"kd-train: stopped by {stop}; state up to the last finished epoch is in {run_dir / 'state'}; "
              "rerun the same command with the same hydra.run.dir to resume", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"report: {run_dir / 'report.md'}")
    return objective(rep)


ROLE_SHORTHAND = re.compile(r"^([+~]?)(teacher|student)=")


def expand_role_shorthand(args: list[str]) -> list[str]:
    """``teacher=X`` / ``student=X`` -> ``model@teacher=X`` / ``model@student=X`` (one conf/model/ group)."""
    return [ROLE_SHORTHAND.sub(r"\1model@\2=", a) for a in args]


def main() -> None:
    sys.argv[1:] = expand_role_shorthand(sys.argv[1:])
    try:
        check_overrides(sys.argv[1:], config_dir())
    except UserError as err:
        _report_user_error(err)
        sys.exit(EXIT_USER_ERROR)
    _hydra_main()
    if FAILED_JOBS:
        print(f"kd-train: error: {len(FAILED_JOBS)} sweep job(s) failed, see error.txt in: {', '.join(FAILED_JOBS)}",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
