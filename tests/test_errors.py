"""User mistakes through the real CLI (one subprocess each): exit code 2, one ``kd-train: error:`` line
naming the bad value, no traceback, no report.json."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF, assert_user_error, run_many
from omegaconf import OmegaConf


def _garbage_checkpoint(base: Path) -> Path:
    path = base / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _empty_dir(base: Path) -> Path:
    path = base / "empty-data"
    path.mkdir()
    return path


# id -> (overrides, strings the error line must contain, True when the error happens inside the run)
# "{x}" in an override or needle is filled from SETUP[id](base) (a file or folder the case needs)
METHOD_OPTIONS = ", ".join(sorted(p.stem for p in (CONF / "method").glob("*.yaml")))  # the group's options
CASES: dict[str, tuple[list[str], list[str], bool]] = {
    "unknown_method": (["method=foo"], ["method='foo'", f"valid: {METHOD_OPTIONS}"], False),
    "unknown_experiment": (["experiment=mnist_hintn"], ["'mnist_hintn'", "mnist_hinton"], False),
    "T_zero": (["method.T=0"], ["method.T=0", "> 0"], True),
    "negative_soft_weight": (["method.soft_weight=-0.5"], ["method.soft_weight=-0.5"], True),
    "unknown_tap_layer": (["method=cosine", "method.student_layer=nope"], ["'nope'", "features.0", "classifier"],
                          True),
    # dense_28's tapped vector has 28 features, LightNN's 16x2x2 map 64: pooling cannot widen the teacher
    "cosine_teacher_narrower": (["method=cosine", "teacher=dense_28"], ["cosine", "28", "64"], True),
    # an 800-wide MLP vector cannot be regressed onto DeepNN's 32x2x2 conv map
    "hint_vector_vs_map": (["method=hint", "student=mlp_800"], ["hint", "(800,)", "(32, 2, 2)"], True),
    "bad_device": (["trainer.device=tpu"], ["trainer.device='tpu'", "cpu"], True),
    "missing_mnist": (["dataset=mnist"], ["mnist", "{x}/MNIST/raw", "download"], True),
    "nonexistent_teacher_checkpoint": (["teacher.checkpoint={x}"], ["teacher.checkpoint", "{x}", "does not exist"],
                                       True),
    "garbage_teacher_checkpoint": (["teacher.checkpoint={x}"], ["teacher.checkpoint", "{x}", "not a readable"], True),
    # not a number where a number belongs: must not escape as a ValueError traceback
    "T_not_a_number": (["method.T=hot"], ["method.T", "hot"], True),
    # a misspelt key (T -> temperature) is the commonest config mistake
    "unknown_method_key": (["method.temperature=4"], ["temperature"], False),
    # compute-path switches
    "bad_amp": (["trainer.amp=fp8"], ["trainer.amp='fp8'", "auto, bf16, off"], True),
    "bad_channels_last": (["trainer.channels_last=maybe"], ["trainer.channels_last='maybe'", "auto, off, on"], True),
    "bad_cuda_graphs": (["trainer.cuda_graphs=yes"], ["trainer.cuda_graphs='yes'", "auto, off, on"], True),
    "bad_data_on_device": (["trainer.data_on_device=gpu"], ["trainer.data_on_device='gpu'", "auto, off, on"], True),
    "bad_data_path": (["trainer.data_path=disk"], ["trainer.data_path='disk'", "auto, loader, tensor"], True),
    "negative_num_workers": (["trainer.num_workers=-1"], ["trainer.num_workers=-1", ">= 0"], True),
    "compile_not_bool": (["trainer.compile=fast"], ["trainer.compile='fast'", "true or false"], True),
    # asked for explicitly where it cannot run: say so instead of silently running eagerly
    "cuda_graphs_on_cpu": (["trainer.cuda_graphs=on", "trainer.device=cpu"], ["trainer.cuda_graphs=on", "not a CUDA"],
                           True),
}
SETUP = {
    "missing_mnist": _empty_dir,
    "nonexistent_teacher_checkpoint": lambda base: base / "nope" / "teacher.pt",
    "garbage_teacher_checkpoint": _garbage_checkpoint,
}
ENV = {"missing_mnist": lambda x: {"KD_DATA_DIR": str(x)}}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict:
    jobs, needles = {}, {}
    for name, (overrides, wanted, _) in CASES.items():
        base = tmp_path_factory.mktemp(f"err_{name}")
        x = str(SETUP[name](base)) if name in SETUP else ""
        jobs[name] = {"args": [o.replace("{x}", x) for o in overrides], "tmp_path": base,
                      "env": ENV[name](x) if name in ENV else None}
        needles[name] = [n.replace("{x}", x) for n in wanted]
    results = run_many(jobs, workers=6)  # short, import-bound processes
    return {name: (*results[name], needles[name]) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error(error_runs, case):
    proc, run_dir, needles = error_runs[case]
    line = assert_user_error(proc, run_dir, *needles)
    if CASES[case][2]:  # the run dir records the reason
        assert (run_dir / "error.txt").read_text().strip() == line.removeprefix("kd-train: error:").strip()


def test_console_script_reports_errors_the_same_way(tmp_path):
    exe = Path(sys.executable).parent / "kd-train"
    if not exe.is_file():
        found = shutil.which("kd-train")
        if found is None:
            pytest.skip("kd-train console script not installed in this environment")
        exe = Path(found)
    proc = subprocess.run([str(exe), "method=foo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    valid = ", ".join(sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
    assert proc.stderr.strip() == f"kd-train: error: method='foo' is not a known option; valid: {valid}"


# --------------------------------------------------------------------------- the same checks in-process
# (cheaper than a CLI run each: the entry point turns any UserError into the one-line message)


def test_teacher_checkpoint_of_another_arch(tmp_path):
    from kd_runner import checkpoints
    from kd_runner.errors import UserError
    from kd_runner.models.tutorial import DeepNN, LightNN

    path = tmp_path / "light.pt"
    checkpoints.save(path, LightNN((1, 8, 8), 10), OmegaConf.create({"arch": "light_nn"}), (1, 8, 8), 10)
    with pytest.raises(UserError, match="DeepNN") as info:
        checkpoints.load_weights(path, DeepNN((1, 8, 8), 10), "teacher")
    assert str(path) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    from kd_runner.errors import UserError
    from kd_runner.utils import resolve_device

    with pytest.raises(UserError, match="cuda"):
        resolve_device("cuda")


@pytest.mark.parametrize("group, cfg", [
    ("optimizer", {"name": "adam", "lr": "fast"}),
    ("optimizer", {"name": "sgd", "lr": 0.1, "momentum": "lots"}),
    ("scheduler", {"name": "step", "step_size": "ten", "gamma": 0.1}),
])
def test_non_numeric_optimizer_and_scheduler_values_are_user_errors(group, cfg):
    """``optimizer.lr=fast`` and the like must give the one-line error, not a ValueError traceback."""
    from kd_runner.errors import UserError
    from kd_runner.optim import build_optimizer, build_scheduler

    probe = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(UserError):
        if group == "optimizer":
            build_optimizer(OmegaConf.create(cfg), probe)
        else:
            build_scheduler(OmegaConf.create(cfg), build_optimizer(OmegaConf.create({"name": "adam", "lr": 1e-3}),
                                                                    probe), 1)
