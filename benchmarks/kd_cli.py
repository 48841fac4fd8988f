"""Running kd-train from a benchmark script: one command, timed, the script stopping with kd-train's error if it
fails (a benchmark with a failed arm has nothing to report)."""

from __future__ import annotations

import subprocess
import sys
import time

KD_TRAIN = [sys.executable, "-m", "kd_runner.train"]


def run_kd_train(args: list[str], env: dict, launcher: list[str] | None = None) -> float:
    """Run ``kd-train args`` (under ``launcher``, e.g. torchrun's, when given); wall seconds it took."""
    cmd = [*(launcher or KD_TRAIN), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall
