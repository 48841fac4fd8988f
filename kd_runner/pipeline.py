"""The phases of one run: data -> teacher -> CE baseline -> distilled student -> evaluate -> report."""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner import checkpoints, distributed, inference, report
from kd_runner.compute import prepare_model, resolve_compute
from kd_runner.config import Trainer, preflight
from kd_runner.data import build_data
from kd_runner.data.augment import Augment
from kd_runner.data.cache import set_cache_dir
from kd_runner.data.tensors import DataBundle, Normalizer, Split, stratified_fraction
from kd_runner.engine import Env, PhaseResult, TeacherOutputs, check_state_tag, fit, predict_accuracy, probe_taps
from kd_runner.errors import UserError
from kd_runner.loggers import Trackers, build_trackers
from kd_runner.methods.base import IGNORE, Method, Outputs, Setup
from kd_runner.methods.ce import CE
from kd_runner.model_store import baseline_key, load_or_train, teacher_key
from kd_runner.models import build_model
from kd_runner.output_store import load_or_compute, outputs_key
from kd_runner.step import graphs_reason
from kd_runner.utils import (
    atomic_write_text,
    available_memory,
    count_params,
    derive_seed,
    keep_freed_memory,
    resolve_device,
    seed_everything,
    weights_hash,
)

# each role draws from its own stream, derived from (seed, role) so no run's stream is another's
SEED_TEACHER, SEED_STUDENT_INIT, SEED_EXTRA, SEED_TRAIN = "teacher_init", "student_init", "extra_init", "train"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run every phase for ``cfg``; write checkpoints and reports into ``run_dir``; return the report.

    The experiment trackers (``logger``) see every epoch as it ends and the report at the end; a tracker that
    fails only warns, and they are closed however the run ends."""
    wall0 = time.perf_counter()
    checked = preflight(cfg)
    trackers = build_trackers(cfg, run_dir) if distributed.is_main() else Trackers([])
    status = "failed"
    try:
        rep = _run(cfg, run_dir, checked, trackers, wall0)
        trackers.log_report(rep, run_dir)
        status = "complete"
        return rep
    except BaseException as exc:  # not an Exception: SIGTERM/SIGINT (train.Stopped), KeyboardInterrupt
        status = "failed" if isinstance(exc, Exception) else "stopped"
        raise
    finally:
        trackers.close(status)


def _run(cfg: DictConfig, run_dir: Path, checked: tuple, trackers: Trackers, wall0: float) -> dict:
    trainer, method, augments, outputs_mode = checked
    seed = int(cfg.seed)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    allocator = keep_freed_memory()
    torch.use_deterministic_algorithms(trainer.deterministic, warn_only=True)
    device = distributed.resolve_device(resolve_device(trainer.device))
    if trainer.sync_bn and distributed.enabled() and device.type != "cuda":
        raise UserError(f"trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm does not run on "
                        f"{device.type}); use trainer.sync_bn=false")
    timings: dict[str, float] = {}
    cfg_hash = report.config_hash(cfg)
    state_tag = f"config {cfg_hash}, seed {seed}, teacher_seed {cfg.teacher_seed}"
    state_dir = claim_state_dir(run_dir, cfg_hash, state_tag)

    t0 = time.perf_counter()
    set_cache_dir(Path(str(cfg.paths.cache_dir)))
    data = build_run_data(cfg, trainer)
    env = make_env(trainer, data, device)
    no_graphs = graphs_reason(env, str(cfg.optimizer.name))
    if trainer.cuda_graphs == "on" and no_graphs is not None:
        raise UserError(f"trainer.cuda_graphs=on cannot apply: {no_graphs}; use auto or off")
    labelled, student_train, labelled_fp = label_split(cfg, data)
    timings["data"] = time.perf_counter() - t0

    # Build everything before training anything: bad layer names or shapes fail in seconds.
    shape, classes = data.input_shape(), data.num_classes
    teacher = None
    if method.needs_teacher:
        seed_everything(derive_seed(int(cfg.teacher_seed), SEED_TEACHER))
        teacher = sync_bn(prepare_model(build_model(cfg.teacher, shape, classes), device, env.compute), trainer)
    seed_everything(derive_seed(seed, SEED_STUDENT_INIT))
    student_init = sync_bn(prepare_model(build_model(cfg.student, shape, classes), device, env.compute), trainer)
    extra, teacher_shapes = build_extra(method, student_init, teacher, student_train, env, classes, seed)
    outputs_note, cache_device = None, None
    if outputs_mode == "cache":  # decided now, before any training: a cache that cannot fit runs live instead
        outputs_mode, outputs_note = fit_teacher_cache(len(student_train), classes, teacher_shapes, device,
                                                       trainer.teacher_outputs_max_gb)
    elif outputs_mode == "views":
        outputs_mode, outputs_note, cache_device = fit_view_cache(len(student_train), augments["student"].num_views,
                                                                  classes, device, trainer.teacher_outputs_max_gb)
    # memory differs between ranks: rank 0's choice holds for all (every rank serves the same teacher outputs)
    outputs_mode, outputs_note, cache_device = distributed.broadcast_object((outputs_mode, outputs_note, cache_device))
    if cache_device is not None:
        cache_device = distributed.resolve_device(torch.device(cache_device.type))
    if outputs_note:
        print(f"kd-train: {outputs_note}", flush=True)
    models_built = {"student": student_init, **({"teacher": teacher} if teacher is not None else {})}
    init_hash = weights_hash(student_init)

    models: dict[str, dict] = {}
    histories: list[dict] = []
    teacher_info: dict = {}
    if teacher is not None:
        t0 = time.perf_counter()
        teacher_info, res = _teacher_phase(cfg, teacher, data, env, trainer, run_dir, state_dir, state_tag,
                                           int(cfg.teacher_seed), augments["teacher"], trackers.log_epoch)
        timings["teacher"] = time.perf_counter() - t0
        if res is not None and teacher_info.get("source") != "trained":
            trackers.log_history(res.history)
        models["teacher"] = _evaluate("teacher", teacher, None, res, data, env, trainer, cfg.teacher, run_dir)
        histories += res.history if res else []

    baseline = None
    baseline_epochs = matched_epochs(trainer.student_epochs, len(student_train), len(labelled), trainer.batch_size)
    if teacher is not None and cfg.baseline:
        t0 = time.perf_counter()
        baseline = copy.deepcopy(student_init)

        def train_baseline() -> PhaseResult:
            seed_everything(derive_seed(seed, SEED_TRAIN))
            return fit("baseline", baseline, CE(), labelled, data.val, env, epochs=baseline_epochs,
                       optimizer_cfg=student_optimizer(cfg), scheduler_cfg=cfg.scheduler, seed=seed,
                       state_path=state_dir / "baseline.pt", state_tag=state_tag, augment=augments["baseline"],
                       on_epoch=trackers.log_epoch)

        key = (baseline_key(student_view(cfg), labelled_fp, init_hash, augments["baseline"], baseline_epochs)
               if trainer.baseline_cache else None)
        source, res = load_or_train(store_root(cfg, "baselines"), key, baseline, cfg.student, data, run_dir,
                                    train_baseline)
        timings["baseline"] = time.perf_counter() - t0
        if source.get("source") != "trained":
            trackers.log_history(res.history)
        models["baseline"] = _evaluate("baseline", baseline, None, res, data, env, trainer, cfg.student, run_dir)
        models["baseline"].update(init_hash=init_hash, source=source)
        histories += res.history

    t0 = time.perf_counter()
    student = copy.deepcopy(student_init)
    t_out = None
    if teacher is not None:
        t_out, stored = _teacher_outputs(cfg, trainer, method, teacher, student_train, data.fingerprint, env,
                                         outputs_mode, augments["student"], cache_device)
        if stored:
            teacher_info["outputs_store"] = stored
        teacher_info["outputs"] = outputs_mode
        if outputs_mode == "views":
            n_views = augments["student"].num_views
            teacher_info["outputs_views"] = n_views
            teacher_info["outputs_cache_bytes"] = TeacherOutputs.views_cache_bytes(len(student_train), n_views,
                                                                                   classes)
            teacher_info["outputs_cache_where"] = "device" if cache_device == device else "host"
        if outputs_note:
            teacher_info["outputs_note"] = outputs_note
        teacher_info["outputs_cache_seconds"] = round(t_out.cache_seconds, 3)
    seed_everything(derive_seed(seed, SEED_TRAIN))
    res = fit("student", student, method, student_train, data.val, env, epochs=trainer.student_epochs,
              optimizer_cfg=student_optimizer(cfg), scheduler_cfg=cfg.scheduler, seed=seed, teacher=t_out, extra=extra,
              state_path=state_dir / "student.pt", state_tag=state_tag, augment=augments["student"],
              on_epoch=trackers.log_epoch)
    del t_out
    timings["student"] = time.perf_counter() - t0
    models["student"] = _evaluate("student", student, extra, res, data, env, trainer, cfg.student, run_dir)
    models["student"]["init_hash"] = init_hash
    histories += res.history

    if str((cfg.get("export") or {}).get("format", "none")) != "none" and distributed.is_main():
        t0 = time.perf_counter()
        trained = {"teacher": teacher, "baseline": baseline, "student": student}
        _export(cfg, {r: m for r, m in trained.items() if m is not None}, models, data, run_dir)
        timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - wall0
    rep = None
    if distributed.is_main():
        execution = run_paths(env, data, models_built, str(cfg.optimizer.name), allocator)
        execution["distributed"] = {**distributed.describe(), "sync_bn": trainer.sync_bn and distributed.enabled()}
        rep = report.write(run_dir, cfg=cfg, data=data, labelled=len(labelled), method=method, models=models,
                           teacher=teacher_info, histories=histories, timings=timings, device=device,
                           execution=execution)
        shutil.rmtree(state_dir, ignore_errors=True)  # the report is complete: resume state is no longer needed
    data.close()
    return distributed.broadcast_object(rep)  # every rank returns rank 0's report (a sweeper's objective)


def build_run_data(cfg: DictConfig, trainer: Trainer) -> DataBundle:
    """The run's data. In a data-parallel run rank 0 decodes first (writing the decode cache) and the other ranks
    follow with its data path (``trainer.data_path=auto`` would judge memory after rank 0 took its share)."""
    path = trainer.data_path
    data = build_data(cfg.dataset, path, trainer.num_workers) if distributed.is_main() else None
    path = distributed.broadcast_object(data.path if data is not None else None)
    return data if data is not None else build_data(cfg.dataset, path, trainer.num_workers)


def sync_bn(model: nn.Module, trainer: Trainer) -> nn.Module:
    """``trainer.sync_bn`` in a data-parallel run: BatchNorm layers normalise over the global batch."""
    if trainer.sync_bn and distributed.enabled():
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _teacher_outputs(cfg: DictConfig, trainer: Trainer, method: Method, teacher: nn.Module, train: Split,
                     fingerprint: dict, env: Env, mode: str, augment: Augment | None,
                     cache_device: torch.device | None) -> tuple[TeacherOutputs, dict | None]:
    """The teacher's outputs for the student phase; caches come from (and go to) the output store, so a sweep over
    methods and T runs the teacher pass once (``trainer.teacher_cache=false`` or ``teacher_outputs_store=false``
    turn it off). With teacher taps the stored maps are the method's reduced ones, keyed by the taps and what the
    reduction depends on."""
    taps = list(method.teacher_taps)

    def build(precomputed=None) -> TeacherOutputs:
        if isinstance(precomputed, dict):
            precomputed = Outputs(precomputed["logits"], precomputed["feats"])
        return TeacherOutputs(teacher, taps, env, train, mode, augment=augment,
                              cache_device=cache_device, reduce=method.reduce_teacher, precomputed=precomputed)

    if mode not in ("cache", "views") or not (trainer.teacher_cache and trainer.teacher_outputs_store):
        return build(), None
    reads = {"taps": taps, **method.reduce_identity()} if taps else None
    key = outputs_key(teacher, fingerprint, mode, augment, env.compute.describe(), env.device.type, reads)
    built: dict[str, TeacherOutputs] = {}

    def compute(stored):
        built["outputs"] = build(stored)
        cache = built["outputs"].cache
        return {"logits": cache.logits, "feats": cache.feats} if taps else cache.logits

    _, info = load_or_compute(store_root(cfg, "teacher_outputs"), key, compute, cache_device or env.device)
    return built["outputs"], info


def _export(cfg: DictConfig, trained: dict[str, nn.Module], models: dict[str, dict], data: DataBundle,
            run_dir: Path) -> None:
    """``export=onnx|torchscript``: deployable models under ``run_dir/export``, verified against PyTorch on the test
    split and timed on CPU; each role's figures go into its report entry (``models.<role>.export``)."""
    from kd_runner.export import export_models

    exported = export_models(trained, cfg.export, run_dir / "export", data.test, data.mean, data.std, data.classes)
    for role, info in exported.items():
        models[role]["export"] = info


