"""OFD (Heo et al. 2019) and ReviewKD (Chen et al. 2021): losses by hand, defaults, errors, real model pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, Outputs, Setup
from kd_runner.methods.ofd import OFD, Margins
from kd_runner.methods.registry import build_method
from kd_runner.methods.reviewkd import ReviewKD, abf_plan
from kd_runner.models import build_model
from kd_runner.taps import Taps

PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"), ("resnet32x4", "shufflev2")]


def model(name: str) -> nn.Module:
    return build_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), (3, 32, 32), 100)


def method(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return build_method(cfg)


def probe(net: nn.Module, taps: list[str], x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, dict]:
    with torch.set_grad_enabled(grad), Taps(net, taps, "model") as t:
        logits = net(x)
        return logits, t.take()


def ce_of(logits, targets) -> torch.Tensor:
    logp = logits.log_softmax(1)
    return -logp[torch.arange(len(targets)), targets].mean()


# --------------------------------------------------------------------------- OFD: margin, partial L2, scaling


def gaussian_margin(std: float, mean: float) -> float:
    """E[x | x < 0] of N(mean, std^2), or -3 std when P(x < 0) <= 0.001: written out from the paper."""
    s = abs(std)
    p_neg = 0.5 * (1.0 + math.erf((-mean / s) / math.sqrt(2.0)))
    if p_neg <= 0.001:
        return -3.0 * s
    density = math.exp(-0.5 * (mean / s) ** 2) / math.sqrt(2.0 * math.pi)
    return mean - s * density / p_neg


def test_ofd_margin_from_the_teachers_batchnorm_by_hand():
    teacher, student = model("resnet8x4"), model("resnet8")
    m = method("ofd")
    m.bind(student, teacher)
    assert m.margin_layers == ["stage1.0.bn2", "stage2.0.bn2", "stage3.0.bn2"]  # the reference's bn2 of last blocks
    bn = dict(teacher.named_modules())["stage1.0.bn2"]
    weights = [1.0, -2.0, 0.5, 0.1, 0.0, 0.0]
    biases = [0.0, 1.0, -1.0, 1.0, -0.7, 0.3]
    with torch.no_grad():
        bn.weight[:6] = torch.tensor(weights)
        bn.bias[:6] = torch.tensor(biases)
    shapes_s = {f"stage{i}.preact": torch.Size([2, c, 32 // 2 ** (i - 1), 32 // 2 ** (i - 1)])
                for i, c in zip((1, 2, 3), (16, 32, 64), strict=True)}
    shapes_t = {f"stage{i}.preact": torch.Size([2, c, 32 // 2 ** (i - 1), 32 // 2 ** (i - 1)])
                for i, c in zip((1, 2, 3), (64, 128, 256), strict=True)}
    extra = m.extra_modules(Setup(shapes_s, shapes_t, student=student, teacher=teacher))
    got = extra["margins"][0].flatten()[:6].tolist()
    expected = [gaussian_margin(w, b) for w, b in zip(weights[:4], biases[:4], strict=True)]
    expected += [-0.7, 0.0]  # gamma = 0: a constant channel; its negative part is itself, or nothing
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert got[0] == pytest.approx(-math.sqrt(2.0 / math.pi), rel=1e-6)  # E[x | x < 0] of N(0, 1)
    assert got[3] == pytest.approx(-0.3)  # P(x < 0) = Phi(-10) < 0.001: -3 std
    # buffers, saved with the student's extras; (1, C, 1, 1) per layer
    state = extra.state_dict()
    assert [tuple(state[f"margins.m{i}"].shape) for i in range(3)] == [(1, 64, 1, 1), (1, 128, 1, 1), (1, 256, 1, 1)]
    assert not any(n.startswith("margins") for n, _ in extra.named_parameters())


def ofd_by_hand(s: torch.Tensor, t: torch.Tensor, margin: list[float]) -> float:
    """sum over elements of (s - max(t, m))^2 where s > max(t, m) or max(t, m) > 0, divided by the batch size."""
    total = 0.0
    n, c, h, w = s.shape
    for i in range(n):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    tv = max(float(t[i, ch, y, x]), margin[ch])
                    sv = float(s[i, ch, y, x])
                    if sv > tv or tv > 0:
                        total += (sv - tv) ** 2
    return total / n


def identity_extras(margins: list[list[float]]) -> nn.ModuleDict:
    return nn.ModuleDict({"connectors": nn.ModuleList(nn.Identity() for _ in margins),
                          "margins": Margins([torch.tensor(m) for m in margins])})


def test_ofd_partial_l2_and_layer_scaling_by_hand():
    torch.manual_seed(0)
    m = OFD(["a", "b", "c"], ["x", "y", "z"], feat_weight=0.01, ce_weight=0.5)
    margins = [[-0.5, -0.2], [-1.0, -0.1, -0.3], [-0.4]]
    s = {"a": torch.randn(2, 2, 2, 3), "b": torch.randn(2, 3, 2, 2), "c": torch.randn(2, 1, 1, 2)}
    t = {"x": torch.randn(2, 2, 2, 3), "y": torch.randn(2, 3, 2, 2), "z": torch.randn(2, 1, 1, 2)}
    # cover every case of the partial L2: teacher below its margin / between margin and 0 / positive
    t["x"][0, 0, 0, 0], s["a"][0, 0, 0, 0] = -2.0, -0.2  # t < m, s > m: (s - m)^2
    t["x"][0, 0, 0, 1], s["a"][0, 0, 0, 1] = -2.0, -3.0  # t < m, s < m: 0
    t["x"][0, 0, 0, 2], s["a"][0, 0, 0, 2] = -0.3, -0.1  # m < t <= 0, s > t: (s - t)^2
    t["x"][0, 0, 1, 0], s["a"][0, 0, 1, 0] = -0.3, -0.4  # m < t <= 0, s < t: 0
    t["x"][0, 0, 1, 1], s["a"][0, 0, 1, 1] = 0.7, 0.2  # t > 0: (s - t)^2 either way
    logits, targets = torch.randn(2, 5), torch.tensor([1, 3])
    out = m.loss(Outputs(logits, s), Outputs(torch.randn(2, 5), t), Batch.of(targets), identity_extras(margins))
    layers = [ofd_by_hand(s[a], t[b], mg) for a, b, mg in zip("abc", "xyz", margins, strict=True)]
    ofd = layers[0] / 4 + layers[1] / 2 + layers[2]  # layer i of n scaled by 1 / 2^(n - 1 - i)
    ce = ce_of(logits, targets)
    assert float(out["ofd"]) == pytest.approx(ofd, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(out["total"]) == pytest.approx(0.01 * ofd + 0.5 * float(ce), rel=1e-5)
    # the five cases alone, margin -0.5: (s - m)^2, 0, (s - t)^2, 0, (s - t)^2
    s1 = torch.tensor([-0.2, -3.0, -0.1, -0.4, 0.2]).view(1, 1, 1, 5)
    t1 = torch.tensor([-2.0, -2.0, -0.3, -0.3, 0.7]).view(1, 1, 1, 5)
    single = OFD(["a"], ["x"], feat_weight=1.0, ce_weight=0.0)
    got = single.loss(Outputs(torch.zeros(1, 2), {"a": s1}), Outputs(torch.zeros(1, 2), {"x": t1}),
                      Batch.of(torch.tensor([0])), identity_extras([[-0.5]]))
    assert float(got["ofd"]) == pytest.approx(0.3 ** 2 + 0.0 + 0.2 ** 2 + 0.0 + 0.5 ** 2)


def test_ofd_pools_a_larger_teacher_map_to_the_students_grid_and_batch_of_one():
    torch.manual_seed(1)
    m = OFD(["a"], ["x"], feat_weight=1.0, ce_weight=1.0)
    s, t = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4)
    pooled = t.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 average of each 2x2 block
    out = m.loss(Outputs(torch.randn(1, 3), {"a": s}), Outputs(torch.randn(1, 3), {"x": t}),
                 Batch.of(torch.tensor([2])), identity_extras([[-0.2, -0.6]]))
    assert float(out["ofd"]) == pytest.approx(ofd_by_hand(s, pooled, [-0.2, -0.6]), rel=1e-5)


def test_ofd_connector_is_the_references_conv1x1_bn():
    m = OFD(["a"], ["x"])
    m.margin_layers = ["bn"]
    teacher = nn.Sequential()
    teacher.add_module("bn", nn.BatchNorm2d(8))
    extra = m.extra_modules(Setup({"a": torch.Size([2, 4, 8, 8])}, {"x": torch.Size([2, 8, 8, 8])}, teacher=teacher))
    conv, bn = extra["connectors"][0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert (conv.in_channels, conv.out_channels) == (4, 8)
    assert isinstance(bn, nn.BatchNorm2d) and torch.equal(bn.weight, torch.ones(8))
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2.0 / 8), rel=0.5)  # N(0, sqrt(2 / (k*k*out)))


def test_ofd_finds_the_references_bn_before_relu():
    expected = {
        "wrn_40_2": ["stage2.0.bn1", "stage3.0.bn1", "head.bn1"],
        "vgg13": ["stage1.4", "stage2.4", "stage3.4", "stage4.4"],  # each conv group's last BN
        "resnet50_cifar": ["stage1.2.bn3", "stage2.3.bn3", "stage3.5.bn3", "stage4.2.bn3"],
        "mobilenetv2": ["stage1.1.1.conv.7", "stage2.0.2.conv.7", "stage3.1.2.conv.7", "stage4.1.0.conv.7"],
    }
    students = {"wrn_40_2": "wrn_16_2", "vgg13": "vgg8", "resnet50_cifar": "mobilenetv2", "mobilenetv2": "vgg8"}
    for teacher, bns in expected.items():
        m, t = method("ofd"), model(teacher)
        m.bind(model(students[teacher]), t)
        assert m.margin_layers == bns, teacher
        assert all(isinstance(dict(t.named_modules())[b], nn.BatchNorm2d) for b in bns)


def test_ofd_refuses_a_teacher_without_batchnorm_before_the_relu():
    m = method("ofd")
    with pytest.raises(UserError, match="teacher layer 'features.2'.*needs BatchNorm before the tapped ReLU") as err:
        m.bind(model("light_nn"), model("deep_nn"))
    assert "\n" not in str(err.value)
    # ShuffleNetV2's preact is a concat: half its channels pass no BatchNorm (mdistiller refuses it as a teacher)
    m = method("ofd")
    student, teacher = model("resnet8x4"), model("shufflev2")
    m.bind(student, teacher)
    x = torch.rand(2, 3, 32, 32)
    _, fs = probe(student, m.student_taps, x, False)
    _, ft = probe(teacher.eval(), m.teacher_taps, x, False)
    with pytest.raises(UserError, match="BatchNorm 'stage1.3.bn3'.*58 channels, the layer 116"):
        m.extra_modules(Setup({k: v.shape for k, v in fs.items()}, {k: v.shape for k, v in ft.items()},
                              student=student, teacher=teacher))


# --------------------------------------------------------------------------- ReviewKD: HCL, warm-up, ABF


def hcl_by_hand(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """mse + halving weights (1/2, 1/4, ...) on the 4x4, 2x2, 1x1 average pools smaller than the map."""
    def pool(x, g):
        n, c, h, w = x.shape
        return x.reshape(n, c, g, h // g, g, w // g).mean(dim=(3, 5))

    h = fs.shape[2]
    loss, weight, tot = ((fs - ft) ** 2).mean().item(), 1.0, 1.0
    for g in (4, 2, 1):
        if g < h:
            weight /= 2
            loss += weight * ((pool(fs, g) - pool(ft, g)) ** 2).mean().item()
            tot += weight
    return loss / tot


class PassThrough(nn.Module):
    """Stands in for an ABF: returns the student map as the level's output."""

    def forward(self, x, y, out_size):
        return x, x


