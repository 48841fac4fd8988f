"""Forward hooks that capture named layers' outputs from unmodified models."""

from __future__ import annotations

from torch import Tensor, nn

from kd_runner.errors import UserError


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


class Taps:
    """Register hooks on ``names`` of ``model``; after a forward, ``outputs[name]`` holds each output.

    Used as a context manager so hooks never outlive the phase that needs them.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str = "model") -> None:
        self.model, self.names, self.role = model, list(names), role
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []
        modules = dict(model.named_modules())
        for name in self.names:
            if name not in modules or not name:
                valid = layer_names(model)
                shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
                raise UserError(
                    f"{role} has no layer named {name!r} to tap; valid: {shown}"
                )

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self.outputs[name] = output

        return hook

    def __enter__(self) -> Taps:
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}

    def take(self) -> dict[str, Tensor]:
        """Return and clear the captured outputs of the last forward."""
        out, self.outputs = self.outputs, {}
        return out
