"""Any torchvision classification model by name: weights, a new head, optional frozen backbone."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from kd_runner.errors import UserError, choices


def _weights(name: str, weights: str | None):
    from torchvision.models import get_model_weights

    if weights in (None, "", "null", "none"):
        return None
    enum = get_model_weights(name)
    valid = [w.name for w in enum] + ["DEFAULT"]
    if weights not in valid:
        raise UserError(f"weights={weights!r} is not available for {name}; valid: {choices(valid)} or null")
    return enum[weights] if weights != "DEFAULT" else enum.DEFAULT


def _fetch_weights(w) -> None:
    """Make sure the weight file is in torch's hub cache; explain how to put it there offline."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if target.is_file():
        return
    from kd_runner.data.download import NETWORK_ERRORS

    try:
        torch.hub.load_state_dict_from_url(w.url, progress=False)
    except NETWORK_ERRORS as err:
        raise UserError(
            f"cannot download pretrained weights {w} (no network? {type(err).__name__}); "
            f"place the file at '{target}' (or set TORCH_HOME) or use weights=null"
        ) from None


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap the final Linear for one with ``num_classes`` outputs; return the head's module names."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise UserError(f"{type(model).__name__} has no Linear classifier head to replace")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    return [last_name]


def build_torchvision(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights: str | None = None,
    freeze_backbone: bool = False,
) -> nn.Module:
    from torchvision.models import list_models

    valid = list_models(module=__import__("torchvision.models", fromlist=["models"]))
    if name not in valid:
        raise UserError(f"torchvision model name={name!r} is unknown; valid: {', '.join(valid)}")
    w = _weights(name, weights)
    if w is not None:
        _fetch_weights(w)
    from torchvision.models import get_model

    model = get_model(name, weights=w)
    head = replace_head(model, num_classes)
    if freeze_backbone:
        for pname, p in model.named_parameters():
            p.requires_grad = any(pname.startswith(h + ".") for h in head)
        # frozen BatchNorm keeps its pretrained running stats: the engine keeps these in eval mode
        model.kd_frozen = [m for n, m in model.named_modules() if n and not any(n.startswith(h) for h in head)]
    if input_shape[0] == 1:
        model.register_forward_pre_hook(lambda _m, args: (args[0].expand(-1, 3, -1, -1),) + args[1:])
    return model
