"""The logit methods DKD and DIST, and logit standardisation as an option of kd, dkd and dist.

Expected numbers are written out from the papers' formulas in plain float64 torch/math, sample by sample.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import CONF
from omegaconf import OmegaConf
from torch import Tensor, nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, Outputs, Setup
from kd_runner.methods.dist import DIST
from kd_runner.methods.dkd import DKD
from kd_runner.methods.kd import KD
from kd_runner.methods.registry import build_method
from kd_runner.models import build_model
from kd_runner.taps import Taps

# --------------------------------------------------------------------------- hand formulas (float64, per sample)


def softmax_list(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl_list(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum p log(p / q)."""
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def hand_dkd(s: Tensor, t: Tensor, y: Tensor, T: float) -> tuple[float, float]:
    """(TCKD, NCKD) * T^2, averaged over the batch, from the DKD paper's definitions."""
    n = s.shape[0]
    tckd = nckd = 0.0
    for i in range(n):
        zs, zt, yi = s[i].double().tolist(), t[i].double().tolist(), int(y[i])
        ps, pt = softmax_list([v / T for v in zs]), softmax_list([v / T for v in zt])
        tckd += kl_list([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])
        others = [j for j in range(len(zs)) if j != yi]
        qs = softmax_list([zs[j] / T for j in others])
        qt = softmax_list([zt[j] / T for j in others])
        nckd += kl_list(qt, qs)
    return tckd * T * T / n, nckd * T * T / n


def hand_kd(s: Tensor, t: Tensor, T: float) -> float:
    """KL(p_T^t || p_T^s) * T^2, summed over classes, averaged over the batch."""
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        total += kl_list(softmax_list([v / T for v in t[i].double().tolist()]),
                         softmax_list([v / T for v in s[i].double().tolist()]))
    return total * T * T / n


def hand_ce(s: Tensor, y: Tensor) -> float:
    return sum(-math.log(softmax_list(s[i].double().tolist())[int(y[i])]) for i in range(s.shape[0])) / s.shape[0]


def pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    """sum (a - a_mean)(b - b_mean) / (sqrt(sum (a - a_mean)^2) * sqrt(sum (b - b_mean)^2) + eps)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (v - mb) for x, v in zip(a, b, strict=True))
    da = math.sqrt(sum((x - ma) ** 2 for x in a))
    db = math.sqrt(sum((v - mb) ** 2 for v in b))
    return num / (da * db + eps)


def hand_dist(s: Tensor, t: Tensor, T: float) -> tuple[float, float]:
    """(inter, intra) * T^2: 1 - mean Pearson over the rows / over the columns of softmax(z / T)."""
    n, c = s.shape
    ps = [softmax_list([v / T for v in s[i].double().tolist()]) for i in range(n)]
    pt = [softmax_list([v / T for v in t[i].double().tolist()]) for i in range(n)]
    inter = 1 - sum(pearson(ps[i], pt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson([ps[i][k] for i in range(n)], [pt[i][k] for i in range(n)]) for k in range(c)) / c
    return inter * T * T, intra * T * T


def hand_zscore(z: Tensor) -> Tensor:
    """(z - mean) / (1e-7 + sqrt(sum (z - mean)^2 / (C - 1))), row by row."""
    rows = []
    for row in z.double().tolist():
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
        rows.append([(v - m) / (1e-7 + sd) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


def logits(n: int = 4, c: int = 6, seed: int = 0, scale: float = 3.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale


def run(method, s: Tensor, t: Tensor, y: Tensor, epoch: float = 1.0) -> dict[str, float]:
    out = method.loss(Outputs(s), Outputs(t), Batch.of(y, epoch), nn.ModuleDict())
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_dkd_parts_by_hand(T):
    s, t = logits()
    y = torch.tensor([0, 3, 5, 1])
    tckd, nckd = hand_dkd(s, t, y, T)
    out = run(DKD(alpha=1.5, beta=6.0, T=T, warmup=0, ce_weight=0.7), s, t, y)
    assert out["tckd"] == pytest.approx(tckd, rel=1e-5, abs=1e-7)
    assert out["nckd"] == pytest.approx(nckd, rel=1e-5, abs=1e-7)
    assert out["ce"] == pytest.approx(hand_ce(s, y), rel=1e-5)
    assert out["total"] == pytest.approx(0.7 * hand_ce(s, y) + 1.5 * tckd + 6.0 * nckd, rel=1e-5)
    assert set(out) == {"total", "tckd", "nckd", "ce"}


def test_dkd_warmup_scales_the_kd_part_only():
    s, t = logits(seed=1)
    y = torch.tensor([2, 2, 0, 4])
    tckd, nckd = hand_dkd(s, t, y, 4.0)
    ce = hand_ce(s, y)
    dkd = DKD()  # alpha 1, beta 8, T 4, warm-up 20 epochs, ce 1
    kd_part = 1.0 * tckd + 8.0 * nckd
    assert run(dkd, s, t, y, epoch=1)["total"] == pytest.approx(ce + kd_part / 20, rel=1e-5)
    assert run(dkd, s, t, y, epoch=10)["total"] == pytest.approx(ce + kd_part * 10 / 20, rel=1e-5)
    for epoch in (20, 21, 240):
        assert run(dkd, s, t, y, epoch=epoch)["total"] == pytest.approx(ce + kd_part, rel=1e-5)
    # the logged parts are unweighted: the same at every epoch
    assert run(dkd, s, t, y, epoch=1)["nckd"] == pytest.approx(run(dkd, s, t, y, epoch=30)["nckd"], rel=1e-6)
    # warmup 0: no warm-up at all
    assert run(DKD(warmup=0), s, t, y, epoch=1)["total"] == pytest.approx(ce + kd_part, rel=1e-5)


def test_dkd_warmup_reads_the_epoch_tensor_in_place():
    """The factor follows batch.epoch when it is changed in place (as a captured CUDA graph sees it)."""
    s, t = logits(seed=2)
    y = torch.tensor([1, 0, 3, 3])
    batch = Batch.of(y, 1.0)
    dkd = DKD(warmup=4)
    first = float(dkd.loss(Outputs(s), Outputs(t), batch, nn.ModuleDict())["total"])
    batch.epoch.fill_(4.0)
    later = float(dkd.loss(Outputs(s), Outputs(t), batch, nn.ModuleDict())["total"])
    tckd, nckd = hand_dkd(s, t, y, 4.0)
    assert later - first == pytest.approx((tckd + 8 * nckd) * 3 / 4, rel=1e-4)


def test_dkd_class_absent_from_the_batch():
    s, t = logits(n=5, c=7, seed=3)
    y = torch.tensor([0, 0, 2, 2, 0])  # classes 1, 3, 4, 5, 6 never the target
    tckd, nckd = hand_dkd(s, t, y, 4.0)
    out = run(DKD(warmup=0), s, t, y)
    assert out["tckd"] == pytest.approx(tckd, rel=1e-5)
    assert out["nckd"] == pytest.approx(nckd, rel=1e-5)


def test_dkd_batch_of_one_and_the_papers_decomposition():
    """Batch of 1 works; and per sample KD = TCKD + (1 - p_t[y]) * NCKD (DKD paper, Eq. 7)."""
    s, t = logits(n=1, c=5, seed=4)
    y = torch.tensor([3])
    T = 2.0
    tckd, nckd = hand_dkd(s, t, y, T)
    out = run(DKD(alpha=1.0, beta=1.0, T=T, warmup=0, ce_weight=0.0), s, t, y)
    assert out["tckd"] == pytest.approx(tckd, rel=1e-5) and out["nckd"] == pytest.approx(nckd, rel=1e-5)
    p_t_target = softmax_list([v / T for v in t[0].tolist()])[3]
    assert hand_kd(s, t, T) == pytest.approx(out["tckd"] + (1 - p_t_target) * out["nckd"], rel=1e-5)


def test_dkd_is_zero_when_the_student_is_the_teacher_and_stays_finite_when_saturated():
    s, _ = logits(seed=5)
    y = torch.tensor([0, 1, 2, 3])
    out = run(DKD(warmup=0), s, s.clone(), y)
    assert abs(out["tckd"]) < 1e-6 and abs(out["nckd"]) < 1e-6
    # a one-hot-like student: the reference's log(softmax) would give log(0) = -inf here
    big = torch.zeros(2, 4)
    big[0, 0], big[1, 2] = 500.0, -500.0
    teacher = torch.randn(2, 4)
    s_req = big.clone().requires_grad_()
    losses = DKD(warmup=0).loss(Outputs(s_req), Outputs(teacher), Batch.of(torch.tensor([0, 2])), nn.ModuleDict())
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(s_req.grad).all()


def test_dkd_gradient_reaches_only_the_student():
    s, t = logits(seed=6)
    s.requires_grad_()
    t.requires_grad_()
    y = torch.tensor([1, 2, 3, 4])
    DKD(warmup=0).loss(Outputs(s), Outputs(t.detach()), Batch.of(y), nn.ModuleDict())["total"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_dkd_runs_in_float32_under_low_precision_logits():
    s, t = logits(seed=7)
    y = torch.tensor([0, 1, 2, 3])
    out = DKD(warmup=0).loss(Outputs(s.bfloat16()), Outputs(t.bfloat16()), Batch.of(y), nn.ModuleDict())
    assert all(v.dtype == torch.float32 for v in out.values())
    tckd, nckd = hand_dkd(s.bfloat16().float(), t.bfloat16().float(), y, 4.0)
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-4)


# --------------------------------------------------------------------------- DIST


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_by_hand(T):
    s, t = logits(n=5, c=4, seed=8)
    y = torch.tensor([0, 1, 2, 3, 3])
    inter, intra = hand_dist(s, t, T)
    out = run(DIST(beta=1.5, gamma=0.5, T=T, ce_weight=0.3), s, t, y)
    assert out["inter"] == pytest.approx(inter, rel=1e-5, abs=1e-6)
    assert out["intra"] == pytest.approx(intra, rel=1e-5, abs=1e-6)
    assert out["ce"] == pytest.approx(hand_ce(s, y), rel=1e-5)
    assert out["total"] == pytest.approx(0.3 * hand_ce(s, y) + 1.5 * inter + 0.5 * intra, rel=1e-5)
    assert set(out) == {"total", "inter", "intra", "ce"}


def test_dist_pearson_matches_corrcoef_and_defaults():
    """The hand Pearson is the textbook correlation (torch.corrcoef), up to the 1e-8 eps."""
    a, b = torch.rand(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    assert pearson(a.tolist(), b.tolist()) == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
                                                            rel=1e-6)
    s, t = logits(n=3, c=5, seed=9)
    y = torch.tensor([0, 1, 2])
    inter, intra = hand_dist(s, t, 4.0)
    out = run(DIST(), s, t, y)  # defaults: beta = gamma = 2, T = 4, ce 1
    assert out["total"] == pytest.approx(hand_ce(s, y) + 2 * inter + 2 * intra, rel=1e-5)


def test_dist_student_equal_to_teacher_and_affine_invariance_of_the_probabilities():
    s, _ = logits(seed=10)
    y = torch.zeros(4, dtype=torch.long)
    out = run(DIST(), s, s.clone(), y)
    assert out["inter"] < 1e-4 and out["intra"] < 1e-4
    # a teacher whose tempered logits are the student's shifted per sample gives the same probabilities
    out = run(DIST(T=2.0), s, s + torch.tensor([[1.0], [-2.0], [0.5], [3.0]]), y)
    assert out["inter"] < 1e-4 and out["intra"] < 1e-4


def test_dist_batch_of_one_intra_is_the_constant_t_squared():
    """One sample: every class column is a single value, its Pearson is 0 / (0 + eps) = 0 (the reference's eps),
    so intra = T^2 exactly and gives no gradient; inter still trains."""
    s, t = logits(n=1, c=6, seed=11)
    s.requires_grad_()
    out = DIST(T=4.0).loss(Outputs(s), Outputs(t), Batch.of(torch.tensor([2])), nn.ModuleDict())
    assert float(out["intra"].detach()) == pytest.approx(16.0, abs=1e-6)
    inter, _ = hand_dist(s.detach(), t, 4.0)
    assert float(out["inter"].detach()) == pytest.approx(inter, rel=1e-5)
    (g_intra,) = torch.autograd.grad(out["intra"], s, retain_graph=True)
    assert torch.equal(g_intra, torch.zeros_like(g_intra))
    out["total"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------- logit standardisation


def test_standardised_kd_is_kd_on_hand_z_scores():
    s, t = logits(seed=12, scale=5.0)
    y = torch.tensor([1, 2, 3, 0])
    T = 2.0
    zs, zt = hand_zscore(s), hand_zscore(t)
    soft = hand_kd(zs, zt, T)
    out = run(KD(T=T, soft_weight=9.0, ce_weight=0.1, logit_stand=True), s, t, y)
    assert out["soft"] == pytest.approx(soft, rel=1e-5)
    assert out["total"] == pytest.approx(9.0 * soft + 0.1 * hand_ce(s, y), rel=1e-5)  # CE on the raw logits
    plain = run(KD(T=T, soft_weight=9.0, ce_weight=0.1), s, t, y)
    assert plain["soft"] == pytest.approx(hand_kd(s, t, T), rel=1e-5)
    assert abs(plain["soft"] - out["soft"]) > 1e-3  # the option changes the loss


def test_standardised_kd_with_mean_reduction_and_no_t_squared():
    s, t = logits(seed=13)
    y = torch.tensor([0, 0, 1, 1])
    out = run(KD(T=3.0, t_squared=False, kl_reduction="mean", logit_stand=True), s, t, y)
    assert out["soft"] == pytest.approx(hand_kd(hand_zscore(s), hand_zscore(t), 3.0) / 9 / s.shape[1], rel=1e-5)


def test_standardised_dkd_and_dist_use_the_hand_z_scores():
    s, t = logits(seed=14, scale=4.0)
    y = torch.tensor([5, 4, 0, 1])
    zs, zt = hand_zscore(s), hand_zscore(t)
    tckd, nckd = hand_dkd(zs, zt, y, 2.0)
    out = run(DKD(alpha=9.0, beta=72.0, T=2.0, logit_stand=True), s, t, y, epoch=30)
    assert out["tckd"] == pytest.approx(tckd, rel=1e-5) and out["nckd"] == pytest.approx(nckd, rel=1e-5)
    assert out["total"] == pytest.approx(hand_ce(s, y) + 9 * tckd + 72 * nckd, rel=1e-5)
    inter, intra = hand_dist(zs, zt, 2.0)
    out = run(DIST(T=2.0, logit_stand=True), s, t, y)
    assert out["inter"] == pytest.approx(inter, rel=1e-5) and out["intra"] == pytest.approx(intra, rel=1e-5)


def test_hand_z_score_is_unbiased():
    """The z-score divides by the unbiased std (C - 1), the reference's torch.std default."""
    z = hand_zscore(torch.tensor([[1.0, 2.0, 4.0]]))[0]
    # mean 7/3, deviations (-4/3, -1/3, 5/3), unbiased variance (16 + 1 + 25) / 9 / 2 = 7/3
    sd = math.sqrt(7 / 3)
    assert z.tolist() == pytest.approx([(-4 / 3) / sd, (-1 / 3) / sd, (5 / 3) / sd], rel=1e-6)


STANDARDISED = {
    "kd": (lambda: KD(T=2.0, logit_stand=True), ("soft",)),
    "dkd": (lambda: DKD(T=2.0, warmup=0, logit_stand=True), ("tckd", "nckd")),
    "dist": (lambda: DIST(T=2.0, logit_stand=True), ("inter", "intra")),
}


@pytest.mark.parametrize("name", sorted(STANDARDISED))
def test_standardised_losses_are_shift_and_scale_invariant(name):
    """Adding a constant to, or scaling by a positive number, a sample's logits leaves the standardised
    distillation terms unchanged (the paper's claim); without the option they change."""
    make, parts = STANDARDISED[name]
    s, t = logits(seed=15)
    y = torch.tensor([0, 1, 2, 3])
    base = run(make(), s, t, y)
    shift = torch.tensor([[3.0], [-7.0], [0.25], [100.0]])
    scale = torch.tensor([[0.5], [4.0], [1.0], [10.0]])
    for s2, t2 in ((s + shift, t), (s * scale, t), (s * 3 + 1, t * 0.2 - 5)):
        moved = run(make(), s2, t2, y)
        for part in parts:
            assert moved[part] == pytest.approx(base[part], rel=1e-4, abs=1e-6), part
    plain = make()
    plain.logit_stand = False
    before, after = run(plain, s, t, y), run(plain, s * scale, t, y)
    assert any(abs(before[p] - after[p]) > 1e-3 for p in parts)


# --------------------------------------------------------------------------- options and configs


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (DKD, {"alpha": -1}, "method.alpha=-1"),
    (DKD, {"beta": -0.5}, "method.beta=-0.5"),
    (DKD, {"T": 0}, "method.T=0"),
    (DKD, {"T": -2}, "method.T=-2"),
    (DKD, {"warmup": -1}, "method.warmup=-1"),
    (DKD, {"warmup": "soon"}, "method.warmup='soon'"),
    (DKD, {"ce_weight": -1}, "method.ce_weight=-1"),
    (DKD, {"logit_stand": "yes"}, "method.logit_stand='yes'"),
    (DKD, {"alpha": float("nan")}, "method.alpha=nan"),
    (DIST, {"beta": -1}, "method.beta=-1"),
    (DIST, {"gamma": -1}, "method.gamma=-1"),
    (DIST, {"T": 0.0}, "method.T=0"),
    (DIST, {"logit_stand": 1}, "method.logit_stand=1"),
    (KD, {"logit_stand": "true"}, "method.logit_stand='true'"),
    (KD, {"logit_stand": None}, "method.logit_stand=None"),
])
def test_bad_values_are_one_line_user_errors(cls, kwargs, message):
    with pytest.raises(UserError) as err:
        cls(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "expected"), [
    ("dkd", {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20, "ce_weight": 1.0, "logit_stand": False}),
    ("dist", {"beta": 2.0, "gamma": 2.0, "T": 4.0, "ce_weight": 1.0, "logit_stand": False}),
    ("kd", {"T": 2.0, "soft_weight": 0.25, "ce_weight": 0.75, "logit_stand": False}),
])
def test_yaml_defaults_build(name, expected):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    method = build_method(cfg)
    assert method.name == name and method.needs_teacher
    for key, value in expected.items():
        assert getattr(method, key) == value
    cfg.logit_stand = True
    assert build_method(cfg).logit_stand is True


