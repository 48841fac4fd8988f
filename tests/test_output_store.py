"""Teacher outputs stored like teachers: a sweep over methods and T runs the teacher pass once, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
import torch

from kd_runner.output_store import OUTPUTS_FILE, load_or_compute

KD = ["method=kd", "trainer.student_epochs=2", "trainer.teacher_outputs=cache", "trainer.bench_iters=0"]


def test_second_job_loads_the_teacher_pass_and_trains_the_same_student(run_cli, tmp_path):
    first, _ = run_cli([*KD, "method.T=2"], tmp_path, run_dir=tmp_path / "t2")
    assert first.returncode == 0, first.stderr[-2000:]
    stored, run_stored = run_cli([*KD, "method.T=4"], tmp_path, run_dir=tmp_path / "t4")
    assert stored.returncode == 0, stored.stderr[-2000:]
    fresh, run_fresh = run_cli([*KD, "method.T=4", "trainer.teacher_cache=false"], tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    rep2 = json.loads((tmp_path / "t2" / "report.json").read_text())
    rep4 = json.loads((run_stored / "report.json").read_text())
    assert rep2["teacher"]["outputs_store"]["source"] == "computed"
    assert rep4["teacher"]["outputs_store"] == {**rep2["teacher"]["outputs_store"], "source": "store"}
    assert "outputs_store" not in json.loads((run_fresh / "report.json").read_text())["teacher"]
    # the stored logits are the teacher pass: the student trains exactly as with a fresh pass (same teacher: the
    # fresh run trains its own, from the same seed, with teacher_cache=false)
    student = [r for r in helpers.read_metrics(run_stored) if r["phase"] == "student"]
    student_fresh = [r for r in helpers.read_metrics(run_fresh) if r["phase"] == "student"]
    assert [r["train_loss"] for r in student] == [r["train_loss"] for r in student_fresh]
    assert rep4["models"]["student"]["test_acc"] == json.loads(
        (run_fresh / "report.json").read_text())["models"]["student"]["test_acc"]


def test_a_feature_method_stores_its_reduced_teacher_maps_and_a_later_run_trains_the_same(run_cli, tmp_path):
    """method=at: the teacher's stage maps, reduced to attention maps, are stored; a later run (another job of a sweep
    over seeds or weights) loads them and trains exactly as the run that computed them."""
    args = ["method=at", "trainer.student_epochs=1", "trainer.teacher_outputs=cache", "trainer.bench_iters=0"]
    first, run1 = run_cli(args, tmp_path, run_dir=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    again, run2 = run_cli(args, tmp_path, run_dir=tmp_path / "b")
    assert again.returncode == 0, again.stderr[-2000:]
    rep1, rep2 = (json.loads((d / "report.json").read_text()) for d in (run1, run2))
    assert rep1["teacher"]["outputs_store"]["source"] == "computed"
    assert rep2["teacher"]["outputs_store"] == {**rep1["teacher"]["outputs_store"], "source": "store"}
    meta = json.loads((Path(rep1["teacher"]["outputs_store"]["path"]).parent / "meta.json").read_text())
    reads = meta["key_material"]["reads"]
    assert reads["taps"] and reads["p"] == 2.0 and reads["grids"]  # what the stored maps depend on is in the key
    stored = torch.load(rep1["teacher"]["outputs_store"]["path"], weights_only=True)
    assert set(stored["feats"]) == set(reads["taps"]) and all(v.dim() == 3 for v in stored["feats"].values())
    s1, s2 = ([r for r in helpers.read_metrics(d) if r["phase"] == "student"] for d in (run1, run2))
    assert [r["train_loss"] for r in s1] == [r["train_loss"] for r in s2]
    assert rep1["models"]["student"]["test_acc"] == rep2["models"]["student"]["test_acc"]


def test_every_method_that_reduces_teacher_maps_keys_what_the_reduction_reads():
    """A method overriding reduce_teacher must override reduce_identity, or stored maps could serve another setting."""
    from kd_runner.methods.base import Method
    from kd_runner.methods.compose import Composite
    from kd_runner.methods.registry import methods

    classes = {**methods(), "composite": Composite}
    assert {"at", "vid"} <= {n for n, c in classes.items() if c.reduce_teacher is not Method.reduce_teacher}
    for name, cls in classes.items():
        if cls.reduce_teacher is not Method.reduce_teacher:
            assert cls.reduce_identity is not Method.reduce_identity, name


def test_a_corrupt_entry_is_set_aside_and_recomputed(tmp_path, capsys):
    key = ("k" * 16, {"what": "test"})
    calls = []

    def compute(stored):
        calls.append(stored)
        return stored if stored is not None else torch.arange(6.0).reshape(2, 3)

    logits, info = load_or_compute(tmp_path, key, compute, torch.device("cpu"))
    assert info["source"] == "computed" and calls == [None]
    again, info = load_or_compute(tmp_path, key, compute, torch.device("cpu"))
    assert info["source"] == "store" and torch.equal(again, logits)
    (tmp_path / key[0] / OUTPUTS_FILE).write_bytes(b"not a tensor")
    third, info = load_or_compute(tmp_path, key, compute, torch.device("cpu"))
    assert info["source"] == "computed" and torch.equal(third, logits)
    assert list(tmp_path.glob(f"{key[0]}.corrupt-*"))
    assert "are corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("planted", ["pickle"])
def test_a_planted_pickle_is_never_run(tmp_path, planted):
    import pickle

    key = ("p" * 16, {})
    load_or_compute(tmp_path, key, lambda s: torch.zeros(1), torch.device("cpu"))
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / key[0] / OUTPUTS_FILE
    torch.save({"x": Boom()}, path, pickle_module=pickle)
    load_or_compute(tmp_path, key, lambda s: torch.zeros(1) if s is None else s, torch.device("cpu"))
    assert not marker.exists()
