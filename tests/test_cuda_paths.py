"""CUDA-only guarantees (skipped without a GPU; run them on one: ``pytest tests/test_cuda_paths.py``).

A CUDA-graph step must do exactly what the eager step does: same parameters, bit for bit, after the
same batches (no dropout, deterministic kernels, same fused capturable optimizer).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kd_runner.compute import Compute, prepare_model
from kd_runner.data.tensors import Normalizer, Split
from kd_runner.engine import Env
from kd_runner.methods import CE
from kd_runner.models.tutorial import LightNN
from kd_runner.optim import build_optimizer
from kd_runner.step import WARMUP_STEPS, TrainStep
from kd_runner.taps import Taps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


OPTIMIZERS = {"adam": {"name": "adam", "lr": 1e-3},
              # the CIFAR KD recipe's SGD; its lr drops mid-run (a multistep milestone), forcing a recapture
              "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


def _train(graphs: bool, amp: torch.dtype | None, steps: int = 12, optimizer: str = "adam"
           ) -> tuple[torch.Tensor, float, int]:
    dev = torch.device("cuda")
    env = Env(dev, Normalizer([0.5] * 3, [0.25] * 3), 64, 256, False, compute=Compute("auto", amp, False, False, "on"))
    torch.manual_seed(0)
    model = prepare_model(LightNN(input_shape=(3, 32, 32), num_classes=10), dev, env.compute)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (steps, 64, 3, 32, 32), generator=g, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, 10, (steps, 64), generator=g).to(dev)
    data = [(torch.arange(64, device=dev), images[i], labels[i]) for i in range(steps)]
    opt = build_optimizer(OmegaConf.create(OPTIMIZERS[optimizer]), list(model.parameters()), fused=True,
                          capturable=True)
    with Taps(model, [], "student") as taps:
        step = TrainStep(model, torch.nn.ModuleDict(), CE(), env, taps, opt, None, graphs)
        for i, (idx, x, y) in enumerate(data):
            if optimizer == "sgd" and i == steps - 4:
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            step(idx, x, y, full=True)
    torch.cuda.synchronize()
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return params, float(step.sums["total"]), step.replays


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_steps_equal_eager_steps(amp, optimizer):
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        graphed, eager = _train(True, amp, optimizer=optimizer), _train(False, amp, optimizer=optimizer)
    finally:
        torch.use_deterministic_algorithms(False)
    assert graphed[2] == 12 - WARMUP_STEPS and eager[2] == 0  # every step after warm-up was a replay, once
    assert torch.equal(graphed[0], eager[0])
    assert graphed[1] == eager[1]


def test_splits_live_on_the_gpu_or_go_through_pinned_memory():
    dev = torch.device("cuda")
    split = Split(torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8), torch.arange(100) % 10)
    on = Env(dev, Normalizer([0.5] * 3, [0.25] * 3), 32, 64, False, data_on_device="on")
    off = Env(dev, Normalizer([0.5] * 3, [0.25] * 3), 32, 64, False, data_on_device="off")
    assert on.residency(split) == "device" and off.residency(split) == "pinned host"
    a = list(on.batches(split, 32, shuffle=True, generator=torch.Generator().manual_seed(3)))
    b = list(off.batches(split, 32, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert all(xb.is_pinned() for _, xb, _ in b)
    for (ia, xa, ya), (ib, xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ia.cpu(), ib.cpu()) and torch.equal(xa.cpu(), xb) and torch.equal(ya.cpu(), yb)
