"""Test accuracy of kd-runner's fast path vs the PyTorch KD tutorial's own loop: same seed, epochs, images.

The claim it checks: kd-runner's engine reaches the same accuracy as the tutorial's reference loop for the same
seed and number of epochs, within run-to-run noise. For each seed in ``--seeds`` it trains the tutorial's CE
baseline (LightNN, 267,738 params, plain cross-entropy, Adam 1e-3, batch 128, no scheduler, no augmentation)
twice from the same initial weights:

  reference  the tutorial's ``train``/``test`` as written (benchmarks/tutorial_reference.py): ImageFolder over the
             JPEG copy of CIFAR-10 with ToTensor + Normalize, DataLoader batch 128 shuffled, 2 workers,
             ``loss.item()`` per step; ``torch.manual_seed(seed)`` before training seeds the shuffle.
  kd-runner  ``kd_runner.engine.fit("baseline", model, CE(), train, None, env, epochs=E, ...)`` with the config
             ``kd-train experiment=cifar10_tutorial`` composes (decode-once uint8 tensors, kd-runner's compute path),
             seeded as kd-runner's pipeline seeds its baseline; tested with ``predict_accuracy``.

The initial weights are those kd-runner's pipeline gives the student for ``seed=<seed>`` (checked identical in
both arms by hash). Batch order differs between the arms (DataLoader shuffling vs kd-runner's seeded order): that
is part of the run-to-run noise, like the seed. Both arms are tested on the same test images, and each trained model
is also tested by the other arm's test loop (a cross-check that the evaluation paths agree, so any gap comes from
training). The table lists per seed the two test accuracies and their difference, then mean +- std per arm, the
mean difference, and the seed-to-seed spread within each arm, so a reader can judge whether the gap is noise.

Data preparation and helpers (config composition, seeded subsets, the pixel check that ImageFolder and kd-runner
hold the same images in the same order) come from benchmarks/fast_vs_reference.py.

Run from the repository root (CPU, full splits, 2 seeds x 10 epochs):

    .venv/bin/python benchmarks/accuracy_parity.py --smoke --threads 1          # sanity check, < 1 min on CPU
    .venv/bin/python benchmarks/accuracy_parity.py --data /work/shared/data --cache-dir /root/kd-runner-cache \\
        --seeds 0,1 --epochs 10 --json outputs/bench/parity_cpu.json

Data: ``--data`` (default $KD_DATA_DIR, else ../shared/data beside the repo) must hold
``cifar10/{train,test}/<class>/*.jpg``; ``--cache-dir`` (default $KD_CACHE_DIR, else outputs/.cache) is where
kd-runner's decoded tensors live.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import kd_runner.engine
import kd_runner.methods
import kd_runner.models
from kd_runner.models.tutorial import LightNN
from kd_runner.pipeline import SEED_STUDENT_INIT, SEED_TRAIN
from kd_runner.utils import derive_seed, seed_everything, weights_hash

try:  # run as a script: benchmarks/ is on sys.path
    import fast_vs_reference as fvr
    import tutorial_reference as ref
except ImportError:  # python -m benchmarks.accuracy_parity
    from benchmarks import fast_vs_reference as fvr
    from benchmarks import tutorial_reference as ref

SMOKE_LIMIT = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("KD_DATA_DIR") or str(fvr.REPO.parent / "shared" / "data"),
                    help="folder holding cifar10/{train,test}/<class>/*.jpg (default: $KD_DATA_DIR, else "
                         "../shared/data beside the repo)")
    ap.add_argument("--cache-dir", default=os.environ.get("KD_CACHE_DIR") or str(fvr.REPO / "outputs" / ".cache"),
                    help="kd-runner's decoded-tensor cache (default: $KD_CACHE_DIR, else outputs/.cache)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--train-limit", type=int, default=None,
                    help="first N train images of a seeded permutation (default: all 50,000)")
    ap.add_argument("--test-limit", type=int, default=None,
                    help="first M test images of a seeded permutation (default: all 10,000)")
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds (init, batch order, dropout); default 0,1")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per arm (default 10, the tutorial's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both arms")
    ap.add_argument("--json", type=Path, default=None, help="write every result and the summary here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny run to check the script: --train-limit/--test-limit {SMOKE_LIMIT} and --epochs 1 "
                         "unless given")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_limit = args.train_limit or SMOKE_LIMIT
        args.test_limit = args.test_limit or SMOKE_LIMIT
        args.epochs = args.epochs or 1
    args.epochs = args.epochs or fvr.TUTORIAL_EPOCHS
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds: give at least one seed, each once")
    return args


def setup_args(args: argparse.Namespace) -> argparse.Namespace:
    """fast_vs_reference's own options for :func:`fvr.build_setup` (its defaults for everything not set here:
    the tutorial's ImageFolder data, kd-runner's default compute path)."""
    argv = ["--data", str(args.data), "--cache-dir", str(args.cache_dir), "--device", args.device, "--no-memory"]
    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    return fvr.parse_args(argv)


def initial_models(seed: int, setup: fvr.Setup, bundle, env) -> tuple[nn.Module, nn.Module, str]:
    """The reference's and kd-runner's LightNN, both with the initial weights kd-runner's pipeline gives ``seed``."""
    seed_everything(derive_seed(seed, SEED_STUDENT_INIT))
    kd_model = kd_runner.models.build_model(setup.cfg.student, bundle.input_shape(), bundle.num_classes)
    seed_everything(derive_seed(seed, SEED_STUDENT_INIT))
    ref_model = LightNN(input_shape=(3, 32, 32), num_classes=10)
    assert type(kd_model) is LightNN, f"kd-runner's student is {type(kd_model).__name__}, not LightNN"
    assert fvr.count_params(kd_model) == fvr.STUDENT_PARAMS, "LightNN parameter count differs from the tutorial's"
    h = weights_hash(ref_model)
    assert weights_hash(kd_model) == h, f"seed {seed}: the two arms start from different weights"
    return ref_model, fvr.prepare_model(kd_model, env), h


