"""kd-store: list, export and import the teachers (and CE baselines) kept in kd-train's model store.

kd-train keeps every teacher it trains in a content-addressed store, ``<cache_dir>/teachers/<key>/``
(``model.pt``, ``best.pt`` when a validation split picked a best epoch, ``meta.json``), and every CE
baseline under ``<cache_dir>/baselines/<key>/``. This command lists those entries, packs some of them
into a portable ``.tar.gz``, and places such an archive into another machine's store, where a kd-train run
whose config maps to the same key loads the teacher instead of training it.

Import never unpickles anything: every file is checked byte for byte against the sizes and sha256 recorded
in the archive's manifest and in the entry's own ``meta.json`` before it is placed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from kd_runner import __version__

PROG = "kd-store"
KINDS = ("teachers", "baselines")
ROLE = {"teachers": "teacher", "baselines": "baseline"}  # the report's name for an entry of each kind
ARCHIVE_ROOT = "kd-store"
MANIFEST = "MANIFEST.json"
ARCHIVE_FORMAT = "kd-store-archive"
ARCHIVE_VERSION = 1
MODEL_FILE, BEST_FILE, META_FILE = "model.pt", "best.pt", "meta.json"
ENTRY_FILES = (META_FILE, MODEL_FILE, BEST_FILE)
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
MEMBER_RE = re.compile(rf"{ARCHIVE_ROOT}/(?:{re.escape(MANIFEST)}|(teachers|baselines)/([A-Za-z0-9_-]{{1,64}})/"
                       rf"(meta\.json|model\.pt|best\.pt))")
MAX_JSON_BYTES = 64 << 20  # a manifest or meta.json larger than this is not one kd-store wrote

EPILOG_TOP = """\
examples:
  kd-store list                                   every stored teacher and baseline, as a table
  kd-store list --kind teachers --json            the same for scripts
  kd-store export 2cdf6e3c --to teacher.tar.gz    pack one teacher (a unique key prefix is enough)
  kd-store import teacher.tar.gz                  place it into this machine's store

The store is paths.cache_dir of kd-train: $KD_CACHE_DIR, else $KD_OUTPUT_DIR/.cache, else outputs/.cache
(relative to the current directory); --cache-dir overrides it.

An exported teacher is also a plain checkpoint: after `tar -xzf teacher.tar.gz`, the file
kd-store/teachers/<key>/model.pt loads with `kd-train teacher=<its arch> teacher.checkpoint=<that path>`.
"""

EPILOG_LIST = """\
Columns: EPOCHS and SEED are the training settings of the key; TRAIN and VAL are the last epoch's
train/validation accuracy (%), BEST_VAL the best validation accuracy, TEST the test accuracy from the
report.json of the run that trained the entry (meta.json's trained_in; '-' when that report is gone);
STATUS is ok, corrupt (a file differs from the size/sha256 recorded when it was written: kd-train sets it
aside and retrains it), unverified (written before hashes were recorded) or incomplete (an interrupted write).
"""

EPILOG_EXPORT = """\
The archive holds kd-store/MANIFEST.json and, per entry, kd-store/<kind>/<key>/{meta.json,model.pt,best.pt}.
Import it on another machine with `kd-store import FILE.tar.gz`.

It is also a plain checkpoint: `tar -xzf FILE.tar.gz` and pass kd-store/teachers/<key>/model.pt (final
weights) or best.pt (best validation epoch) as `teacher.checkpoint=` to kd-train, with the teacher arch of
the entry (`kd-store list` shows it), e.g. kd-train teacher=deep_nn teacher.checkpoint=kd-store/teachers/<key>/model.pt
"""

EPILOG_IMPORT = """\
Nothing is placed unless every member of the archive matches the size and sha256 recorded for it; nothing
is unpickled. Each entry is written to a temporary directory beside the store and renamed into place. An
entry already present is kept as it is; a corrupt one is set aside (<key>.corrupt-<time>) and replaced.

kd-train uses an imported teacher when its config maps to the entry's key: the same dataset, teacher arch,
training settings and teacher_seed, torch/torchvision major.minor, kd-runner training code and device type.
Otherwise load it explicitly with teacher.checkpoint=<cache dir>/teachers/<key>/model.pt.
"""


class StoreError(Exception):
    """A one-line error for the user: printed as ``kd-store: error: ...``, exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _model_store():
    """The store module, imported on first use (it imports torch: `kd-store --help` stays instant)."""
    from kd_runner import model_store

    return model_store


# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    """kd-train's ``paths.cache_dir`` default (conf/paths/default.yaml), resolved the same way."""
    if os.environ.get("KD_CACHE_DIR"):
        return Path(os.environ["KD_CACHE_DIR"])
    return Path(os.environ.get("KD_OUTPUT_DIR") or "outputs") / ".cache"


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 100 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def _pct(x) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.2f}"


