"""Forward hooks that capture named layers from unmodified models, and the layer sets methods ask for.

A tap is a module name (``stage2``, ``features.4``): the module's output; ``<name>:input`` is the module's
(first) input instead, e.g. ``classifier:input`` (the vector the classifier reads) or a BatchNorm's input.
Method YAMLs may also name a *layer set*, which each model resolves to its own layers:

- ``stages``: every stage's output, in order (``stage1``..``stageN`` in the CIFAR zoo, ``layer1``..``layer4`` in
  torchvision ResNets, a model's ``kd_layer_sets["stages"]`` otherwise);
- ``preact_stages``: the same stages before their final ReLU (what OFD distils);
- ``last_stage``: the last stage's output (a model with no stages: its ``features`` module, as in the MLPs);
- ``embedding``: the pooled vector the final linear classifier reads (the input of the model's last Linear).
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from kd_runner.errors import UserError

INPUT_SUFFIX = ":input"
LAYER_SETS = ("stages", "preact_stages", "last_stage", "embedding")
_STAGE = re.compile(r"^(?:stage|layer)(\d+)$")


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def layer_sets(model: nn.Module) -> dict[str, list[str]]:
    """The layer sets of ``model``: what it declares in ``kd_layer_sets``, else what its names imply."""
    declared = dict(getattr(model, "kd_layer_sets", {}) or {})
    modules = dict(model.named_modules())
    stages = [n for n, _ in model.named_children() if _STAGE.match(n)]
    stages.sort(key=lambda n: int(_STAGE.match(n).group(1)))
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    found = {
        "stages": stages,
        "preact_stages": [f"{s}.preact" for s in stages] if all(f"{s}.preact" in modules for s in stages) else [],
        "last_stage": stages[-1:] or (["features"] if "features" in modules else []),
        "embedding": ["embedding"] if "embedding" in modules else [f"{linears[-1]}{INPUT_SUFFIX}"] if linears else [],
    }
    found.update({k: list(v) for k, v in declared.items()})
    return found


def expand_layers(model: nn.Module, specs: str | list[str]) -> list[str]:
    """Layer names for ``specs`` (names and layer-set names) on ``model``; an empty set is an error."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    sets = layer_sets(model)
    out: list[str] = []
    for spec in specs:
        if spec in LAYER_SETS and spec not in dict(model.named_modules()):
            if not sets.get(spec):
                have = ", ".join(k for k, v in sets.items() if v) or "none"
                raise UserError(f"{type(model).__name__} has no layer set {spec!r} (it has: {have}); "
                                f"name its layers instead, e.g. [{', '.join(layer_names(model)[:4])}]")
            out += sets[spec]
        else:
            out.append(spec)
    return out


def expand_one(model: nn.Module, spec: str, role: str, owner: str) -> str:
    """One layer name for ``spec``; a set that resolves to several layers is an error."""
    names = expand_layers(model, spec)
    if len(names) != 1:
        raise UserError(f"{owner}: {role} layer {spec!r} is {len(names)} layers {names}; name one layer")
    return names[0]


class Taps:
    """Register hooks on ``names`` of ``model``; after a forward, ``outputs[name]`` holds each output
    (each input, for ``<layer>:input``).

    Used as a context manager so hooks never outlive the phase that needs them.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str = "model") -> None:
        self.model, self.names, self.role = model, list(dict.fromkeys(names)), role
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []
        modules = dict(model.named_modules())
        for name in self.names:
            layer = name.removesuffix(INPUT_SUFFIX)
            if layer not in modules or not layer:
                valid = layer_names(model)
                shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
                sets = ", ".join(k for k, v in layer_sets(model).items() if v)
                raise UserError(
                    f"{role} has no layer named {name!r} to tap; valid: {shown} (each may end in {INPUT_SUFFIX!r}; "
                    f"layer sets: {sets or 'none'})"
                )

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self.outputs[name] = output

        return hook

    def _pre_hook(self, name: str):
        def hook(_module: nn.Module, inputs) -> None:
            self.outputs[name] = inputs[0]

        return hook

    def __enter__(self) -> Taps:
        modules = dict(self.model.named_modules())
        for n in self.names:
            if n.endswith(INPUT_SUFFIX):
                self._handles.append(modules[n.removesuffix(INPUT_SUFFIX)].register_forward_pre_hook(self._pre_hook(n)))
            else:
                self._handles.append(modules[n].register_forward_hook(self._hook(n)))
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
