"""Wall time of a T x soft_weight sweep with kd-runner's caches vs the same grid as independent runs.

Both arms run here, one after the other, in fresh output and cache folders:
  cached:      one `kd-train -m` multirun (teacher and CE baseline trained once, teacher outputs cached)
  independent: one `kd-train` per grid point with teacher/baseline caches off and the teacher run live

    python benchmarks/sweep_cost.py --experiment mnist_hinton --T 2,5,10,20 --soft-weight 0.25,0.5,0.9 \\
        --extra trainer.teacher_epochs=2 trainer.student_epochs=2

Prints a JSON line with both wall times, the ratio, and the check that both arms' student accuracies match.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from kd_cli import run_kd_train
except ImportError:
    from benchmarks.kd_cli import run_kd_train


def student_acc(report: Path) -> float:
    return json.loads(report.read_text())["models"]["student"]["test_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="mnist_hinton")
    ap.add_argument("--T", default="2,5,10,20")
    ap.add_argument("--soft-weight", default="0.25,0.5,0.9")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. epochs)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="kd-sweep-bench-"))
    common = [f"experiment={a.experiment}", "trainer.progress=false", "trainer.bench_iters=0", *a.extra]
    grid = list(itertools.product(a.T.split(","), a.soft_weight.split(",")))
    env = dict(os.environ)

    env_c = {**env, "KD_OUTPUT_DIR": str(work / "cached"), "KD_CACHE_DIR": str(work / "cached" / ".cache")}
    t0 = time.perf_counter()
    run_kd_train(["-m", *common, f"method.T={a.T}", f"method.soft_weight={a.soft_weight}",
              f"hydra.sweep.dir={work / 'cached' / 'sweep'}"], env_c)
    cached_s = time.perf_counter() - t0

    env_i = {**env, "KD_OUTPUT_DIR": str(work / "independent"), "KD_CACHE_DIR": str(work / "independent" / ".cache")}
    no_cache = ["trainer.teacher_cache=false", "trainer.baseline_cache=false", "trainer.teacher_outputs=live"]
    t0 = time.perf_counter()
    for i, (T, w) in enumerate(grid):
        run_kd_train([*common, *no_cache, f"method.T={T}", f"method.soft_weight={w}",
                  f"hydra.run.dir={work / 'independent' / str(i)}"], env_i)
    independent_s = time.perf_counter() - t0

    # job i of the multirun is grid point i (Hydra sweeps the product in the same order)
    cached_acc = [student_acc(work / "cached" / "sweep" / str(i) / "report.json") for i in range(len(grid))]
    indep_acc = [student_acc(work / "independent" / str(i) / "report.json") for i in range(len(grid))]
    print(json.dumps({
        "experiment": a.experiment, "grid": len(grid), "extra": a.extra,
        "cached_sweep_s": round(cached_s, 1), "independent_runs_s": round(independent_s, 1),
        "ratio": round(independent_s / cached_s, 2),
        "max_student_acc_diff": round(max(abs(x - y) for x, y in zip(cached_acc, indep_acc, strict=True)), 4),
        "workdir": str(work),
    }))


if __name__ == "__main__":
    main()