def label_split(cfg: DictConfig, data: DataBundle) -> tuple[Split, Split, dict]:
    """``(labelled, student_train, labelled_fingerprint)`` under ``dataset.label_fraction``.

    1 (default but on digits): both are ``data.train``. Below 1, a class-balanced fraction of the training images
    keeps its labels (drawn with ``dataset.split_seed``: the same images for every seed and method of a sweep): the
    CE baseline trains on those alone (CE has nothing to learn from an unlabelled image), the distilled student on
    every training image, the rest labelled ``IGNORE``: CE on the labelled ones, the teacher's outputs on all
    (Hinton et al. 2015: the transfer set may be unlabelled). The teacher trains on all labels: it stands for a
    model trained where labels were plentiful. The fingerprint keys the baseline store."""
    fraction = float(cfg.dataset.get("label_fraction", 1.0))
    if fraction >= 1.0:
        return data.train, data.train, data.fingerprint
    idx = stratified_fraction(data.train.labels, fraction, int(cfg.dataset.get("split_seed", 0)))
    labels = torch.full_like(data.train.labels, IGNORE)
    labels[idx] = data.train.labels[idx]
    digest = hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:16]
    return (data.train.subset(idx), data.train.with_labels(labels),
            {**data.fingerprint, "labelled": len(idx), "labelled_subset": digest})


