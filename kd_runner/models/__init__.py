"""Model registry: a config's ``arch`` names a builder; every model adapts to the data's shape."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner.errors import UserError, choices
from kd_runner.models.convnets import KerasConvTeacher, SmallCNN
from kd_runner.models.mlp import MLP
from kd_runner.models.tutorial import DeepNN, LightNN
from kd_runner.models.zoo import build_torchvision

Builder = Callable[..., nn.Module]

ARCHS: dict[str, Builder] = {
    "deep_nn": DeepNN,
    "light_nn": LightNN,
    "mlp": MLP,
    "keras_conv": KerasConvTeacher,
    "small_cnn": SmallCNN,
    "torchvision": build_torchvision,
}

# keys of a model config that describe the run, not the builder
NON_BUILDER_KEYS = {"arch", "checkpoint", "resize"}


def build_model(cfg: DictConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build ``cfg.arch`` for inputs of ``input_shape``; ``resize`` upsamples inside the model."""
    arch = str(cfg.arch)
    if arch not in ARCHS:
        raise UserError(f"arch={arch!r} is unknown; valid: {choices(ARCHS)}")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NON_BUILDER_KEYS}
    resize = cfg.get("resize")
    shape = (input_shape[0], int(resize), int(resize)) if resize else input_shape
    try:
        model = ARCHS[arch](input_shape=shape, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"arch={arch}: bad model option ({err})") from None
    except RuntimeError as err:  # e.g. an input too small for the conv stack
        raise UserError(f"arch={arch} cannot take inputs of shape {tuple(input_shape)}: {err}") from None
    if resize:
        size = (int(resize), int(resize))
        model.register_forward_pre_hook(
            lambda _m, args: (F.interpolate(args[0], size=size, mode="bilinear", align_corners=False),) + args[1:]
        )
    return model
