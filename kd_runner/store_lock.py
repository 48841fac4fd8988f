"""A per-key claim on the model store that works across machines sharing it over NFS and survives dead holders.

``fcntl.flock`` is not reliable between NFS clients, and a job killed while holding a key (OOM, ``scancel -9``, a
node crash) must not block it forever. So a key is held by a *claim file*, ``<root>/<key>.claim``:

* **claim**: ``os.open(O_CREAT | O_EXCL)`` (atomic on a local file system and on NFSv3+), holding JSON
  ``{host, pid, started, token, boot_id, pid_ns}``, written and fsync'd; **release** unlinks it only when it still
  holds our ``token``.
* **heartbeat**: while held, a daemon thread ``os.utime``\\ s the claim every ``heartbeat_s`` (so a teacher that trains
  for hours keeps it fresh) and warns once if the claim was taken from us.
* **waiting**: poll every 0.5 s, growing to 5 s (with jitter, so a sweep's waiters do not poll in lockstep).
  A claim is **stale** when (a) it was made on this machine (same host name, boot id and pid namespace) by a
  process that is gone: taken over at the next poll; (b) its mtime is older than ``stale_after_s`` (other hosts,
  crashed nodes, a reused pid), or it has not changed for ``stale_after_s`` of this waiter's own clock (a waiter
  whose clock lags the file server's); (c) it is unreadable or empty and older than ``stale_after_s``.

**Breaking a stale claim.** Moving the claim aside with ``rename`` and putting it back with ``os.link`` when a racing
waiter grabbed a live one (the obvious scheme) leaves a window in which the live claim is missing and a third waiter
can claim the key too. Instead a live claim is never moved: to break the claim it judged stale (identified by its
token, or inode + mtime when unreadable), a waiter must first create ``<key>.claim.break-<id>-0`` with ``O_EXCL``;
exactly one waiter wins, re-reads the claim, and unlinks it only if it is still the same one and still stale, then
removes the marker. Losers wait for the next poll. A marker is only held for a few system calls; one older than
``stale_after_s`` belongs to a breaker that died mid-break, and the next level (``...-1``, ...) is tried, so even
that cannot block a key. Every file is ``<key>.claim*``: never a store entry. Old ``<key>.lock`` files (flock, earlier
versions) are ignored.

A holder that is alive but judged stale (suspended for longer than ``stale_after_s``, or an NFS server that hung that
long) loses its claim; its heartbeat says so on stderr. Staleness by age assumes the hosts' clocks agree (NTP) to
well within ``stale_after_s``; NFS attribute caching (``acregmax``, 60 s by default) delays what a waiter sees.

Timing: ``stale_after_s`` (default 300 s; the environment variable ``KD_STORE_STALE_AFTER_S`` overrides the default,
for tests and impatient users) must exceed twice ``heartbeat_s`` (default 30 s, or a third of ``stale_after_s`` when
that is shorter).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kd_runner.errors import UserError

STALE_ENV = "KD_STORE_STALE_AFTER_S"
DEFAULT_STALE_AFTER_S = 300.0
DEFAULT_HEARTBEAT_S = 30.0
CLAIM_SUFFIX = ".claim"
POLL_FIRST_S, POLL_MAX_S = 0.5, 5.0
MAX_BREAK_LEVELS = 32
_ID_RE = re.compile(r"[0-9A-Za-z]{1,64}")


def lock_timing(stale_after_s: float | None = None, heartbeat_s: float | None = None) -> tuple[float, float]:
    """``(stale_after_s, heartbeat_s)``: the arguments, else ``$KD_STORE_STALE_AFTER_S``, else the defaults.

    ValueError when ``stale_after_s <= 2 * heartbeat_s`` (a live holder could look stale between two beats);
    UserError for a bad environment value.
    """
    if stale_after_s is None:
        text = os.environ.get(STALE_ENV, "").strip()
        stale_after_s = DEFAULT_STALE_AFTER_S
        if text:
            try:
                stale_after_s = float(text)
            except ValueError:
                stale_after_s = math.nan
            if not math.isfinite(stale_after_s) or stale_after_s <= 0:
                raise UserError(f"{STALE_ENV}={text!r} is invalid; it must be a number of seconds > 0 "
                                f"(default {DEFAULT_STALE_AFTER_S:g})")
    if heartbeat_s is None:
        heartbeat_s = min(DEFAULT_HEARTBEAT_S, stale_after_s / 3)
    if not (heartbeat_s > 0 and stale_after_s > 2 * heartbeat_s):
        raise ValueError(f"stale_after_s={stale_after_s:g} must be > 2 * heartbeat_s={heartbeat_s:g} (and both > 0)")
    return float(stale_after_s), float(heartbeat_s)


def _machine() -> dict:
    """What makes a pid meaningful: host name, kernel boot id and pid namespace (Linux; omitted elsewhere)."""
    out = {"host": socket.gethostname()}
    with contextlib.suppress(OSError):
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 1:].split()[0] not in ("Z", "X")
    return True


@dataclass(frozen=True)
class ClaimInfo:
    """A claim file as read: its JSON (``{}`` when unreadable), mtime and identity."""

    data: dict
    mtime_ns: int
    ident: str  # the token, or inode + mtime for an unreadable claim

    @property
    def readable(self) -> bool:
        return bool(self.data)

    def holder(self) -> str:
        """``gpu-3 pid 1234 (since 2025-01-31 12:00:00)``, for messages."""
        if not self.readable:
            return "an unknown job (its claim file is empty or unreadable)"
        started = self.data.get("started")
        since = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
                 if isinstance(started, int | float) and math.isfinite(started) else "?")
        return f"{self.data.get('host', '?')} pid {self.data.get('pid', '?')} (since {since})"

    def who(self) -> str:
        return f"{self.data.get('host', '?')} pid {self.data.get('pid', '?')}" if self.readable else "an unknown job"


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``, or None when there is none. Content and mtime come from one open (NFS revalidates
    attributes on open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and isinstance(data.get("token"), str) and _ID_RE.fullmatch(data["token"])
            and isinstance(data.get("pid"), int) and not isinstance(data.get("pid"), bool)):
        return ClaimInfo({}, st.st_mtime_ns, f"ino{st.st_ino}m{st.st_mtime_ns}")
    return ClaimInfo(data, st.st_mtime_ns, data["token"])


class ClaimTimeout(TimeoutError):
    """The key stayed held by a live claim for ``timeout_s``; ``holder`` is that claim (None if it vanished)."""

    def __init__(self, message: str, holder: ClaimInfo | None) -> None:
        super().__init__(message)
        self.holder = holder


class StoreClaim:
    """The claim on one store key: :meth:`acquire`, then :meth:`release` (or use :func:`claimed`)."""

    def __init__(self, root: Path, key: str, *, stale_after_s: float | None = None, heartbeat_s: float | None = None,
                 who: str = "kd-train") -> None:
        self.root, self.key, self.who = Path(root), key, who
        self.path = self.root / f"{key}{CLAIM_SUFFIX}"
        self.label = f"{self.root.name}/{key}"
        self.stale_after_s, self.heartbeat_s = lock_timing(stale_after_s, heartbeat_s)
        self.token = uuid.uuid4().hex
        self.machine = _machine()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._watched: dict[str, tuple[int, float]] = {}  # ident -> (mtime_ns, monotonic time first seen so)

    # ------------------------------------------------------------------ holding

    def acquire(self, timeout_s: float | None = None) -> None:
        """Wait until the key is ours (taking over stale claims); ClaimTimeout after ``timeout_s`` (None: never)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay, announced = POLL_FIRST_S, False
        while True:
            if self._create():
                break
            info = read_claim(self.path)
            if info is None:  # released in between: try again at once
                continue
            why = self._stale(info)
            if why is not None and self._break(info):
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ClaimTimeout(f"store key {self.label} is held by {info.holder()}; gave up after "
                                   f"{timeout_s:g} s", info)
            if not announced:
                print(f"{self.who}: store key {self.label} is being written by {info.holder()}; waiting",
                      file=sys.stderr, flush=True)
                announced = True
            pause = delay * random.uniform(0.8, 1.2)
            time.sleep(pause if left is None else min(pause, left))
            delay = min(delay * 1.5, POLL_MAX_S)
        self._sweep_markers()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"store-claim-{self.key[:12]}", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat; unlink the claim if it is still ours (never a claim someone else made since)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        with contextlib.suppress(OSError):  # not unlinked: it goes stale; never mask the body's own error
            info = read_claim(self.path)
            if info is not None and info.ident == self.token:
                os.unlink(self.path)

    def _create(self) -> bool:
        """Make the claim file with O_EXCL; False when it exists."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            body = {**self.machine, "pid": os.getpid(), "started": time.time(), "token": self.token}
            os.write(fd, json.dumps(body).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        os.close(fd)
        return True

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = read_claim(self.path)
                if info is not None and info.ident == self.token:
                    os.utime(self.path)
                    continue
            except OSError:
                pass  # a hiccup of the file server: try again at the next beat
            else:
                if not warned:
                    taker = "nobody" if info is None else info.who()
                    print(f"{self.who}: warning: the claim on store key {self.label} was taken over (now held by "
                          f"{taker}); was this job suspended for over {self.stale_after_s:g} s?",
                          file=sys.stderr, flush=True)
                    warned = True

    # ------------------------------------------------------------------ stale claims

    def _stale(self, info: ClaimInfo) -> str | None:
        """Why the claim ``info`` is stale, or None while its holder may be alive."""
        now_mono = time.monotonic()
        mtime_ns, since = self._watched.get(info.ident, (None, now_mono))
        if mtime_ns != info.mtime_ns:
            since = now_mono
        self._watched = {info.ident: (info.mtime_ns, since)}
        age = time.time() - info.mtime_ns / 1e9
        watched = now_mono - since
        limit = f"limit {self.stale_after_s:g} s"
        if not info.readable:
            if age > self.stale_after_s or watched > self.stale_after_s:
                return f"empty or unreadable and not updated for {max(age, watched):.0f} s, {limit}"
            return None
        same_machine = all(info.data.get(k) == v for k, v in self.machine.items())
        pid = info.data["pid"]
        if same_machine and pid > 0 and not pid_alive(pid):
            return "its process is no longer running"
        if age > self.stale_after_s:
            return f"not updated for {age:.0f} s, {limit}"
        if watched > self.stale_after_s:
            return f"unchanged for {watched:.0f} s while waiting, {limit}"
        return None

    def _marker(self, ident: str, level: int) -> Path:
        return self.root / f"{self.key}{CLAIM_SUFFIX}.break-{ident}-{level}"

    def _break(self, judged: ClaimInfo) -> bool:
        """Remove the stale claim ``judged`` if this waiter wins the right to; True when the caller should try to
        claim again at once, False when another waiter is breaking it (wait for the next poll)."""
        for level in range(MAX_BREAK_LEVELS):
            marker = self._marker(judged.ident, level)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                try:
                    age = time.time() - marker.stat().st_mtime
                except FileNotFoundError:
                    return True  # that breaker just finished
                if age <= self.stale_after_s:
                    return False
                continue  # its breaker died mid-break: the next level
            try:
                current = read_claim(self.path)
                if current is None or current.ident != judged.ident:
                    return True  # already broken (or released) by someone else
                why = self._stale(current)
                if why is None:
                    return False  # its heartbeat came back
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                print(f"{self.who}: store key {self.label}: claim by {current.who()} is stale ({why}); taking it over",
                      file=sys.stderr, flush=True)
                return True
            finally:
                for lv in range(level + 1):  # ours, and those of breakers that died
                    with contextlib.suppress(FileNotFoundError):
                        self._marker(judged.ident, lv).unlink()
        raise UserError(f"store key {self.label}: {MAX_BREAK_LEVELS} stale break markers "
                        f"'{self._marker(judged.ident, 0)}' ...; remove '{self.path}*' by hand")

    def _sweep_markers(self) -> None:
        """Remove break markers left by breakers that died after breaking (harmless, but clutter)."""
        for marker in self.root.glob(f"{self.key}{CLAIM_SUFFIX}.break-*"):
            if self.token in marker.name:
                continue
            with contextlib.suppress(OSError):
                if time.time() - marker.stat().st_mtime > self.stale_after_s:
                    marker.unlink()


@contextlib.contextmanager
def claimed(root: Path, key: str, *, stale_after_s: float | None = None, heartbeat_s: float | None = None,
            timeout_s: float | None = None, who: str = "kd-train") -> Iterator[StoreClaim]:
    """Hold the claim on ``<root>/<key>`` for the ``with`` body; released however the body ends."""
    claim = StoreClaim(root, key, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s, who=who)
    claim.acquire(timeout_s)
    try:
        yield claim
    finally:
        claim.release()