def matched_epochs(epochs: int, n_student: int, n_labelled: int, batch_size: int) -> int:
    """Epochs over the labelled images that give the baseline as many optimizer steps as the student takes in
    ``epochs`` over all of them, so a KD gain is never a gain of more steps."""
    steps = epochs * math.ceil(n_student / batch_size)
    return max(epochs, math.ceil(steps / math.ceil(n_labelled / batch_size)))


def student_optimizer(cfg: DictConfig) -> DictConfig:
    """``optimizer`` with ``student_optimizer``'s overrides: what the CE baseline and the distilled student use."""
    return OmegaConf.merge(cfg.optimizer, cfg.get("student_optimizer") or {})


def student_view(cfg: DictConfig) -> DictConfig:
    """``cfg`` as the student phases see it (their optimizer), e.g. for the baseline's store key."""
    view = cfg.copy()
    view.optimizer = student_optimizer(cfg)
    return view


def run_paths(env: Env, data: DataBundle, models_built: dict[str, nn.Module], optimizer: str,
              allocator: str = "") -> dict:
    """Which data and compute paths this run took, for the report."""
    no_graphs = graphs_reason(env, optimizer)
    residency = env.residency(data.train)
    return {
        "data": {"path": data.path, "source": data.source, "train_residency": residency,
                 "batches": _batch_route(env, data.path, residency)},
        "compute": {**env.compute.describe(),
                    "channels_last_models": sorted(r for r, m in models_built.items()
                                                   if getattr(m, "kd_channels_last", False)),
                    "inference_mode": True,
                    "cuda_graphs": "off" if env.compute.cuda_graphs == "off" else (no_graphs or "on"),
                    "optimizer_step": "fused" if env.device.type == "cuda" else "torch default",
                    "host_allocator": allocator},
    }


