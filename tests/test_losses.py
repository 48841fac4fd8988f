"""Loss values of kd / cosine / hint against numbers computed by hand (plain Python math)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_runner.errors import UserError
from kd_runner.methods import METHODS, build_method
from kd_runner.methods.base import Batch, Outputs, Setup
from kd_runner.methods.cosine import Cosine
from kd_runner.methods.hint import Hint
from kd_runner.methods.kd import KD

S_LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]]
T_LOGITS = [[1.5, 0.2, -0.7], [-0.4, 2.2, 0.9]]
TARGETS = [0, 2]


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    ex = [math.exp(v / T) for v in row]
    z = sum(ex)
    return [e / z for e in ex]


def hand_kl_T2(s_rows, t_rows, T: float) -> float:
    """mean over the batch of sum_i p_t,i * (log p_t,i - log p_s,i), times T^2."""
    total = 0.0
    for s, t in zip(s_rows, t_rows, strict=True):
        ps, pt = softmax(s, T), softmax(t, T)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return total / len(s_rows) * T * T


def hand_ce(s_rows, targets) -> float:
    return sum(-math.log(softmax(s)[y]) for s, y in zip(s_rows, targets, strict=True)) / len(targets)


def hand_cosine_loss(a_rows, b_rows) -> float:
    """mean of 1 - cos(a, b)."""
    total = 0.0
    for a, b in zip(a_rows, b_rows, strict=True):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        total += 1.0 - dot / (na * nb)
    return total / len(a_rows)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- KD


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_soft_term_is_kl_times_T_squared(T):
    m = KD(T=T, soft_weight=0.3, ce_weight=0.7)
    out = m.loss(Outputs(t(S_LOGITS)), Outputs(t(T_LOGITS)), Batch.of(torch.tensor(TARGETS)), nn.ModuleDict())
    soft, ce = hand_kl_T2(S_LOGITS, T_LOGITS, T), hand_ce(S_LOGITS, TARGETS)
    assert float(out["soft"]) == pytest.approx(soft, rel=1e-9)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-9)
    assert float(out["total"]) == pytest.approx(0.3 * soft + 0.7 * ce, rel=1e-9)


def test_kd_known_value():
    # one sample, two classes, T=1: p_s=(0.5,0.5), p_t=softmax(ln3, 0)=(0.75,0.25)
    out = KD(T=1.0, soft_weight=1.0, ce_weight=0.0).loss(
        Outputs(t([[0.0, 0.0]])), Outputs(t([[math.log(3.0), 0.0]])), Batch.of(torch.tensor([0])), nn.ModuleDict())
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(out["soft"]) == pytest.approx(expected, rel=1e-12)
    assert float(out["total"]) == pytest.approx(expected, rel=1e-12)


def test_kd_soft_term_is_zero_when_student_matches_teacher():
    out = KD(T=2.0).loss(Outputs(t(T_LOGITS)), Outputs(t(T_LOGITS)), Batch.of(torch.tensor(TARGETS)), nn.ModuleDict())
    assert float(out["soft"]) == pytest.approx(0.0, abs=1e-12)


def test_kd_gradient_reaches_student_only():
    s = t(S_LOGITS).requires_grad_(True)
    teacher = t(T_LOGITS).requires_grad_(True)
    out = KD(T=2.0).loss(Outputs(s), Outputs(teacher.detach()), Batch.of(torch.tensor(TARGETS)), nn.ModuleDict())
    out["total"].backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


@pytest.mark.parametrize("kwargs, needle", [({"T": 0}, "method.T=0"), ({"T": -1.5}, "method.T=-1.5"),
                                            ({"soft_weight": -0.1}, "method.soft_weight=-0.1"),
                                            ({"ce_weight": -1}, "method.ce_weight=-1")])
def test_kd_rejects_bad_params(kwargs, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        KD(**kwargs)


def test_method_registry_builds_every_config_group_option():
    from helpers import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    options = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert set(METHODS) <= set(options)  # every registered method has its own YAML
    assert {"ce", "kd", "cosine", "hint"} <= set(METHODS)
    for option in options:  # presets (kd_cifar, ...) are a method's YAML with other values
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"method={option}"])
        m = build_method(cfg.method)
        assert m.name == (option if option in METHODS else OmegaConf.select(cfg, "method.name"))
        assert m.name in METHODS
    with pytest.raises(UserError, match="unknown option"):
        build_method(OmegaConf.create({"name": "kd", "temperature": 4}))


# --------------------------------------------------------------------------- Cosine


def test_cosine_same_width_is_mean_one_minus_cos():
    s_rows = [[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 3.0, 1.0], [2.0, 1.0, 1.0, 1.0]]
    t_rows = [[0.5, 2.0, 1.0, -1.0], [-1.0, 0.5, 2.0, 2.0], [2.0, 1.0, 1.0, 1.0]]
    m = Cosine(hidden_weight=0.4, ce_weight=0.6)
    logits = t([[0.2, 0.1], [0.0, 1.0], [1.0, 0.0]])
    out = m.loss(Outputs(logits, {"features": t(s_rows)}), Outputs(logits, {"features": t(t_rows)}),
                 Batch.of(torch.tensor([0, 1, 0])), nn.ModuleDict())
    hidden = hand_cosine_loss(s_rows, t_rows)
    ce = hand_ce([[0.2, 0.1], [0.0, 1.0], [1.0, 0.0]], [0, 1, 0])
    assert float(out["hidden"]) == pytest.approx(hidden, rel=1e-9)
    assert float(out["total"]) == pytest.approx(0.4 * hidden + 0.6 * ce, rel=1e-9)


def test_cosine_teacher_twice_as_wide_is_pairwise_mean_like_tutorial():
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64)
    teacher = torch.randn(3, 8, dtype=torch.float64)
    # by hand: average neighbouring pairs of the teacher vector
    pooled = [[(row[2 * i] + row[2 * i + 1]) / 2 for i in range(4)] for row in teacher.tolist()]
    m = Cosine()
    logits = torch.zeros(3, 2, dtype=torch.float64)
    out = m.loss(Outputs(logits, {"features": s}), Outputs(logits, {"features": teacher}),
                 Batch.of(torch.tensor([0, 1, 0])), nn.ModuleDict())
    assert float(out["hidden"]) == pytest.approx(hand_cosine_loss(s.tolist(), pooled), rel=1e-9)
    # the PyTorch KD tutorial's own formulation: avg_pool1d(kernel_size=2) on the flattened teacher
    tutorial_t = torch.nn.functional.avg_pool1d(teacher.unsqueeze(1), kernel_size=2).squeeze(1)
    tutorial = torch.nn.functional.cosine_embedding_loss(s, tutorial_t, torch.ones(3))
    assert float(out["hidden"]) == pytest.approx(float(tutorial), rel=1e-9)


def test_cosine_flattens_conv_maps():
    torch.manual_seed(1)
    s = torch.randn(2, 2, 2, 2, dtype=torch.float64)  # 8 features
    teacher = torch.randn(2, 4, 2, 2, dtype=torch.float64)  # 16 features -> pooled pairwise to 8
    flat_t = teacher.flatten(1).tolist()
    pooled = [[(row[2 * i] + row[2 * i + 1]) / 2 for i in range(8)] for row in flat_t]
    logits = torch.zeros(2, 2, dtype=torch.float64)
    out = Cosine().loss(Outputs(logits, {"features": s}), Outputs(logits, {"features": teacher}),
                        Batch.of(torch.tensor([0, 1])), nn.ModuleDict())
    assert float(out["hidden"]) == pytest.approx(hand_cosine_loss(s.flatten(1).tolist(), pooled), rel=1e-9)


def test_cosine_rejects_teacher_narrower_than_student():
    m = Cosine(student_layer="a", teacher_layer="b")
    with pytest.raises(UserError, match="'b' has 28 features, fewer than student layer 'a' \\(64\\)"):
        m.extra_modules(Setup({"a": torch.Size([2, 16, 2, 2])}, {"b": torch.Size([2, 28])}))
    assert len(list(m.extra_modules(Setup({"a": torch.Size([2, 64])}, {"b": torch.Size([2, 128])})).parameters())) == 0


# --------------------------------------------------------------------------- Hint


def test_hint_vector_regressor_and_mse_by_hand():
    m = Hint(student_layer="s", teacher_layer="t", hint_weight=0.5, ce_weight=2.0)
    extra = m.extra_modules(Setup({"s": torch.Size([2, 3])}, {"t": torch.Size([2, 2])}))
    reg = extra["regressor"]
    assert isinstance(reg, nn.Linear) and (reg.in_features, reg.out_features) == (3, 2)
    with torch.no_grad():
        reg.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        reg.bias.copy_(torch.tensor([0.5, -0.5]))
    s_rows = [[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]
    t_rows = [[7.0, 0.0], [1.0, 1.0]]
    # mapped by hand: W s + b
    mapped = [[1 + 2 * 3 + 0.5, -2 + 3 - 0.5], [-1 + 2 + 0.5, 0 + 1 - 0.5]]  # [[7.5, 0.5], [1.5, 0.5]]
    mse = sum((a - b) ** 2 for ra, rb in zip(mapped, t_rows, strict=True) for a, b in zip(ra, rb, strict=True)) / 4
    logit_rows = [[1.0, 0.0], [0.0, 1.0]]
    out = m.loss(Outputs(torch.tensor(logit_rows), {"s": torch.tensor(s_rows)}),
                 Outputs(torch.zeros(2, 2), {"t": torch.tensor(t_rows)}), Batch.of(torch.tensor([1, 1])), extra)
    ce = hand_ce(logit_rows, [1, 1])
    assert float(out["hint"].detach()) == pytest.approx(mse, rel=1e-6)
    assert float(out["total"].detach()) == pytest.approx(0.5 * mse + 2.0 * ce, rel=1e-6)
    out["total"].backward()
    assert reg.weight.grad is not None and float(reg.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("s_shape, t_shape", [((2, 16, 8, 8), (2, 32, 4, 4)), ((2, 16, 2, 2), (2, 32, 2, 2)),
                                              ((2, 8, 6, 6), (2, 3, 3, 3))])
def test_hint_conv_regressor_maps_to_teacher_shape(s_shape, t_shape):
    m = Hint()
    extra = m.extra_modules(Setup({"features": torch.Size(s_shape)}, {"features": torch.Size(t_shape)}))
    reg = extra["regressor"]
    conv = [mod for mod in reg.modules() if isinstance(mod, nn.Conv2d)]
    assert len(conv) == 1 and (conv[0].in_channels, conv[0].out_channels) == (s_shape[1], t_shape[1])
    torch.manual_seed(2)
    s, teacher = torch.randn(s_shape), torch.randn(t_shape)
    mapped = reg(s)
    assert tuple(mapped.shape) == t_shape
    out = m.loss(Outputs(torch.zeros(2, 3), {"features": s}), Outputs(torch.zeros(2, 3), {"features": teacher}),
                 Batch.of(torch.tensor([0, 1])), extra)
    expected = float(((mapped - teacher) ** 2).sum().detach()) / teacher.numel()
    assert float(out["hint"].detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("s_shape, t_shape, needle", [
    ((2, 800), (2, 32, 2, 2), "same kind"),
    ((2, 16, 2, 2), (2, 64), "same kind"),
    ((2, 16, 2, 2), (2, 128, 8, 8), "at least as large"),
])
def test_hint_rejects_unbridgeable_shapes(s_shape, t_shape, needle):
    with pytest.raises(UserError, match=needle):
        Hint().extra_modules(Setup({"features": torch.Size(s_shape)}, {"features": torch.Size(t_shape)}))
