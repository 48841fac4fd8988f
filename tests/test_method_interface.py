"""The method interface: layer sets, input taps, teacher reducers, composition (``method=a+b``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF
from omegaconf import OmegaConf
from torch import Tensor, nn

from kd_runner.data.tensors import Normalizer, Split
from kd_runner.engine import Env, TeacherOutputs
from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, Method, Outputs, Setup
from kd_runner.methods.compose import Composite
from kd_runner.methods.cosine import Cosine
from kd_runner.methods.kd import KD
from kd_runner.methods.registry import build_method
from kd_runner.models import build_model
from kd_runner.taps import Taps, expand_layers, layer_sets
from kd_runner.train import expand_method_sum


def model(name: str, classes: int = 10) -> nn.Module:
    return build_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), (3, 32, 32), classes).eval()


# --------------------------------------------------------------------------- layer sets and input taps


@pytest.mark.parametrize(("name", "stages", "preact"), [
    ("resnet8x4", ["stage1", "stage2", "stage3"], ["stage1.preact", "stage2.preact", "stage3.preact"]),
    ("wrn_16_2", ["stage1", "stage2", "stage3"], ["stage2.0.bn1", "stage3.0.bn1", "head.bn1"]),
    ("vgg8", ["stage1", "stage2", "stage3", "stage4"], [f"stage{i}.preact" for i in range(1, 5)]),
    ("deep_nn", ["features.4", "features.9"], ["features.2", "features.7"]),
    ("light_nn", ["features.2", "features.5"], ["features.0", "features.3"]),
])
def test_layer_sets_resolve_per_model(name, stages, preact):
    m = model(name)
    assert expand_layers(m, "stages") == stages
    assert expand_layers(m, ["preact_stages"]) == preact
    with Taps(m, stages + preact, "student") as taps:
        m(torch.rand(2, 3, 32, 32))
        out = taps.take()
    # each stage halves (or keeps) the grid; preact maps have the stage's grid before any pool that ends it
    assert [out[s].dim() for s in stages] == [4] * len(stages)
    if name.startswith(("resnet", "vgg")):
        assert [out[p].shape for p in preact] == [out[s].shape for s in stages]
        assert all(torch.equal(F.relu(out[p]), out[s]) for p, s in zip(preact, stages, strict=True))


def test_embedding_set_is_the_classifier_input():
    for name in ("resnet8x4", "deep_nn", "mobilenetv2"):
        m = model(name)
        (emb,) = expand_layers(m, "embedding")
        with Taps(m, [emb, "classifier:input" if name != "deep_nn" else "classifier.3:input"], "t") as taps:
            logits = m(torch.rand(2, 3, 32, 32))
            out = taps.take()
        vec = out[emb]
        assert vec.dim() == 2 and vec.shape[0] == 2
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        assert torch.allclose(last(vec), logits, atol=1e-6)


def test_layer_set_a_model_lacks_is_one_line():
    with pytest.raises(UserError, match="has no layer set 'stages'") as err:
        expand_layers(build_model(OmegaConf.load(CONF / "model" / "mlp_800.yaml"), (1, 28, 28), 10), "stages")
    assert "\n" not in str(err.value)
    assert layer_sets(model("resnet20"))["embedding"] == ["embedding"]


def test_unknown_input_tap_names_the_suffix():
    with pytest.raises(UserError, match="no layer named 'nope:input'.*':input'"):
        Taps(model("resnet8"), ["nope:input"], "student")


# --------------------------------------------------------------------------- teacher reducers


class Squash(Method):
    """Reads one teacher map, reduced to its channel mean: checks reduce_teacher runs before caching."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.teacher_taps = ["0"]

    def reduce_teacher(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"0": feats["0"].mean(1)}

    def loss(self, student, teacher, batch, extra):
        return {"total": teacher.feats["0"].sum() * 0}


def test_reduced_teacher_maps_are_what_the_cache_holds_and_serves():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16, 3))
    split = Split(torch.randint(0, 255, (10, 1, 4, 4), dtype=torch.uint8), torch.arange(10) % 3)
    env = Env(torch.device("cpu"), Normalizer((0.5,), (0.5,)), 4, 4, progress=False)
    method = Squash()
    cache = TeacherOutputs(teacher, method.teacher_taps, env, split, "cache", reduce=method.reduce_teacher)
    assert cache.cache.feats["0"].shape == (10, 4, 4)  # the channel mean, not the (10, 6, 4, 4) map
    live = TeacherOutputs(teacher, method.teacher_taps, env, split, "live", reduce=method.reduce_teacher)
    idx = torch.tensor([3, 7])
    x = env.prepare(split.images[idx])
    assert torch.allclose(cache(idx, x).feats["0"], live(idx, x).feats["0"], atol=1e-6)


# --------------------------------------------------------------------------- composition


def logits_batch():
    torch.manual_seed(1)
    return torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 4])


