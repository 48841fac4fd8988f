"""A method x T sweep with and without the shared teacher-output store: teacher passes counted from the reports.

Both arms run here, one after the other, in fresh output and cache folders, as one `kd-train -m` multirun each
(teacher and CE baseline come from the model store in both: only the teacher pass over the training split differs):
  store:     trainer.teacher_outputs_store=true (default): the first job computes the pass, the others load it
  no store:  trainer.teacher_outputs_store=false: every job computes its own pass

    KD_DATA_DIR=../shared/data python benchmarks/outputs_store_sweep.py --methods kd,dkd,dist --T 1,2,4,8 -- \\
        dataset=mnist teacher=mlp_1200 student=mlp_800 trainer.teacher_epochs=1 trainer.student_epochs=1

A job computed a teacher pass when its report says ``teacher.outputs`` is cache/views and its
``teacher.outputs_store.source`` is not ``store``. Prints one JSON line per arm (jobs, passes, pass seconds summed over
the jobs, wall time, students' accuracies) and a markdown row per arm.
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


def arm(name: str, store: bool, grid: list[str], overrides: list[str], work: Path) -> dict:
    out = work / name.replace(" ", "_")
    env = {**os.environ, "KD_OUTPUT_DIR": str(out), "KD_CACHE_DIR": str(out / ".cache")}
    wall = run_kd_train(["-m", *grid, *overrides, "trainer.progress=false", "trainer.bench_iters=0",
                         "trainer.teacher_outputs=cache", f"trainer.teacher_outputs_store={str(store).lower()}",
                         f"hydra.sweep.dir={out / 'sweep'}"], env)
    reports = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/report.json"))]
    passes = [r for r in reports if r["teacher"].get("outputs") in ("cache", "views")
              and (r["teacher"].get("outputs_store") or {}).get("source") != "store"]
    accs = {" ".join(o for o in r["overrides"] if not o.startswith("trainer.teacher_outputs_store=")):
            r["models"]["student"]["test_acc"] for r in reports}  # keyed by the job's point of the grid
    return {"arm": name, "jobs": len(reports), "teacher_passes": len(passes),
            "pass_seconds": round(sum(r["teacher"].get("outputs_cache_seconds", 0.0) for r in reports), 2),
            "wall_s": round(wall, 1), "student_acc": accs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="kd,dkd,dist")
    ap.add_argument("--T", default="1,2,4,8")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="kd-train overrides for every job (after --)")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kd-outputs-bench-"))
    grid = [f"method={a.methods}", f"method.T={a.T}"]
    results = [arm("store", True, grid, a.overrides, work), arm("no store", False, grid, a.overrides, work)]
    for r in results:
        print(json.dumps(r), flush=True)
    same = results[0]["student_acc"] == results[1]["student_acc"]
    print("\n| arm | jobs | teacher passes | pass seconds (all jobs) | sweep wall | students identical |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} | {r['jobs']} | {r['teacher_passes']} | {r['pass_seconds']:.1f} s | {r['wall_s']:.0f} s | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
