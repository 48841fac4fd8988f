"""Does the teacher-view cache pay? Per-image costs of a KD student step with the teacher live vs from the cache.

With random crop (padding p) + flip, the student sees one of V = (2p+1)^2 * 2 views of each image per epoch
(162 for p=4). ``trainer.teacher_outputs=live`` runs the teacher on every augmented batch: one teacher forward
per image per epoch. ``views`` runs it once over every view of every image (V forwards per image, once) and
then only looks logits up. So over E epochs, per image:

    live  = E * c_live            views = V * c_fwd + E * c_views

with c_live / c_views the cost of one KD training step per image (student forward + backward + optimizer, plus a
teacher forward or a lookup) and c_fwd one teacher forward per image as the cache pass runs it (no grad, eval
batches). The cache pays once E > E* = V * c_fwd / (c_live - c_views). This script measures the three costs
side by side in one process on real CIFAR-10 images with a published pair's models (random weights: the
cost does not depend on them), then prints E* and the projection for the recipe's 240 epochs.

    KD_DATA_DIR=../shared/data python benchmarks/teacher_views.py --pair cifar_resnet32x4_resnet8x4 --images 1024

Run nothing else meanwhile: two torch processes on a few cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from kd_runner.config import preflight
from kd_runner.data import build_data
from kd_runner.data.cache import set_cache_dir
from kd_runner.engine import TeacherOutputs, fit
from kd_runner.methods.base import Outputs
from kd_runner.models import build_model
from kd_runner.pipeline import build_extra, make_env, student_optimizer
from kd_runner.train import config_dir
from kd_runner.utils import resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict:
    data_dir = os.environ.get("KD_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    cache_dir = os.environ.get("KD_CACHE_DIR", "outputs/.cache")
    overrides = [f"experiment={args.pair}", "dataset=cifar10", f"dataset.train_subset={args.images}",
                 "dataset.test_subset=100", "dataset.val_fraction=0", f"paths.data_dir={data_dir}",
                 f"paths.cache_dir={cache_dir}", f"trainer.device={args.device}", "trainer.progress=false",
                 *args.overrides]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer, method, augments, _ = preflight(cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(trainer.device)
    set_cache_dir(Path(cache_dir))
    data = build_data(cfg.dataset, trainer.data_path, trainer.num_workers)
    env = make_env(trainer, data, device)
    shape, classes = data.input_shape(), data.num_classes
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, shape, classes).to(device)
    student = build_model(cfg.student, shape, classes).to(device)
    extra, _ = build_extra(method, student, teacher, data.train, env, classes)
    augment = augments["student"]
    n, views = len(data.train), augment.num_views
    out: dict = {"pair": args.pair, "images": n, "views": views, "device": str(device),
                 "threads": torch.get_num_threads(), "views_batch": TeacherOutputs.views_batch_size(env)}

    live = TeacherOutputs(teacher, method.teacher_taps, env, data.train, "live", reduce=method.reduce_teacher)
    # c_fwd: the teacher forward as the cache pass runs it (eval batches, inference mode), one view per image
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        for _, xb, _ in env.batches(data.train, TeacherOutputs.views_batch_size(env), shuffle=False):
            live._forward(env.prepare(augment.view(xb.to(device), 0)))
        sync(device)
        out["c_fwd"] = (time.perf_counter() - t0) / n

    # a views-mode server over a stand-in table: a lookup costs the same whatever the logits are
    table = TeacherOutputs(teacher, [], env, data.train, "live")
    table.mode, table.cache = "views", Outputs(torch.randn(n, views, classes, device=device))

    def epoch_cost(served: TeacherOutputs) -> float:
        model = build_model(cfg.student, shape, classes)
        res = fit("student", model, method, data.train, None, env, epochs=args.epochs,
                  optimizer_cfg=student_optimizer(cfg), scheduler_cfg=cfg.scheduler, seed=0, teacher=served,
                  extra=extra, augment=augment)
        return min(r["epoch_seconds"] for r in res.history) / n  # the fastest epoch: the first pays warm-up

    for rep in range(args.repeats):  # alternate the order so neither arm always runs first
        arms = [("c_live", live), ("c_views", table)] if rep % 2 == 0 else [("c_views", table), ("c_live", live)]
        for key, served in arms:
            cost = epoch_cost(served)
            out[key] = min(out.get(key, cost), cost)
    gain = out["c_live"] - out["c_views"]
    out["break_even_epochs"] = views * out["c_fwd"] / gain if gain > 0 else float("inf")
    e = args.project_epochs
    out["project_epochs"] = e
    out["projected_ratio_views_over_live"] = (views * out["c_fwd"] + e * out["c_views"]) / (e * out["c_live"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="cifar_resnet32x4_resnet8x4", help="an experiment=cifar_<teacher>_<student>")
    ap.add_argument("--images", type=int, default=1024, help="training images to time over")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per arm and repeat (the fastest counts)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*", help="more kd-train overrides, e.g. trainer.eval_batch_size=64")
    ap.add_argument("--project-epochs", type=int, default=240, help="epochs for the projection (the recipe: 240)")
    r = measure(ap.parse_args())
    us = 1e6
    print(f"{r['pair']}: {r['images']} CIFAR-10 images, {r['views']} views/image, {r['device']}, "
          f"{r['threads']} threads, cache pass in batches of {r['views_batch']}")
    print("| cost per image | us |\n|---|---:|")
    print(f"| teacher forward, cache pass (c_fwd) | {r['c_fwd'] * us:.0f} |")
    print(f"| KD step, teacher live (c_live) | {r['c_live'] * us:.0f} |")
    print(f"| KD step, teacher from the view cache (c_views) | {r['c_views'] * us:.0f} |")
    print(f"break-even: the cache pays after {r['break_even_epochs']:.0f} epochs; over {r['project_epochs']} "
          f"epochs views / live = {r['projected_ratio_views_over_live']:.2f} (cache pass included)")


if __name__ == "__main__":
    main()
