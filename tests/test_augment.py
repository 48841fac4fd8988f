"""Random views: batched jitter/flip are correct and seeded; a random student view makes the teacher run live."""

from __future__ import annotations

import helpers
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kd_runner.data.augment import Augment, phase_augments
from kd_runner.errors import UserError


def windows(x: torch.Tensor, pad: int) -> list[torch.Tensor]:
    p = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    return [p[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_jitter_returns_a_window_of_the_zero_padded_image():
    x = torch.randint(1, 255, (16, 3, 6, 5), dtype=torch.uint8)
    y = Augment(crop_padding=2)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8
    for n in range(16):
        assert any(torch.equal(y[n], w) for w in windows(x[n], 2))
    assert not all(torch.equal(y[n], x[n]) for n in range(16))  # some images did move


def test_hflip_flips_some_images_and_keeps_the_rest():
    x = torch.randint(0, 255, (64, 1, 4, 4), dtype=torch.uint8)
    y = Augment(hflip=True)(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(y[n], x[n].flip(2)) for n in range(64)]
    kept = [torch.equal(y[n], x[n]) for n in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_views_are_reproducible_from_the_generator_seed():
    x = torch.randint(0, 255, (32, 1, 8, 8), dtype=torch.uint8)
    aug = Augment(crop_padding=2, hflip=True)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_phase_selection_and_validation():
    cfg = OmegaConf.create({"crop_padding": 2, "hflip": False, "phases": ["teacher"]})
    got = phase_augments(cfg)
    assert got["teacher"] == Augment(2, False) and got["baseline"] is None and got["student"] is None
    off = phase_augments(OmegaConf.create({"crop_padding": 0, "hflip": False, "phases": ["teacher"]}))
    assert off == {"teacher": None, "baseline": None, "student": None}
    with pytest.raises(UserError, match="baseline and student"):
        phase_augments(OmegaConf.create({"crop_padding": 1, "hflip": False, "phases": ["student"]}))
    with pytest.raises(UserError, match="crop_padding=-1"):
        phase_augments(OmegaConf.create({"crop_padding": -1, "hflip": False, "phases": []}))


@pytest.mark.parametrize(("phases", "mode"), [("[teacher,baseline,student]", "live"), ("[teacher]", "cache")])
def test_teacher_output_mode_follows_the_students_views(phases, mode, tmp_path):
    proc, run_dir = helpers.run_cli(["augment.crop_padding=1", "augment.hflip=true", f"augment.phases={phases}",
                                     "trainer.bench_iters=0"], tmp_path)
    rep = helpers.assert_ok(proc, run_dir)
    assert rep["teacher"]["outputs"] == mode
    assert rep["config"]["augment"]["crop_padding"] == 1


def test_cached_teacher_outputs_with_random_student_views_is_refused(tmp_path):
    proc, run_dir = helpers.run_cli(["augment.crop_padding=1", "trainer.teacher_outputs=cache"], tmp_path)
    helpers.assert_user_error(proc, run_dir, "teacher_outputs=cache")


def test_auto_picks_the_view_cache_only_when_it_pays():
    """auto: views when the student trains more epochs than there are views and only logits are read."""
    from kd_runner.config import _teacher_output_mode
    from kd_runner.methods.hint import Hint
    from kd_runner.methods.kd import KD

    recipe = Augment(4, True)  # 162 views
    assert _teacher_output_mode("auto", recipe, KD(), student_epochs=240) == "views"
    assert _teacher_output_mode("auto", recipe, KD(), student_epochs=162) == "live"
    assert _teacher_output_mode("auto", recipe, Hint(), student_epochs=240) == "live"  # reads teacher layers
    assert _teacher_output_mode("auto", None, KD(), student_epochs=240) == "cache"
    assert _teacher_output_mode("live", recipe, KD(), student_epochs=240) == "live"