def _batch_route(env: Env, path: str, residency: str) -> str:
    if path == "loader":
        return "DataLoader workers" + (", pinned, non_blocking copy" if env.device.type == "cuda" else "")
    if residency == "device":
        return "gathered on the GPU"
    return "pinned gather, non_blocking copy" if env.device.type == "cuda" else "gathered in host memory"


def make_env(trainer: Trainer, data: DataBundle, device: torch.device) -> Env:
    """The shared run environment: normalisation from the data, compute path settled for ``device``."""
    compute = resolve_compute(trainer.channels_last, trainer.amp, trainer.compile, trainer.deterministic, device,
                              trainer.cuda_graphs)
    return Env(device, Normalizer(data.mean, data.std), trainer.batch_size, trainer.eval_batch_size,
               trainer.progress and distributed.is_main(), compute=compute, data_on_device=trainer.data_on_device)


def fit_teacher_cache(n_train: int, classes: int, teacher_shapes: dict[str, torch.Size], device: torch.device,
                      max_gb: float | None = None) -> tuple[str, str | None]:
    """``("cache", None)`` when the teacher's logits and tapped maps over the train split fit in ``max_gb``
    (default: half the memory available on ``device``); else ``("live", why)``: the teacher then runs on
    every batch instead, which gives the same losses at the cost of a teacher forward per step."""
    need = TeacherOutputs.cache_bytes(n_train, classes, teacher_shapes)
    if max_gb is None:
        budget, what = available_memory(device) // 2, f"half the memory available on {device.type}"
    else:
        budget, what = int(max_gb * 2**30), f"trainer.teacher_outputs_max_gb={max_gb:g}"
    if need <= budget:
        return "cache", None
    return "live", (f"the teacher-output cache would take {need / 2**30:.3g} GiB, more than {what} "
                    f"({budget / 2**30:.3g} GiB); the teacher runs live on every batch instead")


