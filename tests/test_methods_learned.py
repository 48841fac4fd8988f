"""The learned-module methods VID and CRD: losses checked against the papers' formulas written out by hand,
CRD's memory bank and negative sampling, bad options, and real model pairs end to end (loss + backward)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CONF
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, Outputs, Setup
from kd_runner.methods.crd import CRD, contrast_loss
from kd_runner.methods.registry import build_method
from kd_runner.methods.vid import VID
from kd_runner.models import build_model
from kd_runner.taps import Taps


def hand_ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    rows = logits.tolist()
    terms = [math.log(sum(math.exp(v) for v in row)) - row[int(y)] for row, y in zip(rows, targets, strict=True)]
    return sum(terms) / len(terms)


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


# --------------------------------------------------------------------------- VID


def vid_extra(method: VID, s_shapes: dict, t_shapes: dict) -> nn.Module:
    return method.extra_modules(Setup({k: torch.Size(v) for k, v in s_shapes.items()},
                                      {k: torch.Size(v) for k, v in t_shapes.items()}))


def test_vid_initial_variance_is_init_pred_var():
    method = VID("a", "b", init_pred_var=5.0, eps=1e-5)
    extra = vid_extra(method, {"a": (2, 3, 4, 4)}, {"b": (2, 6, 4, 4)})
    (reg,) = extra["regressors"]
    var = [softplus(v) + 1e-5 for v in reg.log_scale.tolist()]
    assert len(var) == 6 and all(v == pytest.approx(5.0, rel=1e-6) for v in var)
    convs = [m for m in reg.regressor if isinstance(m, nn.Conv2d)]
    # RepDistiller VIDLoss(s, t, t): 1x1 convs s->t->t->t, no bias, ReLU between
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (3, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert [type(m).__name__ for m in reg.regressor] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]


def test_vid_scalar_case_by_hand():
    """One channel everywhere: mu = w3 * relu(w2 * relu(w1 * s)), written out with math."""
    method = VID("a", "b", vid_weight=2.0, ce_weight=0.5, eps=1e-5)
    extra = vid_extra(method, {"a": (2, 1, 1, 2)}, {"b": (2, 1, 1, 2)})
    (reg,) = extra["regressors"]
    w1, w2, w3, ls = 2.0, -0.5, 3.0, 0.3
    with torch.no_grad():
        for conv, w in zip([reg.regressor[0], reg.regressor[2], reg.regressor[4]], [w1, w2, w3], strict=True):
            conv.weight.fill_(w)
        reg.log_scale.fill_(ls)
    s = [[1.0, -1.0], [0.5, -2.0]]
    t = [[0.2, 0.0], [1.0, -1.0]]
    var = math.log(1 + math.exp(ls)) + 1e-5
    terms = []
    for srow, trow in zip(s, t, strict=True):
        for sv, tv in zip(srow, trow, strict=True):
            mu = w3 * max(0.0, w2 * max(0.0, w1 * sv))
            terms.append(0.5 * ((mu - tv) ** 2 / var + math.log(var)))
    vid = sum(terms) / len(terms)
    logits, y = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([2, 0])
    out = method.loss(Outputs(logits, {"a": torch.tensor(s).view(2, 1, 1, 2)}),
                      Outputs(logits, {"b": torch.tensor(t).view(2, 1, 1, 2)}), Batch.of(y), extra)
    assert num(out["vid"]) == pytest.approx(vid, rel=1e-6)
    assert num(out["ce"]) == pytest.approx(hand_ce(logits, y), rel=1e-6)
    assert num(out["total"]) == pytest.approx(2.0 * vid + 0.5 * hand_ce(logits, y), rel=1e-6)


def hand_vid(s: torch.Tensor, t: torch.Tensor, reg, eps: float) -> torch.Tensor:
    """Gaussian NLL of ``t`` given the regressor's mean of ``s``, per pixel with explicit matrix products."""
    w1, w2, w3 = (reg.regressor[i].weight[:, :, 0, 0].detach() for i in (0, 2, 4))
    x = s.permute(0, 2, 3, 1)  # N H W C: a 1x1 conv is a matrix product per pixel
    mu = torch.relu(torch.relu(x @ w1.T) @ w2.T) @ w3.T
    var = torch.log(1 + torch.exp(reg.log_scale.detach())) + eps
    nll = 0.5 * ((mu - t.permute(0, 2, 3, 1)) ** 2 / var + torch.log(var))
    return nll.sum() / nll.numel()