def test_dkd_composes_with_kd():
    cfg = OmegaConf.create({"name": "kd", "logit_stand": True,
                            "add": {"dkd": {"name": "dkd", "warmup": 0, "logit_stand": True}}})
    method = build_method(cfg)
    s, t = logits(seed=16)
    y = torch.tensor([0, 1, 2, 3])
    out = method.loss(Outputs(s), Outputs(t), Batch.of(y), nn.ModuleDict({"kd": nn.ModuleDict(),
                                                                          "dkd": nn.ModuleDict()}))
    assert {"soft", "ce", "dkd.tckd", "dkd.nckd", "total"} <= set(out)
    tckd, nckd = hand_dkd(hand_zscore(s), hand_zscore(t), y, 4.0)
    soft = hand_kd(hand_zscore(s), hand_zscore(t), 2.0)
    assert float(out["total"]) == pytest.approx(0.25 * soft + 0.75 * hand_ce(s, y) + tckd + 8 * nckd, rel=1e-5)


# --------------------------------------------------------------------------- real model pairs


@functools.cache
def model(name: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), (3, 32, 32), classes)


METHODS = {
    "kd": lambda: KD(logit_stand=True),
    "dkd": lambda: DKD(),
    "dist": lambda: DIST(logit_stand=True),
}


@pytest.mark.parametrize(("teacher_name", "student_name", "classes"), [
    ("deep_nn", "light_nn", 10),
    ("wrn_40_2", "wrn_16_2", 100),
    ("resnet56", "resnet20", 100),
])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_real_pairs_train(teacher_name, student_name, classes, method_name):
    teacher, student = model(teacher_name, classes).eval(), model(student_name, classes).train()
    method = METHODS[method_name]()
    method.bind(student, teacher)
    assert method.student_taps == [] and method.teacher_taps == []
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([0, 1, 1])
    with torch.no_grad(), Taps(teacher, method.teacher_taps, "teacher") as taps:
        t_out = Outputs(teacher(x), method.reduce_teacher(taps.take()))
    with Taps(student, method.student_taps, "student") as taps:
        s_logits = student(x)
        s_out = Outputs(s_logits, taps.take())
    setup = Setup({}, {}, num_classes=classes, n_train=3, train_targets=y, student=student, teacher=teacher)
    extra = method.extra_modules(setup)
    assert not list(extra.parameters())  # logit methods train nothing besides the student
    student.zero_grad()
    out = method.loss(s_out, t_out, Batch.of(y, epoch=5.0), extra)
    assert out["total"].shape == () and all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
