"""The one train/eval loop shared by teacher, baseline and every distillation method."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from kd_runner import distributed
from kd_runner.compute import Compute, compile_once, to_model_format
from kd_runner.data.augment import Augment
from kd_runner.data.tensors import Normalizer, Split, global_batch_sizes
from kd_runner.errors import UserError
from kd_runner.methods.base import Method, Outputs
from kd_runner.optim import build_optimizer, build_scheduler, plateau_monitor, scheduler_step
from kd_runner.step import TrainStep, graphs_reason
from kd_runner.taps import Taps
from kd_runner.utils import atomic_torch_save, derive_seed


def set_train_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, but frozen backbones (``kd_frozen``) stay in eval mode."""
    model.train(training)
    for m in getattr(model, "kd_frozen", []):
        m.eval()


@dataclass
class Env:
    """What every phase shares: device, normaliser, batch sizes, compute path, where the data lives."""

    device: torch.device
    normalize: Normalizer
    batch_size: int
    eval_batch_size: int
    progress: bool = True
    compute: Compute = field(default_factory=Compute)
    data_on_device: str = "auto"  # auto | on | off: keep whole splits in GPU memory (CUDA only)
    # id(split) -> (split, its staged copy); holding the split keeps its id from being reused
    _staged: dict[int, tuple[Split, Split]] = field(default_factory=dict, repr=False)
    _shards: dict[int, tuple[Split, Split]] = field(default_factory=dict, repr=False)  # id(split) -> this rank's rows

    def prepare(self, images: Tensor) -> Tensor:
        return self.normalize(images.to(self.device, non_blocking=True))

    def stage(self, split: Split) -> Split:
        """``split`` in GPU memory when it fits (once per split), else as it is."""
        if self.device.type != "cuda" or self.data_on_device == "off" or split.resident_bytes is None:
            return split
        if id(split) not in self._staged:
            fits = self.data_on_device == "on" or _fits_on_gpu(split.resident_bytes, self.device)
            self._staged[id(split)] = (split, split.to(self.device) if fits else split)
        return self._staged[id(split)][1]

    def batches(self, split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                shard: bool = False):
        """``(indices, uint8 images, labels)`` of ``split`` where it lives; host batches bound for a GPU are pinned.
        ``shard``: in a data-parallel run, this rank's part of each global batch of ``batch_size``."""
        staged = self.stage(split)
        part = (distributed.rank(), distributed.world()) if shard and distributed.enabled() else None
        return staged.batches(batch_size, shuffle=shuffle, generator=generator,
                              pin=self.device.type == "cuda" and staged.on_host, shard=part)

    def shard_of(self, split: Split) -> Split:
        """This rank's contiguous rows of ``split`` (``distributed.shard_bounds``; the whole split in a one-process
        run): what it evaluates or runs a teacher over before the ranks' results are combined."""
        if not distributed.enabled():
            return split
        if id(split) not in self._shards:
            lo, hi = distributed.shard_bounds(len(split))
            self._shards[id(split)] = (split, split.subset(torch.arange(lo, hi)))
        return self._shards[id(split)][1]

    def residency(self, split: Split) -> str:
        staged = self.stage(split)
        where = staged.where()
        return "pinned host" if where == "host" and self.device.type == "cuda" else where