def test_vid_two_pairs_sum_and_pooling_by_hand():
    torch.manual_seed(0)
    method = VID(["s1", "s2"], ["t1", "t2"], vid_weight=1.0, ce_weight=0.0, eps=1e-3)
    # pair 1: student grid 4x4 > teacher 2x2 (student pooled); pair 2: teacher 4x4 > student 2x2 (teacher pooled)
    extra = vid_extra(method, {"s1": (3, 2, 4, 4), "s2": (3, 3, 2, 2)}, {"t1": (3, 4, 2, 2), "t2": (3, 2, 4, 4)})
    with torch.no_grad():
        for p in extra.parameters():
            p.copy_(torch.randn_like(p))
    s1, s2 = torch.randn(3, 2, 4, 4), torch.randn(3, 3, 2, 2)
    t1, t2 = torch.randn(3, 4, 2, 2), torch.randn(3, 2, 4, 4)

    def pool2(x):  # 2x2 block means, by hand
        return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4

    r1, r2 = extra["regressors"]
    want = hand_vid(pool2(s1), t1, r1, 1e-3) + hand_vid(s2, pool2(t2), r2, 1e-3)
    logits, y = torch.zeros(3, 5), torch.tensor([0, 1, 4])
    student = Outputs(logits, {"s1": s1, "s2": s2})
    reduced = method.reduce_teacher({"t1": t1, "t2": t2})
    assert reduced["t1"] is t1 and reduced["t2"].shape == (3, 2, 2, 2)  # pooled once, before any cache
    torch.testing.assert_close(reduced["t2"], pool2(t2))
    via_reduce = method.loss(student, Outputs(logits, reduced), Batch.of(y), extra)
    raw = method.loss(student, Outputs(logits, {"t1": t1, "t2": t2}), Batch.of(y), extra)  # loss pools itself
    assert num(via_reduce["vid"]) == pytest.approx(float(want), rel=1e-5)
    assert num(raw["vid"]) == pytest.approx(float(want), rel=1e-5)
    assert num(via_reduce["total"]) == pytest.approx(float(want), rel=1e-5)  # ce_weight 0


def test_vid_vectors_are_1x1_maps_and_batch_of_one():
    torch.manual_seed(1)
    method = VID("e", "e", eps=1e-5)
    extra = vid_extra(method, {"e": (2, 3)}, {"e": (2, 5)})
    s, t = torch.randn(1, 3), torch.randn(1, 5)
    out = method.loss(Outputs(torch.randn(1, 4), {"e": s}), Outputs(torch.randn(1, 4), {"e": t}),
                      Batch.of(torch.tensor([3])), extra)
    (reg,) = extra["regressors"]
    want = hand_vid(s[:, :, None, None], t[:, :, None, None], reg, 1e-5)
    assert num(out["vid"]) == pytest.approx(float(want), rel=1e-5)


def test_vid_gradients_reach_regressor_and_variance():
    torch.manual_seed(2)
    method = VID("a", "b")
    extra = vid_extra(method, {"a": (2, 3, 4, 4)}, {"b": (2, 4, 4, 4)})
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = method.loss(Outputs(torch.randn(2, 3), {"a": s}), Outputs(torch.randn(2, 3), {"b": torch.randn(2, 4, 4, 4)}),
                      Batch.of(torch.tensor([0, 1])), extra)
    out["total"].backward()
    (reg,) = extra["regressors"]
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert reg.log_scale.grad is not None and reg.log_scale.grad.abs().sum() > 0
    assert all(p.grad is not None for p in reg.regressor.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"vid_weight": -1}, "method.vid_weight=-1 is invalid"),
    ({"ce_weight": -0.5}, "method.ce_weight=-0.5 is invalid"),
    ({"eps": -1e-5}, "method.eps=-1e-05 is invalid"),
    ({"init_pred_var": 0.0}, "method.init_pred_var=0 is invalid"),
    ({"init_pred_var": 1e-6, "eps": 1e-5}, "method.init_pred_var=1e-06 is invalid.*> method.eps"),
    ({"init_pred_var": "big"}, "method.init_pred_var='big' is invalid"),
])
def test_vid_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        VID(**kwargs)
    assert "\n" not in str(err.value)