def _kind_arg(text: str) -> str:
    t = text.strip().lower()
    for kind in KINDS:
        if t in (kind, ROLE[kind]):
            return kind
    if t == "all":
        return "all"
    raise argparse.ArgumentTypeError(f"invalid kind {text!r} (choose teachers, baselines or all)")


def _existing_cache(cache: Path) -> Path:
    if not cache.exists():
        raise StoreError(f"cache dir '{cache}' does not exist; give --cache-dir DIR or set KD_CACHE_DIR "
                         "(kd-train's paths.cache_dir, where it stores teachers)")
    if not cache.is_dir():
        raise StoreError(f"cache dir '{cache}' is not a directory")
    return cache


@contextlib.contextmanager
def _entry_lock(root: Path, key: str, what: str) -> Iterator[None]:
    """The store's own claim on ``key`` (``<root>/<key>.claim``, as kd-train takes it), without waiting.

    A claim left by a dead job is taken over, as kd-train does. A store that cannot be written (someone else's
    cache, read-only) is read without the claim.
    """
    from kd_runner.store_lock import ClaimTimeout, StoreClaim

    claim = StoreClaim(root, key, who=PROG)
    try:
        claim.acquire(timeout_s=0)
    except ClaimTimeout as err:
        holder = err.holder.holder() if err.holder is not None else "another job"
        raise StoreError(f"{root.name}/{key} is being trained by a running kd-train job ({holder}, it holds "
                         f"'{claim.path}'); {what} it once that job is done") from None
    except OSError:
        if what == "import":
            raise
        yield
        return
    try:
        yield
    finally:
        claim.release()


def _arch(model_cfg: dict) -> str:
    arch = model_cfg.get("arch")
    if not isinstance(arch, str):
        return "-"
    if arch == "torchvision" and isinstance(model_cfg.get("name"), str):
        return f"torchvision:{model_cfg['name']}"
    return arch


# --------------------------------------------------------------------------- list


