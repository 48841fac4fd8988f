"""Feature methods AT, SP, NST, PKT, RKD: losses against the papers' formulas worked by hand (plain Python
math on small tensors), edge cases, bad options, and shapes/gradients on real teacher -> student pairs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CONF
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.methods.at import AT
from kd_runner.methods.base import Batch, Outputs, Setup
from kd_runner.methods.nst import NST
from kd_runner.methods.pkt import PKT
from kd_runner.methods.registry import build_method
from kd_runner.methods.rkd import RKD
from kd_runner.methods.sp import SP
from kd_runner.models import build_model
from kd_runner.taps import Taps

REL = 1e-5  # the methods compute in float32


# --------------------------------------------------------------------------- plain-math helpers


def rand(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64)


def hand_ce(logits: torch.Tensor, targets: list[int]) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), targets, strict=True):
        z = sum(math.exp(v) for v in row)
        total += -(row[y] - math.log(z))
    return total / len(targets)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(dot(v, v))
    return [x / n for x in v] if n > 0 else [0.0 for _ in v]


def flat(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


def block_mean(f: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H/k, W/k): the mean of each k x k block, written out."""
    n, c, h, w = f.shape
    out = torch.zeros(n, c, h // k, w // k, dtype=f.dtype)
    for i in range(h // k):
        for j in range(w // k):
            out[:, :, i, j] = sum(f[:, :, i * k + a, j * k + b] for a in range(k) for b in range(k)) / (k * k)
    return out


def hand_attention(f: torch.Tensor, p: float = 2.0) -> list[list[float]]:
    """Per sample: the channel mean of |f|^p at every position, divided by its L2 norm."""
    n, c, h, w = f.shape
    out = []
    for s in range(n):
        a = [sum(abs(float(f[s, ch, i, j])) ** p for ch in range(c)) / c for i in range(h) for j in range(w)]
        out.append(unit(a))
    return out


def hand_at(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> float:
    a_s, a_t = hand_attention(f_s, p), hand_attention(f_t, p)
    diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t, strict=True) for x, y in zip(rs, rt, strict=True)]
    return sum(diffs) / len(diffs)


def hand_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    def gram(rows):
        g = [[dot(a, b) for b in rows] for a in rows]
        return [unit(r) for r in g]

    gs, gt = gram(flat(f_s)), gram(flat(f_t))
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def hand_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Squared MMD with k(x, y) = (x . y)^2 between the L2-normalised channel maps, averaged over the batch."""
    def k_mean(xs, ys):
        return sum(dot(x, y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

    total = 0.0
    for n in range(f_s.shape[0]):
        s = [unit(ch) for ch in f_s[n].reshape(f_s.shape[1], -1).tolist()]
        t = [unit(ch) for ch in f_t[n].reshape(f_t.shape[1], -1).tolist()]
        total += k_mean(t, t) + k_mean(s, s) - 2 * k_mean(s, t)
    return total / f_s.shape[0]


def hand_pkt(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> float:
    def probs(rows):
        normed = [[x / (math.sqrt(dot(r, r)) + eps) for x in r] for r in rows]
        k = [[(dot(a, b) + 1) / 2 for b in normed] for a in normed]
        return [[v / sum(r) for v in r] for r in k]

    ps, pt = probs(flat(f_s)), probs(flat(f_t))
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def hand_rkd(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False) -> tuple[float, float]:
    """(distance loss, angle loss) from the paper: distances over their mean, triplet angle cosines."""
    def dists(rows):
        b = len(rows)
        d = [[math.dist(rows[i], rows[j]) ** (2 if squared else 1) if i != j else 0.0 for j in range(b)]
             for i in range(b)]
        pos = [v for r in d for v in r if v > 0]
        mean = sum(pos) / len(pos)
        return [[v / mean for v in r] for r in d]

    def cosines(rows):
        b = len(rows)
        out = []
        for i in range(b):
            u = [unit([x - y for x, y in zip(rows[j], rows[i], strict=True)]) for j in range(b)]
            out += [dot(u[j], u[k]) for j in range(b) for k in range(b)]
        return out

    s, t = flat(f_s), flat(f_t)
    ds, dt = dists(s), dists(t)
    b = len(s)
    distance = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    cs, ct = cosines(s), cosines(t)
    angle = sum(smooth_l1(x - y) for x, y in zip(cs, ct, strict=True)) / len(cs)
    return distance, angle


def run_loss(method, s_feats: dict, t_feats: dict, logits: torch.Tensor, targets: list[int], extra=None):
    return method.loss(Outputs(logits, s_feats), Outputs(logits * 0.5, t_feats), Batch.of(torch.tensor(targets)),
                       extra if extra is not None else nn.ModuleDict())


LOGITS = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2], [2.0, 0.1, 0.0]], dtype=torch.float64)
TARGETS = [0, 0, 1]  # class 2 is absent from the batch


# --------------------------------------------------------------------------- AT


def at_method(s_names, t_names, **kw) -> AT:
    """Layer names, not layer sets: usable without bind()."""
    return AT(s_names, t_names, **kw)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_is_the_sum_over_layers_of_mean_squared_attention_differences(p):
    s1, t1 = rand(3, 2, 2, 3, seed=1) - 0.5, rand(3, 4, 2, 3, seed=2) - 0.5  # signed: |f|^p matters for odd p
    s2, t2 = rand(3, 3, 2, 2, seed=3), rand(3, 5, 2, 2, seed=4)
    m = at_method(["a", "b"], ["x", "y"], p=p, feat_weight=7.0, ce_weight=0.3)
    out = run_loss(m, {"a": s1, "b": s2}, {"x": t1, "y": t2}, LOGITS, TARGETS)
    at = hand_at(s1, t1, p) + hand_at(s2, t2, p)
    assert float(out["at"]) == pytest.approx(at, rel=REL)
    assert float(out["ce"]) == pytest.approx(hand_ce(LOGITS, TARGETS), rel=REL)
    assert float(out["total"]) == pytest.approx(7.0 * at + 0.3 * hand_ce(LOGITS, TARGETS), rel=REL)


@pytest.mark.parametrize("student_bigger", [False, True])
def test_at_pools_the_larger_map_and_reduce_teacher_keeps_only_attention(student_bigger):
    small, big = rand(2, 3, 2, 2, seed=5), rand(2, 6, 4, 4, seed=6)
    f_s, f_t = (big, small) if student_bigger else (small, big)
    m = at_method(["s"], ["t"], feat_weight=1.0, ce_weight=0.0)
    m.extra_modules(Setup({"s": f_s.shape}, {"t": f_t.shape}))
    # by hand: the larger feature map is block-averaged to 2 x 2 before its attention map is taken
    expected = hand_at(block_mean(f_s, 2), f_t) if student_bigger else hand_at(f_s, block_mean(f_t, 2))
    reduced = m.reduce_teacher({"t": f_t})
    assert reduced["t"].shape == (2, 2, 2)  # (N, H, W) on the compared grid: no channels
    assert reduced["t"].numel() < f_t.numel()
    via_reduced = run_loss(m, {"s": f_s}, reduced, LOGITS[:2], [0, 1])["at"]
    via_raw = run_loss(m, {"s": f_s}, {"t": f_t}, LOGITS[:2], [0, 1])["at"]
    assert float(via_reduced) == pytest.approx(expected, rel=REL)
    assert float(via_raw) == pytest.approx(expected, rel=REL)


def test_at_teacher_cache_holds_attention_maps():
    from kd_runner.data.tensors import Normalizer, Split
    from kd_runner.engine import Env, TeacherOutputs

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16, 3))
    split = Split(torch.randint(0, 255, (10, 1, 4, 4), dtype=torch.uint8), torch.arange(10) % 3)
    env = Env(torch.device("cpu"), Normalizer((0.5,), (0.5,)), 4, 4, progress=False)
    m = at_method(["s"], ["0"])
    m.extra_modules(Setup({"s": torch.Size([2, 2, 2, 2])}, {"0": torch.Size([2, 6, 4, 4])}))
    cache = TeacherOutputs(teacher, m.teacher_taps, env, split, "cache", reduce=m.reduce_teacher)
    held = cache.cache.feats["0"]
    assert held.shape == (10, 2, 2)  # pooled to the student's 2 x 2 grid, channels gone
    with torch.no_grad():
        x = env.prepare(split.images)
        maps = teacher[0](x)
    assert torch.allclose(held.reshape(10, 4).norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.allclose(held.reshape(10, 4), torch.tensor(hand_attention(block_mean(maps.double(), 2))).float(),
                          atol=1e-6)


def test_at_teacher_layer_paired_with_two_grids_stays_raw():
    m = at_method(["s1", "s2"], ["t", "t"])
    t = rand(2, 4, 4, 4, seed=7)
    m.extra_modules(Setup({"s1": torch.Size([2, 3, 4, 4]), "s2": torch.Size([2, 3, 2, 2])}, {"t": t.shape}))
    assert m.reduce_teacher({"t": t})["t"] is t
    s1, s2 = rand(2, 3, 4, 4, seed=8), rand(2, 3, 2, 2, seed=9)
    out = run_loss(m, {"s1": s1, "s2": s2}, {"t": t}, LOGITS[:2], [1, 1])
    assert float(out["at"]) == pytest.approx(hand_at(s1, t) + hand_at(s2, block_mean(t, 2)), rel=REL)


def test_at_batch_of_one_and_identical_maps():
    f = rand(1, 3, 2, 2, seed=10)
    m = at_method(["s"], ["t"])
    out = run_loss(m, {"s": f}, {"t": f * 3.0}, LOGITS[:1], [2])  # same attention up to scale: zero loss
    assert float(out["at"]) == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(out["total"])


# --------------------------------------------------------------------------- SP


def test_sp_is_the_frobenius_gram_difference_over_b_squared():
    f_s, f_t = rand(4, 3, 2, 2, seed=11), rand(4, 5, 1, 1, seed=12)
    m = SP("s", "t", layer_index=None, feat_weight=3.0, ce_weight=2.0)
    logits = rand(4, 3, seed=13)
    out = run_loss(m, {"s": f_s}, {"t": f_t}, logits, [1, 1, 1, 0])
    sp = hand_sp(f_s, f_t)
    assert float(out["sp"]) == pytest.approx(sp, rel=REL)
    assert float(out["total"]) == pytest.approx(3.0 * sp + 2.0 * hand_ce(logits, [1, 1, 1, 0]), rel=REL)


def test_sp_batch_of_one_is_zero():
    out = run_loss(SP("s", "t", layer_index=None), {"s": rand(1, 6, seed=14)}, {"t": rand(1, 2, 2, 2, seed=15)},
                   LOGITS[:1], [0])
    assert float(out["sp"]) == pytest.approx(0.0, abs=1e-12) and torch.isfinite(out["total"])


def test_sp_layer_index_picks_one_layer_per_model_and_binds_again():
    deep, light, vgg8, r8 = (tiny(n) for n in ("deep_nn", "light_nn", "vgg8", "resnet8x4"))
    m = SP()
    m.bind(light, deep)
    assert (m.student_taps, m.teacher_taps) == (["features.5"], ["features.9"])
    m.bind(r8, vgg8)  # 3 stages vs 4: each model's last
    assert (m.student_layers, m.teacher_layers) == (["stage3"], ["stage4"])
    first = SP(layer_index=0)
    first.bind(r8, vgg8)
    assert (first.student_taps, first.teacher_taps) == (["stage1"], ["stage1"])
    every = SP(layer_index=None)
    every.bind(light, deep)
    assert every.student_layers == ["features.2", "features.5"]
    with pytest.raises(UserError, match="3 student layers"):
        SP(layer_index=None).bind(r8, vgg8)
    with pytest.raises(UserError, match=r"method\.layer_index=3 is invalid.*-3\.\.2"):
        SP(layer_index=3).bind(r8, vgg8)


# --------------------------------------------------------------------------- NST


def test_nst_is_the_polynomial_mmd_summed_over_layers():
    s1, t1 = rand(2, 3, 2, 2, seed=16), rand(2, 5, 2, 2, seed=17)
    s2, t2 = rand(2, 2, 4, 4, seed=18), rand(2, 4, 2, 2, seed=19)  # student map pooled 4x4 -> 2x2
    m = NST(["a", "b"], ["x", "y"], feat_weight=4.0, ce_weight=0.5)
    out = run_loss(m, {"a": s1, "b": s2}, {"x": t1, "y": t2}, LOGITS[:2], [2, 2])
    nst = hand_nst(s1, t1) + hand_nst(block_mean(s2, 2), t2)
    assert float(out["nst"]) == pytest.approx(nst, rel=REL)
    assert float(out["total"]) == pytest.approx(4.0 * nst + 0.5 * hand_ce(LOGITS[:2], [2, 2]), rel=REL)


def test_nst_teacher_bigger_is_pooled_and_same_maps_give_zero():
    s, t = rand(1, 3, 2, 2, seed=20), rand(1, 2, 4, 4, seed=21)
    out = run_loss(NST("s", "t"), {"s": s}, {"t": t}, LOGITS[:1], [0])
    assert float(out["nst"]) == pytest.approx(hand_nst(s, block_mean(t, 2)), rel=REL)
    same = run_loss(NST("s", "t"), {"s": s}, {"t": s.clone()}, LOGITS[:1], [0])
    assert float(same["nst"]) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- PKT


@pytest.mark.parametrize("eps", [1e-7, 0.1])
def test_pkt_is_the_kl_of_cosine_kernel_probabilities(eps):
    f_s, f_t = rand(4, 3, seed=22) - 0.5, rand(4, 6, seed=23) - 0.5
    m = PKT("s", "t", feat_weight=100.0, eps=eps, ce_weight=1.0)
    logits = rand(4, 3, seed=24)
    out = run_loss(m, {"s": f_s}, {"t": f_t}, logits, [0, 1, 0, 1])
    pkt = hand_pkt(f_s, f_t, eps)
    assert float(out["pkt"]) == pytest.approx(pkt, rel=REL)
    assert float(out["total"]) == pytest.approx(100.0 * pkt + hand_ce(logits, [0, 1, 0, 1]), rel=REL)


def test_pkt_batch_of_one_and_zero_vectors_are_finite():
    one = run_loss(PKT("s", "t"), {"s": rand(1, 4, seed=25)}, {"t": rand(1, 3, seed=26)}, LOGITS[:1], [0])
    assert float(one["pkt"]) == pytest.approx(0.0, abs=1e-9)
    zeros = run_loss(PKT("s", "t"), {"s": torch.zeros(3, 4)}, {"t": rand(3, 3, seed=27)}, LOGITS, TARGETS)
    assert torch.isfinite(zeros["total"])


# --------------------------------------------------------------------------- RKD


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_distance_and_angle_terms_match_the_paper(squared):
    f_s, f_t = rand(4, 3, seed=28) * 3, rand(4, 5, seed=29)
    m = RKD("s", "t", distance_weight=25.0, angle_weight=50.0, feat_weight=0.5, squared=squared, ce_weight=1.5)
    logits = rand(4, 3, seed=30)
    out = run_loss(m, {"s": f_s}, {"t": f_t}, logits, [2, 2, 0, 0])
    distance, angle = hand_rkd(f_s, f_t, squared)
    assert float(out["distance"]) == pytest.approx(distance, rel=REL)
    assert float(out["angle"]) == pytest.approx(angle, rel=REL)
    assert float(out["rkd"]) == pytest.approx(25 * distance + 50 * angle, rel=REL)
    assert float(out["total"]) == pytest.approx(0.5 * (25 * distance + 50 * angle)
                                                + 1.5 * hand_ce(logits, [2, 2, 0, 0]), rel=REL)


def test_rkd_scaled_student_has_zero_distance_loss():
    f = rand(5, 4, seed=31)
    out = run_loss(RKD("s", "t"), {"s": f * 10.0}, {"t": f}, rand(5, 3, seed=32), [0, 1, 2, 0, 1])
    assert float(out["distance"]) == pytest.approx(0.0, abs=1e-10)
    assert float(out["angle"]) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("feats", [
    (torch.rand(1, 4), torch.rand(1, 6)),  # one sample: no pair at all
    (torch.rand(2, 4), torch.rand(2, 6)),  # two samples: one distance, trivial angles
    (torch.ones(3, 4), torch.ones(3, 6)),  # every sample the same point
])
def test_rkd_degenerate_batches_are_finite_with_finite_gradients(feats):
    s, t = feats[0].clone().requires_grad_(True), feats[1]
    logits = torch.zeros(s.shape[0], 3, requires_grad=True)
    out = RKD("s", "t").loss(Outputs(logits, {"s": s}), Outputs(logits.detach(), {"t": t}),
                             Batch.of(torch.zeros(s.shape[0], dtype=torch.long)), nn.ModuleDict())
    assert all(torch.isfinite(v) for v in out.values())
    assert float(out["rkd"].detach()) == pytest.approx(0.0, abs=1e-6)
    out["total"].backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- all five: float32 under autocast


@pytest.mark.parametrize(("method", "s", "t"), [
    (AT("s", "t"), (4, 8, 4, 4), (4, 16, 4, 4)),
    (SP("s", "t", layer_index=None), (4, 8, 4, 4), (4, 16, 4, 4)),
    (NST("s", "t"), (4, 8, 4, 4), (4, 16, 4, 4)),
    (PKT("s", "t"), (4, 16), (4, 32)),
    (RKD("s", "t"), (4, 16), (4, 32)),
])
def test_feature_terms_stay_float32_under_bf16_autocast(method, s, t):
    f_s, f_t = torch.randn(*s), torch.randn(*t)
    logits = torch.randn(4, 3)
    plain = run_loss(method, {"s": f_s}, {"t": f_t}, logits, [0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run_loss(method, {"s": f_s}, {"t": f_t}, logits, [0, 1, 2, 0])
    part = method.name
    assert cast[part].dtype == torch.float32
    assert float(cast[part]) == pytest.approx(float(plain[part]), rel=1e-6)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("cls", "kwargs", "needle"), [
    (AT, {"p": 0}, "method.p=0 is invalid"),
    (AT, {"p": "two"}, "method.p='two' is invalid"),
    (AT, {"feat_weight": -1}, "method.feat_weight=-1 is invalid"),
    (AT, {"ce_weight": -0.5}, "method.ce_weight=-0.5 is invalid"),
    (SP, {"layer_index": 1.5}, "method.layer_index=1.5 is invalid"),
    (SP, {"layer_index": True}, "method.layer_index=True is invalid"),
    (SP, {"feat_weight": float("nan")}, "method.feat_weight=nan is invalid"),
    (NST, {"feat_weight": -50}, "method.feat_weight=-50 is invalid"),
    (PKT, {"eps": 0}, "method.eps=0 is invalid"),
    (PKT, {"feat_weight": -3}, "method.feat_weight=-3 is invalid"),
    (RKD, {"squared": "yes"}, "method.squared='yes' is invalid; valid: false, true"),
    (RKD, {"eps": -1e-12}, "method.eps=-1e-12 is invalid"),
    (RKD, {"distance_weight": -25}, "method.distance_weight=-25 is invalid"),
    (RKD, {"angle_weight": -50}, "method.angle_weight=-50 is invalid"),
])
def test_bad_options_are_one_line_errors_naming_the_value(cls, kwargs, needle):
    with pytest.raises(UserError) as err:
        cls(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cls", [AT, NST])
def test_map_methods_refuse_vectors_before_training(cls):
    m = cls("s", "t")
    with pytest.raises(UserError, match=rf"method={cls.name}: .*'t' output \(8,\).*conv feature maps"):
        m.extra_modules(Setup({"s": torch.Size([2, 4, 2, 2])}, {"t": torch.Size([2, 8])}))


@pytest.mark.parametrize(("name", "defaults"), [
    ("at", {"p": 2.0, "feat_weight": 1000.0, "ce_weight": 1.0, "student_layers": ["stages"]}),
    ("sp", {"layer_index": -1, "feat_weight": 3000.0, "ce_weight": 1.0, "student_layers": ["stages"]}),
    ("nst", {"feat_weight": 50.0, "ce_weight": 1.0, "teacher_layers": ["stages"]}),
    ("pkt", {"feat_weight": 30000.0, "eps": 1e-7, "ce_weight": 1.0, "student_layer": "embedding"}),
    ("rkd", {"distance_weight": 25.0, "angle_weight": 50.0, "feat_weight": 1.0, "squared": False, "eps": 1e-12,
             "ce_weight": 1.0, "teacher_layer": "embedding"}),
])
def test_yaml_defaults_are_the_references(name, defaults):
    m = build_method(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    assert m.name == name
    described = m.describe()
    assert {k: described[k] for k in defaults} == defaults


# --------------------------------------------------------------------------- real model pairs


_MODELS: dict[str, nn.Module] = {}


def tiny(name: str) -> nn.Module:
    """A zoo/tutorial model for 32x32 CIFAR-100 inputs, built once per test session."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = build_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), (3, 32, 32), 100)
    return _MODELS[name]


PAIRS = [("deep_nn", "light_nn"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "shufflev2")]


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_defaults_bind_build_and_backpropagate_on_model_pairs(teacher_name, student_name):
    teacher, student = tiny(teacher_name).eval(), tiny(student_name).train()
    methods = {name: build_method(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
               for name in ("at", "sp", "nst", "pkt", "rkd")}
    for method in methods.values():
        method.bind(student, teacher)
    s_taps = list(dict.fromkeys(t for m in methods.values() for t in m.student_taps))
    t_taps = list(dict.fromkeys(t for m in methods.values() for t in m.teacher_taps))
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 5, 99])
    with torch.no_grad(), Taps(teacher, t_taps, "teacher") as taps:  # one forward of each model serves all five
        t_logits = teacher(x)
        t_all = taps.take()
    student.zero_grad(set_to_none=True)
    with Taps(student, s_taps, "student") as taps:
        s_logits = student(x)
        s_all = taps.take()
    total = 0.0
    for name, method in methods.items():
        s_feats = {k: s_all[k] for k in method.student_taps}
        t_feats = {k: t_all[k] for k in method.teacher_taps}
        setup = Setup({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()},
                      num_classes=100, n_train=3, train_targets=y, student=student, teacher=teacher)
        extra = method.extra_modules(setup)
        assert not list(extra.parameters())  # these five have no trainable extras
        with torch.no_grad():
            reduced = method.reduce_teacher(dict(t_feats))
        if name == "at":  # the cache holds (N, H, W) attention maps on the compared grid, not the maps
            for s_name, t_name in zip(method.student_layers, method.teacher_layers, strict=True):
                assert reduced[t_name].shape == (3, *s_feats[s_name].shape[-2:])
                assert reduced[t_name].numel() < t_feats[t_name].numel()
            raw = method.loss(Outputs(s_logits, s_feats), Outputs(t_logits, t_feats), Batch.of(y), extra)
        method.ce_weight = 0.0  # the gradients below come from the feature term alone
        out = method.loss(Outputs(s_logits, s_feats), Outputs(t_logits, reduced), Batch.of(y), extra)
        if name == "at":
            assert float(out[name].detach()) == pytest.approx(float(raw[name].detach()), rel=1e-5)
        assert all(torch.isfinite(v) for v in out.values()), name
        assert float(out[name].detach()) > 0, name
        grads = torch.autograd.grad(out["total"], list(s_feats.values()), retain_graph=True)
        for g in grads:  # every tapped student map receives a finite, non-zero gradient
            assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        total = total + out["total"]
    total.backward()  # and through the student down to its first layer
    first = next(p for p in student.parameters())
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
