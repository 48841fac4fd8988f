"""Data-parallel runs (DDP over gloo on CPU): ``torchrun --nproc_per_node=2 -m kd_runner.train`` and a submitit job
with two tasks must give the figures of a one-process run with the same global batch and seed.

Why equality holds here, and where it would not: each rank takes a contiguous part of every seeded global batch,
its mean loss is weighted by its share of the batch, and DDP averages the gradients, so each step's update is the
one-process update up to float summation order (last digits of the losses below). Evaluation sums exact counts.
Models with dropout draw their masks per rank, and BatchNorm normalises per rank's part unless trainer.sync_bn
(CUDA only), so those runs match only statistically; the models here have neither.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, merge_overrides, read_metrics

from kd_runner import distributed
from kd_runner.data.augment import Augment
from kd_runner.data.tensors import batch_chunks, global_batch_sizes
from kd_runner.errors import UserError

# no dropout, no BatchNorm; random crops + flips and the teacher-view cache exercise the augmentation draws and the
# sharded teacher pass; 1437 training images in batches of 128 end with an uneven 29-image batch (15 + 14)
ARGS = ["method=kd", "teacher=mlp_800", "student=mlp_800", "trainer.teacher_epochs=1", "trainer.student_epochs=2",
        "augment.crop_padding=1", "augment.hflip=true", "trainer.teacher_outputs=views", "trainer.baseline_cache=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "kd_runner.train"]
LOSS_RTOL = 1e-5  # float summation order only
ACC_TOL = 0.0  # counts of correct test images: exact here (models without dropout or BatchNorm)


def _run(cmd_prefix: list[str], args: list[str], base: Path, run_dir: Path, env: dict | None = None,
         wait: bool = True):
    cmd = [*cmd_prefix, *merge_overrides(args), f"hydra.run.dir={run_dir}"]
    kw = dict(cwd=base, env=cli_env(base, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=300, **kw)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _assert_same_run(one: Path, two: Path) -> None:
    r1, r2 = _report(one), _report(two)
    for role in ("teacher", "baseline", "student"):
        assert abs(r1["models"][role]["test_acc"] - r2["models"][role]["test_acc"]) <= ACC_TOL, role
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [(r["phase"], r["epoch"]) for r in m1] == [(r["phase"], r["epoch"]) for r in m2]
    for a, b in zip(m1, m2, strict=True):
        for col in ("train_loss", "train_soft"):
            if a.get(col):
                assert float(b[col]) == pytest.approx(float(a[col]), rel=LOSS_RTOL), (a["phase"], a["epoch"], col)
        assert float(b["train_acc"]) == pytest.approx(float(a["train_acc"]), abs=1e-9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run in one process and the same run under torchrun with two processes (separate stores: both train)."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = base / "one", base / "two"
    p1 = _run([sys.executable, "-m", "kd_runner.train"], ARGS, base, one, env={"KD_CACHE_DIR": str(base / "c1")})
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = _run(TORCHRUN, ARGS, base, two, env={"KD_CACHE_DIR": str(base / "c2")})
    assert p2.returncode == 0, p2.stderr[-3000:]
    return {"base": base, "one": one, "two": two, "stdout2": p2.stdout}


def test_torchrun_two_processes_match_one(runs):
    _assert_same_run(runs["one"], runs["two"])
    rep = _report(runs["two"])
    assert rep["execution"]["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False}
    assert _report(runs["one"])["execution"]["distributed"]["world_size"] == 1
    # rank 0 alone writes and prints: one report line, one set of files, no second Hydra log
    assert runs["stdout2"].count("report: ") == 1
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == [
        "baseline.pt", "student.pt", "teacher.pt"]
    assert not (runs["two"] / "state").exists()
    stored = _report(runs["two"])["teacher"]["outputs_store"]
    assert stored["source"] == "computed" and Path(stored["path"]).is_file()  # rank 0 stored the sharded pass


def test_torchrun_sigterm_then_rerun_resumes_to_the_same_run(runs):
    # the two-process run's stores: teacher, baseline and teacher pass load, the student phase trains and is cut
    base, cut, store = runs["base"], runs["base"] / "cut", {"KD_CACHE_DIR": str(runs["base"] / "c2")}
    proc = _run(TORCHRUN, ARGS, base, cut, env=store, wait=False)
    deadline = time.time() + 240
    while not (cut / "state" / "student.pt").is_file():  # stop it in the student phase, after its first epoch
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "kd-train: stopped by SIGTERM" in err and not (cut / "report.json").exists()
    again = _run(TORCHRUN, ARGS, base, cut, env=store)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_run(runs["two"], cut)


def test_submitit_job_with_two_tasks_runs_data_parallel(runs, tmp_path):
    """hydra/launcher=slurm_ddp's path (one job, several submitit tasks joining one process group), run by submitit's
    local executor as Slurm would run it."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kd_runner.train", "-m", "hydra/launcher=submitit_cpu",
           "hydra.launcher.tasks_per_node=2", *merge_overrides(ARGS), f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _report(sweep / "0")["execution"]["distributed"]["world_size"] == 2
    _assert_same_run(runs["one"], sweep / "0")


