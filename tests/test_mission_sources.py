"""The mission's three source systems as their sources wrote them.

- Keras MNIST demo (``experiment=mnist_keras``), TensorFlow;
- ResNet-50 -> small CNN on CIFAR-10 (``experiment=cifar10_resnet50``), PyTorch;
- the Hinton MNIST project with BatchNorm MLPs (``experiment=mnist_hinton_bn_mlp``), PyTorch.

Each demo's loss, computed by the kd method with the options read from the experiment's own YAML, equals the
demo's formula computed by hand (numpy); every demo model built from its YAML has the source's parameter count;
the Keras teacher pads as TensorFlow's 'same' does; the PyTorch sources' models, copied here from the sources,
compute exactly what kd-runner's builders compute. The CLI runs of these experiments are in test_experiments.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from kd_runner.errors import UserError
from kd_runner.methods import build_method
from kd_runner.methods.base import Batch, Outputs
from kd_runner.methods.kd import KD
from kd_runner.models import build_model, init_weights
from kd_runner.models.convnets import TFSamePad2d, tf_same_padding
from kd_runner.models.mlp import MLP

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=[f"experiment={name}", *overrides])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return k * k * c_in * c_out + c_out


def linear(i: int, o: int) -> int:
    return i * o + o


def bn(n: int) -> int:
    return 2 * n  # weight and bias (running stats are buffers)


# --------------------------------------------------------------------------- the demos' losses by hand (numpy)

RNG = np.random.default_rng(2024)
S_LOGITS = RNG.normal(scale=2.0, size=(4, 10))   # a batch of 4 over 10 classes, as MNIST / CIFAR-10
T_LOGITS = RNG.normal(scale=3.0, size=(4, 10))
TARGETS = np.array([3, 0, 9, 3])


def softmax(x: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = x / T
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(softmax(s)[np.arange(len(y)), y])))


def keras_demo_loss(s, t, y, T, alpha) -> float:
    """``alpha * SparseCategoricalCrossentropy(from_logits) + (1 - alpha) * KLDivergence()(p_t, p_s)``.

    Keras' KLDivergence: both inputs clipped to [1e-7, 1], ``sum(y_true * log(y_true / y_pred))`` over the
    classes, mean over the batch. No T^2.
    """
    p_t = np.clip(softmax(t, T), 1e-7, 1.0)
    p_s = np.clip(softmax(s, T), 1e-7, 1.0)
    kl = float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1)))
    return alpha * ce(s, y) + (1 - alpha) * kl


def kldivloss_mean(s, t, T) -> float:
    """``nn.KLDivLoss()(F.log_softmax(s / T), F.softmax(t / T))``: the element-wise mean over batch * classes."""
    p_t = softmax(t, T)
    return float(np.mean(p_t * (np.log(p_t) - np.log(softmax(s, T)))))


def resnet_demo_loss(s, t, y, T, alpha) -> float:
    """The ResNet-50 demo's ``loss_kd``: ``KLDivLoss mean * (alpha * T * T) + CE * (1 - alpha)``."""
    return kldivloss_mean(s, t, T) * (alpha * T * T) + ce(s, y) * (1.0 - alpha)


def hinton_project_loss(s, t, y, T, alpha) -> float:
    """The Hinton MNIST project's ``distillation``: ``KLDivLoss mean * (T * T * 2.0 + alpha) + CE * (1 - alpha)``."""
    return kldivloss_mean(s, t, T) * (T * T * 2.0 + alpha) + ce(s, y) * (1.0 - alpha)


# (experiment, extra overrides, the source's T and alpha, the source's formula)
DEMO_LOSSES = {
    "keras": ("mnist_keras", [], 3.0, 0.5, keras_demo_loss),
    "keras_T1": ("mnist_keras", ["method.T=1.0"], 1.0, 0.5, keras_demo_loss),
    "resnet": ("cifar10_resnet50", [], 1.0, 0.5, resnet_demo_loss),
    # the demo's T=1 hides the T^2 factor; at T=3 the formula's alpha * T^2 must still hold
    "resnet_T3": ("cifar10_resnet50", ["method.T=3.0"], 3.0, 0.5, resnet_demo_loss),
    "hinton_project": ("mnist_hinton_bn_mlp", [], 20.0, 0.7, hinton_project_loss),
}