def run_seed(seed: int, epochs: int, setup: fvr.Setup, loaders, bundle, env) -> dict:
    train_loader, test_loader = loaders
    dev, cfg = setup.device, setup.cfg
    ref_model, kd_model, init_hash = initial_models(seed, setup, bundle, env)

    torch.backends.cudnn.benchmark = False  # the tutorial leaves it off
    torch.manual_seed(seed)  # the tutorial's seeding: DataLoader shuffle, worker seeds, dropout
    ref_loss, ref_s = fvr.timed(dev, lambda: ref.train(ref_model, train_loader, epochs=epochs, learning_rate=fvr.LR,
                                                       device=dev))
    ref_acc = ref.test(ref_model, test_loader, dev)

    seed_everything(derive_seed(seed, SEED_TRAIN))  # as kd-runner's pipeline seeds its baseline phase
    res, kd_s = fvr.timed(dev, lambda: kd_runner.engine.fit(
        "baseline", kd_model, kd_runner.methods.CE(), bundle.train, None, env, epochs=epochs,
        optimizer_cfg=cfg.optimizer, scheduler_cfg=cfg.scheduler, seed=seed))
    kd_acc = kd_runner.engine.predict_accuracy(kd_model, bundle.test, env)

    # cross-check: each trained model through the other arm's test loop (same images, other evaluation path)
    ref_by_kd = kd_runner.engine.predict_accuracy(ref_model, bundle.test, env)
    kd_by_ref = ref.test(kd_model, test_loader, dev)

    last = res.history[-1]
    return {"seed": seed, "init_hash": init_hash, "epochs": epochs,
            "reference_test_acc": ref_acc, "kd_runner_test_acc": kd_acc, "difference": kd_acc - ref_acc,
            "reference_train_seconds": round(ref_s, 2), "kd_runner_train_seconds": round(kd_s, 2),
            "reference_last_epoch_loss": ref_loss, "kd_runner_last_epoch_loss": last["train_loss"],
            "kd_runner_last_epoch_train_acc": last["train_acc"],
            "kd_runner_history": [{k: v for k, v in r.items() if k != "phase"} for r in res.history],
            "cross_check": {"reference_model_by_kd_runner_test": ref_by_kd,
                            "kd_runner_model_by_reference_test": kd_by_ref}}


