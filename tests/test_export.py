"""Deployable models (``export=onnx``, ``kd-export``): every zoo family exported to ONNX and read back through ONNX
Runtime's own API (logits and accuracy equal PyTorch's), the TorchScript format and fallback, a failed parity
recorded (not a crash), ``kd-train ... export=torchscript`` and then ``kd-export`` (ONNX) on that real run
(report.json gains the entries, the runtime reproduces the run's test accuracy, the hint regressor is not in the
graph), and the one-line errors."""

from __future__ import annotations

import functools
import importlib
import json
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import helpers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kd_runner import export, export_cli
from kd_runner.data.tensors import Split
from kd_runner.errors import UserError
from kd_runner.models import build_model, mobilenetv2
from kd_runner.models.cifar_resnetv2 import CifarResNetV2
from kd_runner.models.shufflenetv1 import ShuffleNetV1
from kd_runner.models.shufflenetv2 import ShuffleNetV2

CLASSES = [f"class_{i}" for i in range(10)]
N_TEST = 16


def model_yaml(name: str, **over) -> dict:
    """A model config as the run composes it: conf/model/<name>.yaml with ``over`` on top."""
    return {**OmegaConf.to_container(OmegaConf.load(helpers.CONF / "model" / f"{name}.yaml")), **over}


def from_yaml(name: str, **over):
    return lambda shape: build_model(OmegaConf.create(model_yaml(name, **over)), shape, 10)


# MobileNetV2's table of inverted-residual groups, one block fewer per group (the residual blocks of group 1 stay)
SMALL_MOBILENETV2 = [(16, 1, 1), (24, 2, 1), (32, 1, 2), (64, 1, 2), (96, 1, 1), (160, 1, 2), (320, 1, 1)]


def small_mobilenetv2(shape):
    with mock.patch.object(mobilenetv2, "GROUPS", SMALL_MOBILENETV2):
        return from_yaml("mobilenetv2")(shape)


# one model per family of the zoo at about its smallest valid input (the tutorial's light_nn: the kd-export run
# below; dense_28 and small_cnn are the MLP and the conv stack of mlp_1200_bn and demo_cnn). MobileNetV2, the
# ShuffleNets and ResNet-50 are their own classes with fewer blocks: every block kind (channel shuffles, the
# stride-2 concat, the channel split, residual and projection shortcuts) stays in; full depth exports the same
# ops, only slower (the exporter costs about a second of CPU per export plus more per graph node)
FAMILIES = {
    "deep_nn": (from_yaml("deep_nn"), (3, 8, 8)),
    "mlp_1200_bn": (from_yaml("mlp_1200_bn", hidden=[48, 32]), (1, 8, 8)),  # BatchNorm1d, dropout 0.8
    "keras_conv": (from_yaml("keras_conv"), (1, 9, 9)),  # TF 'same' padding, odd sizes: asymmetric
    "demo_cnn_resize": (from_yaml("demo_cnn", resize=12), (3, 8, 8)),  # the bilinear upsampling pre-hook
    "resnet8": (from_yaml("resnet8"), (3, 8, 8)),
    "wrn_16_1": (from_yaml("wrn_16_1"), (3, 8, 8)),
    "vgg8": (from_yaml("vgg8"), (3, 8, 8)),
    "mobilenetv2": (small_mobilenetv2, (3, 8, 8)),
    "shufflev1": (lambda s: ShuffleNetV1(s, 10, out_planes=(48, 96, 192), num_blocks=(1, 2, 1), groups=3), (3, 8, 8)),
    "shufflev2": (lambda s: ShuffleNetV2(s, 10, out_channels=(16, 32, 64, 128), num_blocks=(1, 1, 1)), (3, 8, 8)),
    "resnet50_cifar": (lambda s: CifarResNetV2(s, 10, num_blocks=(1, 1, 1, 1)), (3, 8, 8)),
}
LIGHT_NN = (from_yaml("light_nn"), (1, 8, 8))