def test_vid_unpairable_shapes_are_one_line():
    with pytest.raises(UserError, match="method=vid: student layer 'a' output .* teacher layer 'b'") as err:
        vid_extra(VID("a", "b"), {"a": (2, 8)}, {"b": (2, 4, 2, 2)})
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- CRD


def crd_extra(method: CRD, targets: list[int], s_dim: int = 3, t_dim: int = 5, classes: int = 0) -> nn.Module:
    return method.extra_modules(Setup({method.student_layer: torch.Size([2, s_dim])},
                                      {method.teacher_layer: torch.Size([2, t_dim])},
                                      num_classes=classes, n_train=len(targets), train_targets=torch.tensor(targets)))


def test_crd_embed_head_by_hand():
    method = CRD("f", "g", feat_dim=2, nce_k=2)
    extra = crd_extra(method, [0, 1, 0, 1, 2], s_dim=3)
    head = extra["embed_s"]
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        head.linear.bias.copy_(torch.tensor([0.5, 0.0]))
    x = [[1.0, 2.0, 3.0], [0.0, 0.0, -1.0]]
    got = head(torch.tensor(x))
    for row, out in zip(x, got.tolist(), strict=True):
        y = [row[0] + 2 * row[2] + 0.5, -row[1] + row[2]]
        norm = math.sqrt(y[0] ** 2 + y[1] ** 2)
        assert out == pytest.approx([y[0] / norm, y[1] / norm], rel=1e-6)
    # a map is flattened first (RepDistiller Embed: x.view(N, -1))
    m = CRD("f", "g", feat_dim=4, nce_k=2)
    e = m.extra_modules(Setup({"f": torch.Size([2, 2, 3, 3])}, {"g": torch.Size([2, 7])}, n_train=5,
                              train_targets=torch.tensor([0, 1, 0, 1, 2])))
    assert e["embed_s"].linear.in_features == 18 and e["embed_t"].linear.in_features == 7
    assert e["memory"].memory_s.shape == (5, 4) and e["memory"].memory_t.shape == (5, 4)


def test_contrast_loss_eq18_by_hand():
    x = [[0.5, 0.1, 0.02], [0.05, 0.3, 0.001]]
    n_data, eps = 10, 1e-7
    m = 2
    pn = 1 / n_data
    total = 0.0
    for row in x:
        total += math.log(row[0] / (row[0] + m * pn + eps))
        total += sum(math.log(m * pn / (p + m * pn + eps)) for p in row[1:])
    want = -total / len(x)
    assert float(contrast_loss(torch.tensor(x, dtype=torch.float64), n_data)) == pytest.approx(want, rel=1e-9)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def hand_side(anchors, bank, rows, T, n_data, z=None):
    """(loss, Z) of one side: anchors against bank rows ``rows`` (positive first), Eq. 18 with Z from these scores
    unless given."""
    scores = [[math.exp(dot(bank[r], a) / T) for r in rs] for a, rs in zip(anchors, rows, strict=True)]
    if z is None:
        z = n_data * sum(sum(s) for s in scores) / sum(len(s) for s in scores)
    m = len(rows[0]) - 1
    mpn = m / n_data
    total = 0.0
    for s in scores:
        p = [v / z for v in s]
        total += math.log(p[0] / (p[0] + mpn + 1e-7)) + sum(math.log(mpn / (q + mpn + 1e-7)) for q in p[1:])
    return -total / len(rows), z


