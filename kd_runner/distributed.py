"""Data-parallel runs under ``torchrun`` (or Slurm tasks): the process group and the few collectives the run needs.

A run launched as ``torchrun --nproc_per_node=N -m kd_runner.train ...`` finds ``RANK``/``WORLD_SIZE`` (and the
rendezvous ``MASTER_ADDR``/``MASTER_PORT``) in its environment; a Slurm job with several tasks finds ``SLURM_*``
variables and submitit's job environment, which name the same things. :func:`init_from_env` joins the group once,
before Hydra composes anything, so every rank can agree on the run dir (``kd_runner.train`` shares rank 0's start
time and pid, which name it). Every helper here is the identity in a one-process run, so the engine calls them
unconditionally.

Backend: ``cpu:gloo,cuda:nccl`` where CUDA is available (each collective picks by its tensors' device), ``gloo``
otherwise, and gloo for CUDA tensors too when several processes share one GPU (NCCL refuses that);
``KD_DIST_BACKEND`` overrides. ``KD_DIST_TIMEOUT_S`` (default 21600 = 6 h) bounds how long a rank waits at a
collective: long, because rank 0 may wait on another job that trains a stored teacher the run needs; torchrun
stops the other ranks at once when one of them dies. ``KD_DIST_JOIN_TIMEOUT_S`` (default 600) bounds the wait for
the other ranks to start.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kd_runner.errors import UserError
from kd_runner.launch_env import env_int as _env_int
from kd_runner.launch_env import submitit_tasks

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 6 * 3600
DEFAULT_JOIN_TIMEOUT_S = 600  # how long a rank waits for the others to start (Slurm tasks, torchrun nodes)
_STATE: dict = {"rank": 0, "world": 1, "local_rank": 0, "backend": None}


def world() -> int:
    return int(_STATE["world"])


def rank() -> int:
    return int(_STATE["rank"])


def local_rank() -> int:
    return int(_STATE["local_rank"])


def enabled() -> bool:
    """Whether this process is one of several ranks of one run."""
    return world() > 1


def is_main() -> bool:
    """Rank 0: the one that writes reports, checkpoints, stores and caches."""
    return rank() == 0


def describe() -> dict:
    """What the report records about the process group."""
    return {"world_size": world(), "backend": _STATE["backend"] or "none (one process)"}


def _submitit_to_torch_env() -> None:
    """A submitit job with several tasks (``hydra/launcher=slurm_ddp``): export the torch.distributed variables
    from submitit's job environment (``submitit.helpers.TorchDistributedEnvironment``)."""
    if "RANK" in os.environ or submitit_tasks() <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment  # installed with hydra-submitit-launcher

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def default_backend() -> str:
    if os.environ.get("KD_DIST_BACKEND"):
        return os.environ["KD_DIST_BACKEND"]
    if not torch.cuda.is_available():
        return "gloo"
    per_node = _env_int("LOCAL_WORLD_SIZE") or 1
    return "cpu:gloo,cuda:nccl" if per_node <= torch.cuda.device_count() else "gloo"


def init_from_env() -> None:
    """Join the process group the launcher set up (torchrun, Slurm tasks); nothing for a one-process run.

    Problems a user can fix (no rendezvous address, a rank that cannot join) become one-line
    :class:`UserError`\\ s, raised on every rank."""
    _submitit_to_torch_env()
    size = _env_int("WORLD_SIZE")
    if size is None or size <= 1:
        return
    rank_ = _env_int("RANK")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing or rank_ is None or not 0 <= rank_ < size:
        raise UserError(f"WORLD_SIZE={size} asks for a data-parallel run but {', '.join(missing) or 'RANK'} "
                        f"{'is' if len(missing) <= 1 else 'are'} not set (or RANK is not in 0..{size - 1}); launch "
                        f"it with: torchrun --nproc_per_node={size} -m kd_runner.train ...")
    backend = default_backend()
    local = _env_int("LOCAL_RANK") or 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=_env_int("KD_DIST_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    joining = datetime.timedelta(seconds=_env_int("KD_DIST_JOIN_TIMEOUT_S") or DEFAULT_JOIN_TIMEOUT_S)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:  # torch's own env:// rendezvous (torchrun's agent store included), with a join timeout of its own
        store, rank_, size = next(dist.rendezvous("env://", timeout=joining))
        store.set_timeout(timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError, TimeoutError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"rank {rank_} of {size} could not join the process group at {where} "
                        f"(backend {backend}): {first}") from None
    _STATE.update(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _STATE.update(rank=0, world=1, local_rank=0, backend=None)


def resolve_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this rank's GPU (``LOCAL_RANK`` modulo the GPUs it sees)."""
    if enabled() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def check_batch(name: str, batch_size: int) -> None:
    """The global batch must split evenly over the ranks (before anything trains)."""
    if enabled() and batch_size % world() != 0:
        valid = [m * world() for m in range(max(1, batch_size // world()), batch_size // world() + 3)]
        raise UserError(f"{name}={batch_size} is the global batch and cannot be split over {world()} processes; "
                        f"use a multiple of {world()} (e.g. {', '.join(map(str, valid))})")


def found_on_main(find: Callable[[], T | None], find_again: Callable[[], T | None] | None = None) -> T | None:
    """Rank 0 looks something up (a store entry, checking it); when it found it, the other ranks read it too
    (``find_again``, default ``find``: what rank 0 has just checked); None on every rank otherwise."""
    found = find() if is_main() else None
    if broadcast_object(found is not None) and not is_main():
        found = (find_again or find)()
    return found


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (any picklable value made by this program, never a user's file)."""
    if not enabled() and not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable values this program made), in rank order, on every rank."""
    if not enabled():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(*tensors: Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    if enabled():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def shard_bounds(n: int, rank_: int | None = None, world_: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank_`` takes: contiguous, sizes differ by at most one
    (``torch.tensor_split``'s rule), so the ranks' rows in rank order are exactly ``0..n-1``."""
    r = rank() if rank_ is None else rank_
    w = world() if world_ is None else world_
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def gather_rows(local: Tensor, n: int) -> Tensor:
    """The ``n`` rows the ranks hold in shards (rank r: rows ``shard_bounds(n, r)``), concatenated on every rank."""
    if not enabled():
        return local
    width = shard_bounds(n, 0)[1]  # rank 0 holds the largest shard
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: (lambda b: b[1] - b[0])(shard_bounds(n, r))] for r, p in enumerate(parts)])


def gather_cat(local: Tensor) -> Tensor:
    """Every rank's ``local`` (the same trailing shape, any number of rows), concatenated in rank order."""
    if not enabled():
        return local
    sizes = torch.tensor([local.shape[0]], device=local.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world())]
    dist.all_gather(all_sizes, sizes)
    width = max(int(s) for s in all_sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, all_sizes, strict=True)])


def mean_across(t: Tensor) -> Tensor:
    """``t`` averaged over the ranks (a new tensor)."""
    if not enabled():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world()


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: what rank 0 saves is what every rank
    evaluates."""
    if enabled():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel (gradients averaged over the ranks during backward); itself in a
    one-process run. ``static_graph``: every step runs the same graph, which lets parameters a method leaves
    unused in a step pass, and buffers are synchronised by :func:`sync_buffers` at epoch ends instead of being
    broadcast before every forward (a CRD memory bank is tens of MB)."""
    if not enabled() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False, static_graph=True)