@pytest.fixture(autouse=True, scope="module")
def torchlib_read_once():
    """torch.onnx's exporter re-reads the source of onnxscript's ~500 torchlib functions on every export (about a
    second of CPU each time); read it once for this module. It is a pure function of the installed onnxscript:
    every export still runs the whole exporter. Without that function (another onnxscript) nothing is changed."""
    try:
        apis = importlib.import_module("onnxscript._framework_apis.torch_2_11")
        read = apis.get_torchlib_ops
    except (ImportError, AttributeError):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(apis, "get_torchlib_ops", functools.cache(read))
        yield


# one CPU thread for PyTorch and the runtimes: the machine is shared, and idle worker threads spin
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, as after training (fresh ones are an identity: a wrong
    eval/train mode or BN folding would go unseen)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def fake_test(model: torch.nn.Module, shape, mean, std) -> Split:
    """16 random uint8 images; the first half labelled with the model's own prediction (so accuracy is not ~0)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_TEST, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N_TEST,), generator=g)
    with torch.no_grad():
        pred = eager_logits(model, images, mean, std).argmax(1)
    labels[: N_TEST // 2] = pred[: N_TEST // 2]
    return Split(images, labels)


def eager_logits(model: torch.nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    """The run's own preprocessing (uint8 / 255, then mean/std) and the model in eval mode, restoring its mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        x = images.float() / 255.0
        out = model((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    model.train(was)
    return out


def export_cfg(fmt: str = "onnx", **over):
    base = OmegaConf.load(helpers.CONF / "export" / f"{fmt}.yaml")
    return OmegaConf.merge(base, {"latency_iters": 2, "throughput_iters": 1, "throughput_batch": 4,
                                  "roles": ["student"], **over})


def onnx_opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


# --------------------------------------------------------------------------- every family through ONNX Runtime


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_matches_pytorch_in_onnxruntime(family, tmp_path, ort):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = trained_like(build(shape))
    mean, std = [0.45] * shape[0], [0.27] * shape[0]
    test = fake_test(model, shape, mean, std)
    cfg = export_cfg()
    info = export.export_models({"student": model}, cfg, tmp_path / "export", test, mean, std, CLASSES)["student"]

    assert model.training, "the run's model must not be switched to eval mode (a copy is exported)"
    assert (info["format"], info["file"], info["fallback"]) == ("onnx", "export/student.onnx", None)
    assert info["exporter"] == f"torch.onnx dynamo=True, opset {onnx_opset(tmp_path / 'export' / 'student.onnx')}"
    assert info["runtime"].startswith("onnxruntime ")
    # read back through ONNX Runtime's own API, batches of 1 and 5 (dynamic batch axis), against eager PyTorch
    session = ort.InferenceSession(str(tmp_path / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:], out.name) == ("images", "tensor(float)", list(shape), "logits")
    assert isinstance(inp.shape[0], str), f"batch axis is fixed: {inp.shape}"
    x = test.images.float().numpy() / np.float32(255.0)
    got = np.concatenate([session.run(None, {"images": x[i:i + 5]})[0] for i in (0, 5, 10)]
                         + [session.run(None, {"images": x[15:16]})[0]])
    want = eager_logits(model, test.images, mean, std).numpy()
    assert got.shape == (N_TEST, 10)
    assert np.abs(got - want).max() <= cfg.atol
    assert info["parity"] and info["max_abs_diff"] <= cfg.atol
    labels = test.labels.numpy()
    ort_acc = round(100.0 * float((got.argmax(1) == labels).mean()), 4)
    assert info["test_acc"] == ort_acc == info["torch_test_acc"] == round(100.0 * float((want.argmax(1) == labels)
                                                                                        .mean()), 4)
    assert ort_acc >= 50.0  # half the labels are the model's own predictions
    sidecar = json.loads((tmp_path / "export" / "student.json").read_text())
    assert sidecar["input"] == {"name": "images", "shape": ["batch", *shape], "dtype": "float32", "range": "[0, 1]",
                                "layout": "NCHW"}
    assert (sidecar["mean"], sidecar["std"], sidecar["class_names"]) == (mean, std, CLASSES)
    assert sidecar["parity"] is True and sidecar["test_acc"] == ort_acc


# --------------------------------------------------------------------------- TorchScript, fallback, failed parity


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_runs_in_torch_jit(tmp_path):
    build, shape = FAMILIES["shufflev2"]
    model = trained_like(build(shape))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    test = fake_test(model, shape, mean, std)
    info = export.export_models({"student": model, "teacher": build(shape)}, export_cfg("torchscript"),
                                tmp_path / "export", test, mean, std, CLASSES)
    assert list(info) == ["student"], "export.roles=[student]: the teacher is not exported"
    info = info["student"]
    assert (info["format"], info["file"], info["fallback"]) == ("torchscript", "export/student.torchscript.pt", None)
    assert info["runtime"].startswith("torch.jit") and info["parity"]
    assert not (tmp_path / "export" / "teacher.json").exists()
    loaded = torch.jit.load(str(tmp_path / "export" / "student.torchscript.pt"))
    x = test.images.float() / 255.0
    want = eager_logits(model, test.images, mean, std)
    with torch.no_grad():
        for start, stop in ((0, 3), (3, 4), (0, N_TEST)):  # a dynamic batch: not the traced size
            assert torch.allclose(loaded(x[start:stop]), want[start:stop], atol=1e-5, rtol=0)
    acc = round(100.0 * float((want.argmax(1) == test.labels).float().mean()), 4)
    assert info["test_acc"] == acc and info["torch_test_acc"] == acc


def refuse(*_args, **kwargs):
    """An exporter failing as torch.onnx's do: a generic error wrapping the cause (with colour codes)."""
    raise RuntimeError("Failed to export") from ValueError(f"\x1b[96mop {kwargs['dynamo']}\x1b[0m\nunsupported")


@pytest.mark.parametrize("failing", ["exporters", "runtime"])
def test_onnx_failure_falls_back_to_torchscript(failing, tmp_path, monkeypatch, capsys):
    build, shape = LIGHT_NN
    model = build(shape)
    test = fake_test(model, shape, [0.5], [0.25])
    stale = tmp_path / "export" / "student.onnx"  # an earlier export of this role: must not outlive this one
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    if failing == "exporters":
        monkeypatch.setattr(torch.onnx, "export", refuse)
        why = ("ONNX could not export it (dynamo=True failed: ValueError: op True unsupported; dynamo=False failed: "
               "ValueError: op False unsupported); TorchScript written instead")
    else:  # the graph is written but ONNX Runtime cannot load it
        real = export._runner

        def no_ort(fmt, path, threads):
            if fmt == "onnx":
                raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation")
            return real(fmt, path, threads)

        monkeypatch.setattr(export, "_runner", no_ort)
        why = ("ONNX Runtime cannot run the exported graph (RuntimeError: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : "
               "Could not find an implementation); TorchScript written instead")
    info = export.export_models({"student": model}, export_cfg(), tmp_path / "export", test, [0.5], [0.25],
                                CLASSES)["student"]
    assert (info["format"], info["file"], info["fallback"]) == ("torchscript", "export/student.torchscript.pt", why)
    assert info["parity"] and info["exporter"] == "torch.jit.trace" and info["runtime"].startswith("torch.jit")
    assert not stale.exists() and (tmp_path / "export" / "student.torchscript.pt").is_file()
    assert json.loads((tmp_path / "export" / "student.json").read_text())["fallback"] == why
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"kd-train: warning: student: {why}"]
    rep = {"models": {"student": {"params": 1, "test_acc": 1.0, "export": info}}}
    assert f"- student: {why}" in export.markdown_lines(rep)


def test_a_failed_export_is_recorded_and_the_others_kept(tmp_path, monkeypatch, capsys):
    build, shape = LIGHT_NN
    test = fake_test(build(shape), shape, [0.5], [0.25])
    real_trace = torch.jit.trace

    def trace(module, *args, **kwargs):  # the student cannot be traced either
        if getattr(module.model, "untraceable", False):
            raise RuntimeError("cannot trace")
        return real_trace(module, *args, **kwargs)

    student = build(shape)
    student.untraceable = True  # the exported copy has it too
    monkeypatch.setattr(torch.onnx, "export", refuse)
    monkeypatch.setattr(torch.jit, "trace", trace)
    out = export.export_models({"teacher": build(shape), "student": student}, export_cfg(roles=["teacher", "student"]),
                               tmp_path / "export", test, [0.5], [0.25], CLASSES)
    assert out["teacher"]["format"] == "torchscript" and out["teacher"]["parity"]
    assert out["student"]["error"] == "RuntimeError: cannot trace" and out["student"]["file"] is None
    assert out["student"]["parity"] is False and set(out["student"]) >= set(out["teacher"])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["teacher.json", "teacher.torchscript.pt"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if "student" in ln]
    assert err == ["kd-train: warning: student: export failed (RuntimeError: cannot trace); the run's other results "
                   "are kept"]
    lines = export.markdown_lines({"models": {r: {"params": 1, "test_acc": 1.0, "export": e} for r, e in out.items()}})
    assert next(ln for ln in lines if ln.startswith("| student |")).endswith("| failed |")
    assert "- student: export failed: RuntimeError: cannot trace" in lines


def test_failed_parity_is_recorded_not_raised(tmp_path, monkeypatch, capsys):
    build, shape = LIGHT_NN
    model = build(shape)
    test = fake_test(model, shape, [0.5], [0.25])
    real = export._runner

    def off_by_one(fmt, path, threads):  # a runtime whose logits are all 1.0 too high
        run, name = real(fmt, path, threads)
        return (lambda x: run(x) + np.float32(1.0)), name

    monkeypatch.setattr(export, "_runner", off_by_one)
    info = export.export_models({"student": model}, export_cfg("torchscript"), tmp_path / "export", test, [0.5],
                                [0.25], CLASSES)["student"]
    assert info["parity"] is False and info["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    assert info["test_acc"] == info["torch_test_acc"]  # a constant shift keeps every argmax
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "differ from PyTorch's by up to 1" in err[0] and "export.atol=1e-05" in err[0], err
    assert json.loads((tmp_path / "export" / "student.json").read_text())["parity"] is False
    lines = export.markdown_lines({"models": {"student": {"params": 1, "test_acc": 1.0, "export": info}}})
    row = next(ln for ln in lines if ln.startswith("| student |"))
    assert "| NO (atol 1e-05) |" in row and any("does not match the trained model" in ln for ln in lines)


def test_format_none_exports_nothing(tmp_path):
    build, shape = LIGHT_NN
    out = export.export_models({"student": build(shape)}, OmegaConf.load(helpers.CONF / "export" / "none.yaml"),
                               tmp_path / "export", fake_test(build(shape), shape, [0.5], [0.25]), [0.5], [0.25],
                               CLASSES)
    assert out == {} and not (tmp_path / "export").exists()
    assert export.markdown_lines({"models": {"student": {"params": 1, "test_acc": 1.0}}}) == []


# --------------------------------------------------------------------------- settings and the missing extra


@pytest.mark.parametrize("over, needle", [
    ({"format": "keras"}, "export.format='keras' is invalid; valid: none, onnx, torchscript"),
    ({"atol": 0}, "export.atol=0 is invalid; it must be > 0"),
    ({"atol": "nan"}, "export.atol='nan' is invalid; it must be a finite number"),
    ({"latency_iters": -1}, "export.latency_iters=-1 is invalid; it must be >= 0"),
    ({"throughput_batch": 0}, "export.throughput_batch=0 is invalid; it must be >= 1"),
    ({"roles": ["student", "assistant"]}, "export.roles=['student', 'assistant'] is invalid; give a list of: "
                                          "baseline, student, teacher"),
    ({"opset": 3}, "export.opset=3 is invalid"),
])
def test_bad_export_settings_are_one_line_errors(over, needle):
    with pytest.raises(UserError) as err:
        export.check_config(OmegaConf.merge(OmegaConf.load(helpers.CONF / "export" / "onnx.yaml"), over))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("package", export.ONNX_PACKAGES)
def test_missing_onnx_package_names_the_extra(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
    with pytest.raises(UserError) as err:
        export.check_available("onnx")
    msg = str(err.value)
    assert msg.startswith(f"export=onnx needs the {package}") and msg.endswith(" with: pip install 'kd-runner[export]'")
    if package != "onnx":  # onnxscript imports onnx: without onnx it may be missing too (unless already loaded)
        assert msg == f"export=onnx needs the {package} package; install it with: pip install 'kd-runner[export]'"
    export.check_available("torchscript")  # needs no extra
    export.check_available("none")


def test_kd_train_preflight_names_the_missing_extra(monkeypatch):
    """``kd-train export=onnx`` without the extra fails in preflight, before any data or training."""
    from hydra import compose, initialize_config_dir

    from kd_runner.config import preflight

    with initialize_config_dir(config_dir=str(helpers.CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["export=onnx"])
    preflight(cfg)  # the extra is installed here
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"^export=onnx needs the onnxruntime package; install it with: "
                                        r"pip install 'kd-runner\[export\]'$"):
        preflight(cfg)


# --------------------------------------------------------------------------- kd-train export=..., kd-export


@pytest.fixture(scope="module")
def hint_run(tmp_path_factory):
    """``kd-train method=hint export=torchscript`` on digits (a conv regressor in the student's checkpoint
    ``extra``), light_nn teacher and student: ``(run_dir, report, stderr)``."""
    tmp = tmp_path_factory.mktemp("export_hint_run")
    proc, run_dir = helpers.run_cli(["method=hint", "teacher=light_nn", "export=torchscript",
                                     "export.latency_iters=2", "export.throughput_iters=1"], tmp)
    return run_dir, helpers.assert_ok(proc, run_dir), proc.stderr


def without_exports(rep: dict) -> dict:
    out = json.loads(json.dumps(rep))
    for m in out["models"].values():
        m.pop("export", None)
    out["phase_seconds"].pop("export", None)
    return out


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd-export: error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


def test_export_on_a_finished_run_skips_it_and_names_kd_export(hint_run, tmp_path):
    """export is not part of the config hash: rerunning a finished run with export=onnx skips it, and says how to
    export it instead of silently doing nothing."""
    run_dir, rep, _ = hint_run
    finished = tmp_path / "finished"
    shutil.copytree(run_dir, finished, ignore=shutil.ignore_patterns("export", ".kd-train.lock"))
    (finished / "report.json").write_text(json.dumps(without_exports(rep)))
    proc, _ = helpers.run_cli(["method=hint", "teacher=light_nn", "export=onnx"], tmp_path, run_dir=finished)
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stdout
    assert f"kd-export {finished} --format onnx" in proc.stdout
    assert not (finished / "export").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_kd_train_export_writes_deployable_models(hint_run):
    run_dir, rep, stderr = hint_run
    assert not [ln for ln in stderr.splitlines() if re.search("export|onnx|jit|trac|deprecat", ln, re.I)], stderr
    md = (run_dir / "report.md").read_text()
    assert "export" in rep["phase_seconds"]
    for role in ("teacher", "baseline", "student"):
        e = rep["models"][role]["export"]
        assert (e["format"], e["file"], e["parity"], e["fallback"]) == (
            "torchscript", f"export/{role}.torchscript.pt", True, None)
        # the run is CPU float32 with 1 thread: the trace reproduces its test accuracy exactly
        assert e["test_acc"] == e["torch_test_acc"] == rep["models"][role]["test_acc"]
        assert e["input"]["shape"] == ["batch", *rep["dataset"]["input_shape"]]
        assert next(ln for ln in md.splitlines() if ln.startswith(f"| {role} | torchscript |"))
        sidecar = json.loads((run_dir / "export" / f"{role}.json").read_text())
        assert (sidecar["mean"], sidecar["std"]) == (rep["dataset"]["mean"], rep["dataset"]["std"])
    # the traced student holds the model and the normalisation, not the hint regressor of its checkpoint
    ckpt = torch.load(run_dir / "checkpoints" / "student.pt", weights_only=True)
    assert ckpt["extra"], "a hint run's student checkpoint holds its regressor"
    traced = torch.jit.load(str(run_dir / "export" / "student.torchscript.pt"))
    assert set(traced.state_dict()) == {f"model.{k}" for k in ckpt["model"]} | {"mean", "std"}


def test_kd_export_writes_verified_onnx_and_report_entries(hint_run, tmp_path, capsys, ort):
    import onnx

    run_dir, before, _ = hint_run
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    assert export_cli.main([str(work), "--latency-iters", "2", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    after = json.loads((work / "report.json").read_text())

    # every other field of report.json is kept; the torchscript files of the kd-train export are replaced
    assert without_exports(after) == without_exports(before)
    from kd_runner.report import markdown

    assert (work / "report.md").read_text() == markdown(after)
    assert sorted(p.name for p in (work / "export").iterdir()) == [
        f"{r}.{ext}" for r in ("baseline", "student", "teacher") for ext in ("json", "onnx")]

    # the runtime reproduces the run's own test accuracy (a CPU float32 run) on the real digits test split
    from kd_runner.data import build_data

    data = build_data(OmegaConf.create(before["config"]["dataset"]), "tensor", 0)
    x = data.test.images.float().numpy() / np.float32(255.0)
    for role in ("teacher", "baseline", "student"):
        e = after["models"][role]["export"]
        assert (e["format"], e["file"], e["parity"], e["fallback"], e["threads"]) == (
            "onnx", f"export/{role}.onnx", True, None, 1)
        assert e["torch_test_acc"] == before["models"][role]["test_acc"]
        session = ort.InferenceSession(str(work / e["file"]), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"images": x})[0]
        acc = round(100.0 * float((logits.argmax(1) == data.test.labels.numpy()).mean()), 4)
        assert acc == e["test_acc"] == before["models"][role]["test_acc"]
        assert all(e[k] > 0 for k in ("latency_ms", "throughput_ips", "torch_latency_ms", "torch_throughput_ips"))
        assert f"| {role} | onnx | {before['models'][role]['params']:,} |" in table

    # the hint regressor (checkpoint "extra") is not part of the exported student
    ckpt = torch.load(work / "checkpoints" / "student.pt", weights_only=True)
    graph = onnx.load(str(work / "export" / "student.onnx")).graph
    params = sum(v.numel() for v in ckpt["model"].values())
    extra_params = sum(v.numel() for v in ckpt["extra"].values())
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    assert not any("regressor" in name for name in sizes), sorted(sizes)
    assert params <= sum(sizes.values()) < params + extra_params
    assert {n.removeprefix("model.") for n in sizes if n.startswith("model.")} <= set(ckpt["model"])


def test_kd_export_errors_are_one_line(hint_run, tmp_path, capsys):
    run_dir = hint_run[0]
    report_bytes = (run_dir / "report.json").read_bytes()
    assert export_cli.main([str(tmp_path / "nope")]) == 2
    assert f"RUN_DIR '{tmp_path / 'nope'}' does not exist" in one_error_line(capsys)

    (tmp_path / "empty").mkdir()
    assert export_cli.main([str(tmp_path / "empty")]) == 2
    assert "holds no complete report.json" in one_error_line(capsys)

    assert export_cli.main([str(run_dir), "--format", "keras"]) == 2
    assert one_error_line(capsys).endswith("--format='keras' is invalid; valid: onnx, torchscript")
    assert export_cli.main([str(run_dir), "--atol", "-1"]) == 2
    assert "--atol=-1 is invalid" in one_error_line(capsys)
    assert export_cli.main([str(run_dir), "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in one_error_line(capsys)
    assert (run_dir / "report.json").read_bytes() == report_bytes

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("student.pt", "export"))
    assert export_cli.main([str(partial)]) == 2
    assert "has no checkpoints/student.pt" in one_error_line(capsys)
    assert not (partial / "export").exists() and (partial / "report.json").read_bytes() == report_bytes


def test_kd_export_without_the_extra(hint_run, monkeypatch, capsys):
    report_bytes = (hint_run[0] / "report.json").read_bytes()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert export_cli.main([str(hint_run[0])]) == 2
    assert one_error_line(capsys) == ("kd-export: error: export=onnx needs the onnxscript package; install it with: "
                                      "pip install 'kd-runner[export]'")
    assert (hint_run[0] / "report.json").read_bytes() == report_bytes
