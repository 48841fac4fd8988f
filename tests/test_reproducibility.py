"""Seeded reruns, teacher outputs cached vs live, and reusing a saved teacher (``teacher.checkpoint``)."""

from __future__ import annotations

import pytest
import torch
from helpers import HINT_DIGITS_ARGS, KD_DIGITS_ARGS, assert_ok, read_metrics, run_many
from omegaconf import OmegaConf

from kd_runner.models.tutorial import LightNN
from kd_runner.utils import weights_hash

ROLES = ("teacher", "baseline", "student")


def with_override(args: list[str], key: str, value: str) -> list[str]:
    return [a for a in args if a.split("=", 1)[0] != key] + [f"{key}={value}"]


def numeric_metrics(run_dir) -> list[dict]:
    """metrics.csv rows without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def repro_runs(tmp_path_factory, kd_digits_run) -> dict:
    """Runs compared with the shared kd/hint digits runs (each in fresh dirs with fresh caches)."""
    teacher_pt = kd_digits_run[1] / "checkpoints" / "teacher.pt"
    jobs = {
        "rerun": KD_DIGITS_ARGS,
        "kd_live": with_override(KD_DIGITS_ARGS, "trainer.teacher_outputs", "live"),
        "hint_live": with_override(HINT_DIGITS_ARGS, "trainer.teacher_outputs", "live"),
        # one run, three checks (a CLI run is the suite's main cost): a saved teacher; another
        # seed (the students' init depends on the seed alone, not on the teacher or lr); and
        # lr=1e-30, which leaves float32 weights unchanged, so the saved baseline and student
        # must still be the initial weights the report's init_hash describes
        "other_seed_from_checkpoint": [*KD_DIGITS_ARGS, "seed=7", f"teacher.checkpoint={teacher_pt}",
                                       "optimizer.lr=1e-30"],
    }
    results = run_many({name: {"args": args, "tmp_path": tmp_path_factory.mktemp(name)}
                        for name, args in jobs.items()})
    return {name: (run_dir, assert_ok(proc, run_dir)) if proc.returncode == 0 else (run_dir, proc)
            for name, (proc, run_dir) in results.items()}


def get(repro_runs, name):
    run_dir, rep = repro_runs[name]
    if not isinstance(rep, dict):
        pytest.fail(f"run {name} failed: rc={rep.returncode}\n{rep.stderr[-4000:]}")
    return run_dir, rep


# --------------------------------------------------------------------------- seeded rerun


def test_same_command_twice_gives_identical_accuracies(kd_digits_run, repro_runs):
    _, _, first = kd_digits_run
    _, second = get(repro_runs, "rerun")
    for role in ROLES:
        assert second["models"][role]["test_acc"] == first["models"][role]["test_acc"], role
    assert second["kd_gain_points"] == first["kd_gain_points"]
    assert second["models"]["student"]["init_hash"] == first["models"]["student"]["init_hash"]
    # different output/cache dirs, same computation: same config hash
    assert second["config_hash"] == first["config_hash"]


def test_same_command_twice_gives_identical_metrics(kd_digits_run, repro_runs):
    first_dir = kd_digits_run[1]
    second_dir, _ = get(repro_runs, "rerun")
    first, second = numeric_metrics(first_dir), numeric_metrics(second_dir)
    assert len(first) == len(second) == 1 + 2 + 2  # teacher, baseline, student epochs
    assert first == second


def test_same_command_twice_gives_identical_weights(kd_digits_run, repro_runs):
    second_dir, _ = get(repro_runs, "rerun")
    for role in ROLES:
        a = torch.load(kd_digits_run[1] / "checkpoints" / f"{role}.pt", map_location="cpu", weights_only=True)
        b = torch.load(second_dir / "checkpoints" / f"{role}.pt", map_location="cpu", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), role


def test_other_seed_gives_other_init(kd_digits_run, repro_runs):
    _, _, first = kd_digits_run
    _, other = get(repro_runs, "other_seed_from_checkpoint")
    assert other["seed"] == 7
    assert other["models"]["student"]["init_hash"] != first["models"]["student"]["init_hash"]
    assert other["models"]["baseline"]["init_hash"] == other["models"]["student"]["init_hash"]
    assert other["config_hash"] != first["config_hash"]


def test_init_hash_is_the_hash_of_the_seeded_student(kd_digits_run):
    """The reported init hash is that of a LightNN built right after seeding the student-init stream."""
    from kd_runner.models import build_model
    from kd_runner.pipeline import SEED_STUDENT_INIT
    from kd_runner.utils import derive_seed, seed_everything

    _, _, rep = kd_digits_run
    seed_everything(derive_seed(rep["seed"], SEED_STUDENT_INIT))
    model = build_model(OmegaConf.create(rep["models"]["student"]["arch"]), (1, 8, 8), 10)
    assert weights_hash(model) == rep["models"]["student"]["init_hash"]


# --------------------------------------------------------------------------- teacher outputs: cache vs live


@pytest.mark.parametrize("cached, live", [("kd_digits_run", "kd_live"), ("hint_digits_run", "hint_live")])
def test_teacher_outputs_cache_equals_live(request, repro_runs, cached, live):
    _, cache_dir, cache_rep = request.getfixturevalue(cached)
    live_dir, live_rep = get(repro_runs, live)
    assert cache_rep["teacher"]["outputs"] == "cache" and live_rep["teacher"]["outputs"] == "live"
    for role in ROLES:  # <= one test image of float-level disagreement
        assert live_rep["models"][role]["test_acc"] == pytest.approx(cache_rep["models"][role]["test_acc"], abs=0.3)
    a, b = numeric_metrics(cache_dir), numeric_metrics(live_dir)
    assert [(r["phase"], r["epoch"]) for r in a] == [(r["phase"], r["epoch"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k.startswith("train_") and ra[k] != "":
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-6), (ra["phase"], k)


# --------------------------------------------------------------------------- teacher.checkpoint


def test_saved_teacher_is_loaded_not_retrained(kd_digits_run, repro_runs):
    _, _, first = kd_digits_run
    run_dir, rep = get(repro_runs, "other_seed_from_checkpoint")
    teacher_pt = kd_digits_run[1] / "checkpoints" / "teacher.pt"
    assert rep["teacher"]["source"] == "checkpoint"
    assert rep["teacher"]["path"] == str(teacher_pt.resolve())
    assert rep["models"]["teacher"]["test_acc"] == first["models"]["teacher"]["test_acc"]
    assert "teacher" not in {r["phase"] for r in read_metrics(run_dir)}
    saved = torch.load(run_dir / "checkpoints" / "teacher.pt", map_location="cpu", weights_only=True)["model"]
    original = torch.load(teacher_pt, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], original[k]) for k in original)


def test_baseline_and_student_really_start_from_the_same_weights(repro_runs):
    """With a vanishing learning rate the saved baseline and student still equal the reported init."""
    run_dir, rep = get(repro_runs, "other_seed_from_checkpoint")
    assert rep["same_init"] is True
    for role in ("baseline", "student"):
        model = LightNN((1, 8, 8), 10)
        model.load_state_dict(torch.load(run_dir / "checkpoints" / f"{role}.pt", map_location="cpu",
                                         weights_only=True)["model"])
        assert weights_hash(model) == rep["models"][role]["init_hash"], role
