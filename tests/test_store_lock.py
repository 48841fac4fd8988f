"""The model store's claim files: one writer per key across processes and hosts, dead holders taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kd_runner import store_cli
from kd_runner.errors import UserError
from kd_runner.model_store import ModelStore, entry_keys
from kd_runner.store_lock import ClaimTimeout, StoreClaim, claimed, read_claim

REPO = Path(__file__).resolve().parents[1]
KEY = "0123abcd"

# one job wanting the key: waits until start_at (so several race), holds it for `hold` seconds, logs start/end
WORKER = r"""
import sys, time
from pathlib import Path
from kd_runner.store_lock import claimed
root, key, log, tag, hold, stale, start_at = sys.argv[1:8]
while time.time() < float(start_at):
    time.sleep(0.002)
with claimed(Path(root), key, stale_after_s=float(stale)):
    with open(log, "a") as f:
        f.write(f"start {tag}\n")
    time.sleep(float(hold))
    with open(log, "a") as f:
        f.write(f"end {tag}\n")
"""


def _job(root: Path, log: Path, tag: str, hold: float, stale: float = 300, start_at: float = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), KEY, str(log), tag, str(hold), str(stale),
                             str(start_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]
        errs.append(err)
    return errs


def _bodies(log: Path) -> list[str]:
    """The tags of the bodies in the order they ran; fails if two overlapped."""
    lines = log.read_text().splitlines()
    assert len(lines) % 2 == 0, lines
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    for start, end in pairs:
        assert start.startswith("start ") and end == f"end {start[6:]}", f"bodies overlapped: {lines}"
    return [start[6:] for start, _ in pairs]


def _wait_for(cond, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _foreign_claim(root: Path, age_s: float, host: str = "other-node", pid: int = 4242) -> str:
    """A claim file as another machine's job writes it, last touched ``age_s`` ago; returns its token."""
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path = root / f"{KEY}.claim"
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s, "token": token}))
    os.utime(path, (time.time() - age_s,) * 2)
    return token


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_racing_processes_run_the_body_one_at_a_time_each_once(tmp_path):
    root, log = tmp_path / "teachers", tmp_path / "log"
    start_at = time.time() + 1.0
    procs = [_job(root, log, f"j{i}", hold=0.3, start_at=start_at) for i in range(3)]
    errs = _finish(procs)
    assert sorted(_bodies(log)) == ["j0", "j1", "j2"]
    assert sum("; waiting" in e for e in errs) >= 1  # the losers said who they wait for
    assert not any("stale" in e for e in errs)  # a live holder is never taken over
    assert list(root.iterdir()) == []  # every claim released, no marker left


def test_sigkilled_holder_is_taken_over_at_once_on_the_same_host(tmp_path):
    root, log = tmp_path / "teachers", tmp_path / "log"
    holder = _job(root, log, "holder", hold=120)
    _wait_for(lambda: log.exists() and "start holder" in log.read_text())
    waiter = _job(root, log, "waiter", hold=0)
    time.sleep(1.0)  # the waiter polls the live claim
    assert waiter.poll() is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err[-2000:]
    assert time.monotonic() - t0 < 10  # next poll, far from stale_after_s=300
    assert f"store key teachers/{KEY} is being written by" in err and f"pid {holder.pid}" in err
    assert (f"claim by {socket.gethostname()} pid {holder.pid} is stale (its process is no longer running); "
            "taking it over") in err
    assert log.read_text().splitlines() == ["start holder", "start waiter", "end waiter"]
    assert not (root / f"{KEY}.claim").exists()


def test_fresh_claim_of_another_host_is_waited_for_even_if_its_pid_is_dead_here(tmp_path, capsys):
    root = tmp_path / "teachers"
    token = _foreign_claim(root, age_s=5, pid=_dead_pid())
    t0 = time.monotonic()
    with pytest.raises(ClaimTimeout) as err, claimed(root, KEY, timeout_s=1.5):
        pytest.fail("the body ran while another host holds the key")
    assert 1.4 < time.monotonic() - t0 < 5
    assert err.value.holder is not None and err.value.holder.data["token"] == token
    assert read_claim(root / f"{KEY}.claim").ident == token  # left alone
    assert f"store key teachers/{KEY} is being written by other-node pid" in capsys.readouterr().err


def test_old_claim_of_another_host_is_taken_over(tmp_path, capsys):
    root = tmp_path / "teachers"
    _foreign_claim(root, age_s=400)
    with claimed(root, KEY, timeout_s=5) as claim:
        assert read_claim(root / f"{KEY}.claim").ident == claim.token
    err = capsys.readouterr().err
    assert f"store key teachers/{KEY}: claim by other-node pid 4242 is stale (not updated for 400 s" in err
    assert err.count("taking it over") == 1 and "waiting" not in err
    assert list(root.iterdir()) == []


def test_empty_claim_is_waited_for_while_fresh_and_taken_over_once_old(tmp_path):
    root = tmp_path / "teachers"
    root.mkdir()
    path = root / f"{KEY}.claim"
    path.touch()  # a job that died between creating its claim and writing it (or is writing it now)
    with pytest.raises(ClaimTimeout), claimed(root, KEY, timeout_s=0.3):
        pass
    os.utime(path, (time.time() - 400,) * 2)
    with claimed(root, KEY, timeout_s=5) as claim:
        assert read_claim(path).ident == claim.token


