"""Scarce labels (``dataset.label_fraction``): who sees which labels, the masked CE, the step-matched baseline."""

from __future__ import annotations

import csv

import helpers
import pytest
import torch
import torch.nn.functional as F

from kd_runner.data.tensors import stratified_fraction
from kd_runner.methods.base import IGNORE, cross_entropy
from kd_runner.pipeline import matched_epochs


def test_stratified_fraction_is_class_balanced_seeded_and_keeps_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx = stratified_fraction(labels, 0.1, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [5, 3, 1]  # round(50*.1), round(30*.1), and a rare class keeps one image
    assert torch.equal(idx, stratified_fraction(labels, 0.1, seed=0))
    assert not torch.equal(idx, stratified_fraction(labels, 0.1, seed=1))
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)


def test_cross_entropy_skips_unlabelled_and_never_divides_by_zero():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([1, IGNORE, 3, IGNORE, 0, 2])
    mask = targets != IGNORE
    assert torch.allclose(cross_entropy(logits, targets), F.cross_entropy(logits[mask], targets[mask]))
    full = torch.tensor([1, 0, 3, 2, 0, 2])
    assert torch.allclose(cross_entropy(logits, full), F.cross_entropy(logits, full))
    none = torch.full((6,), IGNORE)
    loss = cross_entropy(logits, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_matched_epochs_give_the_baseline_as_many_steps():
    # 1,438 images at batch 128: 12 steps per epoch; 72 labelled: 1 step per epoch
    assert matched_epochs(30, 1438, 72, 128) == 360
    assert matched_epochs(10, 1438, 144, 128) == 60
    assert matched_epochs(10, 1438, 1438, 128) == 10


def test_digits_run_with_scarce_labels(tmp_path):
    args = ["dataset.label_fraction=0.1", "trainer.student_epochs=2", "trainer.teacher_outputs=cache"]
    proc, run_dir = helpers.run_cli(args, tmp_path)
    rep = helpers.assert_ok(proc, run_dir)
    d = rep["dataset"]
    assert d["train"] == 1438 and d["labelled"] == 144
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = {p: sum(r["phase"] == p for r in rows) for p in ("baseline", "student")}
    assert epochs == {"baseline": matched_epochs(2, 1438, 144, 128), "student": 2}
    assert "144 labelled training images" in proc.stdout and "other 1294" in proc.stdout
    assert rep["models"]["baseline"]["init_hash"] == rep["models"]["student"]["init_hash"]
    # every student row's train_acc is a share of labelled images: a percentage, not deflated by the unlabelled
    assert all(0.0 <= float(r["train_acc"]) <= 100.0 for r in rows)
    # the labelled subset keys the stored baseline: a full-label run must not reuse it
    proc2, run_dir2 = helpers.run_cli(args[1:], tmp_path, run_dir=tmp_path / "full")
    rep2 = helpers.assert_ok(proc2, run_dir2)
    assert rep2["models"]["baseline"]["source"]["source"] == "trained"
    assert rep2["dataset"]["labelled"] == 1438


@pytest.mark.parametrize("args, needle", [
    (["dataset.label_fraction=0"], "dataset.label_fraction=0 is invalid; it must be in (0, 1]"),
    (["dataset.label_fraction=0.5", "method=dkd"], "method=dkd reads labels beyond its CE term"),
])
def test_bad_label_settings_fail_before_training(tmp_path, args, needle):
    proc, run_dir = helpers.run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoints").exists()
