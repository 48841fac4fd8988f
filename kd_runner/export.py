"""Deployable models: the run's teacher, baseline and student as ONNX (or TorchScript) files, verified and timed.

Each exported graph stands on its own: it takes float32 NCHW pixels in [0, 1] (what torchvision's ``ToTensor``
gives), applies the run's mean/std inside the graph and returns logits, with a dynamic batch axis. It is exported
on the CPU in float32 from an eval-mode copy of the model (the run may have trained on CUDA in channels_last/bf16),
then checked: the runtime's logits against PyTorch's over the whole test split, top-1 accuracy through the runtime,
and batch-1 latency / batch-N throughput on the CPU in the runtime and in eager PyTorch (same threads, same inputs).
A ``<role>.json`` beside each file holds the input spec, mean/std, class names, accuracy and parity.

ONNX first through ``torch.onnx.export(dynamo=True)``, then the TorchScript-based exporter (``dynamo=False``);
only when both fail is the model traced to TorchScript, and ``fallback`` says why. onnx, onnxruntime and
onnxscript are an optional extra (``kd-runner[export]``), imported only when an export runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner import __version__
from kd_runner.errors import UserError, choices, number
from kd_runner.inference import time_calls
from kd_runner.utils import atomic_write_bytes, atomic_write_text

FORMATS = ("none", "onnx", "torchscript")
ROLES = ("teacher", "baseline", "student")  # the report's order (kept here: kd_runner.report imports this module)
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
EXTRA_HINT = "pip install 'kd-runner[export]'"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PARITY_BATCH = 256  # test images per runtime call while checking parity
SAMPLE_BATCH = 2  # the example batch the exporters trace with (not 1: a traced size-1 batch can be specialised)

Runner = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed view of ``cfg.export``, built (and validated) by :func:`settings`."""

    format: str
    atol: float
    latency_iters: int
    throughput_iters: int
    throughput_batch: int
    roles: tuple[str, ...]
    opset: int | None


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def check_available(fmt: str) -> None:
    """A one-line :class:`UserError` for an unknown format, or for ``onnx`` without its packages (the extra)."""
    if fmt not in FORMATS:
        raise UserError(f"export.format={fmt!r} is invalid; valid: {choices(FORMATS)}")
    if fmt != "onnx":
        return  # TorchScript is written and checked by torch alone
    missing = [name for name in ONNX_PACKAGES if not _importable(name)]
    if missing:
        what = (f"the {missing[0]} package; install it" if len(missing) == 1
                else f"the {' and '.join(missing)} packages; install them")
        raise UserError(f"export=onnx needs {what} with: {EXTRA_HINT}")


def settings(cfg: DictConfig | dict) -> Settings:
    """Validate an export config (conf/export/*.yaml); one-line errors name the bad key."""
    get = cfg.get
    fmt = str(get("format", "none"))
    if fmt not in FORMATS:
        raise UserError(f"export.format={fmt!r} is invalid; valid: {choices(FORMATS)}")
    atol = number(get("atol", 1e-3), "export.atol")
    if atol <= 0:
        raise UserError(f"export.atol={atol:g} is invalid; it must be > 0")
    ints = {}
    for key, default, low in (("latency_iters", 50, 0), ("throughput_iters", 10, 0), ("throughput_batch", 64, 1)):
        ints[key] = number(get(key, default), f"export.{key}", int)
        if ints[key] < low:
            raise UserError(f"export.{key}={ints[key]} is invalid; it must be >= {low}")
    roles = get("roles", list(ROLES))
    roles = [roles] if isinstance(roles, str) else list(roles or [])
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise UserError(f"export.roles={roles} is invalid; give a list of: {choices(ROLES)}")
    opset = get("opset")
    if opset is not None:
        opset = number(opset, "export.opset", int)
        if opset < 7:
            raise UserError(f"export.opset={opset} is invalid; give an ONNX opset >= 7 or null (the exporter's)")
    return Settings(fmt, atol, ints["latency_iters"], ints["throughput_iters"], ints["throughput_batch"],
                    tuple(dict.fromkeys(roles)), opset)


def check_config(cfg: DictConfig | dict) -> Settings:
    """Every check of ``cfg.export`` that needs no model (preflight): values, format, the optional packages."""
    s = settings(cfg)
    check_available(s.format)
    return s