def test_reviewkd_hcl_by_hand_and_warmup():
    torch.manual_seed(2)
    m = ReviewKD(["a", "b", "c", "d"], ["w", "x", "y", "z"], review_weight=2.0, warmup_epochs=20, ce_weight=0.5)
    shapes = [(2, 3, 8, 8), (2, 2, 4, 4), (2, 2, 2, 2), (2, 5)]  # the last: a pooled embedding (N, C)
    s = {k: torch.randn(*sh) for k, sh in zip("abcd", shapes, strict=True)}
    t = {k: torch.randn(*sh) for k, sh in zip("wxyz", shapes, strict=True)}
    extra = nn.ModuleDict({"abfs": nn.ModuleList(PassThrough() for _ in range(4))})
    as4 = lambda v: v if v.dim() == 4 else v.view(2, 5, 1, 1)  # noqa: E731  (the embedding as N x C x 1 x 1)
    expected = sum(hcl_by_hand(as4(s[a]), as4(t[b])) for a, b in zip("abcd", "wxyz", strict=True))
    # the weights by hand for the 4x4 map: (mse + mse_2x2 / 2 + mse_1x1 / 4) / 1.75
    fs, ft = s["b"], t["x"]
    p2 = lambda v: v.reshape(2, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # noqa: E731
    four = (((fs - ft) ** 2).mean() + ((p2(fs) - p2(ft)) ** 2).mean() / 2
            + ((fs.mean(dim=(2, 3)) - ft.mean(dim=(2, 3))) ** 2).mean() / 4) / 1.75
    assert hcl_by_hand(fs, ft) == pytest.approx(float(four), rel=1e-6)
    logits, targets = torch.randn(2, 7), torch.tensor([0, 6])
    ce = float(ce_of(logits, targets))
    for epoch, warm in ((1, 1 / 20), (10, 0.5), (20, 1.0), (35, 1.0)):
        out = m.loss(Outputs(logits, s), Outputs(torch.randn(2, 7), t), Batch.of(targets, epoch), extra)
        assert float(out["hcl"]) == pytest.approx(expected, rel=1e-5)
        assert float(out["ce"]) == pytest.approx(ce, rel=1e-6)
        assert float(out["total"]) == pytest.approx(2.0 * warm * expected + 0.5 * ce, rel=1e-5), epoch
    no_warmup = ReviewKD(["a", "b", "c", "d"], ["w", "x", "y", "z"], review_weight=1.0, warmup_epochs=0)
    out = no_warmup.loss(Outputs(logits, s), Outputs(logits, t), Batch.of(targets, 1), extra)
    assert float(out["total"]) == pytest.approx(expected + ce, rel=1e-5)


def test_reviewkd_abf_fusion_by_hand():
    """Two levels: a pooled vector (deepest, no fusion) and a 2x2 map fused with it, output at the teacher's 4x4."""
    torch.manual_seed(3)
    m = ReviewKD(["a", "e"], ["x", "z"], max_mid_channel=3)
    s = {"a": torch.randn(2, 4, 2, 2), "e": torch.randn(2, 6)}
    t = {"x": torch.randn(2, 5, 4, 4), "z": torch.randn(2, 7)}
    extra = m.extra_modules(Setup({k: v.shape for k, v in s.items()}, {k: v.shape for k, v in t.items()})).eval()
    shallow, deep = extra["abfs"]
    assert deep.att_conv is None and shallow.att_conv is not None

    def bn(x, layer):  # eval mode: running mean 0 / var 1
        return (x - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.running_var.view(1, -1, 1, 1)
                                                                        + layer.eps) \
            * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

    def conv1x1(x, w):
        return torch.einsum("oi,nihw->nohw", w[:, :, 0, 0], x)

    with torch.no_grad():
        # deepest level: 1x1 conv to mid = min(3, 6) channels, BN, 3x3 conv (its centre tap on a 1x1 map), BN
        v = s["e"].view(2, 6, 1, 1)
        res = bn(conv1x1(v, deep.conv1[0].weight), deep.conv1[1])
        out_deep = bn(conv1x1(res, deep.conv2[0].weight[:, :, 1:2, 1:2]), deep.conv2[1])
        # shallow level: fuse with the residual broadcast to 2x2, attention from a 1x1 conv + sigmoid
        x = bn(conv1x1(s["a"], shallow.conv1[0].weight), shallow.conv1[1])
        y = res.expand(2, 3, 2, 2)
        att = torch.sigmoid(conv1x1(torch.cat([x, y], 1), shallow.att_conv[0].weight)
                            + shallow.att_conv[0].bias.view(1, 2, 1, 1))
        fused = x * att[:, :1] + y * att[:, 1:]
        up = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest to the teacher's 4x4
        out_shallow = bn(F.conv2d(up, shallow.conv2[0].weight, padding=1), shallow.conv2[1])
        got = m.fuse(Outputs(torch.zeros(2, 3), s), [(4, 4), (1, 1)], extra)
    assert got[0].shape == (2, 5, 4, 4) and got[1].shape == (2, 7, 1, 1)
    assert torch.allclose(got[0], out_shallow, atol=1e-5)
    assert torch.allclose(got[1], out_deep, atol=1e-5)


# reference channel / grid lists (ReviewKD CIFAR-100/model/reviewkd.py build_review_kd; mdistiller cfg defaults)
REFERENCE_PLANS = {
    ("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32], 256),
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32], 128),
    ("vgg13", "vgg8"): ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], [1, 4, 4, 8, 16],
                        512),
    ("resnet32x4", "shufflev2"): ([116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32], 512),
}


# --------------------------------------------------------------------------- real model pairs


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def pair(request):
    """Both methods bound to one zoo pair, with one student forward (graph kept) and one teacher forward."""
    torch.manual_seed(0)
    t_name, s_name = request.param
    teacher, student = model(t_name).eval(), model(s_name).train()
    methods = {"reviewkd": method("reviewkd"), "ofd": method("ofd")}
    for m in methods.values():
        m.bind(student, teacher)
    s_taps = list(dict.fromkeys(t for m in methods.values() for t in m.student_taps))
    t_taps = list(dict.fromkeys(t for m in methods.values() for t in m.teacher_taps))
    x = torch.rand(2, 3, 32, 32)
    t_logits, t_feats = probe(teacher, t_taps, x, False)
    s_logits, s_feats = probe(student, s_taps, x, True)
    setup = Setup({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()},
                  num_classes=100, student=student, teacher=teacher)
    return {"names": request.param, "student": student, "methods": methods, "setup": setup,
            "s": Outputs(s_logits, s_feats), "t": Outputs(t_logits, t_feats)}


@pytest.mark.parametrize("name", ["ofd", "reviewkd"])
def test_real_pairs_build_run_and_backpropagate(pair, name):
    m = pair["methods"][name]
    student = pair["student"]
    extra = m.extra_modules(pair["setup"])
    if name == "reviewkd":
        plan = abf_plan([pair["setup"].student_shapes[n] for n in m.student_layers],
                        [pair["setup"].teacher_shapes[n] for n in m.teacher_layers], m.max_mid_channel)
        c_in, c_out, shapes, out_shapes, mid = REFERENCE_PLANS[pair["names"]]
        assert plan == {"in_channels": c_in, "out_channels": c_out, "shapes": [(h, h) for h in shapes],
                        "out_shapes": [(h, h) for h in out_shapes], "mid_channel": mid}
    student.zero_grad(set_to_none=True)
    out = m.loss(pair["s"], Outputs(pair["t"].logits, m.reduce_teacher(pair["t"].feats)),
                 Batch.of(torch.tensor([3, 97]), epoch=5), extra)
    assert set(out) == {"total", "ce", "ofd" if name == "ofd" else "hcl"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["total"].backward(retain_graph=True)
    first_conv = next(p for p in student.parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    params = list(extra.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_tutorial_pair_reviewkd_runs_and_ofd_refuses():
    teacher, student = model("deep_nn").eval(), model("light_nn")
    m = method("reviewkd")
    m.bind(student, teacher)
    assert m.student_layers == ["features.2", "features.5", "classifier.3:input"]
    assert m.teacher_layers == ["features.2", "features.7", "classifier.3:input"]
    x = torch.rand(3, 3, 32, 32)
    t_logits, t_feats = probe(teacher, m.teacher_taps, x, False)
    s_logits, s_feats = probe(student, m.student_taps, x, True)
    extra = m.extra_modules(Setup({k: v.shape for k, v in s_feats.items()}, {k: v.shape for k, v in t_feats.items()}))
    out = m.loss(Outputs(s_logits, s_feats), Outputs(t_logits, t_feats), Batch.of(torch.tensor([0, 1, 2])), extra)
    out["total"].backward()
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in extra.parameters())
    with pytest.raises(UserError, match="method=ofd: teacher layer 'features.2'"):
        method("ofd").bind(student, teacher)


def test_reviewkd_unequal_level_counts_are_an_error():
    with pytest.raises(UserError, match="5 student layers.*4 teacher layers"):
        method("reviewkd").bind(model("vgg8"), model("resnet32x4"))


def test_reviewkd_refuses_a_tap_that_is_not_a_map_or_vector():
    m = ReviewKD(["a"], ["x"])
    with pytest.raises(UserError, match="student layer 'a' has shape \\(4, 5\\)"):
        m.extra_modules(Setup({"a": torch.Size([2, 4, 5])}, {"x": torch.Size([2, 4, 5, 5])}))
    m = OFD(["a"], ["x"])
    m.margin_layers = ["bn"]
    with pytest.raises(UserError, match="must both be conv feature maps"):
        m.extra_modules(Setup({"a": torch.Size([2, 4])}, {"x": torch.Size([2, 4, 5, 5])}, teacher=nn.Sequential()))


# --------------------------------------------------------------------------- defaults and bad values


def test_defaults_are_the_references():
    ofd, rev = method("ofd"), method("reviewkd")
    assert (ofd.feat_weight, ofd.ce_weight, ofd.connector_kernel) == (1e-3, 1.0, 1)
    assert ofd.student_layers == ofd.teacher_layers == ["preact_stages"]
    assert (rev.review_weight, rev.warmup_epochs, rev.max_mid_channel, rev.ce_weight) == (1.0, 20.0, 512, 1.0)
    assert rev.student_layers == ["stages", "embedding"]
    assert rev.teacher_layers == ["preact_stages", "embedding"]


@pytest.mark.parametrize(("name", "key", "value", "shown"), [
    ("ofd", "feat_weight", -1, "method.feat_weight=-1"),
    ("ofd", "ce_weight", -0.5, "method.ce_weight=-0.5"),
    ("ofd", "connector_kernel", 2, "method.connector_kernel=2"),
    ("ofd", "connector_kernel", 0, "method.connector_kernel=0"),
    ("ofd", "connector_kernel", 1.5, "method.connector_kernel=1.5"),
    ("ofd", "feat_weight", "lots", "method.feat_weight='lots'"),
    ("reviewkd", "review_weight", -1, "method.review_weight=-1"),
    ("reviewkd", "warmup_epochs", -3, "method.warmup_epochs=-3"),
    ("reviewkd", "warmup_epochs", float("nan"), "method.warmup_epochs=nan"),
    ("reviewkd", "max_mid_channel", 0, "method.max_mid_channel=0"),
    ("reviewkd", "max_mid_channel", 2.5, "method.max_mid_channel=2.5"),
    ("reviewkd", "ce_weight", -2, "method.ce_weight=-2"),
])
def test_bad_values_name_the_value(name, key, value, shown):
    with pytest.raises(UserError) as err:
        method(name, **{key: value})
    assert shown in str(err.value) and "invalid" in str(err.value) and "\n" not in str(err.value)
