"""``kd-train``: compose the Hydra config, run the pipeline, map user mistakes to one-line errors.

A run dir belongs to one run at a time: the run holds an exclusive lock on ``<run_dir>/.kd-train.lock``
(pid, host and start time written in it) for the whole job, and a multirun holds one on its sweep dir.
Before Hydra writes anything, ``main`` composes the config once more to check the output paths, lock the
run dir and validate the config, so a mistake costs no files and no training.
"""

from __future__ import annotations

import atexit
import copy
import errno
import fcntl
import json
import os
import re
import signal
import socket
import stat
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_runner.errors import UserError, choices
from kd_runner.launch_env import data_parallel_launch

EXIT_USER_ERROR = 2
EXIT_CRASH = 1
LOCK_FILE = ".kd-train.lock"
# what a run writes into its run dir; overwrite=true removes these before replacing the run
RUN_OUTPUTS = ("report.json", "report.md", "metrics.csv", "curves.png", "error.txt", "error_traceback.txt",
               "report.superseded.json", "trackers.json")
RUN_OUTPUT_DIRS = ("checkpoints", "state", "export", "tensorboard", "wandb")
OUTPUT_HINT = "set KD_OUTPUT_DIR or paths.output_dir to a writable directory"
CACHE_HINT = "set KD_CACHE_DIR or paths.cache_dir to a writable directory"
# this process's start and pid; in a data-parallel run rank 0's, so every rank names the same run dir
IDENTITY = {"started": datetime.now(), "pid": os.getpid()}


def _register_resolvers() -> None:
    """``${kd_now:PATTERN}`` (this process's start time) and ``${kd_pid:}`` for the default run and sweep dirs.

    Hydra's ``now`` has one-second resolution, so two commands launched together shared a dir; these give
    microseconds and the pid. Both are fixed per process, so the dir ``main`` checks and locks before Hydra
    starts is the dir Hydra then creates; cached in the config, so sweep workers see the main process's values.
    """
    if not OmegaConf.has_resolver("kd_now"):
        OmegaConf.register_new_resolver("kd_now", lambda pattern: IDENTITY["started"].strftime(pattern),
                                        use_cache=True)
    if not OmegaConf.has_resolver("kd_pid"):
        OmegaConf.register_new_resolver("kd_pid", lambda: str(IDENTITY["pid"]), use_cache=True)


_register_resolvers()


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
        many = not o.is_sweep_override() and isinstance(o.value(), list)  # logger=[tensorboard,mlflow]
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
        else:
            values = [str(v) for v in o.value()] if many else [o.get_value_element_as_str()]
        for v in values:
            if v not in groups[o.key_or_group] and v != "null":
                valid = choices(groups[o.key_or_group])
                raise UserError(f"{o.get_key_element()}={v!r} is not a known option; valid: {valid}")
        chosen.append(o.input_line if many else f"{o.get_key_element()}={values[0]}")
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


class RunDirTaken(UserError):
    """The run dir belongs to another run (one under way, or a complete run of another config): kd-train
    writes nothing into it, not even error.txt."""


def _report_user_error(err: UserError, run_dir: Path | None = None) -> None:
    from kd_runner import distributed

    if not distributed.is_main():  # every rank meets the same error; rank 0 says it
        return
    print(f"kd-train: error: {err}", file=sys.stderr)
    if run_dir is not None and _may_write_error(run_dir, err):
        (run_dir / "error.txt").write_text(f"{err}\n")
        (run_dir / "error_traceback.txt").unlink(missing_ok=True)


def _may_write_error(run_dir: Path, err: BaseException) -> bool:
    """error.txt goes into the run dir unless the dir is another run's (busy, or holding a complete run)."""
    return run_dir.is_dir() and not isinstance(err, RunDirTaken) and complete_report(run_dir) is None


# --------------------------------------------------------------------------- run dir ownership

_HELD: dict[str, int] = {}  # realpath of a run dir -> fd of its lock file, for each dir this process holds


