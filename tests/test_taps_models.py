"""Forward-hook taps and the model zoo: exact tapped outputs, parameter counts, shape adaptation."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.models import ARCHS, build_model
from kd_runner.models.tutorial import DeepNN, LightNN
from kd_runner.taps import Taps


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_cfg(role: str, option: str, **override):
    """conf/model/<option>.yaml (one architecture file serves both roles; ``role`` documents the call site)."""
    cfg = OmegaConf.load(CONF / "model" / f"{option}.yaml")
    for k, v in override.items():
        cfg[k] = v
    return cfg


# --------------------------------------------------------------------------- taps


@pytest.mark.parametrize("name, upto", [("features.0", 1), ("features.3", 4), ("features", 6)])
def test_tap_returns_exactly_the_named_layer_output(name, upto):
    torch.manual_seed(0)
    model = LightNN((3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with Taps(model, [name], "student") as taps:
        logits = model(x)
        got = taps.take()
    manual = x
    for layer in list(model.features)[:upto]:
        manual = layer(manual)
    assert set(got) == {name}
    assert torch.equal(got[name], manual)
    assert torch.equal(logits, model(x))  # tapping does not change the model's output


def test_tap_on_classifier_sublayer_and_several_names():
    torch.manual_seed(0)
    model = DeepNN((1, 8, 8), 10).eval()
    x = torch.randn(3, 1, 8, 8)
    with Taps(model, ["classifier.1", "features.9"], "teacher") as taps:
        model(x)
        got = taps.take()
    feats = model.features(x)
    assert torch.equal(got["features.9"], feats)
    assert torch.equal(got["classifier.1"], torch.relu(model.classifier[0](torch.flatten(feats, 1))))


def test_take_clears_and_hooks_are_removed_on_exit():
    model = LightNN((1, 8, 8), 10).eval()
    with Taps(model, ["features"]) as taps:
        model(torch.zeros(1, 1, 8, 8))
        assert "features" in taps.take()
        assert taps.take() == {}
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("bad", ["nope", "features.99", ""])
def test_unknown_tap_name_raises_user_error_listing_valid_names(bad):
    model = LightNN((1, 8, 8), 10)
    with pytest.raises(UserError) as info:
        Taps(model, [bad], "student")
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(bad) in msg and "student" in msg
    for valid in ("features", "features.0", "features.5", "classifier", "classifier.3"):
        assert valid in msg


# --------------------------------------------------------------------------- models


def test_tutorial_parameter_counts_on_cifar():
    assert n_params(DeepNN()) == 1_186_986
    assert n_params(LightNN()) == 267_738
    assert n_params(DeepNN((3, 32, 32), 10)) == 1_186_986
    assert n_params(LightNN((3, 32, 32), 10)) == 267_738


def conv_params(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out


def deep_nn_params(c: int, flat_hw: int) -> int:
    convs = conv_params(c, 128) + conv_params(128, 64) + conv_params(64, 64) + conv_params(64, 32)
    return convs + (32 * flat_hw * 512 + 512) + (512 * 10 + 10)


def light_nn_params(c: int, flat_hw: int) -> int:
    return conv_params(c, 16) + conv_params(16, 16) + (16 * flat_hw * 256 + 256) + (256 * 10 + 10)


def test_hand_formulas_match_the_tutorial_numbers():
    assert deep_nn_params(3, 8 * 8) == 1_186_986 and light_nn_params(3, 8 * 8) == 267_738


# after two 2x2 pools: 28 -> 7, 8 -> 2
@pytest.mark.parametrize("shape, deep, light", [((1, 28, 28), deep_nn_params(1, 49), light_nn_params(1, 49)),
                                                ((1, 8, 8), deep_nn_params(1, 4), light_nn_params(1, 4))])
def test_tutorial_models_adapt_to_mnist_and_digits(shape, deep, light):
    for cls, expected in ((DeepNN, deep), (LightNN, light)):
        model = cls(shape, 10).eval()
        assert n_params(model) == expected
        assert model(torch.zeros(2, *shape)).shape == (2, 10)


# hand-computed: Linear(i, o) has i*o + o parameters
MLP_COUNTS = {
    ("mlp_1200", (1, 28, 28)): (784 * 1200 + 1200) + (1200 * 1200 + 1200) + (1200 * 10 + 10),
    ("mlp_800", (1, 28, 28)): (784 * 800 + 800) + (800 * 800 + 800) + (800 * 10 + 10),
    ("dense_28", (1, 28, 28)): (784 * 28 + 28) + (28 * 10 + 10),
    ("dense_28", (1, 8, 8)): (64 * 28 + 28) + (28 * 10 + 10),
}


@pytest.mark.parametrize("option, shape", list(MLP_COUNTS))
def test_mlp_configs_have_the_papers_sizes(option, shape):
    model = build_model(model_cfg("student", option), shape, 10)
    assert n_params(model) == MLP_COUNTS[(option, shape)]


def test_keras_teacher_size_on_mnist():
    model = build_model(model_cfg("teacher", "keras_conv"), (1, 28, 28), 10)
    # conv 1->256 3x3, conv 256->512 3x3 (28 -> 14 -> 14 -> 7), dense 512*7*7 -> 10
    assert n_params(model) == (9 * 256 + 256) + (9 * 256 * 512 + 512) + (512 * 49 * 10 + 10)


# the mission systems' models (the CIFAR zoo is checked at 32x32 in test_zoo.py)
MISSION_MODULES = {"kd_runner.models.tutorial", "kd_runner.models.mlp", "kd_runner.models.convnets",
                   "kd_runner.models.zoo"}
GROUP_OPTIONS = sorted(p.stem for p in (CONF / "model").glob("*.yaml")
                       if ARCHS[OmegaConf.load(p).arch].__module__ in MISSION_MODULES)
SHAPES = [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 7)]


@pytest.mark.parametrize("option, shape, classes",
                         [(o, s, c) for o in GROUP_OPTIONS if o != "torchvision" for s, c in SHAPES]
                         + [("torchvision", (1, 16, 16), 7)])  # grayscale into an ImageNet net: one case is enough
def test_every_model_config_adapts_to_the_data_shape(option, shape, classes):
    torch.manual_seed(0)
    model = build_model(model_cfg("either", option), shape, classes).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, classes), (option, shape)


def test_resize_upsamples_inside_the_model():
    cfg = model_cfg("teacher", "light_nn", resize=16)
    model = build_model(cfg, (1, 8, 8), 10).eval()
    # the conv stack is sized for 16x16 (16 ch * 4 * 4 flattened), while the data stays 8x8
    assert model.classifier[0].in_features == 16 * 4 * 4
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_input_too_small_for_the_conv_stack_is_a_user_error():
    with pytest.raises(UserError, match="deep_nn"):
        build_model(model_cfg("teacher", "deep_nn"), (1, 2, 2), 10)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="'resnet'"):
        build_model(OmegaConf.create({"arch": "resnet"}), (1, 8, 8), 10)