@pytest.mark.parametrize("case", list(DEMO_LOSSES))
def test_demo_loss_is_the_kd_method_with_the_experiments_options(case):
    exp, overrides, T, alpha, formula = DEMO_LOSSES[case]
    cfg = compose_experiment(exp, *overrides)
    assert cfg.method.name == "kd" and cfg.method.T == T
    method = build_method(cfg.method)
    assert type(method) is KD  # an option of the one kd method, not a copy of it
    out = method.loss(Outputs(torch.tensor(S_LOGITS)), Outputs(torch.tensor(T_LOGITS)), Batch.of(torch.tensor(TARGETS)),
                      nn.ModuleDict())
    expected = formula(S_LOGITS, T_LOGITS, TARGETS, T, alpha)
    assert float(out["total"]) == pytest.approx(expected, rel=1e-10)
    assert float(out["ce"]) == pytest.approx(ce(S_LOGITS, TARGETS), rel=1e-12)


def test_the_three_losses_differ_on_the_same_logits():
    """The options matter: the three formulas give three different numbers (and kd's defaults a fourth)."""
    values = [f(S_LOGITS, T_LOGITS, TARGETS, 3.0, 0.5) for f in (keras_demo_loss, resnet_demo_loss,
                                                                   hinton_project_loss)]
    default = KD(T=3.0, soft_weight=0.5, ce_weight=0.5).loss(
        Outputs(torch.tensor(S_LOGITS)), Outputs(torch.tensor(T_LOGITS)), Batch.of(torch.tensor(TARGETS)),
        nn.ModuleDict())
    values.append(float(default["total"]))
    assert len({round(v, 9) for v in values}) == 4


def test_kl_reduction_mean_is_batchmean_over_classes_and_matches_torch_kldivloss():
    s, t = torch.tensor(S_LOGITS), torch.tensor(T_LOGITS)
    y = torch.tensor(TARGETS)
    for T in (1.0, 2.5, 20.0):
        mean = KD(T=T, soft_weight=1.0, ce_weight=0.0, t_squared=False, kl_reduction="mean").loss(
            Outputs(s), Outputs(t), Batch.of(y), nn.ModuleDict())["soft"]
        batchmean = KD(T=T, soft_weight=1.0, ce_weight=0.0, t_squared=False).loss(
            Outputs(s), Outputs(t), Batch.of(y), nn.ModuleDict())["soft"]
        torch_default = nn.KLDivLoss(reduction="sum")(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1)) / s.numel()
        assert float(mean) == pytest.approx(float(batchmean) / 10, rel=1e-12)
        assert float(mean) == pytest.approx(float(torch_default), rel=1e-12)
        assert float(mean) == pytest.approx(kldivloss_mean(S_LOGITS, T_LOGITS, T), rel=1e-10)


def test_t_squared_false_drops_the_T_squared_factor():
    s, t, y = torch.tensor(S_LOGITS), torch.tensor(T_LOGITS), torch.tensor(TARGETS)
    with_t2 = KD(T=4.0).loss(Outputs(s), Outputs(t), Batch.of(y), nn.ModuleDict())["soft"]
    without = KD(T=4.0, t_squared=False).loss(Outputs(s), Outputs(t), Batch.of(y), nn.ModuleDict())["soft"]
    assert float(with_t2) == pytest.approx(16.0 * float(without), rel=1e-12)


def test_kd_defaults_keep_hintons_loss():
    cfg = OmegaConf.load(CONF / "method" / "kd.yaml")
    m = build_method(cfg)
    assert (m.t_squared, m.kl_reduction) == (True, "batchmean")
    assert (KD().t_squared, KD().kl_reduction) == (True, "batchmean")


@pytest.mark.parametrize("kwargs, needles", [
    ({"kl_reduction": "sum"}, ["method.kl_reduction='sum'", "batchmean, mean"]),
    ({"kl_reduction": "none"}, ["method.kl_reduction='none'", "batchmean, mean"]),
    ({"t_squared": "yes"}, ["method.t_squared='yes'", "false, true"]),
    ({"t_squared": 1}, ["method.t_squared=1", "false, true"]),
])
def test_kd_rejects_bad_options_in_one_line(kwargs, needles):
    with pytest.raises(UserError) as err:
        build_method(OmegaConf.create({"name": "kd", **kwargs}))
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# --------------------------------------------------------------------------- parameter counts from the YAMLs