def _lock_holder(path: Path) -> str:
    """Who holds a lock file, as its holder wrote it (it writes right after taking the lock)."""
    info = None
    for _ in range(20):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid"):
            return f"pid {info['pid']} on host {info.get('host')}, started {info.get('started')}"
        time.sleep(0.05)
    return "its holder has not recorded itself yet"


def lock_run_dir(run_dir: Path, what: str = "run dir", key: str = "hydra.run.dir") -> bool:
    """Take the exclusive lock of ``run_dir`` (created if needed) for this process.

    Returns False when this process holds it already. A dir held by another process raises
    :class:`RunDirTaken` naming the holder. The lock goes when the process ends, however it ends.
    """
    real = os.path.realpath(run_dir)
    if real in _HELD:
        return False
    path = Path(run_dir) / LOCK_FILE
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create {what} '{run_dir}': {err.strerror}; choose another {key}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirTaken(f"{what} '{run_dir}' is in use by another kd-train ({_lock_holder(path)}); "
                              f"wait for it to end or choose another {key}") from None
        print(f"kd-train: warning: cannot lock {path} ({err.strerror}); nothing keeps another run out of "
              f"{run_dir} meanwhile", file=sys.stderr)
        return False
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[real] = fd
    return True


def unlock_run_dir(run_dir: Path) -> None:
    """Release a lock this process holds; the lock file is emptied, so no stale holder is ever named."""
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)


@atexit.register
def _unlock_all() -> None:
    for real in list(_HELD):
        unlock_run_dir(Path(real))


# --------------------------------------------------------------------------- output paths


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def dir_problem(path: Path) -> tuple[Path, str] | None:
    """None when ``path`` is a writable directory or can be created (its nearest existing ancestor is a
    writable directory); else ``(the path at fault, what is wrong with it)``."""
    probe = path
    while True:
        try:
            st = os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                return probe, "does not exist"
            probe = probe.parent
        except OSError as err:
            return probe, f"cannot be accessed ({err.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return probe, "is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return probe, "is on a read-only file system" if read_only else "is not writable"
    return None


def check_dirs(items: list[tuple[str, Path, str]], output_dir: Path | None = None) -> None:
    """A one-line UserError for the first ``(key, path, hint)`` whose dir cannot be written or created.

    A fault at or above ``paths.output_dir`` in a path under it is reported as ``paths.output_dir``'s.
    """
    for key, path, hint in items:
        found = dir_problem(path)
        if found is None:
            continue
        at, problem = found
        if output_dir is not None and _within(path, output_dir) and _within(output_dir, at):
            key, path, hint = "paths.output_dir", output_dir, OUTPUT_HINT
        if at == path:
            raise UserError(f"{key}='{path}' {problem}; {hint}")
        raise UserError(f"{key}='{path}' cannot be created: '{at}' {problem}; {hint}")


# --------------------------------------------------------------------------- complete runs


def complete_report(run_dir: Path) -> dict | None:
    """The complete report.json in ``run_dir``, if there is a readable one."""
    from kd_runner.summary import BadReport, read_report

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        return read_report(path)
    except BadReport:
        return None


