"""Config checks that run before any training, so a bad value costs seconds, not a teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from kd_runner import distributed
from kd_runner.compute import resolve_compute
from kd_runner.data import DATA_PATHS
from kd_runner.data.augment import Augment, phase_augments
from kd_runner.errors import UserError, choices, number
from kd_runner.methods.base import Method
from kd_runner.optim import build_optimizer, build_scheduler
from kd_runner.store_lock import lock_timing

DEVICES = ("auto", "cpu", "cuda", "mps")
TEACHER_OUTPUTS = ("auto", "cache", "live", "views")
DATA_ON_DEVICE = ("auto", "on", "off")


@dataclass(frozen=True)
class Trainer:
    """Typed view of ``cfg.trainer``; construction validates every field."""

    teacher_epochs: int
    student_epochs: int
    batch_size: int
    eval_batch_size: int
    device: str
    num_threads: int | None
    deterministic: bool
    teacher_outputs: str
    teacher_cache: bool
    baseline_cache: bool
    progress: bool
    bench_iters: int
    channels_last: str = "auto"
    amp: str = "auto"
    compile: bool = False
    data_on_device: str = "auto"
    cuda_graphs: str = "auto"
    data_path: str = "auto"
    num_workers: int = 2
    teacher_outputs_max_gb: float | None = None
    sync_bn: bool = False
    teacher_outputs_store: bool = True

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Trainer:
        t = cls(
            teacher_epochs=_int(cfg, "teacher_epochs", 0),
            student_epochs=_int(cfg, "student_epochs", 1),
            batch_size=_int(cfg, "batch_size", 1),
            eval_batch_size=_int(cfg, "eval_batch_size", 1),
            device=str(cfg.device),
            num_threads=None if cfg.get("num_threads") is None else _int(cfg, "num_threads", 1),
            deterministic=bool(cfg.deterministic),
            teacher_outputs=str(cfg.teacher_outputs),
            teacher_cache=bool(cfg.get("teacher_cache", True)),
            baseline_cache=bool(cfg.get("baseline_cache", True)),
            progress=bool(cfg.progress),
            bench_iters=_int(cfg, "bench_iters", 0),
            channels_last=str(cfg.get("channels_last", "auto")),
            amp=str(cfg.get("amp", "auto")),
            compile=_bool(cfg, "compile"),
            data_on_device=str(cfg.get("data_on_device", "auto")),
            cuda_graphs=str(cfg.get("cuda_graphs", "auto")),
            data_path=str(cfg.get("data_path", "auto")),
            num_workers=_int(cfg, "num_workers", 0) if "num_workers" in cfg else 2,
            teacher_outputs_max_gb=None if cfg.get("teacher_outputs_max_gb") is None
            else number(cfg.teacher_outputs_max_gb, "trainer.teacher_outputs_max_gb"),
            sync_bn=_bool(cfg, "sync_bn"),
            teacher_outputs_store=_bool(cfg, "teacher_outputs_store", True),
        )
        if t.teacher_outputs_max_gb is not None and t.teacher_outputs_max_gb < 0:
            raise UserError(f"trainer.teacher_outputs_max_gb={t.teacher_outputs_max_gb:g} is invalid; it must be >= 0 "
                            "(or null: half the memory available)")
        if t.device not in DEVICES:
            raise UserError(f"trainer.device={t.device!r} is invalid; valid: {choices(DEVICES)}")
        if t.teacher_outputs not in TEACHER_OUTPUTS:
            raise UserError(
                f"trainer.teacher_outputs={t.teacher_outputs!r} is invalid; valid: {choices(TEACHER_OUTPUTS)}"
            )
        if t.data_path not in DATA_PATHS:
            raise UserError(f"trainer.data_path={t.data_path!r} is invalid; valid: {choices(DATA_PATHS)}")
        if t.data_on_device not in DATA_ON_DEVICE:
            raise UserError(f"trainer.data_on_device={t.data_on_device!r} is invalid; valid: {choices(DATA_ON_DEVICE)}")
        # checks the values (the device is settled at run time)
        resolve_compute(t.channels_last, t.amp, t.compile, t.deterministic, torch.device("cpu"), t.cuda_graphs)
        return t


def _bool(cfg: DictConfig, key: str, default: bool = False) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"trainer.{key}={value!r} is invalid; it must be true or false")
    return value


def _int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"trainer.{key}={value!r} is invalid; it must be an integer >= {minimum}")
    return value


def validate(cfg: DictConfig) -> Trainer:
    """Check the parts of the config that are not checked where they are built."""
    for key in ("seed", "teacher_seed"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            raise UserError(f"{key}={cfg[key]!r} is invalid; it must be an integer")
    part = cfg.dataset.get("label_fraction", 1.0)
    if isinstance(part, bool) or not isinstance(part, (int, float)) or not 0.0 < float(part) <= 1.0:
        raise UserError(f"dataset.label_fraction={part!r} is invalid; it must be in (0, 1] (1: every training "
                        "image labelled)")
    frac = cfg.dataset.get("val_fraction") or 0.0
    if not isinstance(frac, (int, float)) or not 0.0 <= float(frac) < 1.0:
        raise UserError(f"dataset.val_fraction={frac!r} is invalid; it must be in [0, 1)")
    for key in ("split_seed", "image_size", "channels"):
        if cfg.dataset.get(key) is not None:
            number(cfg.dataset.get(key), f"dataset.{key}", int)
    for v in cfg.dataset.get("mean") or []:
        number(v, "dataset.mean")
    if str(cfg.dataset.name) == "digits":
        from kd_runner.data.digits import count_test_images

        count_test_images(cfg.dataset.get("test_fraction"))
    std = cfg.dataset.get("std")
    if std is not None and any(number(v, "dataset.std") <= 0 for v in std):
        raise UserError(f"dataset.std={list(std)} is invalid; every value must be > 0")
    phases = cfg.get("augment", {}).get("phases")
    if phases is not None and not OmegaConf.is_list(phases):
        raise UserError(f"augment.phases={phases!r} is invalid; give a list, e.g. [teacher,baseline,student]")
    trainer = Trainer.from_cfg(cfg.trainer)
    distributed.check_batch("trainer.batch_size", trainer.batch_size)
    lock_timing()  # a bad KD_STORE_STALE_AFTER_S fails now, not when the first store key is claimed
    probe = torch.nn.Parameter(torch.zeros(1))
    try:  # torch's own range checks (momentum with nesterov, negative decay, factor >= 1, ...)
        optimizer = build_optimizer(cfg.optimizer, [probe])
        build_scheduler(cfg.scheduler, optimizer, max(1, trainer.student_epochs))
        overrides = cfg.get("student_optimizer") or {}
        if not OmegaConf.is_dict(overrides) and not isinstance(overrides, dict):
            raise UserError(f"student_optimizer={overrides!r} is invalid; give overrides of optimizer, "
                            "e.g. {lr: 0.01}")
        unknown = sorted(set(overrides) - set(cfg.optimizer))
        if unknown:
            raise UserError(f"student_optimizer.{unknown[0]} is not a key of optimizer={cfg.optimizer.name}; "
                            f"valid: {choices(cfg.optimizer.keys())}")
        build_optimizer(OmegaConf.merge(cfg.optimizer, overrides), [probe])
    except (ValueError, ZeroDivisionError) as err:
        raise UserError(f"optimizer={cfg.optimizer.name} / scheduler={cfg.scheduler.name}: {err}") from None
    if cfg.scheduler.name == "step" and number(cfg.scheduler.step_size, "scheduler.step_size", int) < 1:
        raise UserError(f"scheduler.step_size={cfg.scheduler.step_size} is invalid; it must be >= 1")
    return trainer


# The views pass costs V teacher forwards per image, live one per epoch; measured on CPU (resnet32x4 -> resnet8x4,
# benchmarks/teacher_views.py) the cache paid after 1.13 V epochs: auto asks for a margin beyond that.
VIEWS_PAY_AFTER = 1.25


def _teacher_output_mode(requested: str, student_augment: Augment | None, method: Method | None = None,
                         student_epochs: int = 0) -> str:
    """Cache teacher outputs unless the student's views are random: then the teacher must see the same view:
    ``views`` (logits of every crop/flip view computed once, looked up per sample) when the student trains for more
    epochs than there are views and the method reads logits only (V teacher passes instead of one per epoch: it
    pays, see benchmarks/teacher_views.py), else ``live``."""
    if requested == "cache" and student_augment is not None:
        raise UserError("trainer.teacher_outputs=cache with a randomly augmented student would distill from "
                        "views the student never sees; use auto, live or views, or drop 'student' from "
                        "augment.phases")
    if requested == "views":
        if student_augment is None:
            raise UserError("trainer.teacher_outputs=views caches the teacher's logits per crop/flip view, but the "
                            "student trains on fixed views (set augment.crop_padding > 0 or augment.hflip=true with "
                            "'student' in augment.phases); use auto or cache")
        taps = list(method.teacher_taps) if method is not None else []
        if taps:
            raise UserError(f"trainer.teacher_outputs=views serves logits only; method={method.name} reads teacher "
                            f"layers {taps}; use live")
    if requested != "auto":
        return requested
    if student_augment is None:
        return "cache"
    logits_only = method is not None and not list(method.teacher_taps)
    return "views" if logits_only and student_epochs > VIEWS_PAY_AFTER * student_augment.num_views else "live"


def check_deliverables(cfg: DictConfig) -> None:
    """Trackers (``logger``) and export: unknown names, bad settings and missing optional packages fail here,
    before any training. Their modules load only when asked for, so a default run imports neither."""
    logger = cfg.get("logger")
    if logger is not None and (not OmegaConf.is_dict(logger) or set(logger.keys()) - {"csv"}):
        from kd_runner.loggers import check_loggers

        check_loggers(logger)
    export = cfg.get("export")
    if export is not None and str(export.get("format", "none")) != "none":
        from kd_runner.export import check_config

        check_config(export)


def preflight(cfg: DictConfig) -> tuple[Trainer, Method, dict[str, Augment | None], str | None]:
    """Every check that needs no data: a bad value fails here, before a run touches its run dir."""
    trainer = validate(cfg)
    from kd_runner.methods.registry import build_method  # loads every method: only when a run is checked

    method = build_method(cfg.method)
    if float(cfg.dataset.get("label_fraction", 1.0)) < 1.0 and method.reads_labels:
        raise UserError(f"method={method.name} reads labels beyond its CE term, so it cannot train on unlabelled "
                        f"images (dataset.label_fraction={cfg.dataset.label_fraction}); use a method such as kd, "
                        "dist, hint or at, or dataset.label_fraction=1")
    check_deliverables(cfg)
    augments = phase_augments(cfg.augment)
    outputs_mode = (_teacher_output_mode(trainer.teacher_outputs, augments["student"], method, trainer.student_epochs)
                    if method.needs_teacher else None)
    return trainer, method, augments, outputs_mode