def test_crd_nce_with_fixed_memory_and_negatives_by_hand():
    torch.manual_seed(3)
    T, mom = 0.5, 0.25
    method = CRD("f", "g", feat_dim=3, nce_k=2, nce_t=T, nce_m=mom, crd_weight=0.8, ce_weight=1.0)
    targets = [0, 1, 2, 0, 1, 2]
    extra = crd_extra(method, targets, s_dim=3, t_dim=3)
    with torch.no_grad():  # identity heads: the embedding is the normalised input
        for head in (extra["embed_s"], extra["embed_t"]):
            head.linear.weight.copy_(torch.eye(3))
            head.linear.bias.zero_()
    mem = extra["memory"]
    bank_s = [unit([math.cos(i), math.sin(i), 0.5]) for i in range(6)]
    bank_t = [unit([0.3, math.sin(2 * i), math.cos(i)]) for i in range(6)]
    mem.memory_s.copy_(torch.tensor(bank_s))
    mem.memory_t.copy_(torch.tensor(bank_t))
    f_s, f_t = [[1.0, 2.0, -1.0], [0.0, 1.0, 1.0]], [[2.0, 0.0, 1.0], [-1.0, 1.0, 0.5]]
    e_s, e_t = [unit(v) for v in f_s], [unit(v) for v in f_t]
    index, rows = [0, 4], [[0, 1, 2], [4, 0, 5]]  # positive = own row, then other-class rows
    out = method.contrast(torch.tensor(f_s), torch.tensor(f_t), torch.tensor(index), torch.tensor(rows), extra)
    loss_s, z_s = hand_side(e_s, bank_t, rows, T, 6)  # student anchor against the teacher bank
    loss_t, z_t = hand_side(e_t, bank_s, rows, T, 6)  # teacher anchor against the student bank
    assert num(out["crd_s"]) == pytest.approx(loss_s, rel=1e-5)
    assert num(out["crd_t"]) == pytest.approx(loss_t, rel=1e-5)
    assert num(out["crd"]) == pytest.approx(loss_s + loss_t, rel=1e-5)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    # the rows of the batch moved by momentum and were renormalised; the others are untouched
    for bank, buf, emb in ((bank_s, mem.memory_s, e_s), (bank_t, mem.memory_t, e_t)):
        new = [r[:] for r in bank]
        for i, e in zip(index, emb, strict=True):
            new[i] = unit([mom * a + (1 - mom) * b for a, b in zip(bank[i], e, strict=True)])
        assert buf.tolist() == [pytest.approx(r, abs=1e-6) for r in new]
        bank[:] = new

    # a second batch keeps Z from the first and reads the updated banks
    f_s2, f_t2 = [[0.5, -1.0, 2.0]], [[1.0, 1.0, 1.0]]
    logits, y = torch.tensor([[0.2, -0.3, 1.0]]), torch.tensor([1])
    out2 = method.contrast(torch.tensor(f_s2), torch.tensor(f_t2), torch.tensor([1]), torch.tensor([[1, 3, 0]]),
                           extra)
    l_s2, _ = hand_side([unit(f_s2[0])], bank_t, [[1, 3, 0]], T, 6, z=z_s)
    l_t2, _ = hand_side([unit(f_t2[0])], bank_s, [[1, 3, 0]], T, 6, z=z_t)
    assert num(out2["crd"]) == pytest.approx(l_s2 + l_t2, rel=1e-5)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    # the whole loss: 0.8 * crd + 1.0 * CE, batch of one, with negatives drawn by the method
    full = method.loss(Outputs(logits, {"f": torch.tensor(f_s2)}), Outputs(logits, {"g": torch.tensor(f_t2)}),
                       Batch(y, torch.tensor([1]), torch.tensor(1.0)), extra)
    assert num(full["total"]) == pytest.approx(0.8 * num(full["crd"]) + hand_ce(logits, y), rel=1e-6)
    assert set(full) == {"total", "crd", "crd_s", "crd_t", "ce"}