RESNET50_10 = 25_557_032 - linear(2048, 1000) + linear(2048, 10)  # torchvision resnet50, 10-class fc

PARAMS = {
    # the Keras summaries: 2,560 + 1,180,160 + 250,890 and 21,980 + 290
    ("mnist_keras", "teacher"): (MNIST, 1_433_610),
    ("mnist_keras", "student"): (MNIST, 22_270),
    ("cifar10_resnet50", "teacher"): (CIFAR, RESNET50_10),
    ("cifar10_resnet50", "student"): (CIFAR, conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
                                      + linear(128, 32) + linear(32, 10)),
    ("mnist_hinton_bn_mlp", "teacher"): (MNIST, linear(784, 1200) + bn(1200) + linear(1200, 1200) + bn(1200)
                                         + linear(1200, 10)),
    ("mnist_hinton_bn_mlp", "student"): (MNIST, linear(784, 800) + bn(800) + linear(800, 800) + bn(800)
                                         + linear(800, 10)),
}


@pytest.mark.parametrize("exp, role", list(PARAMS))
def test_every_demo_model_has_its_sources_parameter_count(exp, role):
    cfg = compose_experiment(exp, *(["teacher.weights=null"] if exp == "cifar10_resnet50" else []))
    shape, expected = PARAMS[(exp, role)]
    model = build_model(cfg[role], shape, 10)
    assert n_params(model) == expected
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, *shape)).shape == (2, 10)


def test_keras_counts_are_the_summaries_numbers():
    assert conv(1, 256) == 2_560 and conv(256, 512) == 1_180_160 and linear(512 * 7 * 7, 10) == 250_890
    assert linear(784, 28) == 21_980 and linear(28, 10) == 290
    assert PARAMS[("cifar10_resnet50", "student")][1] == 264_618


# --------------------------------------------------------------------------- the experiments' other values


def test_keras_experiment_values():
    cfg = compose_experiment("mnist_keras")
    assert (cfg.trainer.teacher_epochs, cfg.trainer.student_epochs, cfg.trainer.batch_size) == (5, 10, 64)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.eps) == ("adam", 0.01, 1e-7)
    assert list(cfg.dataset.mean) == [0.0] and list(cfg.dataset.std) == [1.0]  # x / 255 only
    assert cfg.scheduler.name == "none" and cfg.teacher.init == cfg.student.init == "glorot_uniform"


def test_resnet_experiment_values():
    cfg = compose_experiment("cifar10_resnet50")
    t, s = cfg.teacher, cfg.student
    assert (t.name, t.weights, t.freeze_backbone, t.resize) == ("resnet50", "IMAGENET1K_V1", True, 224)
    assert (s.arch, s.resize) == ("demo_cnn", 224)  # the demo's one loader feeds both models 224-px images
    assert (cfg.trainer.teacher_epochs, cfg.trainer.student_epochs, cfg.trainer.batch_size) == (10, 20, 64)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.scheduler.name) == ("adam", 1e-3, "none")
    assert list(cfg.dataset.mean) == [0.485, 0.456, 0.406] and list(cfg.dataset.std) == [0.229, 0.224, 0.225]
    assert compose_experiment("cifar10_resnet50", "student.resize=null").student.resize is None
    from torchvision.models import ResNet50_Weights

    # pretrained=True is V1; the yaml comment names its file
    assert ResNet50_Weights.IMAGENET1K_V1.url.endswith("resnet50-0676ba61.pth")
    assert "resnet50-0676ba61.pth" in (CONF / "experiment" / "cifar10_resnet50.yaml").read_text()


def test_hinton_project_experiment_values():
    cfg = compose_experiment("mnist_hinton_bn_mlp")
    assert (cfg.trainer.teacher_epochs, cfg.trainer.student_epochs, cfg.trainer.batch_size) == (30, 100, 64)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 1e-3)
    sched = cfg.scheduler
    assert (sched.name, sched.factor, sched.patience, sched.monitor) == ("plateau", 0.1, 10, "val_loss")
    assert list(cfg.dataset.mean) == [0.1307] and list(cfg.dataset.std) == [0.3081]
    assert 0.0 < cfg.dataset.val_fraction < 1.0  # validated on a held-out split, not on the test set
    assert cfg.method.soft_weight == pytest.approx(20.0 ** 2 * 2 + 0.7) and cfg.method.ce_weight == pytest.approx(0.3)
    assert compose_experiment("mnist_hinton").method.soft_weight == 0.9  # the paper's experiment is unchanged