def _fits_on_gpu(nbytes: int, device: torch.device, share: float = 0.25) -> bool:
    """Whole-split residency may take at most ``share`` of the GPU memory free now."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


class TeacherOutputs:
    """Serves a frozen teacher's logits and tapped features for a training batch.

    ``cache`` mode runs the teacher once over the training split and indexes the result
    (valid only when training views are deterministic); ``live`` runs it on each batch;
    ``views`` (random crop/flip views, logits only) runs it once over every view of every
    training image (``augment.num_views`` per image) and serves ``cache[idx, view_ids]``.
    All run under ``torch.inference_mode`` (no autograd bookkeeping) and the run's autocast. Tapped maps pass
    through ``reduce`` (the method's ``reduce_teacher``) before they are cached or served. ``precomputed``: logits
    (with taps, cache mode: logits and reduced maps) the store already holds for this teacher, data and mode (no
    teacher pass then).
    """

    def __init__(self, teacher: nn.Module, taps: list[str], env: Env, split: Split, mode: str,
                 augment: Augment | None = None, cache_device: torch.device | None = None,
                 reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 precomputed: Tensor | Outputs | None = None) -> None:
        self.teacher, self.taps, self.env, self.mode = teacher, taps, env, mode
        self.reduce = reduce or (lambda feats: feats)  # the method's reduce_teacher: applied before caching
        self.cache: Outputs | None = None
        self.cache_seconds = 0.0
        if mode == "views" and (augment is None or taps):
            raise UserError("trainer.teacher_outputs=views needs random student views and serves logits only "
                            f"(teacher taps: {taps}); use live")
        set_train_mode(teacher, False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        compile_once(teacher, env.compute)
        if precomputed is not None and (mode not in ("cache", "views") or (taps and mode != "cache")):
            raise ValueError("precomputed teacher outputs are for cache mode, or views mode without taps")
        if mode in ("cache", "views"):
            start = time.perf_counter()
            if precomputed is not None:  # from the teacher-output store (kd_runner.output_store)
                self.cache = precomputed if isinstance(precomputed, Outputs) else Outputs(precomputed)
            elif mode == "cache":
                self.cache = self._run_over(split)
            else:
                self.cache = Outputs(self._run_over_views(split, augment, cache_device or env.device))
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            self.cache_seconds = time.perf_counter() - start

    @property
    def uses_views(self) -> bool:
        """Whether ``__call__`` needs the view ids the augmentation drew (``views`` mode)."""
        return self.mode == "views"

    @property
    def graph_safe(self) -> bool:
        """Whether a lookup can be captured in a CUDA graph: not from a cache in host memory."""
        return self.cache is None or self.cache.logits.device.type == self.env.device.type

    @staticmethod
    def cache_bytes(n: int, classes: int, shapes: dict[str, torch.Size]) -> int:
        """Memory the cache takes for ``n`` samples: float32 logits plus every tapped map (per-sample shape)."""
        per_sample = classes + sum(int(torch.Size(s[1:]).numel()) for s in shapes.values())
        return 4 * n * per_sample

    @staticmethod
    def views_batch_size(env: Env) -> int:
        """Batch of the views pass: ``eval_batch_size`` on a GPU; the training batch on a CPU, where a large
        batch's activations spill out of cache (resnet32x4: 25 ms per image at 512, 17 ms at 64)."""
        return env.eval_batch_size if env.device.type == "cuda" else env.batch_size

    @staticmethod
    def views_cache_bytes(n: int, views: int, classes: int) -> int:
        """Memory the ``views`` cache takes: float32 logits for ``views`` views of ``n`` samples."""
        return 4 * n * views * classes

    def _forward(self, x: Tensor) -> Outputs:
        """Teacher outputs as inference tensors: fine to index or cat, not to save for backward."""
        with torch.inference_mode(), self.env.compute.autocast(self.env.device), \
                Taps(self.teacher, self.taps, "teacher") as taps:
            logits = self.teacher(to_model_format(x, self.teacher))
            return Outputs(logits, self.reduce(taps.take()) if self.taps else {})

    def _run_over(self, split: Split) -> Outputs:
        """Outputs for every image of ``split``; in a data-parallel run each rank runs its shard and the ranks
        exchange them."""
        logits, feats = [], {}
        for _, xb, _ in self.env.batches(self.env.shard_of(split), self.env.eval_batch_size, shuffle=False):
            out = self._forward(self.env.prepare(xb))
            logits.append(out.logits)
            for n, v in out.feats.items():
                feats.setdefault(n, []).append(v)
        # cat outside inference mode: the cache holds ordinary tensors that losses may save for backward
        n = len(split)
        return Outputs(distributed.gather_rows(torch.cat(logits), n),
                       {k: distributed.gather_rows(torch.cat(v), n) for k, v in feats.items()})

    def _run_over_views(self, split: Split, augment: Augment, where: torch.device) -> Tensor:
        """(N, V, classes) float32 logits: every view of every image, rendered as ``augment.draw`` renders it.

        Each batch is loaded once and run through the teacher once per view; the cache is allocated
        outside inference mode, so losses may save lookups from it for backward."""
        cache: Tensor | None = None
        shard = self.env.shard_of(split)  # this rank's images; the ranks exchange their rows at the end
        for idx, xb, _ in self.env.batches(shard, self.views_batch_size(self.env), shuffle=False):
            xb = xb.to(self.env.device, non_blocking=True)
            rows = idx.to(where)
            for v in range(augment.num_views):
                logits = self._forward(self.env.prepare(augment.view(xb, v))).logits
                if cache is None:
                    cache = torch.empty((len(shard), augment.num_views, logits.shape[1]), dtype=torch.float32,
                                        device=where)
                cache[rows, v] = logits.to(where, torch.float32)
        assert cache is not None, "the training split is empty"
        return distributed.gather_rows(cache, len(split))

    def __call__(self, idx: Tensor, x: Tensor, views: Tensor | None = None) -> Outputs:
        """Teacher outputs for the batch ``x`` of training samples ``idx``; ``views``: the view ids
        ``Augment.draw`` gave (read in ``views`` mode only)."""
        if self.cache is None:
            out = self._forward(x)
            return Outputs(out.logits.clone(), {n: v.clone() for n, v in out.feats.items()})
        where = self.cache.logits.device
        if self.mode == "views":
            if views is None:
                raise RuntimeError("teacher_outputs=views needs the view ids of the batch")
            logits = self.cache.logits[idx.to(where), views.to(where)]
            return Outputs(logits.to(x.device, non_blocking=True))
        idx = idx.to(where)
        return Outputs(self.cache.logits[idx], {n: v[idx] for n, v in self.cache.feats.items()})


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, env: Env) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``split``, in eval mode; in a data-parallel run
    each rank scores its shard and the counts are summed, so every rank returns the figures of the whole split."""
    was_training = model.training
    set_train_mode(model, False)
    correct = torch.zeros((), dtype=torch.float64, device=env.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    with env.compute.autocast(env.device):
        for _, xb, yb in env.batches(env.shard_of(split), env.eval_batch_size, shuffle=False):
            logits = model(to_model_format(env.prepare(xb), model))
            y = yb.to(env.device)
            correct += (logits.argmax(1) == y).sum()
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
    set_train_mode(model, was_training)
    totals = torch.stack([correct, loss_sum])
    distributed.all_reduce_sum(totals)
    n = max(1, len(split))
    return 100.0 * int(totals[0]) / n, float(totals[1]) / n


def predict_accuracy(model: nn.Module, split: Split, env: Env) -> float:
    """Top-1 accuracy (%) of ``model`` on ``split``, in eval mode."""
    return evaluate(model, split, env)[0]


def probe_taps(model: nn.Module, names: list[str], split: Split, env: Env, role: str) -> dict[str, Tensor]:
    """The tapped layers' outputs for a 2-image batch: their shapes drive extras' construction."""
    if not names:
        return {}
    was_training = model.training
    set_train_mode(model, False)
    with torch.no_grad(), Taps(model, names, role) as taps:
        model(to_model_format(env.prepare(split.head(2)), model))
        outputs = taps.take()
    set_train_mode(model, was_training)
    return outputs


@dataclass
class PhaseResult:
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0
    cuda_graph_replays: int = 0


def _rng_states() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _save_state(path: Path, tag: str, model, extra, optimizer, scheduler, order: torch.Generator,
                result: PhaseResult) -> None:
    """Everything needed to continue bit-identically after this epoch, written atomically (by rank 0; every rank
    calls it: each rank's own random state (dropout masks) is recorded too).

    Only tensors, numbers, strings and containers of them: it loads with ``weights_only=True``.
    ``tag`` names the config and seed that wrote it; only a run with the same tag resumes from it.
    """
    ranks = distributed.gather_objects(_rng_states()) if distributed.enabled() else None
    if not distributed.is_main():
        return
    atomic_torch_save({
        "rank_rngs": [list(r) for r in ranks] if ranks is not None else None,
        "tag": tag, "model": model.state_dict(), "extra": extra.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "order_rng": order.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": result.history, "best_state": result.best_state, "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
    }, path)


def check_state_tag(path: Path, tag: str) -> dict:
    """Load a resume state safely and check it was written for ``tag`` (config hash and seeds); return it."""
    try:  # weights_only: a state file planted in a run dir cannot run code
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"resume state '{path}' is unreadable or not a kd-train state ({type(err).__name__}); "
                        "delete it to start over") from None
    if not isinstance(st, dict) or st.get("tag") != tag:
        written = st.get("tag") if isinstance(st, dict) else None
        raise UserError(f"resume state '{path}' was written by another run ({written}), not this one ({tag}); "
                        "rerun with that run's config and seed, or delete it to start over")
    return st


def _load_state(path: Path, tag: str, model, extra, optimizer, scheduler, order: torch.Generator,
                result: PhaseResult) -> None:
    st = check_state_tag(path, tag)
    model.load_state_dict(st["model"])
    extra.load_state_dict(st["extra"])
    optimizer.load_state_dict(st["optimizer"])
    if scheduler is not None and st["scheduler"] is not None:
        scheduler.load_state_dict(st["scheduler"])
    order.set_state(st["order_rng"])
    torch.set_rng_state(st["torch_rng"])
    if st["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    ranks = st.get("rank_rngs")
    if distributed.enabled() and ranks is not None and len(ranks) == distributed.world():
        cpu, cuda = ranks[distributed.rank()]
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    result.history, result.best_state = st["history"], st["best_state"]
    result.best_val_acc, result.best_epoch = st["best_val_acc"], st["best_epoch"]
    result.train_seconds = st["train_seconds"]
    result.resumed_from_epoch = len(result.history)


def fit(
    phase: str,
    model: nn.Module,
    method: Method,
    train: Split,
    val: Split | None,
    env: Env,
    *,
    epochs: int,
    optimizer_cfg: DictConfig,
    scheduler_cfg: DictConfig,
    seed: int,
    teacher: TeacherOutputs | None = None,
    extra: nn.Module | None = None,
    state_path: Path | None = None,
    state_tag: str = "",
    augment: Augment | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> PhaseResult:
    """Train ``model`` (and ``extra``) with ``method`` for ``epochs``; track best-on-val weights.

    With ``state_path``, the full training state is saved after every epoch and a run that
    finds it continues from there, giving the same numbers as an uninterrupted run; ``state_tag``
    (config hash, seed, phase) must match the one the state was written with. ``on_epoch`` gets each
    epoch's metrics row as it is appended (experiment trackers); epochs replayed from a resume state are not
    passed again.
    """
    extra = extra if extra is not None else nn.ModuleDict()
    model.to(env.device)
    extra.to(env.device)
    compile_once(model, env.compute)
    params = [p for p in list(model.parameters()) + list(extra.parameters()) if p.requires_grad]
    graphs = env.compute.cuda_graphs != "off" and graphs_reason(env, str(optimizer_cfg.name)) is None
    graphs = graphs and getattr(teacher, "graph_safe", True)  # a lookup from host memory is not capturable
    optimizer = build_optimizer(optimizer_cfg, params, fused=env.device.type == "cuda", capturable=graphs)
    scheduler = build_scheduler(scheduler_cfg, optimizer, epochs)
    monitor = plateau_monitor(scheduler_cfg) if str(scheduler_cfg.name) == "plateau" else None
    order = torch.Generator().manual_seed(derive_seed(seed, "batch_order"))  # same for baseline and student
    if not distributed.is_main():  # ranks share the batch order, not their dropout masks
        torch.manual_seed(derive_seed(seed, f"rank {distributed.rank()}"))
    result = PhaseResult()
    if state_path is not None and state_path.is_file():
        _load_state(state_path, state_tag, model, extra, optimizer, scheduler, order, result)
        if env.progress and result.resumed_from_epoch < epochs:
            tqdm.write(f"[{phase}] resuming after epoch {result.resumed_from_epoch} from {state_path}")
    with Taps(model, method.student_taps, "student") as taps:
        step = TrainStep(model, extra, method, env, taps, optimizer, teacher, graphs)
        for epoch in range(len(result.history) + 1, epochs + 1):
            t0 = time.perf_counter()
            row = _train_epoch(phase, epoch, epochs, model, extra, train, env, step, order, augment,
                               views=getattr(teacher, "uses_views", False))
            distributed.sync_buffers(model)  # rank 0's BatchNorm statistics: what it saves, every rank evaluates
            distributed.sync_buffers(extra)
            if not math.isfinite(row["train_loss"]):
                raise UserError(f"{phase}: training loss became {row['train_loss']} at epoch {epoch}; "
                                f"lower optimizer.lr (now {optimizer_cfg.lr}) or the loss weights")
            if val is not None:
                row["val_acc"], row["val_loss"] = evaluate(model, val, env)
                if result.best_val_acc is None or row["val_acc"] > result.best_val_acc:
                    result.best_val_acc, result.best_epoch = row["val_acc"], epoch
                    result.best_state = {"model": copy.deepcopy(model.state_dict()),
                                         "extra": copy.deepcopy(extra.state_dict())}
            scheduler_step(scheduler, row, monitor)
            row["epoch_seconds"] = time.perf_counter() - t0
            result.cuda_graph_replays = step.replays
            result.history.append(row)
            result.train_seconds += row["epoch_seconds"]
            if state_path is not None:
                _save_state(state_path, state_tag, model, extra, optimizer, scheduler, order, result)
            if on_epoch is not None and distributed.is_main():
                on_epoch(row)
            if env.progress:
                shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                 if k not in ("phase", "epoch_seconds"))
                tqdm.write(f"[{phase}] {shown} ({row['epoch_seconds']:.1f}s)")
    return result


def _train_epoch(phase: str, epoch: int, epochs: int, model: nn.Module, extra: nn.Module, train: Split, env: Env,
                 step: TrainStep, order: torch.Generator, augment: Augment | None, views: bool = False) -> dict:
    """One pass over ``train``; loss parts and accuracy accumulate on the device (no per-step sync).

    Random views (``augment``) draw from ``order`` too, so one generator state pins the whole epoch;
    a live teacher sees the same augmented batch as the student. With ``views``, the step also gets
    the id of the view each sample drew (same draws), for a teacher-view cache to look up.
    """
    set_train_mode(model, True)
    extra.train()
    step.reset(epoch)
    seen = 0
    world = distributed.world()
    sizes = global_batch_sizes(len(train), env.batch_size, world)  # data-parallel: each rank gets its share
    bar = tqdm(env.batches(train, env.batch_size, shuffle=True, generator=order, shard=True), total=len(sizes),
               desc=f"{phase} {epoch}/{epochs}", disable=not env.progress, leave=False, dynamic_ncols=True)
    for i, ((idx, xb, yb), n_global) in enumerate(zip(bar, sizes, strict=True)):
        xb = xb.to(env.device, non_blocking=True)
        view_ids = None
        if augment is not None:  # drawn for the whole global batch: the views one process would draw
            xb, view_ids = augment.draw(xb, order, rows=(n_global, *distributed.shard_bounds(n_global)))
        y = yb.to(env.device, non_blocking=True)
        # each rank's mean loss, weighted so the ranks' averaged gradients are the global batch's mean gradient
        step(idx, xb, y, full=n_global == env.batch_size, views=view_ids if views else None,
             weight=world * y.shape[0] / n_global)
        seen += y.shape[0]
        if env.progress and (i % 20 == 0 or i == len(sizes) - 1):
            bar.set_postfix(loss=f"{float(step.sums['total']) / seen:.4f}",
                            acc=f"{100.0 * int(step.correct) / max(1, int(step.labelled)):.2f}")
    names = list(step.sums)
    totals = torch.stack([*(step.sums[k].double() for k in names), step.correct.double(), step.labelled.double(),
                          torch.tensor(float(seen), dtype=torch.float64, device=step.correct.device)])
    distributed.all_reduce_sum(totals)  # the epoch's figures over every rank's images
    *sums, correct, labelled, seen_all = (float(v) for v in totals)
    row = {"phase": phase, "epoch": epoch, "lr": step.optimizer.param_groups[0]["lr"]}
    row.update({f"train_{k}" if k != "total" else "train_loss": v / seen_all for k, v in zip(names, sums, strict=True)})
    row["train_acc"] = 100.0 * correct / max(1.0, labelled)
    return row
