"""Model registry: a config's ``arch`` names a builder; every model adapts to the data's shape."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner.errors import UserError, choices, number
from kd_runner.models.cifar_resnet import RESNET_ARCHS
from kd_runner.models.cifar_resnetv2 import RESNETV2_ARCHS
from kd_runner.models.convnets import DemoCNN, KerasConvTeacher, SmallCNN
from kd_runner.models.mlp import MLP
from kd_runner.models.mobilenetv2 import MOBILENETV2_ARCHS
from kd_runner.models.shufflenetv1 import SHUFFLEV1_ARCHS
from kd_runner.models.shufflenetv2 import SHUFFLEV2_ARCHS
from kd_runner.models.tutorial import DeepNN, LightNN
from kd_runner.models.vgg import VGG_ARCHS
from kd_runner.models.wrn import WRN_ARCHS
from kd_runner.models.zoo import build_torchvision

Builder = Callable[..., nn.Module]

ARCHS: dict[str, Builder] = {
    "deep_nn": DeepNN,
    "light_nn": LightNN,
    "mlp": MLP,
    "keras_conv": KerasConvTeacher,
    "demo_cnn": DemoCNN,
    "small_cnn": SmallCNN,
    "torchvision": build_torchvision,
    # the CIFAR distillation zoo of RepDistiller / mdistiller (kd_runner/models/cifar_parts.py: tappable names)
    **RESNET_ARCHS,  # resnet8 .. resnet110, resnet8x4, resnet32x4
    **WRN_ARCHS,  # wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2
    **VGG_ARCHS,  # vgg8, vgg11, vgg13, vgg16, vgg19 (with BatchNorm)
    **MOBILENETV2_ARCHS,  # mobilenetv2
    **SHUFFLEV1_ARCHS,  # shufflev1
    **SHUFFLEV2_ARCHS,  # shufflev2
    **RESNETV2_ARCHS,  # resnet50_cifar
}

# keys of a model config that describe the run, not the builder (init/init_std: applied by build_model)
NON_BUILDER_KEYS = {"arch", "checkpoint", "resize", "init", "init_std"}

# weight initialisations build_model applies over the builder's: torch keeps PyTorch's defaults
INITS = ("torch", "glorot_uniform", "normal")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def build_model(cfg: DictConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build ``cfg.arch`` for inputs of ``input_shape``; ``init`` re-initialises it; ``resize`` upsamples inside it."""
    arch = str(cfg.arch)
    if arch not in ARCHS:
        raise UserError(f"arch={arch!r} is unknown; valid: {choices(ARCHS)}")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NON_BUILDER_KEYS}
    resize = cfg.get("resize")
    shape = (input_shape[0], int(resize), int(resize)) if resize else input_shape
    init, init_std = _init_options(cfg)
    for key, value in kwargs.items():  # torch lets e.g. Dropout(p=nan) through
        if isinstance(value, float):
            number(value, f"model option {key}")
    try:
        model = ARCHS[arch](input_shape=shape, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise UserError(f"arch={arch}: bad model option ({err})") from None
    except RuntimeError as err:  # e.g. an input too small for the conv stack
        raise UserError(f"arch={arch} cannot take inputs of shape {tuple(input_shape)}: {err}") from None
    init_weights(model, init, init_std)
    if resize:
        size = (int(resize), int(resize))
        model.register_forward_pre_hook(
            lambda _m, args: (F.interpolate(args[0], size=size, mode="bilinear", align_corners=False),) + args[1:]
        )
    return model


def _init_options(cfg: DictConfig) -> tuple[str, float]:
    init = str(cfg.get("init") or "torch")
    if init not in INITS:
        raise UserError(f"model init={init!r} is invalid; valid: {choices(INITS)}")
    std = cfg.get("init_std")
    std = 0.02 if std is None else number(std, "model init_std")
    if std <= 0:
        raise UserError(f"model init_std={std:g} is invalid; it must be > 0")
    if init != "torch" and cfg.get("weights") not in (None, "", "null", "none"):
        raise UserError(f"model init={init} would overwrite the pretrained weights={cfg.get('weights')}; "
                        "use init=torch or weights=null")
    return init, std


def init_weights(model: nn.Module, init: str, std: float = 0.02) -> None:
    """Re-initialise every Linear/Conv (and, for ``normal``, BatchNorm) of ``model``; ``torch`` leaves it as built.

    - ``glorot_uniform`` (Keras' default for Dense and Conv2D): weights U(-a, a), a = sqrt(6 / (fan_in + fan_out)),
      biases 0; BatchNorm keeps weight 1, bias 0 (Keras' defaults too).
    - ``normal`` (the DCGAN-style init of the Hinton MNIST project): weights N(0, std), biases 0; BatchNorm
      weight N(1, std), bias 0.
    """
    if init == "torch":
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, *CONVS)):
            if init == "glorot_uniform":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif init == "normal" and isinstance(m, BATCHNORMS) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