# --------------------------------------------------------------------------- the models, layer for layer


def test_keras_student_has_no_activation_between_its_dense_layers():
    cfg = compose_experiment("mnist_keras")
    model = build_model(cfg.student, MNIST, 10).eval()
    assert [type(m) for m in model.features] == [nn.Flatten, nn.Linear]
    x = torch.rand(3, *MNIST)
    dense_1, dense_2 = model.features[1], model.classifier
    with torch.no_grad():
        assert torch.allclose(model(x), dense_2(dense_1(x.flatten(1))), atol=0, rtol=0)
        # linear in x: f(a + b) - f(0) = (f(a) - f(0)) + (f(b) - f(0))
        a, b, z = x[:1], x[1:2], torch.zeros(1, *MNIST)
        assert torch.allclose(model(a + b) - model(z), model(a) - model(z) + model(b) - model(z), atol=1e-5)


def test_mlp_activation_and_batch_norm_options_keep_old_configs_identical():
    for option in ("mlp_1200", "mlp_800"):
        cfg = OmegaConf.load(CONF / "model" / f"{option}.yaml")
        torch.manual_seed(0)
        built = build_model(cfg, MNIST, 10)
        torch.manual_seed(0)
        plain = MLP(MNIST, 10, hidden=list(cfg.hidden), dropout=cfg.dropout, input_dropout=cfg.input_dropout)
        assert [type(m) for m in built.modules()] == [type(m) for m in plain.modules()]
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), plain.state_dict().values(),
                                                      strict=True))
    with pytest.raises(UserError, match="activation='tanh'.*none, relu"):
        MLP(MNIST, 10, hidden=[4], activation="tanh")
    with pytest.raises(UserError, match="batch_norm='yes'"):
        MLP(MNIST, 10, hidden=[4], batch_norm="yes")


