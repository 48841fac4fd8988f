"""kd-store: list, export and import the model store's teachers (run as a subprocess, as a user would).

One tiny digits teacher is trained through kd-train; every test reads it, exports it or imports an archive of
it into a cache dir of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, cli_env, run_cli

STORE_TIMEOUT_S = 180


def kd_store(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kd_runner.store_cli ARGS`` in ``cwd`` with the test's data/cache/output paths."""
    return subprocess.run([sys.executable, "-m", "kd_runner.store_cli", *args], cwd=cwd,
                          env=cli_env(cwd, **(env or {})), capture_output=True, text=True, timeout=STORE_TIMEOUT_S)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def store_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr, ``kd-store: error: ...``, naming every needle; no traceback."""
    detail = f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, detail
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd-store: error: "), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


# --------------------------------------------------------------------------- archives, by hand


def read_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_archive(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def reseal(members: dict[str, bytes], key: str) -> dict[str, bytes]:
    """Record the members' current sizes and hashes in meta.json and the manifest: a consistent forgery."""
    prefix = f"kd-store/teachers/{key}"
    meta = json.loads(members[f"{prefix}/meta.json"])
    meta["files"] = {n: digest(members[f"{prefix}/{n}"]) for n in ("model.pt", "best.pt") if f"{prefix}/{n}" in members}
    members[f"{prefix}/meta.json"] = json.dumps(meta).encode()
    manifest = json.loads(members["kd-store/MANIFEST.json"])
    (entry,) = manifest["entries"]
    entry["files"] = {**meta["files"], "meta.json": digest(members[f"{prefix}/meta.json"])}
    members["kd-store/MANIFEST.json"] = json.dumps(manifest).encode()
    return members


class _Planted:
    """Unpickling this creates ``marker``: what a crafted model.pt could do to an importer that loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def skip_if_only_the_code_changed(trained: dict, rep: dict) -> None:
    """The rerun's key differs only because kd-runner's training code was edited while the test ran."""
    stored = json.loads((trained["entry"] / "meta.json").read_text())["key_material"]
    rerun = Path(rep["teacher"]["path"]).parent / "meta.json"
    if not rerun.is_file():
        return
    now = json.loads(rerun.read_text())["key_material"]
    then_code, now_code = stored["versions"].pop("kd_runner_code"), now["versions"].pop("kd_runner_code")
    if then_code != now_code and stored == now:
        pytest.skip(f"kd_runner's training code changed while the test ran (code hash {then_code} -> {now_code}), "
                    "so kd-train computes another key; rerun the test")


# --------------------------------------------------------------------------- one trained teacher, one archive


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A digits teacher (and CE baseline) trained by kd-train with the test defaults into ``<base>/cache``."""
    base = tmp_path_factory.mktemp("kdstore_src")
    proc, run_dir = run_cli([], base)
    rep = assert_ok(proc, run_dir)
    assert rep["teacher"]["source"] == "trained"
    key = rep["teacher"]["key"]
    cache = base / "cache"
    return {"base": base, "cache": cache, "key": key, "report": rep, "entry": cache / "teachers" / key,
            "test_acc": rep["models"]["teacher"]["test_acc"]}


@pytest.fixture(scope="module")
def archive(trained) -> Path:
    """``kd-store export <unique prefix> --to teacher.tar.gz``."""
    to = trained["base"] / "teacher.tar.gz"
    out = ok(kd_store("export", trained["key"][:8], "--to", str(to), cwd=trained["base"]))
    assert f"teachers/{trained['key']}" in out and "deep_nn" in out
    return to


@pytest.fixture(scope="module")
def imported(trained, archive, tmp_path_factory) -> dict:
    """The archive imported into a fresh (not yet existing) cache dir on "another machine"."""
    other = tmp_path_factory.mktemp("kdstore_dst")
    cache = other / "fresh-cache"
    proc = kd_store("import", str(archive), "--cache-dir", str(cache), cwd=other)
    return {"base": other, "cache": cache, "proc": proc}


# --------------------------------------------------------------------------- list


def test_list_shows_the_teacher_with_its_arch_and_accuracy(trained):
    out = ok(kd_store("list", cwd=trained["base"]))  # the cache dir comes from KD_CACHE_DIR, as kd-train's does
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["KEY", "KIND", "ARCH"] and "TEST" in header and "STATUS" in header
    (row,) = [r for r in rows if r.startswith(trained["key"])]
    cells = row.split()
    assert cells[1:4] == ["teacher", "deep_nn", "digits"] and cells[-1] == "ok"
    assert f"{trained['test_acc']:.2f}" in cells
    assert rows[0].startswith(trained["key"])  # teachers first, then baselines
    assert any(" light_nn " in r and "baseline" in r for r in rows)