class Deployable(nn.Module):
    """``model((images - mean) / std)``: the run's normalisation baked in front of the model.

    ``images`` are float32 NCHW pixels in [0, 1]; the arithmetic is the run's own (``data.tensors.Normalizer``
    after ``uint8 / 255``), so the logits are the ones the run computed.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def cpu_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 copy on the CPU in the default memory format; ``model`` itself is untouched."""
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:  # a compiled copy would call the original
            m._compiled_call_impl = None
    clone = clone.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
    clone.kd_channels_last = False
    return clone.eval()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what exporters print: Python output, warnings, and C++ output on file descriptors 1 and 2."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with (tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings()):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _why(err: BaseException, limit: int = 160) -> str:
    """One line for an exporter's error: its root cause (the exporters wrap it in a generic "step 1/3" error),
    without colour codes, cut to ``limit`` characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split()) or "no message"
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# --------------------------------------------------------------------------- writing the files


def _onnx_proto(deploy: nn.Module, sample: torch.Tensor, opset: int | None, dynamo: bool):
    """The ONNX ModelProto of ``deploy`` with a dynamic batch axis, from the dynamo or the TorchScript exporter."""
    import onnx

    with quiet():
        if dynamo:
            program = torch.onnx.export(deploy, (sample,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(deploy, (sample,), buf, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())


def _serialize(deploy: nn.Module, sample: torch.Tensor, s: Settings, meta: dict) -> tuple[str, bytes, str, str | None]:
    """``(format, file bytes, exporter, fallback)``: ONNX (dynamo, then the TorchScript-based exporter), else a
    TorchScript trace with ``fallback`` saying why ONNX could not be written."""
    fallback = None
    if s.format == "onnx":
        import onnx

        errors: list[str] = []
        for dynamo in (True, False):
            try:
                proto = _onnx_proto(deploy, sample, s.opset, dynamo)
                onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                                    for k, v in meta.items()})
                proto.doc_string = meta["description"]
                opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
                exporter = f"torch.onnx dynamo={dynamo}, opset {opset}" + (f" ({errors[0]})" if errors else "")
                return "onnx", proto.SerializeToString(), exporter, None
            except Exception as err:  # exporters raise many types; both failing means TorchScript
                errors.append(f"dynamo={dynamo} failed: {_why(err)}")
        fallback = f"ONNX could not export it ({'; '.join(errors)}); TorchScript written instead"
    with quiet(), torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(deploy, sample, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"kd_runner.json": json.dumps(meta)})
    return "torchscript", buf.getvalue(), "torch.jit.trace", fallback


def _runner(fmt: str, path: Path, threads: int) -> tuple[Runner, str]:
    """A function from float32 NCHW images to logits that runs the written file, and the runtime's name."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return (lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]), f"onnxruntime {ort.__version__}"
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x)).numpy()

    return run, f"torch.jit (torch {torch.__version__})"


# --------------------------------------------------------------------------- checking and timing


@torch.inference_mode()
def verify(deploy: nn.Module, run: Runner, test, batch_size: int = PARITY_BATCH) -> dict:
    """Runtime vs PyTorch logits over the whole ``test`` split (plus its first image alone, a batch of 1):
    ``max_abs_diff`` (inf when either side is not finite) and top-1 accuracy (%) of both."""
    worst, hits_rt, hits_pt, n = 0.0, 0, 0, 0
    first = True
    for _idx, images, labels in test.batches(batch_size, shuffle=False):
        x = images.cpu().float().div_(255.0)
        batches = [x[:1], x] if first else [x]
        first = False
        for xb in batches:
            ref = deploy(xb)
            out = torch.from_numpy(np.asarray(run(xb.numpy()), dtype=np.float32))
            if out.shape != ref.shape:
                raise RuntimeError(f"the runtime returned logits of shape {tuple(out.shape)}, not {tuple(ref.shape)}")
            diff = float((out - ref).abs().max()) if out.numel() else 0.0
            worst = max(worst, diff) if math.isfinite(diff) else math.inf
        labels = labels.cpu()
        hits_rt += int((out.argmax(1) == labels).sum())
        hits_pt += int((ref.argmax(1) == labels).sum())
        n += len(labels)
    def acc(hits: int) -> float | None:
        return round(100.0 * hits / n, 4) if n else None

    return {"max_abs_diff": worst, "test_acc": acc(hits_rt), "torch_test_acc": acc(hits_pt), "n": n}


# --------------------------------------------------------------------------- one model, every model


