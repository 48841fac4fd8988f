"""The CIFAR distillation zoo (RepDistiller / mdistiller): sizes, training step, tappable stage names."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.models import ARCHS, build_model
from kd_runner.taps import Taps

CIFAR = (3, 32, 32)

# the modules whose builders make up the zoo: a conf/model YAML whose arch comes from one of them is a zoo model
ZOO_MODULES = {
    "kd_runner.models.cifar_resnet",
    "kd_runner.models.cifar_resnetv2",
    "kd_runner.models.wrn",
    "kd_runner.models.vgg",
    "kd_runner.models.mobilenetv2",
    "kd_runner.models.shufflenetv1",
    "kd_runner.models.shufflenetv2",
}


class Zoo(NamedTuple):
    field: str  # the name in RepDistiller's model_dict / mdistiller's cifar_model_dict
    params_100: int
    params_10: int
    stages: int
    embedding: int  # width of the pooled feature that feeds the classifier
    preact: str  # how the stage outputs before the final ReLU are reached: see PREACT_KINDS


# How each family exposes its pre-activation features (RepDistiller's preact=True, mdistiller's preact_feats):
# relu    - stageK.preact, then the stage's ReLU: stageK == relu(stageK.preact) >= 0
# shuffle - ShuffleV2: stageK.preact, then ReLU of the branch half and a channel shuffle (the reference's order)
# linear  - MobileNetV2: stages end in a linear bottleneck, stageK.preact is stageK itself
# wrn     - pre-activation Wide ResNets: stageK is the raw residual sum; its BN-before-ReLU is the BN opening the
#           next stage (stage2.0.bn1, stage3.0.bn1) or the head (head.bn1)
PREACT_KINDS = ("relu", "shuffle", "linear", "wrn")

# Parameter counts: instantiated from HobbitLong/RepDistiller models/ (commit b84f547c5db6) with
# models.model_dict[field](num_classes=100) and (num_classes=10), counting sum(p.numel() for p in parameters());
# megvii-research/mdistiller mdistiller/models/cifar/ (commit a08d46f10d61) cifar_model_dict gives the same numbers.
ZOO: dict[str, Zoo] = {
    # RepDistiller models/resnet.py
    "resnet8": Zoo("resnet8", 83_892, 78_042, 3, 64, "relu"),
    "resnet14": Zoo("resnet14", 181_108, 175_258, 3, 64, "relu"),
    "resnet20": Zoo("resnet20", 278_324, 272_474, 3, 64, "relu"),
    "resnet32": Zoo("resnet32", 472_756, 466_906, 3, 64, "relu"),
    "resnet44": Zoo("resnet44", 667_188, 661_338, 3, 64, "relu"),
    "resnet56": Zoo("resnet56", 861_620, 855_770, 3, 64, "relu"),
    "resnet110": Zoo("resnet110", 1_736_564, 1_730_714, 3, 64, "relu"),
    "resnet8x4": Zoo("resnet8x4", 1_233_540, 1_210_410, 3, 256, "relu"),
    "resnet32x4": Zoo("resnet32x4", 7_433_860, 7_410_730, 3, 256, "relu"),
    # RepDistiller models/wrn.py
    "wrn_16_1": Zoo("wrn_16_1", 180_916, 175_066, 3, 64, "wrn"),
    "wrn_16_2": Zoo("wrn_16_2", 703_284, 691_674, 3, 128, "wrn"),
    "wrn_40_1": Zoo("wrn_40_1", 569_780, 563_930, 3, 64, "wrn"),
    "wrn_40_2": Zoo("wrn_40_2", 2_255_156, 2_243_546, 3, 128, "wrn"),
    # RepDistiller models/vgg.py (vgg8_bn .. vgg19_bn)
    "vgg8": Zoo("vgg8", 3_965_028, 3_918_858, 4, 512, "relu"),
    "vgg11": Zoo("vgg11", 9_277_284, 9_231_114, 4, 512, "relu"),
    "vgg13": Zoo("vgg13", 9_462_180, 9_416_010, 4, 512, "relu"),
    "vgg16": Zoo("vgg16", 14_774_436, 14_728_266, 4, 512, "relu"),
    "vgg19": Zoo("vgg19", 20_086_692, 20_040_522, 4, 512, "relu"),
    # RepDistiller models/mobilenetv2.py (mobile_half)
    "mobilenetv2": Zoo("MobileNetV2", 812_836, 697_546, 4, 1280, "linear"),
    # RepDistiller models/ShuffleNetv1.py
    "shufflev1": Zoo("ShuffleV1", 949_258, 862_768, 3, 960, "relu"),
    # RepDistiller models/ShuffleNetv2.py
    "shufflev2": Zoo("ShuffleV2", 1_355_528, 1_263_278, 3, 1024, "shuffle"),
    # RepDistiller models/resnetv2.py
    "resnet50_cifar": Zoo("ResNet50", 23_705_252, 23_520_842, 4, 2048, "relu"),
}


# batches of 2 gain nothing from intra-op threads; on a shared CPU they only oversubscribe it
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def zoo_yamls() -> list[str]:
    """conf/model options whose arch is built by a zoo module."""
    found = []
    for path in sorted((CONF / "model").glob("*.yaml")):
        builder = ARCHS.get(str(OmegaConf.load(path).get("arch")))
        if builder is not None and builder.__module__ in ZOO_MODULES:
            found.append(path.stem)
    return found


NAMES = list(ZOO) + sorted(set(zoo_yamls()) - set(ZOO))  # a zoo YAML missing from the table fails by name


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, classes: int, shape: tuple[int, int, int] = CIFAR) -> nn.Module:
    assert name in ZOO, f"conf/model/{name}.yaml is a zoo model missing from the ZOO table"
    path = CONF / "model" / f"{name}.yaml"
    assert path.is_file(), f"{path} is missing"
    return build_model(OmegaConf.load(path), shape, classes)


def preact_names(name: str) -> list[str]:
    spec = ZOO[name]
    if spec.preact == "wrn":
        return ["stage2.0.bn1", "stage3.0.bn1", "head.bn1"]
    return [f"stage{k}.preact" for k in range(1, spec.stages + 1)]


def documented_names(name: str) -> list[str]:
    stages = [f"stage{k}" for k in range(1, ZOO[name].stages + 1)]
    head = ["head"] if ZOO[name].preact in ("wrn", "linear", "shuffle") else []
    return ["stem", *stages, *preact_names(name), *head, "embedding", "classifier"]


def test_every_zoo_yaml_is_in_the_table_and_every_table_entry_has_a_yaml():
    assert sorted(zoo_yamls()) == sorted(ZOO)
    assert all(spec.preact in PREACT_KINDS for spec in ZOO.values())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_the_reference(name):
    spec = ZOO.get(name)
    assert spec is not None, f"conf/model/{name}.yaml is a zoo model missing from the ZOO table"
    assert n_params(build(name, 100)) == spec.params_100
    assert n_params(build(name, 10)) == spec.params_10
    assert f"{spec.params_100:,}" in (CONF / "model" / f"{name}.yaml").read_text().splitlines()[0]


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_cifar_images(name, classes):
    torch.manual_seed(0)
    model = build(name, classes).train()
    logits = model(torch.randn(2, *CIFAR))
    assert logits.shape == (2, classes)
    F.cross_entropy(logits, torch.tensor([0, classes - 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_documented_layers_tap_stage_maps_preacts_and_the_embedding(name):
    spec = ZOO[name]
    torch.manual_seed(0)
    model = build(name, 100).train()
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    names = documented_names(name)
    assert set(names) <= {n for n, _ in model.named_modules()}
    x = torch.randn(2, *CIFAR)
    with torch.no_grad(), Taps(model, names, "student") as taps:
        logits = model(x)
        got = taps.take()
    assert set(got) == set(names)
    for layer in names:
        rank = 2 if layer in ("embedding", "classifier") else 4
        assert got[layer].dim() == rank and got[layer].shape[0] == 2, (layer, got[layer].shape)
    assert got["embedding"].shape == (2, spec.embedding)
    assert torch.equal(got["classifier"], logits)
    last_map = got["head"] if "head" in got else got[f"stage{spec.stages}"]
    assert torch.allclose(got["embedding"], last_map.mean((2, 3)), atol=1e-5)
    assert spec.preact == "wrn" or (got["stem"] >= 0).all()  # every stem ends in a ReLU, except WRN's bare conv
    stages = [got[f"stage{k}"] for k in range(1, spec.stages + 1)]
    for stage, preact_name in zip(stages, preact_names(name), strict=True):
        preact = got[preact_name]
        assert (preact < 0).any(), preact_name
        if spec.preact == "relu":
            assert (stage >= 0).all() and not torch.equal(preact, stage)
            assert torch.equal(F.relu(preact), stage)
        elif spec.preact == "shuffle":  # ReLU (the pass-through half is already >= 0), then shuffle 2 groups
            assert (stage >= 0).all() and not torch.equal(preact, stage)
            n, c, h, w = preact.shape
            assert torch.equal(F.relu(preact).reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w), stage)
        elif spec.preact == "linear":
            assert preact is stage
        else:  # wrn: the tapped BN is the one applied to this stage's raw output
            assert (stage < 0).any()
            bn = model.get_submodule(preact_name)
            assert torch.allclose(preact, bn(stage), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_models_adapt_to_grayscale_and_small_inputs(name):
    for shape in ((1, 28, 28), (1, 8, 8)):
        model = build(name, 7, shape).eval()
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.in_channels == 1
        with torch.no_grad():
            assert model(torch.rand(2, *shape)).shape == (2, 7), shape


def test_fixed_settings_cannot_be_overridden_and_unknown_options_are_user_errors():
    with pytest.raises(UserError, match="resnet8: bad model option"):
        build_model(OmegaConf.create({"arch": "resnet8", "depth": 20}), CIFAR, 10)
    with pytest.raises(UserError, match="bad model option"):
        build_model(OmegaConf.create({"arch": "vgg13", "dropout": 0.5}), CIFAR, 10)
    wrn = build_model(OmegaConf.create({"arch": "wrn_16_2", "drop_rate": 0.3}), CIFAR, 10)
    assert n_params(wrn) == ZOO["wrn_16_2"].params_10