def test_list_json_parses_and_reads_meta_and_report(trained):
    rows = json.loads(ok(kd_store("list", "--json", "--cache-dir", str(trained["cache"]), cwd=trained["base"])))
    (row,) = [r for r in rows if r["key"] == trained["key"]]
    meta = json.loads((trained["entry"] / "meta.json").read_text())
    assert row["kind"] == "teacher" and row["arch"] == "deep_nn" and row["dataset"] == "digits"
    assert row["epochs"] == 1 and row["seed"] == 42 and row["status"] == "ok" and row["problem"] is None
    assert row["train_acc"] == meta["history"][-1]["train_acc"] and row["val_acc"] is None
    assert row["test_acc"] == trained["test_acc"] and row["test_acc_from"] == "report"
    assert row["size_bytes"] >= (trained["entry"] / "model.pt").stat().st_size
    assert row["trained_in"] == meta["trained_in"]
    only = json.loads(ok(kd_store("list", "--json", "--kind", "teachers", cwd=trained["base"])))
    assert [r["kind"] for r in only] == ["teacher"]


# --------------------------------------------------------------------------- export / import


def test_export_writes_the_entry_and_a_plain_checkpoint(trained, archive):
    members = read_members(archive)
    prefix = f"kd-store/teachers/{trained['key']}"
    assert set(members) == {"kd-store/MANIFEST.json", f"{prefix}/meta.json", f"{prefix}/model.pt"}
    assert members[f"{prefix}/model.pt"] == (trained["entry"] / "model.pt").read_bytes()
    # the exported model.pt is what teacher.checkpoint= takes: a kd-train checkpoint, loadable without pickles
    payload = torch.load(io.BytesIO(members[f"{prefix}/model.pt"]), map_location="cpu", weights_only=True)
    assert payload["model_cfg"]["arch"] == "deep_nn" and isinstance(payload["model"], dict)
    meta = json.loads(members[f"{prefix}/meta.json"])
    assert meta["exported"]["test_acc"] == trained["test_acc"]


def test_import_places_the_entry_and_kd_train_loads_it_from_the_store(trained, imported):
    out = ok(imported["proc"])
    assert f"imported teachers/{trained['key']}" in out
    placed = imported["cache"] / "teachers" / trained["key"]
    for name in ("model.pt", "meta.json"):
        assert (placed / name).is_file()
    assert (placed / "model.pt").read_bytes() == (trained["entry"] / "model.pt").read_bytes()
    assert not list(imported["cache"].glob(".kd-store-import-*"))  # the staging dir is gone

    proc, run_dir = run_cli(["baseline=false"], imported["base"] / "job",
                            env={"KD_CACHE_DIR": str(imported["cache"])})
    rep = assert_ok(proc, run_dir)
    if rep["teacher"]["key"] != trained["key"]:
        skip_if_only_the_code_changed(trained, rep)
    assert rep["teacher"]["key"] == trained["key"]
    assert rep["teacher"]["source"] == "cache"
    assert rep["teacher"]["path"] == str((placed / "model.pt").resolve())
    assert rep["models"]["teacher"]["test_acc"] == trained["test_acc"]


def test_importing_twice_says_already_present(trained, archive, imported):
    ok(imported["proc"])
    placed = imported["cache"] / "teachers" / trained["key"]
    before = {p.name: p.stat().st_mtime_ns for p in placed.iterdir()}
    out = ok(kd_store("import", str(archive), "--cache-dir", str(imported["cache"]), cwd=imported["base"]))
    assert "already present" in out and trained["key"] in out and "imported" not in out
    assert {p.name: p.stat().st_mtime_ns for p in placed.iterdir()} == before  # left as it was


def test_imported_entry_is_listed_with_its_test_accuracy(trained, imported):
    ok(imported["proc"])
    rows = json.loads(ok(kd_store("list", "--json", "--cache-dir", str(imported["cache"]), cwd=imported["base"])))
    (row,) = [r for r in rows if r["key"] == trained["key"]]
    assert row["status"] == "ok" and row["arch"] == "deep_nn" and row["test_acc"] == trained["test_acc"]


# --------------------------------------------------------------------------- archives that are refused