def _test_acc(meta: dict, kind: str, key: str) -> tuple[float | None, str | None]:
    """Test accuracy of the entry: from the report of the run that trained it, else the one recorded on export."""
    role = ROLE[kind]
    trained_in = meta.get("trained_in")
    if isinstance(trained_in, str) and trained_in:
        try:
            rep = json.loads((Path(trained_in) / "report.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            rep = None
        if isinstance(rep, dict):
            model = _dict(_dict(rep.get("models")).get(role))
            source = _dict(rep.get("teacher")) if role == "teacher" else _dict(model.get("source"))
            acc = _num(model.get("test_acc"))
            if source.get("key") == key and acc is not None:  # the run dir may since hold another run
                return acc, "report"
    acc = _num(_dict(meta.get("exported")).get("test_acc"))
    return (acc, "archive") if acc is not None else (None, None)


def describe(cache: Path, kind: str, key: str) -> dict:
    """One row of ``kd-store list`` for the entry ``<cache>/<kind>/<key>``: read from bytes, nothing unpickled."""
    ms = _model_store()
    folder = cache / kind / key
    status, problem = ms.check_entry(folder)
    if status == "absent":
        status, problem = "incomplete", "an interrupted write: no model.pt and no meta.json"
    meta = ms.ModelStore(folder.parent).read_meta(key)
    material = _dict(meta.get("key_material"))
    model_cfg = _dict(material.get("teacher" if kind == "teachers" else "student"))
    history = meta.get("history") if isinstance(meta.get("history"), list) else []
    last = _dict(history[-1]) if history else {}
    test_acc, test_from = _test_acc(meta, kind, key)
    size, mtime = 0, None
    for name in ENTRY_FILES:
        with contextlib.suppress(OSError):
            st = (folder / name).stat()
            size += st.st_size
            if name == META_FILE:
                mtime = st.st_mtime
    versions = _dict(material.get("versions"))
    return {
        "key": key, "kind": ROLE[kind], "arch": _arch(model_cfg), "model": model_cfg,
        "dataset": _dict(material.get("dataset")).get("name"),
        "epochs": _dict(material.get("training")).get("epochs"), "seed": material.get("seed"),
        "train_acc": _num(last.get("train_acc")), "val_acc": _num(last.get("val_acc")),
        "best_val_acc": _num(meta.get("best_val_acc")), "best_epoch": meta.get("best_epoch"),
        "test_acc": test_acc, "test_acc_from": test_from,
        "size_bytes": size,
        "trained": (datetime.fromtimestamp(mtime, timezone.utc).astimezone().isoformat(timespec="seconds")
                    if mtime is not None else None),
        "trained_in": meta.get("trained_in"), "train_seconds": _num(meta.get("train_seconds")),
        "device": material.get("device"), "versions": versions,
        "has_best": (folder / BEST_FILE).is_file(),
        "status": status, "problem": problem or None, "path": str(folder.resolve()),
    }


def entries(cache: Path, kind: str = "all") -> list[dict]:
    ms = _model_store()
    kinds = KINDS if kind == "all" else (kind,)
    rows = [describe(cache, k, key) for k in kinds for key in ms.entry_keys(cache / k)]
    order = {ROLE[k]: i for i, k in enumerate(KINDS)}
    return sorted(rows, key=lambda r: (order[r["kind"]], str(r["dataset"]), r["arch"], r["trained"] or "", r["key"]))


LIST_COLUMNS = [  # header, row -> cell, right-aligned
    ("KEY", lambda r: r["key"], False),
    ("KIND", lambda r: r["kind"], False),
    ("ARCH", lambda r: r["arch"], False),
    ("DATASET", lambda r: str(r["dataset"] or "-"), False),
    ("EPOCHS", lambda r: "-" if r["epochs"] is None else str(r["epochs"]), True),
    ("SEED", lambda r: "-" if r["seed"] is None else str(r["seed"]), True),
    ("TRAIN", lambda r: _pct(r["train_acc"]), True),
    ("VAL", lambda r: _pct(r["val_acc"]), True),
    ("BEST_VAL", lambda r: _pct(r["best_val_acc"]), True),
    ("TEST", lambda r: _pct(r["test_acc"]), True),
    ("SIZE", lambda r: _human(r["size_bytes"]), True),
    ("TRAINED", lambda r: (r["trained"] or "-")[:16].replace("T", " "), False),
    ("STATUS", lambda r: r["status"], False),
]


def format_table(rows: list[dict]) -> str:
    cells = [[head for head, _, _ in LIST_COLUMNS]] + [[fn(r) for _, fn, _ in LIST_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(LIST_COLUMNS))]
    out = []
    for line in cells:
        parts = [c.rjust(w) if right else c.ljust(w) for c, w, (_, _, right) in zip(line, widths, LIST_COLUMNS,
                                                                                     strict=True)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def cmd_list(args) -> int:
    cache = _existing_cache(args.cache_dir)
    rows = entries(cache, args.kind)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    kinds = "entries" if args.kind == "all" else args.kind
    if not rows:
        print(f"no stored {kinds} in '{cache}' (kd-train stores each teacher it trains there)")
        return 0
    print(format_table(rows))
    print(f"\n{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} in '{cache}'"
          "; accuracies in %, TEST from the report of the run that trained it")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['kind']} {r['key']}: {r['status']}: {r['problem']}")
    ms = _model_store()
    aside = [p for k in (KINDS if args.kind == "all" else (args.kind,)) for p in ms.set_aside_entries(cache / k)]
    if aside:
        print(f"{len(aside)} corrupt entr{'y' if len(aside) == 1 else 'ies'} set aside by kd-train (not listed, "
              f"kept): {', '.join(str(p) for p in aside[:3])}{', ...' if len(aside) > 3 else ''}")
    return 0


# --------------------------------------------------------------------------- export


def resolve_key(cache: Path, text: str) -> tuple[str, str]:
    """``(kind, key)`` of the stored entry ``text`` names: a key, a unique key prefix, or ``<kind>/<key>``."""
    ms = _model_store()
    wanted, kinds = text.strip(), KINDS
    if "/" in wanted:
        kind_text, _, wanted = wanted.partition("/")
        try:
            kind = _kind_arg(kind_text)
        except argparse.ArgumentTypeError:
            kind = ""
        if kind not in KINDS:
            raise StoreError(f"'{text}' names no kind of entry; give KEY or teachers/KEY or baselines/KEY")
        kinds = (kind,)
    stored = [(k, key) for k in kinds for key in ms.entry_keys(cache / k)]
    exact = [e for e in stored if e[1] == wanted]
    if len(exact) == 1:
        return exact[0]
    matches = exact or ([e for e in stored if e[1].startswith(wanted)] if wanted else [])
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(f"{k}/{key}" for k, key in matches[:6]) + (", ..." if len(matches) > 6 else "")
        raise StoreError(f"key prefix '{wanted}' is ambiguous: it matches {len(matches)} entries ({shown}); "
                         "give more characters")
    where = f"'{cache}'" if len(kinds) > 1 else f"'{cache / kinds[0]}'"
    if not stored:
        raise StoreError(f"unknown key '{wanted}': nothing is stored in {where}")
    close = difflib.get_close_matches(wanted, [key for _, key in stored], n=3, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else "; `kd-store list` shows the stored keys"
    raise StoreError(f"unknown key '{wanted}': no stored entry in {where} has that key or prefix{hint}")


class _HashingReader(io.RawIOBase):
    """A file read through while hashing it, so the bytes that go into the archive are the bytes checked."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _entry_for_export(cache: Path, kind: str, key: str) -> tuple[dict, bytes, dict]:
    """``(manifest record, meta.json bytes to archive, file records)``; refuses entries that are not intact."""
    ms = _model_store()
    folder = cache / kind / key
    status, problem = ms.check_entry(folder)
    if status == "absent":
        raise StoreError(f"{kind}/{key} holds no model (an interrupted write); nothing to export")
    if status == "corrupt":
        raise StoreError(f"{kind}/{key} is corrupt ({problem}); it cannot be exported (kd-train sets it aside "
                         "and retrains it on its next run with that config)")
    meta = ms.ModelStore(folder.parent).read_meta(key)
    files = _dict(meta.get("files"))
    if set(files) - {MODEL_FILE, BEST_FILE}:
        raise StoreError(f"{kind}/{key}/{META_FILE} records unexpected files ({', '.join(sorted(files))})")
    if status == "unverified":  # written before hashes were recorded: record them now, for the importer
        files = {name: ms.file_digest(folder / name) for name in (MODEL_FILE, BEST_FILE) if (folder / name).is_file()}
        meta = {**meta, "files": files}
    test_acc, _ = _test_acc(meta, kind, key)
    row = describe(cache, kind, key)
    exported = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kd_runner": __version__}
    if test_acc is not None:
        exported["test_acc"] = test_acc
    meta_bytes = json.dumps({**meta, "exported": exported}, indent=2, default=str).encode()
    records = {META_FILE: {"size": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()},
               **{name: {"size": d["size"], "sha256": d["sha256"]} for name, d in files.items()}}
    summary = {"kind": kind, "key": key, "arch": row["arch"], "dataset": row["dataset"], "epochs": row["epochs"],
               "seed": row["seed"], "test_acc": test_acc, "files": records}
    return summary, meta_bytes, records


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def export(cache: Path, keys: list[str], to: Path) -> tuple[list[dict], int]:
    """Write the entries ``keys`` name into the archive ``to``; return their manifest records and its size."""
    resolved = list(dict.fromkeys(resolve_key(cache, k) for k in keys))
    to = Path(to)
    if to.is_dir():
        raise StoreError(f"--to '{to}' is a directory; give the archive's file name, e.g. '{to / 'teachers.tar.gz'}'")
    if not to.parent.is_dir():
        raise StoreError(f"--to '{to}': directory '{to.parent}' does not exist")
    with contextlib.ExitStack() as stack:
        for kind, key in resolved:  # entries do not change while they are packed
            stack.enter_context(_entry_lock(cache / kind, key, "export"))
        packed = [(kind, key, *_entry_for_export(cache, kind, key)) for kind, key in resolved]
        manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "kd_runner": __version__, "entries": [summary for _, _, summary, _, _ in packed]}
        manifest_bytes = json.dumps(manifest, indent=2, default=str).encode()
        fd, tmp = tempfile.mkstemp(dir=to.parent, prefix=f".{to.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                now = time.time()
                tar.addfile(_tarinfo(f"{ARCHIVE_ROOT}/{MANIFEST}", len(manifest_bytes), now),
                            io.BytesIO(manifest_bytes))
                for kind, key, _, meta_bytes, records in packed:
                    folder, prefix = cache / kind / key, f"{ARCHIVE_ROOT}/{kind}/{key}"
                    meta_mtime = (folder / META_FILE).stat().st_mtime
                    tar.addfile(_tarinfo(f"{prefix}/{META_FILE}", len(meta_bytes), meta_mtime),
                                io.BytesIO(meta_bytes))
                    for name in (MODEL_FILE, BEST_FILE):
                        if name not in records:
                            continue
                        path = folder / name
                        with path.open("rb") as f:
                            reader = _HashingReader(f)
                            tar.addfile(_tarinfo(f"{prefix}/{name}", records[name]["size"], path.stat().st_mtime),
                                        reader)
                        if reader.size != records[name]["size"] or reader.sha.hexdigest() != records[name]["sha256"]:
                            raise StoreError(f"{kind}/{key}/{name} changed while it was being exported; try again")
            os.replace(tmp, to)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return [summary for _, _, summary, _, _ in packed], to.stat().st_size


def cmd_export(args) -> int:
    cache = _existing_cache(args.cache_dir)
    summaries, size = export(cache, args.keys, args.to)
    n = len(summaries)
    print(f"wrote '{args.to}': {n} entr{'y' if n == 1 else 'ies'}, {_human(size)}")
    for s in summaries:
        test = f", test {s['test_acc']:.2f}%" if s["test_acc"] is not None else ""
        epochs = f"{s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}"
        print(f"  {s['kind']}/{s['key']}  {s['arch']} on {s['dataset']}, {epochs}, seed {s['seed']}{test}")
    print(f"import it on another machine with: kd-store import {args.to}")
    teacher = next((s for s in summaries if s["kind"] == "teachers"), None)
    if teacher is not None:
        print(f"or unpack it and load the teacher directly: kd-train teacher={teacher['arch']} "
              f"teacher.checkpoint={ARCHIVE_ROOT}/teachers/{teacher['key']}/{MODEL_FILE}")
    return 0


# --------------------------------------------------------------------------- import


def _refuse(archive: Path, why: str) -> StoreError:
    return StoreError(f"refusing archive '{archive}': {why}; nothing was imported")


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """The archive's regular files by name; refuses links, absolute or escaping paths, and anything unexpected."""
    files: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = m.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
            raise _refuse(archive, f"member '{name}' has an absolute path")
        if ".." in parts:
            raise _refuse(archive, f"member '{name}' points outside the archive ('..': path traversal)")
        if m.issym() or m.islnk():
            raise _refuse(archive, f"member '{name}' is a link (to '{m.linkname}')")
        clean = "/".join(p for p in parts if p not in ("", "."))
        if m.isdir():
            segs = clean.split("/")
            ok = (segs[0] == ARCHIVE_ROOT and len(segs) <= 3 and (len(segs) < 2 or segs[1] in KINDS)
                  and (len(segs) < 3 or KEY_RE.fullmatch(segs[2]) is not None))
            if not ok:
                raise _refuse(archive, f"unexpected directory '{name}' (not a kd-store archive)")
            continue
        if not m.isreg():
            raise _refuse(archive, f"member '{name}' is not a regular file")
        if not MEMBER_RE.fullmatch(clean):
            raise _refuse(archive, f"unexpected member '{name}' (a kd-store archive holds {ARCHIVE_ROOT}/{MANIFEST} "
                                   f"and {ARCHIVE_ROOT}/<kind>/<key>/{{meta.json,model.pt,best.pt}})")
        if clean in files:
            raise _refuse(archive, f"member '{name}' appears twice")
        files[clean] = m
    return files


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_JSON_BYTES:
        raise StoreError(f"'{member.name}' is {member.size} bytes: too large")
    f = tar.extractfile(member)
    return f.read(MAX_JSON_BYTES + 1) if f is not None else b""


def _valid_record(rec) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool)
            and rec["size"] >= 0 and isinstance(rec.get("sha256"), str) and SHA_RE.fullmatch(rec["sha256"]) is not None)


def _read_manifest(archive: Path, tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo]) -> list[dict]:
    name = f"{ARCHIVE_ROOT}/{MANIFEST}"
    if name not in files:
        raise _refuse(archive, f"it has no {name} (not an archive written by kd-store export)")
    try:
        manifest = json.loads(_read_small(tar, files[name]))
    except (StoreError, UnicodeDecodeError, ValueError) as err:
        raise _refuse(archive, f"its {MANIFEST} is unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise _refuse(archive, f"its {MANIFEST} is not a kd-store manifest")
    if manifest.get("version") != ARCHIVE_VERSION:
        raise _refuse(archive, f"it is in kd-store archive version {manifest.get('version')!r}; this kd-runner "
                               f"reads version {ARCHIVE_VERSION} (update kd-runner)")
    records = manifest.get("entries")
    if not isinstance(records, list) or not records:
        raise _refuse(archive, f"its {MANIFEST} lists no entries")
    seen, expected = set(), {name}
    for rec in records:
        ok = (isinstance(rec, dict) and rec.get("kind") in KINDS and isinstance(rec.get("key"), str)
              and KEY_RE.fullmatch(rec["key"]) is not None and isinstance(rec.get("files"), dict)
              and {META_FILE, MODEL_FILE} <= set(rec["files"]) <= set(ENTRY_FILES)
              and all(_valid_record(v) for v in rec["files"].values()))
        if not ok:
            raise _refuse(archive, f"its {MANIFEST} has an invalid entry record")
        if (rec["kind"], rec["key"]) in seen:
            raise _refuse(archive, f"its {MANIFEST} lists {rec['kind']}/{rec['key']} twice")
        seen.add((rec["kind"], rec["key"]))
        expected |= {f"{ARCHIVE_ROOT}/{rec['kind']}/{rec['key']}/{f}" for f in rec["files"]}
    missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
    if missing:
        raise _refuse(archive, f"member '{missing[0]}' listed in its {MANIFEST} is missing")
    if extra:
        raise _refuse(archive, f"member '{extra[0]}' is not listed in its {MANIFEST}")
    return records


def _extract_verified(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, want: dict, dest: Path) -> None:
    """Copy ``member``'s bytes to ``dest`` (never through tarfile's extract) and check its size and sha256."""
    if member.size != want["size"]:
        raise _refuse(archive, f"member '{member.name}' is {member.size} bytes, {want['size']} were recorded "
                               "(the archive was damaged or altered)")
    src = tar.extractfile(member)
    sha, size = hashlib.sha256(), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        while src is not None and (chunk := src.read(1 << 20)):
            sha.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != want["size"] or sha.hexdigest() != want["sha256"]:
        raise _refuse(archive, f"member '{member.name}' has sha256 {sha.hexdigest()[:12]}..., "
                               f"{want['sha256'][:12]}... was recorded (the archive was damaged or altered)")
    with contextlib.suppress(OSError, OverflowError, ValueError):
        os.utime(dest, (member.mtime, member.mtime))


def _check_meta(archive: Path, folder: Path, rec: dict) -> dict:
    """The entry's meta.json agrees with the manifest, and its key is the hash of its key material."""
    from kd_runner.utils import stable_hash

    label = f"{rec['kind']}/{rec['key']}"
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise _refuse(archive, f"{label}/{META_FILE} is not a JSON object")
    files = meta.get("files")
    listed = {k: v for k, v in rec["files"].items() if k != META_FILE}
    if not isinstance(files, dict) or {k: _dict(v) for k, v in files.items()} != listed:
        raise _refuse(archive, f"{label}/{META_FILE} records other files than the archive holds")
    material = meta.get("key_material")
    if not isinstance(material, dict) or stable_hash(material) != rec["key"]:
        raise _refuse(archive, f"{label}: its {META_FILE} key material does not hash to its key "
                               "(kd-train would load it for the wrong config)")
    return meta


def _place(cache: Path, staged: Path, rec: dict, meta: dict) -> str:
    """Rename the verified entry ``staged`` into the store; return what happened, one line."""
    ms = _model_store()
    kind, key = rec["kind"], rec["key"]
    root, label = cache / kind, f"{kind}/{key}"
    with _entry_lock(root, key, "import"):
        dest = root / key
        status, problem = ms.check_entry(dest) if dest.exists() else ("missing", "")
        note = ""
        if status in ("ok", "unverified"):
            if status == "ok" and _dict(ms.ModelStore(root).read_meta(key).get("files")) == {
                    k: v for k, v in rec["files"].items() if k != META_FILE}:
                return f"{label} is already present in '{root}' (identical); kept it"
            return f"{label} is already present in '{root}' (stored {'unverified' if status != 'ok' else 'other'} " \
                   "weights for the same key); kept the stored entry"
        if status in ("corrupt", "absent"):
            aside = ms.ModelStore(root).set_aside(key)
            note = (f"; the corrupt entry there ({problem}) was set aside to '{aside}'" if status == "corrupt"
                    else f"; the leftovers of an interrupted write were moved to '{aside}'")
        try:
            os.rename(staged, dest)
        except OSError as err:
            if err.errno != errno.EXDEV:  # the kind's root is on another file system than the cache dir
                raise
            hop = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.import-"))
            try:
                shutil.copytree(staged, hop / key)
                os.rename(hop / key, dest)
            finally:
                shutil.rmtree(hop, ignore_errors=True)
    return f"imported {label} into '{root}'{note}"


def _compat_note(rec: dict, meta: dict, placed: Path) -> str | None:
    """Why kd-train on this machine would compute another key for the entry, if it would."""
    import torch

    from kd_runner.model_store import _major_minor
    from kd_runner.utils import code_hash, torchvision_version

    versions = _dict(_dict(meta.get("key_material")).get("versions"))
    here = {"torch": _major_minor(torch.__version__), "torchvision": _major_minor(torchvision_version()),
            "kd_runner_code": code_hash()}
    diff = [f"{k} {versions.get(k)} (here {v})" for k, v in here.items() if versions.get(k) != v]
    if not diff:
        return None
    hint = f"; load it with teacher.checkpoint={placed.resolve() / MODEL_FILE}" if rec["kind"] == "teachers" else ""
    return (f"note: {rec['kind']}/{rec['key']} was trained with {', '.join(diff)}: kd-train here computes other "
            f"keys and will not pick it up from the store{hint}")


def import_archive(archive: Path, cache: Path) -> list[str]:
    """Verify ``archive`` completely, then place each of its entries into ``cache``; return one line per entry."""
    archive = Path(archive)
    if not archive.exists():
        raise StoreError(f"archive '{archive}' does not exist")
    if not archive.is_file():
        raise StoreError(f"archive '{archive}' is not a file")
    if cache.exists() and not cache.is_dir():
        raise StoreError(f"cache dir '{cache}' is not a directory")
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (tarfile.ReadError, tarfile.CompressionError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise StoreError(f"'{archive}' is not a gzip-compressed tar archive ({str(err) or type(err).__name__}); "
                         "give a file written by kd-store export") from None
    lines: list[str] = []
    created = not cache.exists()
    with tar:
        try:
            files = _check_members(archive, tar.getmembers())
            records = _read_manifest(archive, tar, files)
            cache.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=cache, prefix=".kd-store-import-"))
            try:
                metas = []
                for rec in records:
                    folder = staging / rec["kind"] / rec["key"]
                    for fname, want in rec["files"].items():
                        member = files[f"{ARCHIVE_ROOT}/{rec['kind']}/{rec['key']}/{fname}"]
                        _extract_verified(archive, tar, member, want, folder / fname)
                    metas.append(_check_meta(archive, folder, rec))
                # every member is verified: only now is anything placed
                for rec, meta in zip(records, metas, strict=True):
                    try:
                        lines.append(_place(cache, staging / rec["kind"] / rec["key"], rec, meta))
                    except StoreError as err:
                        lines.append(f"skipped {rec['kind']}/{rec['key']}: {err}")
                        continue
                    if lines[-1].startswith("imported"):
                        note = _compat_note(rec, meta, cache / rec["kind"] / rec["key"])
                        lines.extend([note] if note else [])
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise StoreError(f"archive '{archive}' is corrupt or truncated ({str(err) or type(err).__name__}); "
                             "nothing was imported") from None
        finally:
            if created and not lines:  # a cache dir made for an import that placed nothing: leave no trace
                with contextlib.suppress(OSError):
                    cache.rmdir()
    return lines


