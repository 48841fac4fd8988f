"""One kd-train run in one process vs the same run data-parallel under torchrun (gloo, CPU), side by side.

Each arm runs in fresh output and cache folders (every arm trains its own teacher and baseline), one after the other:
  1 proc x T threads:   python -m kd_runner.train ...  trainer.num_threads=T
  N procs x 1 thread:   torchrun --standalone --nproc_per_node=N -m kd_runner.train ...  trainer.num_threads=1

    KD_DATA_DIR=../shared/data python benchmarks/ddp_cpu.py --arms 1x2,1x1,2x1 -- dataset=mnist \\
        teacher=mlp_1200 teacher.dropout=0 teacher.input_dropout=0 student=mlp_800 method=kd \\
        trainer.teacher_epochs=2 trainer.student_epochs=2

Prints one JSON line per arm (wall time, each phase's training seconds, test accuracies, world size) and a markdown
table with every arm's time relative to the first and its accuracy differences from the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from kd_cli import run_kd_train
except ImportError:
    from benchmarks.kd_cli import run_kd_train

ROLES = ("teacher", "baseline", "student")


def run_arm(procs: int, threads: int, overrides: list[str], work: Path) -> dict:
    out = work / f"{procs}x{threads}"
    env = {**os.environ, "KD_OUTPUT_DIR": str(out), "KD_CACHE_DIR": str(out / ".cache"), "OMP_NUM_THREADS": "1"}
    launcher = None if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        f"--nproc_per_node={procs}", "-m", "kd_runner.train"]
    wall = run_kd_train([*overrides, f"trainer.num_threads={threads}", "trainer.progress=false",
                         f"hydra.run.dir={out / 'run'}"], env, launcher)
    rep = json.loads((out / "run" / "report.json").read_text())
    return {"arm": f"{procs} proc x {threads} thread{'s' if threads > 1 else ''}", "procs": procs, "threads": threads,
            "wall_s": round(wall, 1), "world_size": rep["execution"]["distributed"]["world_size"],
            "train_s": {r: rep["models"][r].get("train_seconds") for r in ROLES if r in rep["models"]},
            "test_acc": {r: rep["models"][r]["test_acc"] for r in ROLES if r in rep["models"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="1x2,1x1,2x1", help="comma-separated PROCSxTHREADS")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="kd-train overrides for every arm (after --)")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kd-ddp-bench-"))
    results = []
    for arm in a.arms.split(","):
        procs, threads = (int(v) for v in arm.split("x"))
        results.append(run_arm(procs, threads, a.overrides, work))
        print(json.dumps(results[-1]), flush=True)
    first = results[0]
    print("\n| arm | wall | teacher / baseline / student train s | vs first (wall) | test acc t / b / s | "
          "acc diff vs first |")
    print("|---|---|---|---|---|---|")
    for r in results:
        secs = " / ".join(f"{r['train_s'][k]:.1f}" for k in ROLES if r["train_s"].get(k) is not None)
        accs = " / ".join(f"{r['test_acc'][k]:.2f}" for k in ROLES if k in r["test_acc"])
        diff = " / ".join(f"{r['test_acc'][k] - first['test_acc'][k]:+.2f}" for k in ROLES if k in r["test_acc"])
        print(f"| {r['arm']} | {r['wall_s']:.0f} s | {secs} | {first['wall_s'] / r['wall_s']:.2f}x | {accs} | "
              f"{diff} |")


if __name__ == "__main__":
    main()
