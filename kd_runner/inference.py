"""Inference cost of a trained model on the run's device: batch-1 latency and batched throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kd_runner.compute import Compute, to_model_format


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model: nn.Module, input_shape: tuple[int, int, int], device: torch.device,
            batch_size: int, iters: int, compute: Compute | None = None) -> dict:
    """Median batch-1 latency (ms) and throughput (images/s) at ``batch_size``; random inputs.

    Runs on the run's compute path (memory format, autocast), so the figures are the ones a user gets.
    """
    if iters <= 0:
        return {"latency_ms": None, "throughput_ips": None}
    with (compute or Compute()).autocast(device):
        return _measure(model, input_shape, device, batch_size, iters)


def _measure(model: nn.Module, input_shape: tuple[int, int, int], device: torch.device,
             batch_size: int, iters: int) -> dict:
    model.eval()
    one = to_model_format(torch.randn(1, *input_shape, device=device), model)
    many = to_model_format(torch.randn(batch_size, *input_shape, device=device), model)
    latency, throughput = time_calls(model, one, many, iters, max(1, iters // 4), sync=lambda: _sync(device))
    return {"latency_ms": latency, "throughput_ips": throughput}


def time_calls(fn: Callable, one, many, latency_iters: int, throughput_iters: int,
               sync: Callable[[], None] = lambda: None) -> tuple[float | None, float | None]:
    """Median batch-1 latency (ms) of ``fn(one)`` over ``latency_iters`` calls and throughput (images/s) of
    ``fn(many)`` over ``throughput_iters`` calls, after two warm-up calls of each; None where the count is 0.
    ``sync`` waits for queued device work (CUDA), so each figure times the work, not its launch. Any callable:
    a model on the run's device, or an exported model in its runtime (``kd_runner.export``)."""
    latency = throughput = None
    for _ in range(2 if latency_iters else 0):
        fn(one)
    if latency_iters:
        times = []
        for _ in range(latency_iters):
            sync()
            t0 = time.perf_counter()
            fn(one)
            sync()
            times.append(time.perf_counter() - t0)
        latency = round(1000 * statistics.median(times), 4)
    if throughput_iters:
        for _ in range(2):
            fn(many)
        sync()
        t0 = time.perf_counter()
        for _ in range(throughput_iters):
            fn(many)
        sync()
        throughput = round(len(many) * throughput_iters / (time.perf_counter() - t0), 1)
    return latency, throughput
