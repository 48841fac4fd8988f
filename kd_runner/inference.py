"""Inference cost of a trained model on the run's device: batch-1 latency and batched throughput."""

from __future__ import annotations

import statistics
import time

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
    for _ in range(2):
        model(one)
        model(many)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        model(one)
        _sync(device)
        times.append(time.perf_counter() - t0)
    batch_iters = max(1, iters // 4)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batch_iters):
        model(many)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"latency_ms": round(1000 * statistics.median(times), 4),
            "throughput_ips": round(batch_size * batch_iters / elapsed, 1)}