def _sd(vals: list[float]) -> float | None:
    return statistics.stdev(vals) if len(vals) > 1 else None


def _pm(vals: list[float]) -> str:
    sd = _sd(vals)
    return f"{statistics.mean(vals):.2f}" + (f" ± {sd:.2f}" if sd is not None else " (one seed: no std)")


def summarise(rows: list[dict], n_test: int) -> tuple[dict, str]:
    ref_accs = [r["reference_test_acc"] for r in rows]
    kd_accs = [r["kd_runner_test_acc"] for r in rows]
    diffs = [r["difference"] for r in rows]
    n = len(rows)
    sd_ref, sd_kd = _sd(ref_accs), _sd(kd_accs)
    mean_diff = statistics.mean(diffs)
    # noise yardsticks: the seed-to-seed spread (standard error of a difference of two n-seed means), and the
    # sampling error of one accuracy on n_test images (binomial), for a difference of two such accuracies
    p = statistics.mean(ref_accs + kd_accs) / 100
    binom_se_diff = 100 * math.sqrt(2 * p * (1 - p) / n_test)
    pooled = math.sqrt((sd_ref**2 + sd_kd**2) / 2) if sd_ref is not None and sd_kd is not None else None
    seed_se_diff = pooled * math.sqrt(2 / n) if pooled is not None else None
    same_sign = n > 1 and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    ratio_seed = abs(mean_diff) / seed_se_diff if seed_se_diff else None
    ratio_binom = abs(mean_diff) / binom_se_diff if binom_se_diff else None
    summary = {"seeds": n, "reference_mean": statistics.mean(ref_accs), "reference_std": sd_ref,
               "kd_runner_mean": statistics.mean(kd_accs), "kd_runner_std": sd_kd, "mean_difference": mean_diff,
               "difference_std": _sd(diffs), "pooled_seed_std": pooled, "seed_se_of_mean_difference": seed_se_diff,
               "binomial_se_of_one_difference": binom_se_diff,
               "abs_mean_difference_over_seed_se": ratio_seed, "abs_mean_difference_over_binomial_se": ratio_binom,
               "same_sign_every_seed": same_sign}
    lines = ["| seed | reference test acc | kd-runner test acc | difference (kd-runner - reference) |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['reference_test_acc']:.2f}% | {r['kd_runner_test_acc']:.2f}% | "
              f"{r['difference']:+.2f} pp |" for r in rows]
    lines.append(f"| mean ± std | {_pm(ref_accs)}% | {_pm(kd_accs)}% | {_pm(diffs)} pp |")
    lines += [
        "",
        f"reference: mean {statistics.mean(ref_accs):.2f}%, seed-to-seed std "
        + (f"{sd_ref:.2f} pp" if sd_ref is not None else "n/a (one seed)"),
        f"kd-runner: mean {statistics.mean(kd_accs):.2f}%, seed-to-seed std "
        + (f"{sd_kd:.2f} pp" if sd_kd is not None else "n/a (one seed)"),
        f"mean difference (kd-runner - reference): {mean_diff:+.2f} pp over {n} seed(s)",
        "noise yardsticks: standard error of the difference of the two arms' means from the seed-to-seed spread "
        + (f"{seed_se_diff:.2f} pp" if seed_se_diff is not None else "n/a (one seed)")
        + f"; test-set sampling error of a difference of two accuracies on {n_test:,} images "
          f"{binom_se_diff:.2f} pp (binomial, p = {100 * p:.1f}%)",
        f"=> |mean difference| {abs(mean_diff):.2f} pp = "
        + (f"{ratio_seed:.1f} x the seed-based standard error, " if ratio_seed is not None else "")
        + f"{ratio_binom:.1f} x the test-set sampling error (unpaired, so an upper bound for two models scored on "
          "the same images); "
        + (f"the sign is the same for every seed ({n} seeds)" if same_sign else "the sign varies across seeds")
        + (f". With {n} seeds the spread estimate is itself rough: add seeds to settle it" if n <= 3 else ""),
    ]
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    setup = fvr.build_setup(setup_args(args))
    cfg, dev = setup.cfg, setup.device
    opt = cfg.optimizer
    if str(opt.name) != "adam" or float(opt.lr) != fvr.LR or float(opt.get("weight_decay", 0.0)) != 0.0 \
            or str(cfg.scheduler.name) != "none" or int(cfg.trainer.batch_size) != ref.BATCH_SIZE:
        sys.exit("accuracy_parity: the composed config no longer matches the tutorial's training "
                 f"(optimizer {dict(opt)}, scheduler {cfg.scheduler.name}, batch {cfg.trainer.batch_size})")
    if any(float(cfg.augment.get(k) or 0) for k in ("crop_padding", "hflip")):
        sys.exit("accuracy_parity: the composed config augments; the tutorial does not")
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": fvr.device_name(dev), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_model": fvr.cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "kd_runner_git": fvr.git_rev(), "compose_overrides": setup.overrides,
    }
    print("# accuracy_parity: test accuracy of the tutorial's CE baseline (LightNN), reference loop vs kd-runner")
    print(f"date {meta['date']}; device {meta['device']}; torch {meta['torch']}, torchvision {meta['torchvision']}; "
          f"torch threads {meta['torch_threads']}; CPU {meta['cpu_model']} x {meta['cpu_count']}; load average "
          f"{', '.join(f'{v:.2f}' for v in meta['load_average_at_start'])}")
    print(f"kd-runner {meta['kd_runner_git']}; compose overrides: {' '.join(setup.overrides)}")
    print(f"data: {setup.root}; train {setup.n_train:,} of {setup.full_train:,} images, test {setup.n_test:,} of "
          f"{setup.full_test:,}" + (" (seeded subset)" if setup.train_idx is not None or setup.test_idx is not None
                                     else "") + "; both arms see the same images (pixels spot-checked)")
    print(f"training: {args.epochs} epoch(s) per arm, CE, Adam lr {fvr.LR}, batch {ref.BATCH_SIZE}, seeds "
          f"{','.join(map(str, args.seeds))}", flush=True)

    loaders = fvr.ReferenceArm(setup).data()
    bundle, env = fvr.KdRunnerArm(setup).data()
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args.epochs, setup, loaders, bundle, env)
        rows.append(row)
        cc = row["cross_check"]
        print(f"  seed {seed}: init {row['init_hash']}; reference {row['reference_test_acc']:.2f}% "
              f"(train {row['reference_train_seconds']:.1f} s, last-epoch loss {row['reference_last_epoch_loss']:.3f})"
              f"; kd-runner {row['kd_runner_test_acc']:.2f}% (train {row['kd_runner_train_seconds']:.1f} s, "
              f"last-epoch loss {row['kd_runner_last_epoch_loss']:.3f}); cross-check: reference model by "
              f"kd-runner's test {cc['reference_model_by_kd_runner_test']:.2f}%, kd-runner model by the reference's "
              f"test {cc['kd_runner_model_by_reference_test']:.2f}%", flush=True)

    summary, md = summarise(rows, setup.n_test)
    wall = time.perf_counter() - wall0
    print()
    print(f"## test accuracy after {args.epochs} epoch(s), LightNN with CE; {setup.n_train:,} train / "
          f"{setup.n_test:,} test images; {meta['device']}")
    print()
    print(md)
    gaps = [abs(r["cross_check"]["reference_model_by_kd_runner_test"] - r["reference_test_acc"]) for r in rows]
    gaps += [abs(r["cross_check"]["kd_runner_model_by_reference_test"] - r["kd_runner_test_acc"]) for r in rows]
    print(f"evaluation cross-check: the two test loops disagree on the same trained model by at most "
          f"{max(gaps):.2f} pp")
    print("Batch order differs between the arms (DataLoader shuffle vs kd-runner's seeded order); like the seed, it "
          "is part of the run-to-run noise.")
    print(f"\nbenchmark wall time {wall:.1f} s")

    if args.json:
        out = {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "setup": {**setup.info, "n_train": setup.n_train, "n_test": setup.n_test,
                         "full_train": setup.full_train, "full_test": setup.full_test},
               "results": rows, "summary": summary, "wall_seconds": round(wall, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
