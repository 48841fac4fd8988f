"""A published CIFAR pair with the recipe, cut to a few epochs on a subset: what one epoch of each phase costs.

Runs ``kd-train experiment=<pair> dataset=cifar10`` with ``dataset.train_subset`` / ``test_subset`` and a few
epochs (the milestones scaled to the shortened schedule), then prints per-phase wall time, seconds per epoch,
images per second and the accuracies from the run's ``report.json``. Use it to size a full 240-epoch run on
your machine before you start one.

    KD_DATA_DIR=../shared/data python benchmarks/cifar_pair_cpu.py --pair cifar_resnet32x4_resnet8x4 \
        --train-subset 5000 --test-subset 1000 --epochs 2

Run nothing else on the machine while it runs: two torch processes on a few cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from kd_cli import run_kd_train
except ImportError:
    from benchmarks.kd_cli import run_kd_train


def run_pair(pair: str, train_subset: int, test_subset: int, epochs: int, extra: list[str], out: Path) -> dict:
    run_dir = out / pair
    args = [f"experiment={pair}", "dataset=cifar10",
            f"dataset.train_subset={train_subset}", f"dataset.test_subset={test_subset}",
            f"trainer.teacher_epochs={epochs}", f"trainer.student_epochs={epochs}",
            f"scheduler.milestones=[{max(1, epochs - 1)}]", "trainer.progress=false", "trainer.bench_iters=0",
            "trainer.teacher_cache=false", "trainer.baseline_cache=false", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "KD_CACHE_DIR": str(out / ".cache")}
    run_kd_train(args, env)
    return json.loads((run_dir / "report.json").read_text())


def table(rep: dict, train_images: int) -> str:
    """Markdown rows per phase; ``train_images`` is the training split the epochs ran over (after the val split)."""
    lines = ["| phase | wall s | s / epoch | train img/s | test acc (last) | test acc (best val) |",
             "|---|---:|---:|---:|---:|---:|"]
    for role in ("teacher", "baseline", "student"):
        m = rep["models"][role]
        epochs = max(1, int(m.get("epochs", 1)))
        per_epoch = float(m.get("train_seconds", 0.0)) / epochs
        lines.append(f"| {role} | {rep['phase_seconds'].get(role, 0.0):.1f} | {per_epoch:.1f} | "
                     f"{train_images / per_epoch if per_epoch else 0:.0f} | {m['test_acc']:.2f} | "
                     f"{m.get('test_acc_best_val', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="cifar_resnet32x4_resnet8x4", help="an experiment=cifar_<teacher>_<student>")
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="where the run goes (default: a temp dir)")
    ap.add_argument("extra", nargs="*", help="more kd-train overrides, e.g. trainer.num_threads=2")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="kd_pair_cpu_"))
    rep = run_pair(a.pair, a.train_subset, a.test_subset, a.epochs, a.extra, out)
    train_images = int(rep["dataset"]["train"])
    print(f"{a.pair} on CIFAR-10, {a.train_subset} train / {a.test_subset} test images, {a.epochs} epochs a phase, "
          f"device {rep.get('device')}, run dir {out / a.pair}")
    print(table(rep, train_images))


if __name__ == "__main__":
    main()