def input_spec(shape: tuple[int, int, int]) -> dict:
    return {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32", "range": "[0, 1]", "layout": "NCHW"}


def _write(out_dir: Path, role: str, fmt: str, blob: bytes) -> Path:
    """``<out_dir>/<role>.<suffix>`` atomically; an earlier export of the role in the other format goes (stale)."""
    path = out_dir / f"{role}{SUFFIXES[fmt]}"
    atomic_write_bytes(path, blob)
    for other, suffix in SUFFIXES.items():
        if other != fmt:
            (out_dir / f"{role}{suffix}").unlink(missing_ok=True)
    return path


def export_one(role: str, model: nn.Module, s: Settings, out_dir: Path, test, mean: list[float], std: list[float],
               class_names: list[str], prog: str = "kd-train") -> dict:
    """Write, verify and time one model; write its ``<role>.json``; return its report entry."""
    shape = tuple(int(v) for v in test.sample_shape)
    threads = torch.get_num_threads()
    deploy = Deployable(cpu_copy(model), mean, std).eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.rand(SAMPLE_BATCH, *shape, generator=gen)
    one = torch.rand(1, *shape, generator=gen)
    many = torch.rand(s.throughput_batch, *shape, generator=gen)
    with torch.inference_mode():  # before any runtime starts: no idle runtime threads compete for the cores
        t_latency, t_throughput = time_calls(deploy, one, many, s.latency_iters, s.throughput_iters)
    meta = {"description": f"kd-runner {role}: float32 NCHW pixels in [0, 1] -> logits; the normalisation "
                           "(x - mean) / std is inside the graph",
            "kd_runner": __version__, "role": role, "input": input_spec(shape), "mean": list(mean),
            "std": list(std), "class_names": list(class_names)}
    fmt, blob, exporter, fallback = _serialize(deploy, sample, s, meta)
    path = _write(out_dir, role, fmt, blob)
    try:
        run, runtime = _runner(fmt, path, threads)
        check = verify(deploy, run, test)
    except Exception as err:  # ONNX Runtime cannot load or run the graph (an op or type it lacks): TorchScript
        if fmt != "onnx":
            raise
        fmt, blob, exporter, _ = _serialize(deploy, sample, dataclasses.replace(s, format="torchscript"), meta)
        fallback = f"ONNX Runtime cannot run the exported graph ({_why(err)}); TorchScript written instead"
        path = _write(out_dir, role, fmt, blob)
        run, runtime = _runner(fmt, path, threads)
        check = verify(deploy, run, test)
    latency, throughput = time_calls(run, one.numpy(), many.numpy(), s.latency_iters, s.throughput_iters)
    del run  # the runtime's session and its threads go now, not with the next model's timings
    info = {
        "format": fmt,
        "file": f"{out_dir.name}/{path.name}",
        "fallback": fallback,
        "exporter": exporter,
        "atol": s.atol,
        "max_abs_diff": check["max_abs_diff"],
        "parity": check["max_abs_diff"] <= s.atol,
        "test_acc": check["test_acc"],
        "torch_test_acc": check["torch_test_acc"],
        "runtime": runtime,
        "latency_ms": latency,
        "throughput_ips": throughput,
        "torch_latency_ms": t_latency,
        "torch_throughput_ips": t_throughput,
        "throughput_batch": s.throughput_batch,
        "threads": threads,
        "size_bytes": len(blob),
        "input": input_spec(shape),
    }
    sidecar = {**meta, **{k: v for k, v in info.items() if k != "input"}, "test_images": check["n"],
               "output": {"name": OUTPUT_NAME, "shape": ["batch", len(class_names)], "dtype": "float32"},
               "torch": torch.__version__}
    atomic_write_text(out_dir / f"{role}.json", json.dumps(sidecar, indent=2) + "\n")
    if fallback:
        print(f"{prog}: warning: {role}: {fallback}", file=sys.stderr)
    if not info["parity"]:
        print(f"{prog}: warning: {role}: {runtime} logits differ from PyTorch's by up to "
              f"{check['max_abs_diff']:.3g} on the test split, more than export.atol={s.atol:g}; "
              f"{info['file']} is written but does not match the trained model", file=sys.stderr)
    return info


def failed_entry(s: Settings, shape: tuple[int, int, int], err: BaseException) -> dict:
    """The report entry of a model whose export failed altogether: every key, ``error`` saying why."""
    return {"format": s.format, "file": None, "fallback": None, "exporter": None, "atol": s.atol,
            "max_abs_diff": None, "parity": False, "test_acc": None, "torch_test_acc": None, "runtime": None,
            "latency_ms": None, "throughput_ips": None, "torch_latency_ms": None, "torch_throughput_ips": None,
            "throughput_batch": s.throughput_batch, "threads": torch.get_num_threads(), "size_bytes": None,
            "input": input_spec(shape), "error": _why(err, 300)}


def export_models(models: dict[str, nn.Module], export_cfg: DictConfig, out_dir: Path, test, mean: list[float],
                  std: list[float], class_names: list[str], *, prog: str = "kd-train") -> dict[str, dict]:
    """Export every model of ``export_cfg.roles`` that ``models`` holds into ``out_dir``: ``{role: info}``
    (the report's ``models[role].export``); ``{}`` for ``format: none``.

    ``models`` are the bare models (no training extras: regressors, heads); each is copied, never changed.
    ``test`` is the run's test split (uint8 images, labels), ``mean``/``std`` its normalisation. A model that
    cannot be exported at all costs a warning line and an entry with ``error``, never the run's other results.
    """
    s = check_config(export_cfg if export_cfg is not None else OmegaConf.create({"format": "none"}))
    if s.format == "none":
        return {}
    out: dict[str, dict] = {}
    for role in (r for r in s.roles if r in models):
        try:
            out[role] = export_one(role, models[role], s, Path(out_dir), test, mean, std, class_names, prog)
        except Exception as err:  # after hours of training, a failed export must not lose the report
            out[role] = failed_entry(s, tuple(int(v) for v in test.sample_shape), err)
            print(f"{prog}: warning: {role}: export failed ({out[role]['error']}); the run's other results are "
                  "kept", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = ["model", "format", "params", "file MB", "test acc % (torch)", "test acc % (runtime)", "max abs diff",
          "parity", "latency ms bs 1 (runtime)", "latency ms bs 1 (torch)", "img/s bs {b} (runtime)",
          "img/s bs {b} (torch)", "file"]


def markdown_lines(rep: dict) -> list[str]:
    """Markdown lines for report.md (no heading): a table with one row per exported role (teacher, baseline,
    student): size, accuracy through PyTorch and through the runtime, parity, CPU speed in both; then notes (runtime,
    input spec, fallbacks, failed parity). ``[]`` when no role was exported.

    "torch" columns are eager PyTorch float32 on the CPU with the same threads and inputs as the runtime.
    """
    models = rep.get("models") or {}
    rows = [(role, models[role]) for role in ROLES
            if isinstance(models.get(role), dict) and isinstance(models[role].get("export"), dict)]
    if not rows:
        return []
    first = rows[0][1]["export"]
    batch = first.get("throughput_batch", 64)
    runtimes = sorted({m["export"]["runtime"] for _, m in rows if m["export"].get("runtime")}) or ["no runtime"]
    threads = first.get("threads")
    lines = ["| " + " | ".join(h.format(b=batch) for h in HEADER) + " |", "|" + "---|" * len(HEADER)]
    notes = []
    for role, m in rows:
        e = m["export"]
        diff = e.get("max_abs_diff")
        size = e.get("size_bytes")
        lines.append("| " + " | ".join([
            role, e.get("format", "?"), _fmt(m.get("params"), ","), _fmt(size / 1e6 if size else None, ".2f"),
            _fmt(e.get("torch_test_acc", m.get("test_acc")), ".2f"), _fmt(e.get("test_acc"), ".2f"),
            _fmt(diff, ".1e"), f"{'yes' if e.get('parity') else 'NO'} (atol {_fmt(e.get('atol'), 'g')})",
            _fmt(e.get("latency_ms"), ".3f"), _fmt(e.get("torch_latency_ms"), ".3f"),
            _fmt(e.get("throughput_ips"), ".0f"), _fmt(e.get("torch_throughput_ips"), ".0f"),
            f"`{e['file']}`" if e.get("file") else "failed"]) + " |")
        if e.get("fallback"):
            notes.append(f"- {role}: {e['fallback']}")
        if e.get("error"):
            notes.append(f"- {role}: export failed: {e['error']}")
        elif not e.get("parity"):
            notes.append(f"- {role}: the runtime's logits differ from PyTorch's by up to {_fmt(diff, '.3g')}, more "
                         f"than atol {_fmt(e.get('atol'), 'g')}: the file does not match the trained model")
    inp = first.get("input") or {}
    lines += ["", f"- runtime: {', '.join(runtimes)}; torch: eager PyTorch float32; both on the CPU with {threads} "
                  f"thread{'' if threads == 1 else 's'}, the same inputs; accuracy over the whole test split",
              f"- input `{inp.get('name')}`: {inp.get('dtype')} {inp.get('layout', 'NCHW')} {inp.get('shape')}, "
              f"pixels in {inp.get('range')} (torchvision's ToTensor); the run's mean/std are inside the graph; "
              "output: logits. Each file has a `<role>.json` beside it (input spec, mean/std, class names, accuracy, "
              "parity)."]
    return lines + notes
