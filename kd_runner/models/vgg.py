"""CIFAR VGGs with BatchNorm and no FC stack (vgg8, vgg11, vgg13, vgg16, vgg19).

Reference: RepDistiller ``models/vgg.py``, the ``vgg*_bn`` builders that its ``model_dict`` (and mdistiller's
``cifar_model_dict``, ``mdistiller/models/cifar/vgg.py``) call ``vgg8`` .. ``vgg19``. Five conv groups
(``block0``..``block4`` there: ``stem``, ``stage1``..``stage4`` here, the same ``0``, ``1``, ... keys inside),
2x2 max-pools between them, global average pool, ``Linear(512, classes)``. Every conv has a bias.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from kd_runner.models.cifar_parts import Shape, StagedNet, fixed, init_he_normal, named_stage

# channels of the convs in block0 .. block4 (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E')
VGG_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def conv_group(c_in: int, widths: list[int]) -> OrderedDict[str, nn.Module]:
    """(conv3x3 + bias, BN, ReLU) per width, without the last ReLU: the reference's ``_make_layers(cfg, True)``."""
    layers: list[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return OrderedDict((str(i), m) for i, m in enumerate(layers[:-1]))


class CifarVGG(StagedNet):
    """``stem`` = block0 + ReLU; ``stageK`` = max-pool, blockK, ``preact``, ReLU; then pool, embedding, Linear.

    As in the reference, stage4 has no max-pool in front unless the input is 64x64 (its ``if h == 64``; decided
    here from ``input_shape``): at 32x32 the stages run at 16, 8, 4 and 4 pixels.
    Taps: ``stem``, ``stage1``..``stage4`` (post-ReLU), ``stage1.preact``..``stage4.preact``, ``embedding``
    (512 wide), ``classifier``.
    """

    def __init__(self, input_shape: Shape, num_classes: int, cfg: list[list[int]]) -> None:
        stem_layers = conv_group(input_shape[0], cfg[0])
        stem_layers["relu"] = nn.ReLU()
        stem = nn.Sequential(stem_layers)
        stages = []
        for k in range(1, 5):
            pool = nn.MaxPool2d(kernel_size=2, stride=2) if k < 4 or input_shape[1] == 64 else None
            layers = OrderedDict(pool=pool) if pool is not None else OrderedDict()
            layers.update(conv_group(cfg[k - 1][-1], cfg[k]))
            stages.append(named_stage(layers, ("relu", nn.ReLU())))
        super().__init__(stem, stages, cfg[4][-1], num_classes)
        init_he_normal(self, linear_std=0.01)


VGG_ARCHS = {name: fixed(CifarVGG, cfg=cfg) for name, cfg in VGG_CFGS.items()}
