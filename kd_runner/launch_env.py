"""How this process was launched, read from the environment alone (no torch import, so a one-process kd-train
starts as fast as before): as one of several ranks (torchrun's ``WORLD_SIZE``) or as a task of a submitit job with
several tasks (Slurm's ``SLURM_NTASKS``, or ``SUBMITIT_LOCAL_NTASKS`` under submitit's local executor)."""

from __future__ import annotations

import os


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def submitit_tasks() -> int:
    """How many tasks the submitit job this process runs in has (1 outside one)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 1
    return max(env_int("SLURM_NTASKS") or 1, env_int("SUBMITIT_LOCAL_NTASKS") or 1)


def data_parallel_launch() -> bool:
    """Whether a launcher started this process as one of several ranks of one run."""
    return (env_int("WORLD_SIZE") or 1) > 1 or submitit_tasks() > 1