def fit_view_cache(n_train: int, views: int, classes: int, device: torch.device,
                   max_gb: float | None = None) -> tuple[str, str | None, torch.device | None]:
    """``("views", note, where)`` when float32 logits for ``views`` views of ``n_train`` images fit in ``max_gb``
    on ``device`` (default: half the memory available there, else half the host's); ``where`` is ``device`` when they
    fit there, else the host (a host cache turns CUDA graphs off for the student). Else ``("live", why, None)``:
    the teacher runs on every batch, which gives the same losses at the cost of a teacher forward per step."""
    need = TeacherOutputs.views_cache_bytes(n_train, views, classes)
    what = f"the teacher-view cache ({n_train} images x {views} views x {classes} classes) would take " \
           f"{need / 2**30:.3g} GiB"
    if max_gb is not None and need > int(max_gb * 2**30):
        return "live", (f"{what}, more than trainer.teacher_outputs_max_gb={max_gb:g}; "
                        "the teacher runs live on every batch instead"), None
    if max_gb is not None or need <= available_memory(device) // 2:  # a budget the user set is the device's
        return "views", None, device
    host = torch.device("cpu")
    if device.type != "cpu" and need <= available_memory(host) // 2:
        return "views", (f"{what}, more than half the memory available on {device.type}; it lives in host memory "
                         "(CUDA graphs off for the student)"), host
    return "live", f"{what}, more than half the memory available; the teacher runs live on every batch instead", None


def build_extra(method: Method, student: nn.Module, teacher: nn.Module | None, train: Split, env: Env,
                num_classes: int, seed: int | None = None) -> tuple[nn.Module, dict[str, torch.Size]]:
    """Bind the method's layers to both models and let it build its trainable extras for the tapped shapes.

    Returns the extras and the shapes of the teacher's outputs as the method reads them (after its
    ``reduce_teacher``): they size the teacher-output cache."""
    method.bind(student, teacher)
    s_out = probe_taps(student, method.student_taps, train, env, "student")
    t_out = probe_taps(teacher, method.teacher_taps, train, env, "teacher") if teacher is not None else {}
    setup = Setup({k: v.shape for k, v in s_out.items()}, {k: v.shape for k, v in t_out.items()},
                  num_classes=num_classes, n_train=len(train), train_targets=train.labels, student=student,
                  teacher=teacher)
    if seed is not None:
        seed_everything(derive_seed(seed, SEED_EXTRA))
    extra = prepare_model(method.extra_modules(setup), env.device, env.compute)
    reduced = method.reduce_teacher(t_out) if t_out else {}
    return extra, {k: v.shape for k, v in reduced.items()}