def test_tampered_member_is_refused_and_nothing_is_placed(trained, archive, tmp_path):
    members = read_members(archive)
    name = f"kd-store/teachers/{trained['key']}/model.pt"
    data = bytearray(members[name])
    data[len(data) // 2] ^= 0x01  # one bit
    members[name] = bytes(data)
    bad = write_archive(tmp_path / "tampered.tar.gz", members)
    for cache in (tmp_path / "new-cache", tmp_path / "existing-cache"):
        if cache.name.startswith("existing"):
            cache.mkdir()
        store_error(kd_store("import", str(bad), "--cache-dir", str(cache), cwd=tmp_path),
                    "refusing archive", name, "sha256", "nothing was imported")
        assert not cache.exists() or list(cache.iterdir()) == []


def test_forged_entry_under_another_key_is_refused(trained, archive, tmp_path):
    """Hashes resealed, but meta.json's key material is not the key's: kd-train would load the wrong teacher."""
    members = read_members(archive)
    meta_name = f"kd-store/teachers/{trained['key']}/meta.json"
    meta = json.loads(members[meta_name])
    meta["key_material"]["seed"] = 7
    members[meta_name] = json.dumps(meta).encode()
    bad = write_archive(tmp_path / "forged.tar.gz", reseal(members, trained["key"]))
    store_error(kd_store("import", str(bad), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path),
                "does not hash to its key")
    assert not (tmp_path / "c").exists()


def test_import_never_unpickles(trained, archive, tmp_path):
    """A model.pt that runs code when unpickled, with matching hashes: placed (bytes verified), never loaded."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"model": _Planted(marker)}, buf)
    members = read_members(archive)
    members[f"kd-store/teachers/{trained['key']}/model.pt"] = buf.getvalue()
    crafted = write_archive(tmp_path / "crafted.tar.gz", reseal(members, trained["key"]))
    cache = tmp_path / "c"
    assert "imported" in ok(kd_store("import", str(crafted), "--cache-dir", str(cache), cwd=tmp_path))
    assert "ok" in ok(kd_store("list", "--cache-dir", str(cache), cwd=tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "unexpected"])
def test_unsafe_archive_is_refused_in_one_line(trained, archive, tmp_path, case):
    members = read_members(archive)
    links = {}
    if case == "dotdot":
        members["../evil"], needle = b"x", "'../evil'"
    elif case == "absolute":
        members[str(tmp_path / "abs-evil")], needle = b"x", "absolute path"
    elif case == "symlink":
        links[f"kd-store/teachers/{trained['key']}/best.pt"], needle = "/etc/passwd", "is a link"
    else:
        members["kd-store/run.sh"], needle = b"echo hi", "unexpected member 'kd-store/run.sh'"
    bad = write_archive(tmp_path / "bad.tar.gz", members, links)
    work = tmp_path / "work"
    work.mkdir()
    cache = work / "cache"
    store_error(kd_store("import", str(bad), "--cache-dir", str(cache), cwd=work), "refusing archive", needle)
    assert not cache.exists() and not (tmp_path / "evil").exists() and not (tmp_path / "abs-evil").exists()


def test_not_a_tar_gz_and_missing_cache_dir_are_one_line_errors(tmp_path):
    (tmp_path / "x.tar.gz").write_text("not an archive")
    store_error(kd_store("import", str(tmp_path / "x.tar.gz"), cwd=tmp_path), "not a gzip-compressed tar archive")
    store_error(kd_store("import", str(tmp_path / "nope.tar.gz"), cwd=tmp_path), "does not exist")
    store_error(kd_store("list", "--cache-dir", str(tmp_path / "none"), cwd=tmp_path), "cache dir", "does not exist")


# --------------------------------------------------------------------------- keys


def test_unknown_key_is_one_line_error_with_close_matches(trained):
    key = trained["key"]
    typo = key[:-1] + ("0" if key[-1] != "0" else "1")
    line = store_error(kd_store("export", typo, "--to", "x.tar.gz", cwd=trained["base"]), f"unknown key '{typo}'")
    assert f"close matches: {key}" in line
    assert not (trained["base"] / "x.tar.gz").exists()


def test_ambiguous_prefix_is_one_line_error(tmp_path):
    for key in ("abc1000000000000", "abc2000000000000"):
        (tmp_path / "cache" / "teachers" / key).mkdir(parents=True)
    store_error(kd_store("export", "abc", "--to", "x.tar.gz", cwd=tmp_path), "ambiguous", "abc1000000000000",
                "abc2000000000000")


def test_help_says_model_pt_is_a_teacher_checkpoint(tmp_path):
    out = ok(kd_store("export", "--help", cwd=tmp_path))
    assert "teacher.checkpoint=" in out and "model.pt" in out
    top = ok(kd_store("--help", cwd=tmp_path))
    assert all(cmd in top for cmd in ("list", "export", "import"))