class SourceTeacher(nn.Module):
    """The Hinton MNIST project's Teacher, verbatim."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 1200)
        self.bn1 = nn.BatchNorm1d(1200)
        self.fc2 = nn.Linear(1200, 1200)
        self.bn2 = nn.BatchNorm1d(1200)
        self.fc3 = nn.Linear(1200, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.dropout(x, p=0.8)
        x = F.relu(self.bn2(self.fc2(x)))
        x = F.dropout(x, p=0.8)
        x = self.fc3(x)
        return x


class SourceStudent(nn.Module):
    """The Hinton MNIST project's Student, verbatim."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 800)
        self.bn1 = nn.BatchNorm1d(800)
        self.fc2 = nn.Linear(800, 800)
        self.bn2 = nn.BatchNorm1d(800)
        self.fc3 = nn.Linear(800, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        x = self.fc3(x)
        return x


def _load_in_order(ours: nn.Module, source: nn.Module) -> None:
    """Copy ``ours``' parameters and buffers into ``source``, matched by order of registration."""
    ours_sd, src_keys = ours.state_dict(), list(source.state_dict())
    assert [v.shape for v in ours_sd.values()] == [source.state_dict()[k].shape for k in src_keys]
    source.load_state_dict(dict(zip(src_keys, ours_sd.values(), strict=True)))


@pytest.mark.parametrize("role, source_cls", [("teacher", SourceTeacher), ("student", SourceStudent)])
def test_hinton_project_mlps_compute_what_the_source_computes(role, source_cls):
    cfg = compose_experiment("mnist_hinton_bn_mlp")
    torch.manual_seed(0)
    ours = build_model(cfg[role], MNIST, 10)
    source = source_cls()
    _load_in_order(ours, source)
    x = torch.randn(8, *MNIST)
    # training mode: batch statistics and (teacher) dropout p=0.8 drawing the same masks from the same seed
    torch.manual_seed(1)
    got = ours.train()(x)
    torch.manual_seed(1)
    want = source.train()(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ours.features[2].running_mean, source.bn1.running_mean)
    if role == "teacher":
        assert [m.p for m in ours.modules() if isinstance(m, nn.Dropout)] == [0.8, 0.8]
        # evaluation: kd-runner's dropout is off (the source's F.dropout ignores eval mode: a bug not copied)
        with torch.no_grad():
            ours.eval()
            assert torch.equal(ours(x), ours(x))
    else:
        assert not any(isinstance(m, nn.Dropout) for m in ours.modules())
        with torch.no_grad():
            assert torch.allclose(ours.eval()(x), source.eval()(x), atol=1e-6, rtol=1e-5)


class SourceNet(nn.Module):
    """The ResNet-50 demo's student ``Net``, verbatim (its dropout_rate is never used)."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False))
        self.layer2 = nn.Sequential(
            nn.Conv2d(64, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(inplace=True),
            nn.Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False))
        self.pool1 = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc1 = nn.Linear(128, 32)
        self.fc2 = nn.Linear(32, 10)
        self.dropout_rate = 0.5

    def forward(self, x):
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.pool1(x)
        x = x.view(x.size(0), -1)
        x = self.fc1(x)
        x = self.fc2(x)
        return x


def test_demo_cnn_computes_what_the_demos_net_computes_and_taps_by_name():
    from kd_runner.taps import Taps

    cfg = compose_experiment("cifar10_resnet50", "student.resize=null")
    torch.manual_seed(0)
    ours = build_model(cfg.student, CIFAR, 10).eval()
    source = SourceNet().eval()
    _load_in_order(ours, source)
    x = torch.randn(2, *CIFAR)
    with torch.no_grad(), Taps(ours, ["features", "embedding"], "student") as taps:
        got = ours(x)
        feats = taps.take()
        assert torch.allclose(got, source(x), atol=1e-6, rtol=1e-5)
    assert feats["features"].shape == (2, 128, 8, 8) and feats["embedding"].shape == (2, 32)
    assert torch.allclose(feats["embedding"], source.fc1(source.pool1(source.layer2(source.layer1(x))).flatten(1)),
                          atol=1e-6, rtol=1e-5)


def test_demo_cnn_resize_feeds_the_conv_stack_224_px():
    cfg = compose_experiment("cifar10_resnet50")
    model = build_model(cfg.student, CIFAR, 10).eval()
    from kd_runner.taps import Taps

    with torch.no_grad(), Taps(model, ["features"], "student") as taps:
        model(torch.rand(1, *CIFAR))
        assert taps.take()["features"].shape == (1, 128, 56, 56)  # 224 / 4


# --------------------------------------------------------------------------- Keras 'same' padding


@pytest.mark.parametrize("size, kernel, stride, pads", [
    (28, 3, 2, (0, 1)),   # the demo's first conv: 28 -> 14, one zero row/col at the bottom/right only
    (14, 3, 2, (0, 1)),   # its second conv: 14 -> 7
    (14, 2, 1, (0, 1)),   # its stride-1 2x2 max-pool: 14 -> 14
    (27, 3, 2, (1, 1)),   # odd sizes pad both sides
    (7, 3, 2, (1, 1)),
    (8, 3, 1, (1, 1)),
    (5, 1, 1, (0, 0)),
])
def test_tf_same_padding_matches_tensorflows_rule(size, kernel, stride, pads):
    assert tf_same_padding(size, kernel, stride) == pads
    out = math.ceil(size / stride)  # TF 'same': output = ceil(input / stride)
    assert (size + sum(pads) - kernel) // stride + 1 == out


def _keras_teacher():
    cfg = compose_experiment("mnist_keras")
    return build_model(cfg.teacher, MNIST, 10).eval()


def test_keras_conv_first_output_pixel_has_no_top_left_padding():
    """TF 'same' with stride 2 on 28 px pads only bottom/right: output (i, j) sees input rows/cols 2i..2i+2.

    So the first output pixel covers rows/cols 0..2 of the image (no padding row before them), unlike PyTorch's
    symmetric padding=1, whose first window is (pad, 0, 1). The last output pixel covers rows 26, 27 and the zero row.
    """
    model = _keras_teacher()
    pad, conv1 = model.features[0], model.features[1]
    with torch.no_grad():
        conv1.weight.fill_(1.0)
        conv1.bias.zero_()
        x = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
        out = conv1(pad(x))[0, 0]
        assert out.shape == (14, 14)
        for i, j in [(0, 0), (0, 5), (6, 13), (13, 0), (13, 13)]:
            window = x[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # slicing past 27 drops the (zero) padding
            assert float(out[i, j]) == float(window.sum()), (i, j)
        assert float(out[0, 0]) == float(x[0, 0, 0:3, 0:3].sum())
        torch_symmetric = F.conv2d(x, conv1.weight, stride=2, padding=1)[0, 0]
        assert float(torch_symmetric[0, 0]) == float(x[0, 0, 0:2, 0:2].sum()) != float(out[0, 0])
        # a single lit pixel at (2, 2) reaches output (0, 0) under TF's padding, not under the symmetric one
        dot = torch.zeros(1, 1, 28, 28)
        dot[0, 0, 2, 2] = 1.0
        assert float(conv1(pad(dot))[0, 0, 0, 0]) == 1.0
        assert float(F.conv2d(dot, conv1.weight, stride=2, padding=1)[0, 0, 0, 0]) == 0.0


def test_keras_pool_same_pads_bottom_right_and_shapes_follow_the_summary():
    model = _keras_teacher()
    f = model.features
    x = torch.randn(1, 256, 14, 14)
    with torch.no_grad():
        pooled = f[4](f[3](x))[0]
        assert pooled.shape == (256, 14, 14)
        for i, j in [(0, 0), (3, 13), (13, 13), (13, 2)]:
            window = x[0, :, i:i + 2, j:j + 2]  # TF ignores the padded cells: max over the in-image ones
            assert torch.equal(pooled[:, i, j], window.amax(dim=(1, 2))), (i, j)
        shapes, h = [], torch.zeros(1, *MNIST)
        for layer in f:
            h = layer(h)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                shapes.append(tuple(h.shape[1:]))
    assert shapes == [(256, 14, 14), (256, 14, 14), (512, 7, 7)]  # the demo's summary
    assert isinstance(f[0], TFSamePad2d)


# --------------------------------------------------------------------------- init options


def test_glorot_uniform_init_is_keras_default():
    model = _keras_teacher()
    student = build_model(compose_experiment("mnist_keras").student, MNIST, 10)
    for m in [*model.modules(), *student.modules()]:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.detach()
            receptive = w[0, 0].numel() if w.dim() > 2 else 1
            limit = math.sqrt(6.0 / (w.shape[1] * receptive + w.shape[0] * receptive))
            assert float(w.abs().max()) <= limit
            assert torch.count_nonzero(m.bias) == 0
    big = model.features[6].weight.detach()  # 1.18M draws: std of U(-a, a) is a / sqrt(3)
    limit = math.sqrt(6.0 / (256 * 9 + 512 * 9))
    assert float(big.std()) == pytest.approx(limit / math.sqrt(3), rel=0.01)


def test_normal_init_is_the_hinton_projects_initialize_weights():
    model = build_model(compose_experiment("mnist_hinton_bn_mlp").teacher, MNIST, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and len(bns) == 2
    w = torch.cat([m.weight.detach().flatten() for m in linears])
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-3) and float(w.std()) == pytest.approx(0.02, rel=0.01)
    g = torch.cat([m.weight.detach() for m in bns])
    assert float(g.mean()) == pytest.approx(1.0, abs=3e-3) and float(g.std()) == pytest.approx(0.02, rel=0.1)
    for m in [*linears, *bns]:
        assert torch.count_nonzero(m.bias) == 0


def test_init_torch_leaves_the_builder_alone_and_bad_inits_are_user_errors():
    torch.manual_seed(3)
    a = build_model(OmegaConf.create({"arch": "mlp", "hidden": [5], "init": "torch"}), (1, 4, 4), 3)
    torch.manual_seed(3)
    b = MLP((1, 4, 4), 3, hidden=[5])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    init_weights(b, "torch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="init='he'.*glorot_uniform, normal, torch"):
        build_model(OmegaConf.create({"arch": "mlp", "hidden": [5], "init": "he"}), (1, 4, 4), 3)
    with pytest.raises(UserError, match="init_std=-0.1"):
        build_model(OmegaConf.create({"arch": "mlp", "hidden": [5], "init": "normal", "init_std": -0.1}), (1, 4, 4), 3)
    with pytest.raises(UserError, match="overwrite the pretrained weights=IMAGENET1K_V1"):
        build_model(OmegaConf.create({"arch": "torchvision", "name": "resnet18", "weights": "IMAGENET1K_V1",
                                      "init": "glorot_uniform"}), (3, 32, 32), 10)
