"""``kd-export RUN_DIR``: export a finished kd-train run's models as deployable files, verified and timed.

Rebuilds each model of the run from ``checkpoints/<role>.pt`` (weights only; training extras such as regressors
are left out) and the test split from the report's own dataset config, then writes ``<RUN_DIR>/export/`` as
``kd-train ... export=onnx`` would, adds each model's ``export`` entry to report.json and re-renders report.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kd_runner import checkpoints
from kd_runner.errors import UserError, choices
from kd_runner.export import FORMATS, check_config, export_models, markdown_lines
from kd_runner.utils import atomic_write_text

EXIT_USER_ERROR = 2
CLI_FORMATS = tuple(f for f in FORMATS if f != "none")
EXAMPLES = """examples:
  kd-export outputs/runs/2025-01-01/12-00-00-000000_4242             ONNX, verified with ONNX Runtime
  kd-export RUN_DIR --format torchscript                               TorchScript, verified with torch.jit
  kd-export RUN_DIR --atol 1e-4 --threads 1 --latency-iters 200        stricter parity, single-thread timings
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own error prints the usage first)
        raise UserError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kd-export", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Export a finished kd-train run's teacher, baseline and student to <RUN_DIR>/export/\n"
                            "(float32 NCHW pixels in [0, 1] in, logits out, the run's normalisation inside), check\n"
                            "them against PyTorch on the test split, time them on the CPU, and add the results to\n"
                            "report.json and report.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished kd-train run dir (holds report.json, checkpoints/)")
    p.add_argument("--format", default="onnx", metavar="FORMAT", help=f"{' | '.join(CLI_FORMATS)} (default: onnx)")
    p.add_argument("--atol", type=float, default=None, metavar="X",
                   help="max |runtime logits - PyTorch logits| for parity (default: conf/export/<format>.yaml's)")
    p.add_argument("--latency-iters", type=int, default=None, metavar="N",
                   help="batch-1 calls timed per runtime (0: no timing; default: the YAML's)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch and the runtime (default: torch's)")
    return p


def export_settings(fmt: str, atol: float | None = None, latency_iters: int | None = None):
    """``conf/export/<fmt>.yaml`` with the command line's overrides (validated: one-line errors)."""
    from kd_runner.train import config_dir

    if fmt not in CLI_FORMATS:
        raise UserError(f"--format={fmt!r} is invalid; valid: {choices(CLI_FORMATS)}")
    cfg = OmegaConf.load(config_dir() / "export" / f"{fmt}.yaml")
    if atol is not None:
        if not (math.isfinite(atol) and atol > 0):
            raise UserError(f"--atol={atol:g} is invalid; it must be a positive number")
        cfg.atol = atol
    if latency_iters is not None:
        if latency_iters < 0:
            raise UserError(f"--latency-iters={latency_iters} is invalid; it must be >= 0")
        cfg.latency_iters = latency_iters
        cfg.throughput_iters = min(int(cfg.get("throughput_iters", 10)), latency_iters)
    check_config(cfg)
    return cfg


def load_run(run_dir: Path) -> dict:
    """The run's complete report; one-line errors for a missing dir or an unfinished/foreign one."""
    from kd_runner.train import complete_report

    if not run_dir.exists():
        raise UserError(f"RUN_DIR '{run_dir}' does not exist; give a kd-train run dir")
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR '{run_dir}' is not a directory; give a kd-train run dir")
    rep = complete_report(run_dir)
    if rep is None:
        raise UserError(f"RUN_DIR '{run_dir}' holds no complete report.json (an unfinished or failed run, or not a "
                        "kd-train run dir); export a finished run")
    for key in ("config", "dataset", "models"):
        if not isinstance(rep.get(key), dict):
            raise UserError(f"RUN_DIR '{run_dir}': report.json has no {key!r} section; it was not written by kd-train")
    return rep


def load_model(run_dir: Path, role: str) -> torch.nn.Module:
    """``checkpoints/<role>.pt`` rebuilt into its architecture (weights only; the ``extra`` modules are left out)."""
    from kd_runner.models import build_model

    path = run_dir / "checkpoints" / f"{role}.pt"
    if not path.is_file():
        raise UserError(f"RUN_DIR '{run_dir}' has no checkpoints/{role}.pt but its report lists a {role}; "
                        "the run dir is incomplete")
    payload = checkpoints.read(path, f"'{path}'", "kd-train checkpoint")
    keys = ("model", "model_cfg", "input_shape", "num_classes")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise UserError(f"'{path}' is not a kd-train checkpoint (it needs the keys {', '.join(keys)})")
    model_cfg = OmegaConf.create(payload["model_cfg"])
    if str(model_cfg.get("arch")) == "torchvision":
        model_cfg.weights = None  # the checkpoint holds every weight: never download pretrained ones to overwrite
    model = build_model(model_cfg, tuple(payload["input_shape"]), int(payload["num_classes"]))
    checkpoints.fit_state(model, payload["model"], f"'{path}'", f"its own arch {model_cfg.get('arch')}")
    return model.eval()


def export_run(run_dir: Path, export_cfg) -> dict:
    """Export the run in ``run_dir`` as ``export_cfg`` says; add the entries to report.json, re-render report.md;
    return the updated report."""
    from kd_runner.data import build_data
    from kd_runner.data.cache import set_cache_dir
    from kd_runner.report import markdown
    from kd_runner.train import lock_run_dir, unlock_run_dir

    rep = load_run(run_dir)
    held = lock_run_dir(run_dir, "run dir", "RUN_DIR")  # no kd-train may replace the run meanwhile
    try:
        rep = load_run(run_dir)  # as it is now that it is ours
        cfg = OmegaConf.create(rep["config"])
        roles = [r for r in export_cfg.roles if r in rep["models"]]
        models = {role: load_model(run_dir, role) for role in roles}
        set_cache_dir(Path(str(cfg.paths.cache_dir)))
        data = build_data(cfg.dataset, "tensor", 0)
        d = rep["dataset"]
        if len(data.test) != d.get("test") or data.num_classes != d.get("num_classes"):
            raise UserError(f"the test split rebuilt from the run's config.dataset has {len(data.test)} images of "
                            f"{data.num_classes} classes, but the run tested on {d.get('test')} of "
                            f"{d.get('num_classes')}; the data changed since the run")
        mean, std = d.get("mean") or data.mean, d.get("std") or data.std
        entries = export_models(models, export_cfg, run_dir / "export", data.test, mean, std, data.classes,
                                prog="kd-export")
        for role, info in entries.items():
            rep["models"][role]["export"] = info
        atomic_write_text(run_dir / "report.md", markdown(rep))
        atomic_write_text(run_dir / "report.json", json.dumps(rep, indent=2, default=str))
    finally:
        if held:
            unlock_run_dir(run_dir)
    return rep


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kd-export``: 0 on success, 2 (one ``kd-export: error:`` line) on a user error."""
    try:
        args = parser().parse_args(argv)
        export_cfg = export_settings(str(args.format), args.atol, args.latency_iters)
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads={args.threads} is invalid; it must be >= 1")
            torch.set_num_threads(args.threads)
        rep = export_run(Path(args.run_dir), export_cfg)
    except UserError as err:
        print(f"kd-export: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(markdown_lines(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
