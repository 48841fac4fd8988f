"""Teacher-view cache (``trainer.teacher_outputs=views``): every crop/flip view's teacher logits, computed once.

The augmentation reports which view each sample drew without changing its images or its generator draws;
a lookup in the cache equals the live teacher on the augmented batch, so a ``views`` run trains the same
student as a ``live`` run.
"""

from __future__ import annotations

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.compute import Compute
from kd_runner.data.augment import Augment
from kd_runner.data.tensors import Normalizer, Split
from kd_runner.engine import Env, TeacherOutputs
from kd_runner.errors import UserError
from kd_runner.pipeline import fit_view_cache

AUGMENTS = [Augment(2, True), Augment(1, False), Augment(0, True), Augment(3, True)]


def old_augment(aug: Augment, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``Augment.__call__`` as it was before view ids existed: the reference for images and generator draws."""
    n, _, h, w = x.shape
    if aug.crop_padding > 0:
        p = aug.crop_padding
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if aug.hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def tiny_teacher(channels: int = 3, classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def cpu_env(batch_size: int = 16, eval_batch_size: int = 11) -> Env:
    return Env(torch.device("cpu"), Normalizer([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]), batch_size, eval_batch_size,
               progress=False, compute=Compute())


@pytest.mark.parametrize("aug", AUGMENTS, ids=str)
def test_draw_keeps_the_images_and_generator_draws_of_before(aug):
    x = torch.randint(0, 256, (33, 3, 6, 7), dtype=torch.uint8)
    g_old, g_new, g_call = (torch.Generator().manual_seed(5) for _ in range(3))
    for _ in range(3):  # several batches in a row: the streams stay in step
        ref = old_augment(aug, x, g_old)
        views, ids = aug.draw(x, g_new)
        assert torch.equal(views, ref) and torch.equal(aug(x, g_call), ref)
        assert ids.dtype == torch.long and ids.shape == (33,) and 0 <= int(ids.min()) and int(ids.max()) < aug.num_views
    assert torch.equal(g_new.get_state(), g_old.get_state())
    assert torch.equal(g_call.get_state(), g_old.get_state())
    assert torch.rand(1, generator=g_new).item() == torch.rand(1, generator=g_old).item()


@pytest.mark.parametrize("aug", AUGMENTS, ids=str)
def test_view_renders_the_view_each_sample_drew(aug):
    x = torch.randint(1, 256, (64, 3, 5, 6), dtype=torch.uint8)
    views, ids = aug.draw(x, torch.Generator().manual_seed(3))
    assert aug.num_views == (2 * aug.crop_padding + 1) ** 2 * (2 if aug.hflip else 1)
    for n in range(len(x)):
        assert torch.equal(aug.view(x[n:n + 1], int(ids[n]))[0], views[n]), (n, int(ids[n]))
    # the id layout: (dy * (2p+1) + dx) * F + flip
    p, f = aug.crop_padding, 2 if aug.hflip else 1
    for v in range(aug.num_views):
        (dy, dx), flip = divmod(v // f, 2 * p + 1), v % f
        want = F.pad(x, (p, p, p, p))[:, :, dy:dy + 5, dx:dx + 6]
        assert torch.equal(aug.view(x, v), want.flip(3) if flip else want)
    # every view is distinct for images with no symmetry (nonzero pixels, so padding shows)
    assert len({aug.view(x[:1], v).numpy().tobytes() for v in range(aug.num_views)}) == aug.num_views
    with pytest.raises(ValueError, match="out of range"):
        aug.view(x, aug.num_views)


def test_view_cache_lookup_equals_the_live_teacher_on_the_augmented_batch():
    aug = Augment(2, True)
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.arange(37) % 7)
    env = cpu_env()
    teacher = tiny_teacher()
    views = TeacherOutputs(teacher, [], env, split, "views", augment=aug)
    live = TeacherOutputs(teacher, [], env, split, "live")
    assert views.cache.logits.shape == (37, aug.num_views, 7) and views.cache.logits.dtype == torch.float32
    assert views.uses_views and not live.uses_views and views.graph_safe and views.cache_seconds > 0
    gen = torch.Generator().manual_seed(11)
    for idx, xb, _ in env.batches(split, 16, shuffle=True, generator=gen):
        xa, ids = aug.draw(xb, gen)
        x = env.prepare(xa)
        got = views(idx, x, ids).logits
        want = live(idx, x).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert torch.equal(live(idx, x, ids).logits, want)  # live mode ignores the view ids
        # and directly: the cache row of (sample, view) is the teacher on that one rendered view
        n = 0
        one = teacher(env.prepare(aug.view(images[int(idx[n])][None], int(ids[n]))))
        assert torch.allclose(views.cache.logits[idx[n], ids[n]], one[0], atol=1e-5)
    # the lookup is an ordinary tensor: a loss may save it for backward
    s = torch.zeros(7, requires_grad=True)
    (views(torch.arange(4), env.prepare(images[:4]), torch.zeros(4, dtype=torch.long)).logits * s).sum().backward()


def test_views_mode_refuses_teacher_taps_and_missing_augment():
    split = Split(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4))
    with pytest.raises(UserError, match="logits only"):
        TeacherOutputs(tiny_teacher(), ["0"], cpu_env(), split, "views", augment=Augment(1, True))
    with pytest.raises(UserError, match="needs random student views"):
        TeacherOutputs(tiny_teacher(), [], cpu_env(), split, "views")


def test_view_cache_budget():
    cpu = torch.device("cpu")
    assert TeacherOutputs.views_cache_bytes(50_000, 162, 100) == 50_000 * 162 * 100 * 4  # CIFAR-100, p=4 + flip
    assert fit_view_cache(100, 18, 10, cpu) == ("views", None, cpu)
    assert fit_view_cache(100, 18, 10, cpu, max_gb=1.0) == ("views", None, cpu)
    mode, note, where = fit_view_cache(100, 18, 10, cpu, max_gb=1e-6)
    assert mode == "live" and where is None
    assert "teacher-view cache" in note and "100 images x 18 views x 10 classes" in note and "live" in note


VIEW_ARGS = ["augment.crop_padding=1", "augment.hflip=true", "augment.phases=[baseline,student]", "baseline=false",
             "trainer.student_epochs=2", "trainer.bench_iters=0"]


def test_views_run_trains_the_same_student_as_a_live_run(tmp_path):
    """Same seed: identical batches, views and init; the teacher's logits come from the cache instead of a
    forward, so every loss and accuracy column matches up to float summation order."""
    shared = {"KD_CACHE_DIR": str(tmp_path / "cache")}  # the second run reuses the first run's stored teacher
    reps, rows = {}, {}
    for mode in ("live", "views"):
        proc, run_dir = helpers.run_cli([*VIEW_ARGS, f"trainer.teacher_outputs={mode}"], tmp_path / mode, env=shared)
        reps[mode] = helpers.assert_ok(proc, run_dir)
        rows[mode] = [r for r in helpers.read_metrics(run_dir) if r["phase"] == "student"]
    teacher = reps["views"]["teacher"]
    assert teacher["outputs"] == "views" and reps["live"]["teacher"]["outputs"] == "live"
    assert teacher["outputs_views"] == 18 and teacher["outputs_cache_where"] == "device"
    assert teacher["outputs_cache_seconds"] > 0 and teacher["outputs_cache_bytes"] > 0
    assert reps["views"]["models"]["teacher"]["test_acc"] == reps["live"]["models"]["teacher"]["test_acc"]
    assert len(rows["views"]) == len(rows["live"]) == 2
    for a, b in zip(rows["views"], rows["live"], strict=True):
        cols = [k for k in b if k.startswith("train_") or k in ("val_acc", "val_loss")]
        assert cols and "train_loss" in cols and "train_acc" in cols
        for k in cols:
            if b[k] not in ("", None):
                assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-4), k
    s_views, s_live = reps["views"]["models"]["student"], reps["live"]["models"]["student"]
    assert s_views["test_acc"] == pytest.approx(s_live["test_acc"], abs=1e-4)


@pytest.mark.parametrize(("args", "needles"), [
    (["method=hint", "augment.crop_padding=1", "trainer.teacher_outputs=views"],
     ["teacher_outputs=views serves logits only", "method=hint", "use live"]),
    (["trainer.teacher_outputs=views"], ["teacher_outputs=views", "fixed views", "augment.crop_padding"]),
    (["augment.hflip=true", "augment.phases=[teacher]", "trainer.teacher_outputs=views"],
     ["teacher_outputs=views", "fixed views"]),
], ids=["feature_method", "no_augment", "teacher_only_augment"])
def test_views_mode_errors_are_one_line(args, needles, tmp_path):
    proc, run_dir = helpers.run_cli(args, tmp_path)
    helpers.assert_user_error(proc, run_dir, *needles)
