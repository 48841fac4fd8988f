"""One optimisation step, run eagerly or replayed from a CUDA graph.

Tutorial-sized models on a fast GPU spend most of a step launching kernels from Python. A CUDA
graph records the whole step (normalise, teacher outputs, forward, loss, backward, optimizer
update, running sums) once and replays it with one launch; the math is the same kernels.
Warm-up steps and the last, smaller batch of an epoch run eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_runner import distributed
from kd_runner.compute import to_model_format
from kd_runner.methods.base import IGNORE, Batch, Method, Outputs
from kd_runner.taps import Taps

# Adam/AdamW run with capturable=True (their step count lives on the GPU); SGD keeps no step count, and its
# momentum buffers exist after the eager warm-up steps, so its fused step replays as it is. A float lr is
# baked into a graph: a schedule's change of lr triggers a recapture (once per change, e.g. 3 in 240 epochs).
CAPTURABLE_OPTIMIZERS = ("adam", "adamw", "sgd")
WARMUP_STEPS = 3  # eager steps before capture: cuBLAS/cuDNN handles, optimizer state, autotuning
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up/capture stream per device for the whole process: cuBLAS keeps a workspace per stream."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class StudentLoss(nn.Module):
    """The student, the method's extras and its loss as one module: the unit DistributedDataParallel wraps, so the
    gradients of the extras (regressors, embeddings) are averaged over the ranks like the student's."""

    def __init__(self, model: nn.Module, extra: nn.Module, method: Method, taps: Taps) -> None:
        super().__init__()
        self.model, self.extra = model, extra
        self.__dict__["method"], self.__dict__["taps"] = method, taps  # not submodules: no parameters of their own

    def forward(self, x: Tensor, t_out: Outputs | None, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(to_model_format(x, self.model))
        return logits, self.method.loss(Outputs(logits, self.taps.take()), t_out, batch, self.extra)


class TrainStep:
    """Callable ``(idx, uint8 images, labels, full, views=None)`` -> None; loss parts and hits accumulate on the
    device. ``views`` (the augmentation's view ids, or None) is handed to the teacher callable untouched."""

    def __init__(self, model: nn.Module, extra: nn.Module, method: Method, env, taps: Taps,
                 optimizer: torch.optim.Optimizer, teacher, graphs: bool) -> None:
        self.model, self.extra, self.method, self.env = model, extra, method, env
        self.taps, self.optimizer, self.teacher = taps, optimizer, teacher
        self.graphs = graphs
        self.net = distributed.wrap(StudentLoss(model, extra, method, taps), env.device)
        self.sums: dict[str, Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.long, device=env.device)
        self.labelled = torch.zeros((), dtype=torch.long, device=env.device)  # train_acc counts labelled images
        self.epoch = torch.zeros((), device=env.device)  # read by methods through Batch.epoch, also when replayed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lr: list[float] | None = None
        self.static: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None
        self.eager_steps = 0
        self.replays = 0

    def reset(self, epoch: int = 1) -> None:
        """Zero the running sums and set the epoch at the start of an epoch (in place: a graph holds their
        addresses)."""
        for v in self.sums.values():
            v.zero_()
        self.correct.zero_()
        self.labelled.zero_()
        self.epoch.fill_(float(epoch))

    def _math(self, idx: Tensor, xb: Tensor, y: Tensor, views: Tensor | None = None, weight: float = 1.0) -> None:
        env = self.env
        x = env.prepare(xb)
        t_out = self.teacher(idx, x, views) if self.teacher is not None else None
        # no autocast weight cache: cached casts made during capture would not be refreshed on replay
        with env.compute.autocast(env.device, cache_enabled=False):
            batch = Batch(y, idx.to(env.device, non_blocking=True), self.epoch)
            logits, losses = self.net(x, t_out, batch)
        (losses["total"] * weight if weight != 1.0 else losses["total"]).backward()
        self.optimizer.step()
        n = y.shape[0]
        for k, v in losses.items():
            if k not in self.sums:
                self.sums[k] = torch.zeros((), device=env.device)
            self.sums[k].add_(v.detach().float() * n)
        self.correct.add_((logits.detach().argmax(1) == y).sum())
        self.labelled.add_((y != IGNORE).sum())

    def __call__(self, idx: Tensor, xb: Tensor, y: Tensor, full: bool, views: Tensor | None = None,
                 weight: float = 1.0) -> None:
        """``weight`` scales this step's loss before backward (a data-parallel rank's share of an uneven last batch);
        graphs never run then (they are off in data-parallel runs)."""
        lr = [g["lr"] for g in self.optimizer.param_groups]
        if not (self.graphs and full) or self.eager_steps < WARMUP_STEPS:
            self._eager(idx, xb, y, views, weight)
            return
        if self.graph is None or lr != self.graph_lr:  # a float lr is baked into the graph: recapture on change
            self._capture(idx, xb, y, views, lr)  # captures with this batch and runs it
            return
        sx, sxb, sy, sv = self.static
        sx.copy_(idx.to(sx.device), non_blocking=True)
        sxb.copy_(xb, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        if sv is not None:
            sv.copy_(views.to(sv.device), non_blocking=True)
        self.graph.replay()
        self.replays += 1

    def _eager(self, idx: Tensor, xb: Tensor, y: Tensor, views: Tensor | None = None, weight: float = 1.0) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.graphs and self.env.device.type == "cuda" and self.eager_steps < WARMUP_STEPS:
            side = side_stream(self.env.device)  # warm up off the default stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(self.env.device))
            with torch.cuda.stream(side):
                self._math(idx, xb, y, views, weight)
            torch.cuda.current_stream(self.env.device).wait_stream(side)
        else:
            self._math(idx, xb, y, views, weight)
        self.eager_steps += 1

    def _capture(self, idx: Tensor, xb: Tensor, y: Tensor, views: Tensor | None, lr: list[float]) -> None:
        self.graph = None
        sv = views.to(self.env.device).clone() if views is not None else None
        self.static = (idx.to(self.env.device).clone(), xb.clone(), y.clone(), sv)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated (and later written) by the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side_stream(self.env.device)):
            self._math(*self.static)
        self.graph, self.graph_lr = graph, lr
        # capture records without running: this batch's update still has to happen
        self.graph.replay()
        self.replays += 1


def graphs_reason(env, optimizer_name: str) -> str | None:
    """Why CUDA graphs cannot run here (None when they can)."""
    if env.device.type != "cuda":
        return "not a CUDA device"
    if env.compute.compile:
        return "trainer.compile=true (compiled code manages its own graphs)"
    if distributed.enabled():
        return f"a data-parallel run ({distributed.world()} processes; DDP's gradient hooks are not captured)"
    if optimizer_name not in CAPTURABLE_OPTIMIZERS:
        return f"optimizer={optimizer_name} has no capturable step here"
    return None