def test_heartbeat_keeps_a_long_hold_fresh(tmp_path):
    root = tmp_path / "teachers"
    timing = {"stale_after_s": 1.0, "heartbeat_s": 0.2}
    got: dict[str, float] = {}
    with claimed(root, KEY, **timing) as claim:
        first = read_claim(claim.path).mtime_ns
        waiter = threading.Thread(target=lambda: _take(root, timing, got))
        waiter.start()
        time.sleep(2.5)  # 2.5 x stale_after_s: without the heartbeat the waiter breaks the claim
        assert read_claim(claim.path).mtime_ns > first and read_claim(claim.path).ident == claim.token
        released = time.monotonic()
    waiter.join(timeout=30)
    assert got["acquired"] >= released


def _take(root: Path, timing: dict, got: dict) -> None:
    with claimed(root, KEY, **timing):
        got["acquired"] = time.monotonic()


def test_release_leaves_someone_elses_claim_alone(tmp_path, capsys):
    root = tmp_path / "teachers"
    mine = StoreClaim(root, KEY, stale_after_s=1.0, heartbeat_s=0.1)
    mine.acquire()
    os.unlink(mine.path)  # as a waiter does that judged us stale (we were suspended too long)
    theirs = StoreClaim(root, KEY)
    theirs.acquire(timeout_s=0)
    time.sleep(0.4)
    mine.release()
    assert read_claim(theirs.path).ident == theirs.token
    assert "the claim on store key teachers/0123abcd was taken over (now held by" in capsys.readouterr().err
    theirs.release()
    assert not theirs.path.exists()


def test_waiters_racing_to_break_one_stale_claim_take_turns(tmp_path):
    root, log = tmp_path / "teachers", tmp_path / "log"
    _foreign_claim(root, age_s=400)
    start_at = time.time() + 1.0
    errs = _finish([_job(root, log, f"w{i}", hold=0.3, start_at=start_at) for i in range(3)])
    assert sorted(_bodies(log)) == ["w0", "w1", "w2"]
    assert sum(e.count("taking it over") for e in errs) == 1
    assert list(root.iterdir()) == []


def test_breaker_that_died_mid_break_does_not_block_the_key(tmp_path, capsys):
    root = tmp_path / "teachers"
    token = _foreign_claim(root, age_s=400)
    marker = root / f"{KEY}.claim.break-{token}-0"
    marker.touch()  # another waiter is breaking it right now: leave it to that one
    with pytest.raises(ClaimTimeout), claimed(root, KEY, timeout_s=0.3):
        pass
    assert read_claim(root / f"{KEY}.claim").ident == token
    os.utime(marker, (time.time() - 400,) * 2)  # ... and that waiter died in the middle
    with claimed(root, KEY, timeout_s=5):
        pass
    assert "taking it over" in capsys.readouterr().err
    assert list(root.iterdir()) == []


def test_model_store_lock_is_released_however_the_body_ends(tmp_path):
    store = ModelStore(tmp_path / "teachers", stale_after_s=3, heartbeat_s=1)
    with pytest.raises(KeyboardInterrupt), store.locked(KEY):
        assert (store.root / f"{KEY}.claim").exists()
        raise KeyboardInterrupt
    assert not (store.root / f"{KEY}.claim").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("store-claim-")]
    with store.locked(KEY), pytest.raises(ClaimTimeout), ModelStore(store.root).locked(KEY, timeout_s=0.2):
        pass


def test_claim_files_are_not_entries_and_kd_store_respects_them(tmp_path):
    root = tmp_path / "teachers"
    (root / KEY).mkdir(parents=True)
    (root / f"{KEY}.lock").touch()  # left by an earlier version: ignored
    _foreign_claim(root, age_s=5)
    (root / f"{KEY}.claim.break-{'ab' * 16}-0").touch()
    assert entry_keys(root) == [KEY]
    with pytest.raises(store_cli.StoreError, match="being trained by a running kd-train job .other-node pid 4242"):
        with store_cli._entry_lock(root, KEY, "export"):
            pass
    os.utime(root / f"{KEY}.claim", (time.time() - 400,) * 2)  # that job died: kd-store takes the key over
    with store_cli._entry_lock(root, KEY, "export"):
        assert read_claim(root / f"{KEY}.claim").data["pid"] == os.getpid()
    assert not (root / f"{KEY}.claim").exists()


def test_timing_is_checked_and_env_overrides_the_default(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="must be > 2 \\* heartbeat_s"):
        ModelStore(tmp_path, stale_after_s=50, heartbeat_s=30)
    monkeypatch.setenv("KD_STORE_STALE_AFTER_S", "6")
    store = ModelStore(tmp_path)
    assert (store.stale_after_s, store.heartbeat_s) == (6.0, 2.0)
    monkeypatch.setenv("KD_STORE_STALE_AFTER_S", "soon")
    with pytest.raises(UserError, match="KD_STORE_STALE_AFTER_S='soon' is invalid"):
        ModelStore(tmp_path)