def test_composite_adds_the_parts_and_counts_ce_once():
    s, t, y = logits_batch()
    feats_s, feats_t = {"f": torch.randn(4, 8)}, {"f": torch.randn(4, 8)}
    kd = KD(T=4.0, soft_weight=0.9, ce_weight=0.1)
    cos = Cosine("f", "f", hidden_weight=2.0, ce_weight=0.75)
    both = Composite(kd, {"cosine": cos})
    both.teacher_taps = ["f"]
    teacher = Outputs(t, both.reduce_teacher(feats_t))
    assert set(teacher.feats) == {"1|f"}  # each part's teacher maps under its own index
    out = both.loss(Outputs(s, feats_s), teacher, Batch.of(y), nn.ModuleDict({"kd": nn.ModuleDict(),
                                                                             "cosine": nn.ModuleDict()}))
    ce = F.cross_entropy(s, y)
    soft = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    hidden = F.cosine_embedding_loss(feats_s["f"], feats_t["f"], torch.ones(4))
    assert float(out["total"]) == pytest.approx(float(0.1 * ce + 0.9 * soft + 2.0 * hidden), rel=1e-5)
    assert set(out) == {"total", "soft", "ce", "cosine.hidden"}
    assert cos.ce_weight == 0.0 and both.name == "kd+cosine"


def test_build_method_composes_from_method_add():
    cfg = OmegaConf.create({"name": "kd", "T": 2.0, "soft_weight": 0.5, "ce_weight": 0.5,
                            "add": {"cosine": {"name": "cosine", "student_layer": "features",
                                               "teacher_layer": "features", "hidden_weight": 0.3,
                                               "ce_weight": 0.7}}})
    m = build_method(cfg)
    assert isinstance(m, Composite) and m.name == "kd+cosine" and m.needs_teacher
    assert m.describe()["cosine"]["hidden_weight"] == 0.3
    m.bind(model("light_nn"), model("deep_nn"))
    assert m.student_taps == ["features"] and m.teacher_taps == ["features"]
    extra = m.extra_modules(Setup({"features": torch.Size([2, 16, 8, 8])}, {"features": torch.Size([2, 32, 8, 8])}))
    assert set(extra.keys()) == {"kd", "cosine"}


@pytest.mark.parametrize(("add", "message"), [
    ({"kd": {"name": "kd"}}, "appears twice"),
    ({"x": {"name": "nosuch"}}, "method.add.x.name='nosuch' is unknown; valid: "),
    ({"x": 3}, "method.add.x is not a method config"),
])
def test_bad_compositions_are_one_line(add, message):
    with pytest.raises(UserError, match=message) as err:
        build_method(OmegaConf.create({"name": "kd", "add": add}))
    assert "\n" not in str(err.value)


def test_method_sum_shorthand():
    assert expand_method_sum(["method=crd+kd", "seed=1"]) == ["method=crd", "+method@method.add.kd=kd", "seed=1"]
    assert expand_method_sum(["method=kd,hint"]) == ["method=kd,hint"]
    with pytest.raises(UserError, match="cannot be swept"):
        expand_method_sum(["method=kd+hint,cosine"])


def test_composition_runs_end_to_end(run_cli, tmp_path):
    proc, run_dir = run_cli(["method=kd+hint", "method.add.hint.hint_weight=0.5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    from helpers import read_metrics

    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["status"] == "complete" and rep["method"]["name"] == "kd+hint"
    assert rep["method"]["hint"]["hint_weight"] == 0.5 and rep["method"]["hint"]["ce_weight"] == 0.0
    student = [r for r in read_metrics(run_dir) if r["phase"] == "student"]
    for col in ("train_soft", "train_ce", "train_hint.hint"):
        assert all(float(r[col]) > 0 for r in student), col


@pytest.mark.parametrize(("args", "message"), [
    (["method=kd+nosuch"], "'nosuch' is not a known option; valid: "),
    (["method=kd+hint,cosine"], "cannot be swept"),
])
def test_bad_composition_on_the_command_line_exits_2(run_cli, tmp_path, args, message):
    proc, run_dir = run_cli(args, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "report.json").exists()


# --------------------------------------------------------------------------- every method on both kinds of model

# (method, teacher) -> what its refusal says: OFD's margins come from the BatchNorm before the teacher's ReLU
REFUSALS = {("ofd", "deep_nn"): "BatchNorm"}
SMALL = {"crd": {"nce_k": 16}}  # the paper's 16384 negatives need a larger training split than this test's


@pytest.mark.parametrize(("teacher_name", "student_name"), [("deep_nn", "light_nn"), ("resnet32x4", "resnet8x4")])
def test_every_method_binds_and_steps_on_tutorial_and_zoo_pairs(teacher_name, student_name):
    from kd_runner.engine import set_train_mode
    from kd_runner.methods.registry import methods
    from kd_runner.pipeline import build_extra

    torch.manual_seed(0)
    split = Split(torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) % 10)
    env = Env(torch.device("cpu"), Normalizer((0.5,) * 3, (0.25,) * 3), 8, 8, progress=False)
    teacher, student = model(teacher_name), model(student_name)
    set_train_mode(student, True)
    for name in sorted(set(methods()) - {"ce"}):
        cfg = OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{name}.yaml"), SMALL.get(name, {}))
        method = build_method(cfg)
        refusal = REFUSALS.get((name, teacher_name))
        if refusal:
            with pytest.raises(UserError, match=refusal):
                build_extra(method, student, teacher, split, env, 10)
            continue
        extra, _ = build_extra(method, student, teacher, split, env, 10)
        served = TeacherOutputs(teacher, method.teacher_taps, env, split, "live", reduce=method.reduce_teacher)
        idx = torch.arange(8)
        x = env.prepare(split.images[idx])
        student.zero_grad()
        with Taps(student, method.student_taps, "student") as taps:
            logits = student(x)
            losses = method.loss(Outputs(logits, taps.take()), served(idx, x), Batch.of(split.labels[idx], 30.0),
                                 extra)
        losses["total"].backward()
        assert torch.isfinite(losses["total"]), name
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name