def test_batch_that_does_not_split_fails_every_rank_with_one_line(tmp_path):
    proc = _run(TORCHRUN, [*ARGS, "trainer.batch_size=127"], tmp_path, tmp_path / "run")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("kd-train:")]
    assert lines == ["kd-train: error: trainer.batch_size=127 is the global batch and cannot be split over 2 "
                     "processes; use a multiple of 2 (e.g. 126, 128, 130)"], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # torchrun's account of the ranks: they exited with kd-train's user error
    assert not (tmp_path / "run" / "report.json").exists()


def test_world_size_without_a_rendezvous_is_one_line(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    proc = _run([sys.executable, "-m", "kd_runner.train"], ARGS, tmp_path, tmp_path / "run", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kd-train: error: WORLD_SIZE=2 asks for a data-parallel run but MASTER_ADDR, MASTER_PORT are not set (or "
        "RANK is not in 0..1); launch it with: torchrun --nproc_per_node=2 -m kd_runner.train ..."]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- sharding, in-process


@pytest.mark.parametrize("n,batch,world", [(1437, 128, 2), (1437, 128, 3), (100, 10, 4), (7, 4, 2), (3, 4, 2)])
def test_shards_cover_every_global_batch_once(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    whole = batch_chunks(order, batch)
    sizes = global_batch_sizes(n, batch, world)
    parts = [batch_chunks(order, batch, (r, world)) for r in range(world)]
    assert all(len(p) == len(sizes) for p in parts)
    for i, size in enumerate(sizes):
        joined = torch.cat([p[i] for p in parts])
        assert torch.equal(joined, whole[i]) and len(joined) == size
        assert min(len(p[i]) for p in parts) >= 2  # BatchNorm needs two images per rank
    dropped = n - sum(sizes)
    assert dropped == (len(whole[-1]) if len(whole[-1]) < 2 * world else 0) and dropped < 2 * world


def test_a_ranks_views_are_its_rows_of_the_one_process_draw():
    aug = Augment(crop_padding=2, hflip=True)
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    gen_full = torch.Generator().manual_seed(3)
    full, ids = aug.draw(x, gen_full)
    for r in range(3):
        lo, hi = distributed.shard_bounds(10, r, 3)
        gen = torch.Generator().manual_seed(3)
        part, part_ids = aug.draw(x[lo:hi], gen, rows=(10, lo, hi))
        assert torch.equal(part, full[lo:hi]) and torch.equal(part_ids, ids[lo:hi])
        assert torch.equal(gen.get_state(), gen_full.get_state())  # the next batch's draws start alike too


def _collectives(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.init_from_env()
    try:
        assert distributed.enabled() and distributed.rank() == rank and distributed.describe()["backend"] == "gloo"
        n = 7  # rank 0 holds rows 0..3, rank 1 rows 4..6
        lo, hi = distributed.shard_bounds(n)
        rows = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
        assert torch.equal(distributed.gather_rows(rows[lo:hi], n), rows)
        mine = torch.full((rank + 1, 2), float(rank))  # 1 row on rank 0, 2 on rank 1
        assert torch.equal(distributed.gather_cat(mine), torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert float(distributed.mean_across(torch.tensor(float(rank)))) == 0.5
        assert distributed.broadcast_object({"from": rank}) == {"from": 0}
        assert distributed.gather_objects(rank * 10) == [0, 10]
        total = torch.tensor([float(rank + 1)])
        distributed.all_reduce_sum(total)
        assert float(total) == 3.0
        with pytest.raises(UserError, match="trainer.batch_size=5 .* multiple of 2"):
            distributed.check_batch("trainer.batch_size", 5)
    finally:
        distributed.shutdown()


def test_collectives_on_two_ranks():
    """The helpers the engine calls, on a real two-process gloo group (CRD's bank updates use gather_cat)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives, args=(port,), nprocs=2, join=True)