def test_crd_momentum_zero_copies_the_embedding():
    method = CRD("f", "g", feat_dim=2, nce_k=1, nce_m=0.0)
    extra = crd_extra(method, [0, 1, 1], s_dim=2, t_dim=2)
    with torch.no_grad():
        for head in (extra["embed_s"], extra["embed_t"]):
            head.linear.weight.copy_(torch.eye(2))
            head.linear.bias.zero_()
    before = extra["memory"].memory_s.clone()
    method.contrast(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, -2.0]]), torch.tensor([2]),
                    torch.tensor([[2, 0]]), extra)
    assert extra["memory"].memory_s[2].tolist() == pytest.approx([0.6, 0.8])
    assert extra["memory"].memory_t[2].tolist() == pytest.approx([0.0, -1.0])
    assert torch.equal(extra["memory"].memory_s[:2], before[:2])


def test_crd_memory_init_is_the_references_uniform():
    torch.manual_seed(4)
    method = CRD("f", "g", feat_dim=12, nce_k=10)
    mem = crd_extra(method, [i % 3 for i in range(200)])["memory"]
    stdv = 1 / math.sqrt(12 / 3)
    for bank in (mem.memory_s, mem.memory_t):
        assert float(bank.min()) >= -stdv and float(bank.max()) <= stdv and float(bank.max()) > 0.9 * stdv
    assert not torch.equal(mem.memory_s, mem.memory_t)
    assert mem.z.tolist() == [-1.0, -1.0]
    assert set(mem.state_dict()) == {"memory_s", "memory_t", "z"}  # index tables are rebuilt, not saved


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_crd_negatives_come_from_other_classes_uniformly(mode):
    torch.manual_seed(5)
    targets = torch.tensor([0] * 5 + [1] * 12 + [3] * 3 + [2] * 10)[torch.randperm(30)]  # class 4 absent
    method = CRD("f", "g", feat_dim=2, nce_k=29, mode=mode)
    mem = crd_extra(method, targets.tolist(), classes=5)["memory"]
    index = torch.arange(30).repeat(40)  # every sample as an anchor, 40 times
    drawn = mem.sample(index, targets[index], 29, mode)
    assert drawn.shape == (1200, 30) and drawn.dtype == torch.long
    neg, y = drawn[:, 1:], targets[index]
    assert bool((targets[neg] != y[:, None]).all())  # never the anchor's class
    assert bool(((neg >= 0) & (neg < 30)).all())
    if mode == "exact":
        assert torch.equal(drawn[:, 0], index)
    else:
        assert bool((targets[drawn[:, 0]] == y).all())
        assert bool((drawn[:, 0] != index).any())  # another sample of the class, sometimes
    # uniform over the other classes' samples: per anchor class, each allowed index is drawn ~equally often
    for c in (0, 1, 2, 3):
        rows = neg[y == c].reshape(-1)
        counts = torch.bincount(rows, minlength=30).float()
        allowed = targets != c
        assert bool((counts[~allowed] == 0).all())
        expected = rows.numel() / int(allowed.sum())
        assert float((counts[allowed] - expected).abs().max()) < 0.25 * expected


def test_crd_under_autocast_stays_float32():
    method = CRD("f", "g", feat_dim=4, nce_k=3)
    extra = crd_extra(method, [0, 1, 2, 0, 1], s_dim=6, t_dim=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.loss(Outputs(torch.randn(2, 3), {"f": torch.randn(2, 6)}),
                          Outputs(torch.randn(2, 3), {"g": torch.randn(2, 6)}),
                          Batch(torch.tensor([0, 2]), torch.tensor([0, 2]), torch.tensor(1.0)), extra)
    assert out["crd"].dtype == torch.float32 and torch.isfinite(out["total"])
    assert extra["memory"].memory_s.dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"feat_dim": 0}, "method.feat_dim=0 is invalid"),
    ({"feat_dim": 1.5}, "method.feat_dim=1.5 is invalid"),
    ({"nce_k": 0}, "method.nce_k=0 is invalid"),
    ({"nce_t": 0}, "method.nce_t=0 is invalid"),
    ({"nce_t": -0.07}, "method.nce_t=-0.07 is invalid"),
    ({"nce_m": 1.0}, r"method.nce_m=1 is invalid.*\[0, 1\)"),
    ({"nce_m": -0.1}, "method.nce_m=-0.1 is invalid"),
    ({"mode": "loose"}, "method.mode='loose' is invalid; valid: exact, relax"),
    ({"crd_weight": -0.8}, "method.crd_weight=-0.8 is invalid"),
])
def test_crd_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        CRD(**kwargs)
    assert "\n" not in str(err.value)


def test_crd_bank_larger_than_the_dataset_is_one_line():
    with pytest.raises(UserError, match=r"method.nce_k=16384 is invalid for a training split of 100 images.*"
                                        r"method.nce_k < 100") as err:
        crd_extra(CRD("f", "g"), [i % 10 for i in range(100)])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="method.nce_k=4 is invalid for a training split of 4 images"):
        crd_extra(CRD("f", "g", nce_k=4), [0, 1, 0, 1])
    with pytest.raises(UserError, match="at least two classes"):
        crd_extra(CRD("f", "g", nce_k=2), [3, 3, 3, 3])
    with pytest.raises(UserError, match="needs the training split's labels"):
        CRD("f", "g", nce_k=2).extra_modules(Setup({"f": torch.Size([2, 3])}, {"g": torch.Size([2, 3])}))


# --------------------------------------------------------------------------- real model pairs


def model(name: str) -> nn.Module:
    return build_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), (3, 32, 32), 100)


PAIRS = [("light_nn", "deep_nn"), ("wrn_16_2", "wrn_40_2"), ("shufflev2", "resnet32x4")]


@pytest.fixture(scope="module")
def pairs():
    torch.manual_seed(6)
    return {p: (model(p[0]), model(p[1]).eval()) for p in PAIRS}


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[1]}->{p[0]}")
@pytest.mark.parametrize("name", ["vid", "crd"])
def test_defaults_bind_and_train_on_real_pairs(pairs, pair, name):
    torch.manual_seed(7)
    student, teacher = pairs[pair]
    student.train()
    student.zero_grad(set_to_none=True)
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    if name == "crd":
        cfg.nce_k = 32  # the default 16384 needs a training split larger than this test's 64 images
    method = build_method(cfg)
    method.bind(student, teacher)
    n_train, n = 64, 3
    train_targets = torch.randint(0, 100, (n_train,))
    index = torch.tensor([5, 17, 40])
    x = torch.rand(n, 3, 32, 32)
    with Taps(student, method.student_taps, "student") as s_taps:
        logits = student(x)
        s_feats = s_taps.take()
    with torch.no_grad(), Taps(teacher, method.teacher_taps, "teacher") as t_taps:
        t_logits = teacher(x)
        t_feats = t_taps.take()
    setup = Setup({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()},
                  num_classes=100, n_train=n_train, train_targets=train_targets, student=student, teacher=teacher)
    extra = method.extra_modules(setup)
    reduced = method.reduce_teacher(t_feats)
    if name == "vid":
        for s_name, t_name in zip(method.student_layers, method.teacher_layers, strict=True):
            assert reduced[t_name].shape[2:] == s_feats[s_name].shape[2:]  # each student grid <= its teacher's
        assert len(extra["regressors"]) == len(method.student_layers) >= 2
    out = method.loss(Outputs(logits, s_feats), Outputs(t_logits, reduced),
                      Batch(train_targets[index], index, torch.tensor(1.0)), extra)
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3]) and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    extra_grads = [p.grad for p in extra.parameters()]
    assert extra_grads and all(g is not None and float(g.abs().sum()) > 0 for g in extra_grads)
    if name == "crd":
        assert extra["memory"].memory_s.shape == (n_train, 128)
        assert bool((extra["memory"].z > 0).all())