def completed_report(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The report of an earlier, complete run of this same config in ``run_dir``, if any."""
    from kd_runner.report import config_hash

    rep = complete_report(run_dir)
    return rep if rep is not None and rep.get("config_hash") == config_hash(cfg) else None


def pop_overwrite(cfg: DictConfig) -> bool:
    """Take ``overwrite`` out of the config (it says how to run, not what: no part of the config hash)."""
    with open_dict(cfg):
        value = cfg.pop("overwrite", False)
    if not isinstance(value, bool):
        raise UserError(f"overwrite={value!r} is invalid; it must be true or false")
    return value


def refuse_other_config(run_dir: Path, rep: dict, cfg_hash: str, what: str, key: str) -> RunDirTaken:
    from kd_runner.summary import _clean_overrides

    shown = " ".join(f"{k}={v}" for k, v in (_clean_overrides(rep.get("overrides")) or {}).items())
    return RunDirTaken(f"{what} '{run_dir}' holds a complete run of another config (hash {rep.get('config_hash')}"
                       + (f", overrides: {shown}" if shown else "") + f"; this config is {cfg_hash}); "
                       f"pass overwrite=true to replace it, or choose another {key}")


def clear_run_outputs(run_dir: Path) -> None:
    """overwrite=true: remove the previous run's outputs (report, metrics, checkpoints, resume state)."""
    import shutil

    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_OUTPUT_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


# --------------------------------------------------------------------------- checks before Hydra starts


def _is_multirun(args: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in args) or "hydra.mode=MULTIRUN" in args


def _compose_for_checks(overrides: list[str], multirun: bool) -> DictConfig | None:
    """The config Hydra will compose (a sweep: its first point), with its hydra node; None if that fails
    (Hydra then reports the problem itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports bad override syntax itself
        return None
    args = []
    for o in parsed:
        if not o.is_sweep_override():
            args.append(o.input_line)
            continue
        if not multirun:
            return None
        try:
            args.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        except Exception:  # noqa: BLE001 - interval sweeps (Optuna) have no first point
            continue
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=args, return_hydra_config=True)
    except Exception:  # noqa: BLE001
        return None


def precheck(args: list[str]) -> Path | None:
    """Everything that can be known before Hydra creates a dir: output paths writable, the run dir free
    (then locked for this process), the config valid, no complete run of another config in the way.

    Returns the sweep dir of a multirun (locked, its job records started), else None.
    """
    flags = [a for a in args if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):  # --cfg, --help, -cn ...: Hydra's own business
        return None
    multirun = _is_multirun(args)
    cfg = _compose_for_checks([a for a in args if not a.startswith("-")], multirun)
    if cfg is None:
        return None
    if not multirun and str(cfg.hydra.get("mode")).endswith("MULTIRUN"):  # e.g. hparams_search=kd_optuna
        multirun = True
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        raw = str(OmegaConf.select(cfg, key.rpartition(".")[0])._get_node("dir")._value())
        job_dir = Path(os.path.abspath(str(OmegaConf.select(cfg, key))))
        output_dir = Path(os.path.abspath(str(cfg.paths.output_dir)))
        cache_dir = Path(str(cfg.paths.cache_dir))
        chdir = bool(cfg.hydra.job.chdir)
    except Exception:  # noqa: BLE001 - a path Hydra alone can resolve (${hydra:...}): checked in the job
        return None
    dirs = [(key, job_dir, f"choose another {key}")]
    if cache_dir.is_absolute() or not chdir:
        dirs.append(("paths.cache_dir", Path(os.path.abspath(cache_dir)), CACHE_HINT))
    check_dirs(dirs, output_dir)
    if re.search(r"\$\{(now|hydra):", raw):  # not the dir Hydra resolves a moment later: the job locks its own
        return None
    if multirun:
        from kd_runner.summary import reset_job_records

        lock_run_dir(job_dir, "sweep dir", key)
        reset_job_records(job_dir)
        return job_dir
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    from kd_runner import pipeline
    from kd_runner.report import config_hash

    try:  # a bad value is refused before a default run dir is even created
        overwrite = pop_overwrite(task)
        pipeline.preflight(task)
    except UserError as err:
        if "kd_now" not in raw:  # a run dir the user named records why its run failed (error.txt)
            lock_run_dir(job_dir, "run dir", key)
            if _may_write_error(job_dir, err):
                (job_dir / "error.txt").write_text(f"{err}\n")
        raise
    except Exception:  # noqa: BLE001 - a bug: the job raises it again, with Hydra's context
        return None
    lock_run_dir(job_dir, "run dir", key)
    rep = complete_report(job_dir)
    cfg_hash = config_hash(task)
    if rep is not None and not overwrite and rep.get("config_hash") != cfg_hash:
        raise refuse_other_config(job_dir, rep, cfg_hash, "run dir", key)
    return None


# --------------------------------------------------------------------------- one job


class SweepJob:
    """A multirun job: records how it stands in ``<sweep_dir>/.kd-jobs/<num>.json`` for the main process."""

    def __init__(self, hydra_cfg, run_dir: Path) -> None:
        self.sweep_dir = Path(os.path.abspath(str(hydra_cfg.sweep.dir)))
        self.num = int(hydra_cfg.job.num)
        self.dir = str(run_dir.relative_to(self.sweep_dir)) if _within(run_dir, self.sweep_dir) else str(run_dir)
        self.overrides = [str(o) for o in hydra_cfg.overrides.task]

    def record(self, status: str, reason: str | None = None, kind: str | None = None,
               config_hash: str | None = None) -> None:
        from kd_runner import distributed
        from kd_runner.summary import write_job_record

        if not distributed.is_main():  # rank 0 speaks for a data-parallel job
            return
        try:
            write_job_record(self.sweep_dir, self.num, self.dir, self.overrides, status, reason, kind, config_hash)
        except OSError as err:
            print(f"kd-train: warning: cannot record sweep job {self.num} in {self.sweep_dir}: {err.strerror}",
                  file=sys.stderr)


class Stopped(BaseException):
    """Raised from a signal handler; a BaseException so no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def _crash_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _write_crash(run_dir: Path, reason: str) -> None:
    """An unexpected exception: its one-line reason in error.txt, the traceback in error_traceback.txt."""
    try:
        if run_dir.is_dir() and complete_report(run_dir) is None:
            (run_dir / "error.txt").write_text(f"{reason}\n")
            (run_dir / "error_traceback.txt").write_text(traceback.format_exc())
    except OSError:
        pass


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

    try:  # a Slurm task of a multi-task job joins its process group here (torchrun ranks did in main)
        main_rank = _join_data_parallel()
    except UserError as err:
        _report_user_error(err)
        sys.exit(EXIT_USER_ERROR)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job = SweepJob(hydra_cfg, run_dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    if job is not None:
        job.record("running")
    try:
        value, status, cfg_hash = _run_job(cfg, run_dir, job)
    except UserError as err:
        if job is None:
            _report_user_error(err, run_dir)
            sys.exit(EXIT_USER_ERROR)
        if not main_rank:
            return float("nan")
        print(f"kd-train: sweep job {job.num} failed: {err}", file=sys.stderr)
        if _may_write_error(run_dir, err):
            (run_dir / "error.txt").write_text(f"{err}\n")
            (run_dir / "error_traceback.txt").unlink(missing_ok=True)
        job.record("failed", str(err), "user")
        return float("nan")  # let the other jobs of the sweep run
    except Stopped as stop:
        where = (f"hydra.sweep.dir ({job.sweep_dir})" if job is not None else f"hydra.run.dir ({run_dir})")
        if job is not None:
            job.record("failed", f"stopped by {stop}", "stopped")
        if not main_rank:
            from kd_runner import distributed

            print(f"kd-train: rank {distributed.rank()} stopped by {stop}", file=sys.stderr)
        else:
            print(f"kd-train: stopped by {stop}; state up to the last finished epoch is in {run_dir / 'state'}; "
                  f"rerun the same command with the same {where} to resume", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except Exception as exc:
        reason = _crash_reason(exc)
        if _lost_peer(exc):  # the rank that stopped or failed says why; this one only says it could not go on
            print(f"kd-train: a process of this data-parallel run stopped or failed, so this one stops too "
                  f"({reason[:100]}); state up to the last finished epoch is in {run_dir / 'state'}; rerun to resume",
                  file=sys.stderr)
            sys.exit(EXIT_CRASH)
        if main_rank:
            _write_crash(run_dir, reason)
        if job is None:
            raise
        traceback.print_exc()
        print(f"kd-train: sweep job {job.num} crashed: {reason}; traceback in {run_dir / 'error_traceback.txt'}",
              file=sys.stderr)
        job.record("failed", reason, "crash")
        return float("nan")
    if job is not None:
        job.record(status, config_hash=cfg_hash)
    return value


def _join_data_parallel() -> bool:
    """Join the run's process group when launched data-parallel (once); True on rank 0 (and in a one-process run).

    Ranks other than 0 agree on rank 0's start time and pid (the default run dir's name), print nothing to
    stdout and leave Hydra's own files and logs to rank 0."""
    if not data_parallel_launch():
        return True
    from kd_runner import distributed

    if not distributed.enabled():
        distributed.init_from_env()
        atexit.register(distributed.shutdown)
        IDENTITY.update(distributed.broadcast_object(dict(IDENTITY)))
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return distributed.is_main()


def _precheck_on_rank0(args: list[str], main_rank: bool) -> Path | None:
    """:func:`precheck` (which reads the run dir) on rank 0 alone; its verdict reaches every rank, which fail
    with it together."""
    if not data_parallel_launch():
        return precheck(args)
    from kd_runner import distributed

    outcome: tuple = (None, None)
    if main_rank:
        try:
            outcome = (precheck(args), None)
        except UserError as err:
            outcome = (None, err)
    sweep_dir, err = distributed.broadcast_object(outcome)
    if err is not None:
        raise err
    return sweep_dir


QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _lost_peer(exc: BaseException) -> bool:
    """An error raised because another rank of a data-parallel run is gone (a collective lost its peer)."""
    from kd_runner import distributed

    if not distributed.enabled():
        return False
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroup"))


def _run_job(cfg: DictConfig, run_dir: Path, job: SweepJob | None) -> tuple[float, str, str]:
    """Lock the run dir, validate, skip or refuse what is there, run; ``(objective, status, config hash)``.

    In a data-parallel run rank 0 owns the run dir: it takes the lock and decides (run, skip, or the error),
    and every rank follows that decision."""
    from kd_runner import distributed, pipeline

    what, key = ("job dir", "hydra.sweep.dir") if job is not None else ("run dir", "hydra.run.dir")
    locked = False
    try:
        decision: tuple = ("run", None, None)
        if distributed.is_main():
            try:
                locked = lock_run_dir(run_dir, what, key)
                decision = _prepare_run_dir(cfg, run_dir, what, key)
            except UserError as err:
                decision = ("error", err, None)
        kind, value, cfg_hash = distributed.broadcast_object(decision)
        if kind == "error":
            raise value
        if kind == "skip":
            return value, "skipped", cfg_hash
        if not distributed.is_main():
            pop_overwrite(cfg)
        if cfg.trainer.get("num_threads") is None:
            torch_threads_for_parallel_jobs()
        previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rep = pipeline.run(cfg, run_dir)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        print(f"report: {run_dir / 'report.md'}")
        return objective(rep), "complete", cfg_hash
    finally:
        if locked:
            unlock_run_dir(run_dir)


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, what: str, key: str) -> tuple[str, float | None, str]:
    """Validate, then skip, refuse or clear what the run dir holds: ``("skip", objective, hash)`` or
    ``("run", None, hash)``."""
    from kd_runner import pipeline
    from kd_runner.report import config_hash

    overwrite = pop_overwrite(cfg)
    pipeline.preflight(cfg)
    check_dirs([("paths.cache_dir", Path(os.path.abspath(str(cfg.paths.cache_dir))), CACHE_HINT)])
    cfg_hash = config_hash(cfg)
    rep = complete_report(run_dir)
    if rep is not None and not overwrite:
        if rep.get("config_hash") != cfg_hash:
            raise refuse_other_config(run_dir, rep, cfg_hash, what, key)
        print(f"kd-train: {run_dir} already holds a complete report of this config; skipping")
        fmt = str((cfg.get("export") or {}).get("format", "none"))
        if fmt != "none" and not any("export" in m for m in (rep.get("models") or {}).values()):
            print(f"kd-train: export={fmt} does not rerun a finished run; export it with: "
                  f"kd-export {run_dir} --format {fmt}")
        return "skip", objective(rep), cfg_hash
    if overwrite:
        ckpt = cfg.teacher.get("checkpoint")
        if ckpt and Path(os.path.realpath(str(ckpt))).is_relative_to(os.path.realpath(run_dir)):
            raise UserError(f"teacher.checkpoint='{ckpt}' lies in the run dir that overwrite=true would clear; "
                            "copy it elsewhere first, or choose another hydra.run.dir")
        clear_run_outputs(run_dir)
    (run_dir / "error_traceback.txt").unlink(missing_ok=True)
    return "run", None, cfg_hash


def _exit_if_jobs_failed(sweep_dir: Path | None) -> None:
    """After a multirun: one line naming each failed job and its reason, exit 2 (1 if a job crashed)."""
    from kd_runner.summary import _clean_overrides, failed_jobs, read_job_records, varying_keys

    records = read_job_records(sweep_dir) if sweep_dir is not None else None
    bad = failed_jobs(records) if records else []
    if not bad:
        return
    rows = [{"overrides": _clean_overrides(r.get("overrides")) or {}} for r in records.values()]
    keys = varying_keys(rows) if len(rows) > 1 else []
    parts = []
    for r in bad:
        ovr = _clean_overrides(r.get("overrides")) or {}
        shown = " ".join(f"{k}={ovr[k]}" for k in keys if k in ovr)
        why = r.get("reason") or ("did not finish (killed?)" if r.get("status") == "running" else r.get("status"))
        parts.append(f"job {r.get('dir')}" + (f" ({shown})" if shown else "") + f": {why}")
    print(f"kd-train: error: {len(bad)} of {len(records)} sweep jobs failed: {'; '.join(parts)} "
          f"(error.txt in each job dir under {sweep_dir})", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR if all(r.get("kind") == "user" for r in bad) else EXIT_CRASH)


ROLE_SHORTHAND = re.compile(r"^([+~]?)(teacher|student)=")


def expand_role_shorthand(args: list[str]) -> list[str]:
    """``teacher=X`` / ``student=X`` -> ``model@teacher=X`` / ``model@student=X`` (one conf/model/ group)."""
    return [ROLE_SHORTHAND.sub(r"\1model@\2=", a) for a in args]


METHOD_SUM = re.compile(r"^method=([^,]+\+[^,]+)$")


def expand_method_sum(args: list[str]) -> list[str]:
    """``method=crd+kd`` -> ``method=crd +method@method.add.kd=kd``: the first method plus each added one
    (``kd_runner.methods.compose``); every part keeps its own YAML's options under ``method.add.<name>``."""
    out: list[str] = []
    for a in args:
        m = METHOD_SUM.match(a)
        if a.startswith("method=") and "+" in a and "," in a:
            raise UserError(f"{a!r}: a composed method cannot be swept with ','; run one sweep per composition, "
                            "e.g. method=crd+kd method.add.kd.soft_weight=0.5,1")
        if not m:
            out.append(a)
            continue
        first, *added = m.group(1).split("+")
        out.append(f"method={first}")
        out += [f"+method@method.add.{name}={name}" for name in added]
    return out


def main() -> None:
    sys.argv[1:] = expand_role_shorthand(sys.argv[1:])
    try:
        sys.argv[1:] = expand_method_sum(sys.argv[1:])
    except UserError as err:
        _report_user_error(err)
        sys.exit(EXIT_USER_ERROR)
    args = sys.argv[1:]
    try:
        main_rank = _join_data_parallel()  # torchrun: before Hydra names the run dir, so every rank names one dir
        check_overrides(args, config_dir())
        sweep_dir = _precheck_on_rank0(args, main_rank)
    except UserError as err:
        _report_user_error(err)  # rank 0 says it (every process, when no group could be joined)
        sys.exit(EXIT_USER_ERROR)
    if not main_rank:
        sys.argv += QUIET_RANK_OVERRIDES
    _hydra_main()
    from kd_runner.summary import ACTIVE_SWEEP

    if not main_rank:
        return
    if _is_multirun(args) or ACTIVE_SWEEP.get("dir") or sweep_dir is not None:  # -m, or a sweeper in the config
        _exit_if_jobs_failed(ACTIVE_SWEEP.get("dir") or sweep_dir)


if __name__ == "__main__":
    main()
