"""How the math runs on the chosen device: memory format, autocast, compilation, cuDNN autotuning.

Resolved once per run from ``trainer.*`` and the device, applied to every model the run
builds, and written into the report so a number can always be traced to the path that made it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from kd_runner.errors import UserError, choices

SWITCH = ("auto", "on", "off")
AMP = ("auto", "bf16", "off")


@dataclass(frozen=True)
class Compute:
    channels_last: str = "off"  # auto | on | off, as asked; auto means "for models with 2-D convolutions"
    amp: torch.dtype | None = None  # autocast dtype for forward passes and losses; None: float32
    compile: bool = False
    cudnn_benchmark: bool = False
    cuda_graphs: str = "off"  # auto | on | off, as asked; the report says whether they ran

    def autocast(self, device: torch.device, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp, cache_enabled=cache_enabled)

    def wants_channels_last(self, model: nn.Module) -> bool:
        if self.channels_last == "on":
            return True
        return self.channels_last == "auto" and any(isinstance(m, nn.Conv2d) for m in model.modules())

    def describe(self) -> dict:
        return {"channels_last": self.channels_last, "amp": str(self.amp).removeprefix("torch.") if self.amp else "off",
                "compile": self.compile, "cudnn_benchmark": self.cudnn_benchmark}


def resolve_compute(channels_last: str, amp: str, compile_models: bool, deterministic: bool,
                    device: torch.device, cuda_graphs: str = "auto") -> Compute:
    """Settle ``auto`` for ``device``.

    bf16 autocast is the default on CUDA GPUs that support it. On CPU it stays off unless asked:
    on CPUs without native bf16 (AVX2-only, like the machines in docs/BENCHMARKS.md) it is slower.
    """
    if channels_last not in SWITCH:
        raise UserError(f"trainer.channels_last={channels_last!r} is invalid; valid: {choices(SWITCH)}")
    if cuda_graphs not in SWITCH:
        raise UserError(f"trainer.cuda_graphs={cuda_graphs!r} is invalid; valid: {choices(SWITCH)}")
    if amp not in AMP:
        raise UserError(f"trainer.amp={amp!r} is invalid; valid: {choices(AMP)}")
    dtype = None
    if amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    benchmark = device.type == "cuda" and not deterministic
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark
    return Compute(channels_last=channels_last, amp=dtype, compile=compile_models, cudnn_benchmark=benchmark,
                   cuda_graphs=cuda_graphs)


def prepare_model(model: nn.Module, device: torch.device, compute: Compute) -> nn.Module:
    """Move ``model`` to ``device`` in the memory format it runs fastest in."""
    model.to(device)
    if compute.wants_channels_last(model):
        model.to(memory_format=torch.channels_last)
        model.kd_channels_last = True
    return model


def compile_once(model: nn.Module, compute: Compute) -> nn.Module:
    """``torch.compile`` in place when asked (state_dict keys and forward hooks (taps) stay as they were).

    Called right before a model first runs, after any deepcopy: a copy of a compiled module
    would still call the original's forward.
    """
    if compute.compile and getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    return model


def to_model_format(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A 4-D batch in the memory format ``model`` was prepared for."""
    if x.dim() == 4 and getattr(model, "kd_channels_last", False):
        return x.contiguous(memory_format=torch.channels_last)
    return x