def cmd_import(args) -> int:
    lines = import_archive(args.archive, args.cache_dir)
    for line in lines:
        print(line)
    return 1 if any(line.startswith("skipped") for line in lines) else 0


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_TOP,
        description="List, export and import the teachers (and CE baselines) kd-train keeps in its model store, "
                    "so a trained teacher can be reused on another machine instead of trained again.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (kd-runner {__version__})")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="kd-train's cache dir (paths.cache_dir) holding teachers/ and baselines/; default: "
                             "$KD_CACHE_DIR, else $KD_OUTPUT_DIR/.cache, else outputs/.cache")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="one row per stored teacher/baseline: arch, dataset, accuracies, size, status",
                       description="One row per stored entry, verified by size and sha256 (nothing is loaded).",
                       epilog=EPILOG_LIST)
    p.add_argument("--kind", type=_kind_arg, default="all", metavar="{teachers,baselines,all}",
                   help="which entries to list (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list of entries (for scripts) instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("export", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="pack entries into a portable .tar.gz (also usable as teacher.checkpoint=)",
                       description="Pack stored entries (model.pt, best.pt if present, meta.json) into a .tar.gz "
                                   "that `kd-store import` places into another machine's store.",
                       epilog=EPILOG_EXPORT)
    p.add_argument("keys", nargs="+", metavar="KEY",
                   help="a stored key, a unique key prefix (like git), or teachers/KEY / baselines/KEY")
    p.add_argument("--to", type=Path, required=True, metavar="FILE.tar.gz",
                   help="the archive to write (replaced if it exists)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="verify an archive from `kd-store export` and place its entries into the store",
                       description="Verify every member of an archive written by `kd-store export` and place its "
                                   "entries into the store (created if missing).",
                       epilog=EPILOG_IMPORT)
    p.add_argument("archive", type=Path, metavar="FILE.tar.gz", help="an archive written by kd-store export")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    try:
        code = args.func(args)
        sys.stdout.flush()
    except StoreError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `kd-store list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as err:
        where = f" '{err.filename}'" if err.filename else ""
        print(f"{PROG}: error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        from kd_runner.errors import UserError

        if not isinstance(err, UserError):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
