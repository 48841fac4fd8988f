"""User mistakes through the real CLI: exit code 2, one ``kd-train: error:`` line naming the bad value,
no traceback, no report.json."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_user_error, run_cli

# (id, overrides, strings the error line must contain, True when the error happens inside the run)
CASES = [
    ("unknown_method", ["method=foo"], ["method='foo'", "ce, cosine, hint, kd"], False),
    ("unknown_experiment", ["experiment=mnist_hintn"], ["'mnist_hintn'", "mnist_hinton"], False),
    ("unknown_teacher", ["teacher=resnet"], ["'resnet'", "deep_nn"], False),
    ("T_zero", ["method.T=0"], ["method.T=0", "> 0"], True),
    ("negative_soft_weight", ["method.soft_weight=-0.5"], ["method.soft_weight=-0.5"], True),
    ("unknown_tap_layer", ["method=cosine", "method.student_layer=nope"], ["'nope'", "features.0", "classifier"],
     True),
    # dense_28's tapped vector has 28 features, LightNN's 16x2x2 map 64: pooling cannot widen the teacher
    ("cosine_teacher_narrower", ["method=cosine", "teacher=dense_28"], ["cosine", "28", "64"], True),
    # an 800-wide MLP vector cannot be regressed onto DeepNN's 32x2x2 conv map
    ("hint_vector_vs_map", ["method=hint", "student=mlp_800"], ["hint", "(800,)", "(32, 2, 2)"], True),
    ("bad_device", ["trainer.device=tpu"], ["trainer.device='tpu'", "cpu"], True),
    # not numbers where numbers belong: must not escape as ValueError tracebacks
    ("T_not_a_number", ["method.T=hot"], ["method.T", "hot"], True),
    ("lr_not_a_number", ["optimizer.lr=fast"], ["optimizer.lr", "fast"], True),
    # a misspelt key (T -> temperature) is the commonest config mistake
    ("unknown_method_key", ["method.temperature=4"], ["temperature"], False),
]


@pytest.mark.parametrize("overrides, needles, in_run", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_error(tmp_path, overrides, needles, in_run):
    proc, run_dir = run_cli(overrides, tmp_path)
    line = assert_user_error(proc, run_dir, *needles)
    if in_run:  # the run dir records the reason
        assert (run_dir / "error.txt").read_text().strip() == line.removeprefix("kd-train: error:").strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path):
    proc, run_dir = run_cli(["trainer.device=cuda"], tmp_path)
    assert_user_error(proc, run_dir, "cuda", "cpu")


def test_missing_mnist(tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    proc, run_dir = run_cli(["dataset=mnist"], tmp_path, env={"KD_DATA_DIR": str(empty)})
    assert_user_error(proc, run_dir, "mnist", str(empty / "MNIST" / "raw"), "download")


def test_nonexistent_teacher_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "teacher.pt"
    proc, run_dir = run_cli([f"teacher.checkpoint={missing}"], tmp_path)
    assert_user_error(proc, run_dir, "teacher.checkpoint", str(missing), "does not exist")


def test_garbage_teacher_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    proc, run_dir = run_cli([f"teacher.checkpoint={garbage}"], tmp_path)
    assert_user_error(proc, run_dir, "teacher.checkpoint", str(garbage), "not a readable")


def test_teacher_checkpoint_of_another_arch(tmp_path):
    from omegaconf import OmegaConf

    from kd_runner import checkpoints
    from kd_runner.models.tutorial import LightNN

    other = tmp_path / "light.pt"
    checkpoints.save(other, LightNN((1, 8, 8), 10), OmegaConf.create({"arch": "light_nn"}), (1, 8, 8), 10)
    proc, run_dir = run_cli([f"teacher.checkpoint={other}"], tmp_path)  # the teacher is a DeepNN
    assert_user_error(proc, run_dir, str(other), "DeepNN")


def test_console_script_reports_errors_the_same_way(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "kd-train"
    if not exe.is_file():
        exe = shutil.which("kd-train")
        if exe is None:
            pytest.skip("kd-train console script not installed in this environment")
    proc = subprocess.run([str(exe), "method=foo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kd-train: error: method='foo' is not a known option; valid: ce, cosine, hint, kd"