def _teacher_phase(cfg, teacher, data, env, trainer, run_dir, state_dir, state_tag: str, seed,
                   augment: Augment | None, on_epoch=None) -> tuple[dict, PhaseResult | None]:
    """Teacher from an explicit checkpoint, from the content-addressed store, or trained (and stored)."""
    ckpt = cfg.teacher.get("checkpoint")
    if ckpt:
        path = checkpoints.load_weights(ckpt, teacher, "teacher")
        teacher.to(env.device)
        return {"source": "checkpoint", "path": path}, None

    def train_teacher() -> PhaseResult:
        seed_everything(derive_seed(seed, SEED_TRAIN))
        return fit("teacher", teacher, CE(), data.train, data.val, env, epochs=trainer.teacher_epochs,
                   optimizer_cfg=cfg.optimizer, scheduler_cfg=cfg.scheduler, seed=seed,
                   state_path=state_dir / "teacher.pt", state_tag=state_tag, augment=augment, on_epoch=on_epoch)

    key = teacher_key(cfg, data.fingerprint, augment) if trainer.teacher_cache else None
    return load_or_train(store_root(cfg, "teachers"), key, teacher, cfg.teacher, data, run_dir, train_teacher)


def store_root(cfg: DictConfig, kind: str) -> Path:
    """Where the ``kind`` store (teachers, baselines) lives: under ``paths.cache_dir``."""
    return Path(str(cfg.paths.cache_dir)) / kind


def claim_state_dir(run_dir: Path, cfg_hash: str, tag: str) -> Path:
    """``run_dir/state``, where per-epoch training state lives; refuse state left by another config or seed.

    Every state file is checked now, before any training (and again when a phase resumes from it).
    """
    state_dir = run_dir / "state"
    marker = state_dir / "config_hash"
    if marker.is_file() and marker.read_text().strip() != cfg_hash and any(state_dir.glob("*.pt")):
        raise UserError(
            f"run dir '{run_dir}' holds the partial state of a different config (hash {marker.read_text().strip()}, "
            f"this one {cfg_hash}); rerun with the original overrides or choose another hydra.run.dir"
        )
    for path in sorted(state_dir.glob("*.pt")):
        check_state_tag(path, tag)
    if distributed.is_main():
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, cfg_hash + "\n")
    return state_dir


def _evaluate(role: str, model: nn.Module, extra: nn.Module | None, res: PhaseResult | None, data: DataBundle,
              env: Env, trainer, model_cfg: DictConfig, run_dir: Path) -> dict:
    """Test accuracy (last epoch and best-on-val), size, speed; save the checkpoint."""
    t0 = time.perf_counter()
    info: dict = {"arch": OmegaConf.to_container(model_cfg, resolve=True), "params": count_params(model),
                  "test_acc": round(predict_accuracy(model, data.test, env), 4)}
    ckpt = run_dir / "checkpoints" / f"{role}.pt"
    main = distributed.is_main()  # only rank 0 writes; every rank evaluates its shard of the test split
    if main:
        info["size_bytes"] = checkpoints.save(ckpt, model, model_cfg, data.input_shape(), data.num_classes, extra)
    info["checkpoint"] = str(ckpt.relative_to(run_dir))
    if res is not None:
        info["epochs"] = len(res.history)
        info["train_seconds"] = round(res.train_seconds, 3)
        if res.cuda_graph_replays:
            info["cuda_graph_replays"] = res.cuda_graph_replays
        if res.best_state is not None:
            info["best_val_acc"], info["best_epoch"] = round(res.best_val_acc, 4), res.best_epoch
            last = copy.deepcopy(model.state_dict())
            last_extra = copy.deepcopy(extra.state_dict()) if extra is not None else None
            model.load_state_dict(res.best_state["model"])
            if extra is not None and res.best_state.get("extra"):
                extra.load_state_dict(res.best_state["extra"])
            info["test_acc_best_val"] = round(predict_accuracy(model, data.test, env), 4)
            if main:
                checkpoints.save(run_dir / "checkpoints" / f"{role}_best.pt", model, model_cfg, data.input_shape(),
                                 data.num_classes, extra)
            model.load_state_dict(last)
            if last_extra is not None:
                extra.load_state_dict(last_extra)
    if main:  # timed on rank 0 alone
        info.update(inference.measure(model, data.input_shape(), env.device, env.eval_batch_size,
                                      trainer.bench_iters, env.compute))
    info["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return info
