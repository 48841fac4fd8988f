"""Probes of a fresh install: the decode cache, the model store's integrity, late-failing values, bad image trees.

Each test pins one defect a hostile user found: it fails without its fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest
import torch
from helpers import assert_ok, assert_user_error, run_many
from omegaconf import OmegaConf
from torch import nn

from kd_runner import model_store
from kd_runner.data import cache, image_folder
from kd_runner.data.streaming import estimate_decoded_bytes, load_stream
from kd_runner.engine import PhaseResult
from kd_runner.errors import UserError, number

CORRUPT_LINE = re.compile(r"^kd-train: store entry (\w+) is corrupt \((.+)\); set aside to (\S+); retraining$",
                          re.MULTILINE)


def folder_cfg(root, **kw):
    cfg = {"name": "image_folder", "root": str(root), "channels": None, "image_size": None, "decode_cache": False,
           "mean": None, "std": None, "val_fraction": 0.0}
    cfg.update(kw)
    return OmegaConf.create(cfg)


def no_store_entries(base: Path) -> bool:
    """Nothing was trained in a CLI run under ``base``: no stored model, no per-epoch training state."""
    stored = list((base / "cache").glob("*/*/model.pt"))
    states = list((base / "run" / "state").glob("*.pt"))
    return not stored and not states


# =========================================================================== 1. decode cache: no code execution


class _Planted:
    """Unpickling this creates ``marker``: what a crafted file in a shared cache dir could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def decode_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "decode-cache")
    return tmp_path / "decode-cache"


@pytest.fixture
def small_tree(tmp_path):
    helpers.write_image_tree(tmp_path / "tree", ["a", "b"], {"train": 3, "test": 1}, 1, 6, 6)
    return tmp_path / "tree"


def test_planted_pickle_in_decode_cache_is_not_executed(small_tree, decode_cache_dir, tmp_path):
    cfg = folder_cfg(small_tree, decode_cache=True)
    first = image_folder.load(cfg)
    (entry,) = decode_cache_dir.glob("datasets/image_folder-*.pt")
    marker = tmp_path / "pwned"
    torch.save({"key": _Planted(marker)}, entry)  # a full unpickle of this file runs os.mkdir(marker)

    again = image_folder.load(cfg)
    assert not marker.exists(), "the planted payload ran: the decode cache was unpickled with weights_only=False"
    assert "decoded now" in again["source"]  # refused, decoded again ...
    assert torch.equal(again["train"].images, first["train"].images)
    assert isinstance(torch.load(entry, weights_only=True), dict)  # ... and the bad entry was overwritten
    assert "decoded-tensor cache" in image_folder.load(cfg)["source"]
    assert not marker.exists()


def test_decode_cache_entry_loads_weights_only_and_must_carry_its_key(small_tree, decode_cache_dir):
    cfg = folder_cfg(small_tree, decode_cache=True)
    first = image_folder.load(cfg)
    (entry,) = decode_cache_dir.glob("datasets/image_folder-*.pt")
    raw = torch.load(entry, weights_only=True)  # the real payload is weights-only loadable
    assert torch.equal(raw["train"]["images"], first["train"].images)
    # a well-formed file under this name that was written for other data is not used
    torch.save({**raw, "key": {"kind": "image_folder", "root": "/elsewhere"},
                "train": {"images": raw["train"]["images"][:1], "labels": raw["train"]["labels"][:1]}}, entry)
    out = image_folder.load(cfg)
    assert "decoded now" in out["source"] and len(out["train"]) == len(first["train"])


# =========================================================================== 2. model store integrity


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)


DATA = SimpleNamespace(input_shape=lambda: (4,), num_classes=3)
CFG = OmegaConf.create({"arch": "tiny"})


class Trainer:
    """A ``train()`` for load_or_train: sets the weights to a known value per call, records what it saw."""

    def __init__(self, model: nn.Module, with_best: bool = True) -> None:
        self.model, self.with_best, self.calls, self.seen = model, with_best, 0, []

    def __call__(self) -> PhaseResult:
        self.calls += 1
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float(self.calls))
        best = {"model": {k: v.clone() - 0.5 for k, v in self.model.state_dict().items()}, "extra": {}}
        return PhaseResult(history=[{"phase": "teacher", "epoch": 1}], best_val_acc=50.0 if self.with_best else None,
                           best_epoch=1 if self.with_best else None, train_seconds=0.1,
                           best_state=best if self.with_best else None)


def store_run(root: Path, key: str = "k0", with_best: bool = True, model: nn.Module | None = None):
    model = model if model is not None else Tiny()
    train = Trainer(model, with_best)
    info, res = model_store.load_or_train(root, (key, {"m": 1}), model, CFG, DATA, root.parent / "run", train)
    return info, res, model, train


def corrupt_line(err: str) -> re.Match:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    match = CORRUPT_LINE.match(lines[0])
    assert match, lines[0]
    return match


def test_store_records_size_and_sha256_and_loads_what_it_stored(tmp_path):
    root = tmp_path / "teachers"
    info, _, trained, _ = store_run(root)
    assert info["source"] == "trained"
    meta = json.loads((root / "k0" / "meta.json").read_text())
    for name in ("model.pt", "best.pt"):
        data = (root / "k0" / name).read_bytes()
        assert meta["files"][name]["size"] == len(data)
        assert re.fullmatch(r"[0-9a-f]{64}", meta["files"][name]["sha256"])
    info, res, loaded, train = store_run(root)
    assert info["source"] == "cache" and train.calls == 0
    assert torch.equal(loaded.fc.weight, trained.fc.weight)
    assert torch.equal(res.best_state["model"]["fc.weight"], trained.fc.weight - 0.5)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "damage", "reason"), [
    ("model.pt", _truncate, "model.pt is"),
    ("best.pt", _truncate, "best.pt is"),
    ("model.pt", _flip_bit, "model.pt has sha256"),  # same size: only the hash can tell
    ("best.pt", _flip_bit, "best.pt has sha256"),
    ("model.pt", Path.unlink, "model.pt is missing"),
    ("best.pt", Path.unlink, "best.pt is missing"),
    ("meta.json", lambda p: p.write_text("{not json"), "meta.json is unreadable"),
    ("meta.json", Path.unlink, "meta.json is missing"),
])
def test_corrupt_entry_is_set_aside_and_retrained(tmp_path, capsys, name, damage, reason):
    root = tmp_path / "teachers"
    store_run(root)
    damage(root / "k0" / name)
    before = sorted(p.name for p in (root / "k0").iterdir())
    capsys.readouterr()

    info, res, model, train = store_run(root)
    assert info["source"] == "trained" and train.calls == 1
    match = corrupt_line(capsys.readouterr().err)
    assert match.group(1) == "k0" and reason in match.group(2)
    aside = Path(match.group(3))
    assert aside.parent == root and aside.name.startswith("k0.corrupt-")
    assert sorted(p.name for p in aside.iterdir()) == before  # kept as found, never deleted
    assert info["corrupt_entry"] == {"reason": match.group(2), "set_aside": str(aside)}
    # stored again, and the next job loads it
    info, _, again, train = store_run(root)
    assert info["source"] == "cache" and train.calls == 0 and torch.equal(again.fc.weight, model.fc.weight)
    assert capsys.readouterr().err == ""


def test_a_corrupt_entry_never_touches_the_model_before_retraining(tmp_path, capsys):
    """Retraining must start from the model's own initial weights, not half a corrupt entry's."""
    root = tmp_path / "teachers"
    store_run(root)
    _truncate(root / "k0" / "best.pt")  # model.pt is fine and would load first
    model = Tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, _, train = store_run(root, model=model)
    assert train.calls == 1 and all(torch.equal(train.seen[0][k], v) for k, v in init.items())
    capsys.readouterr()


def _legacy(root: Path) -> None:
    """Rewrite the entry's meta.json as before sizes and hashes were recorded."""
    meta_path = root / "k0" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))


def test_entry_written_before_hashes_loads_when_readable(tmp_path, capsys):
    root = tmp_path / "teachers"
    _, _, trained, _ = store_run(root)
    _legacy(root)
    info, res, loaded, train = store_run(root)
    assert info["source"] == "cache" and train.calls == 0 and torch.equal(loaded.fc.weight, trained.fc.weight)
    assert res.best_state is not None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["model.pt", "best.pt"])
def test_entry_written_before_hashes_is_set_aside_when_unreadable(tmp_path, capsys, name):
    root = tmp_path / "teachers"
    store_run(root)
    _legacy(root)
    _truncate(root / "k0" / name)
    capsys.readouterr()
    info, _, _, train = store_run(root)
    assert info["source"] == "trained" and train.calls == 1
    match = corrupt_line(capsys.readouterr().err)
    assert f"{name} is unreadable" in match.group(2) and Path(match.group(3)).is_dir()
    assert "files" in json.loads((root / "k0" / "meta.json").read_text())  # stored again, with hashes


def test_entry_of_another_shape_is_set_aside(tmp_path, capsys):
    root = tmp_path / "teachers"
    store_run(root)
    other = nn.Linear(5, 3)
    torch.save({"model": {"fc." + k: v for k, v in other.state_dict().items()}}, root / "k0" / "model.pt")
    _legacy(root)
    capsys.readouterr()
    info, _, _, _ = store_run(root)
    assert info["source"] == "trained" and "does not fit Tiny" in corrupt_line(capsys.readouterr().err).group(2)


def test_interrupted_write_is_retrained_without_a_corruption_notice(tmp_path, capsys):
    """Only best.pt written (the job died before meta.json and model.pt): nothing stored yet, nothing to set aside."""
    root = tmp_path / "teachers"
    store_run(root)
    for name in ("meta.json", "model.pt"):
        (root / "k0" / name).unlink()
    capsys.readouterr()
    info, _, _, train = store_run(root, with_best=False)
    assert info["source"] == "trained" and train.calls == 1 and capsys.readouterr().err == ""
    assert not (root / "k0" / "best.pt").exists()  # the stale best.pt is not this model's
    assert not list(root.glob("k0.corrupt-*"))
    info, res, _, _ = store_run(root)
    assert info["source"] == "cache" and res.best_state is None


# --------------------------------------------------------------------------- the same through the CLI

STORE_ARGS = ["dataset.val_fraction=0.2", "baseline=false", "trainer.bench_iters=0"]


def _cli_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


CLI_DAMAGE = {"truncated_model": ("model.pt", _cli_truncate), "truncated_best": ("best.pt", _cli_truncate),
              "bit_flip_model": ("model.pt", _flip_bit)}


@pytest.fixture(scope="module")
def cli_store_runs(tmp_path_factory) -> dict:
    """Per case: a first run stores the teacher, the case damages a file, a second run (same store) repairs."""
    bases = {case: tmp_path_factory.mktemp(f"store_{case}") for case in CLI_DAMAGE}
    first = run_many({case: {"args": STORE_ARGS, "tmp_path": base} for case, base in bases.items()})
    keys = {}
    for case, (proc, run_dir) in first.items():
        rep = assert_ok(proc, run_dir)
        assert rep["teacher"]["source"] == "trained"
        keys[case] = rep["teacher"]["key"]
        name, damage = CLI_DAMAGE[case]
        damage(bases[case] / "cache" / "teachers" / keys[case] / name)
    second = run_many({case: {"args": STORE_ARGS, "tmp_path": base, "run_dir": base / "run2"}
                       for case, base in bases.items()})
    return {case: (bases[case], keys[case], *second[case]) for case in CLI_DAMAGE}


@pytest.mark.parametrize("case", list(CLI_DAMAGE))
def test_cli_rerun_repairs_a_corrupt_teacher_entry(cli_store_runs, case):
    base, key, proc, run_dir = cli_store_runs[case]
    rep = assert_ok(proc, run_dir)
    assert rep["teacher"]["key"] == key, "the store key changed between the two runs (was kd_runner edited?)"
    assert rep["teacher"]["source"] == "trained"
    (match,) = CORRUPT_LINE.finditer(proc.stderr)
    name = CLI_DAMAGE[case][0]
    assert match.group(1) == key and name in match.group(2)
    aside = Path(match.group(3))
    assert aside.parent == base / "cache" / "teachers" and aside.name.startswith(f"{key}.corrupt-")
    assert (aside / name).is_file()  # the damaged file is kept
    assert rep["teacher"]["corrupt_entry"]["set_aside"] == str(aside)
    assert "Traceback" not in proc.stderr
    meta = json.loads((base / "cache" / "teachers" / key / "meta.json").read_text())
    assert meta["files"]["model.pt"]["size"] == (base / "cache" / "teachers" / key / "model.pt").stat().st_size


# =========================================================================== 3. values that failed late


def test_number_rejects_non_finite_values():
    for bad in (math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"):
        with pytest.raises(UserError, match="must be a finite number") as err:
            number(bad, "method.T")
        assert str(err.value).startswith(f"method.T={bad!r} is invalid")
    with pytest.raises(UserError, match="finite"):
        number(math.inf, "scheduler.step_size", int)  # int(inf) would raise OverflowError
    assert number("0.5", "x") == 0.5 and number(10**400, "x", int) == 10**400


def _one_class(base: Path) -> Path:
    helpers.write_image_tree(base / "tree", ["only"], {"train": 2, "test": 1}, 1, 6, 6)
    return base / "tree"


def _empty_train_class(base: Path) -> Path:
    helpers.write_image_tree(base / "tree", ["a", "b"], {"train": 2, "test": 1}, 1, 6, 6)
    (base / "tree" / "train" / "c").mkdir()
    return base / "tree"


def _a_run_dir(base: Path) -> Path:
    (base / "old" / "checkpoints").mkdir(parents=True)
    torch.save({}, base / "old" / "checkpoints" / "teacher.pt")
    return base / "old"


# id -> (overrides, needles in the error line); "{x}" is filled from SETUP[id](base)
FAIL_FAST: dict[str, tuple[list[str], list[str]]] = {
    "T_nan": (["method.T=nan"], ["method.T=nan", "finite number"]),
    "T_inf": (["method.T=inf"], ["method.T=inf", "finite number"]),
    "soft_weight_nan": (["method.soft_weight=nan"], ["method.soft_weight=nan", "finite number"]),
    "soft_weight_inf": (["method.soft_weight=inf"], ["method.soft_weight=inf", "finite number"]),
    "hidden_weight_nan": (["method=cosine", "method.hidden_weight=nan"], ["method.hidden_weight=nan", "finite"]),
    "test_fraction_zero": (["dataset.test_fraction=0"], ["dataset.test_fraction=0", "(0, 1)"]),
    "test_fraction_above_one": (["dataset.test_fraction=1.5"], ["dataset.test_fraction=1.5", "(0, 1)"]),
    "dataset_mean_nan": (["dataset.mean=[nan]", "dataset.std=[1.0]"], ["dataset.mean=nan", "finite"]),
    "model_dropout_nan": (["student=mlp_1200", "student.dropout=nan"], ["dropout=nan", "finite"]),
    "image_folder_one_class": (["dataset=image_folder", "dataset.root={x}", "method=ce"],
                               ["{x}/train", "1 class", "at least 2"]),
    "image_folder_empty_class": (["dataset=image_folder", "dataset.root={x}", "method=ce"],
                                 ["{x}/train/c", "no images"]),
    "teacher_checkpoint_is_a_dir": (["teacher.checkpoint={x}"],
                                    ["teacher.checkpoint='{x}'", "is a directory", "checkpoints/teacher.pt"]),
}
SETUP = {"image_folder_one_class": _one_class, "image_folder_empty_class": _empty_train_class,
         "teacher_checkpoint_is_a_dir": _a_run_dir}


@pytest.fixture(scope="module")
def fail_fast_runs(tmp_path_factory) -> dict:
    jobs, needles = {}, {}
    for case, (overrides, wanted) in FAIL_FAST.items():
        base = tmp_path_factory.mktemp(f"fast_{case}")
        x = str(SETUP[case](base)) if case in SETUP else ""
        jobs[case] = {"args": [o.replace("{x}", x) for o in overrides], "tmp_path": base}
        needles[case] = (base, [n.replace("{x}", x) for n in wanted])
    results = run_many(jobs, workers=4)
    return {case: (*results[case], *needles[case]) for case in FAIL_FAST}


@pytest.mark.parametrize("case", list(FAIL_FAST))
def test_cli_bad_value_fails_in_one_line_before_training(fail_fast_runs, case):
    proc, run_dir, base, needles = fail_fast_runs[case]
    assert_user_error(proc, run_dir, *needles)
    assert no_store_entries(base), "a model was trained before the bad value was reported"


# =========================================================================== 4. image trees accepted in silence


def _both_paths(cfg):
    """The error of the tensor path and of the streaming path (they share scan_tree): must be the same line."""
    with pytest.raises(UserError) as tensor_err:
        image_folder.load(cfg)
    with pytest.raises(UserError) as stream_err:
        load_stream(cfg, 0)
    assert str(tensor_err.value) == str(stream_err.value) and "\n" not in str(tensor_err.value)
    return str(tensor_err.value)


def test_one_class_is_refused(tmp_path):
    root = _one_class(tmp_path)
    msg = _both_paths(folder_cfg(root))
    assert f"'{root / 'train'}'" in msg and "at least 2" in msg


def test_empty_train_class_dir_is_refused_naming_it(tmp_path):
    root = _empty_train_class(tmp_path)
    msg = _both_paths(folder_cfg(root))
    assert f"'{root / 'train' / 'c'}' holds no images" in msg


def test_train_class_dir_without_images_is_refused(tmp_path):
    root = _empty_train_class(tmp_path)
    (root / "train" / "c" / "README.txt").write_text("images go here")
    assert str(root / "train" / "c") in _both_paths(folder_cfg(root))


def test_empty_test_class_dir_is_fine(tmp_path):
    helpers.write_image_tree(tmp_path, ["a", "b", "c"], {"train": 2, "test": 1}, 1, 6, 6)
    for f in (tmp_path / "test" / "c").iterdir():
        f.unlink()
    out = image_folder.load(folder_cfg(tmp_path))
    assert out["classes"] == ["a", "b", "c"] and len(out["test"]) == 2
    assert len(load_stream(folder_cfg(tmp_path), 0)["test"]) == 2


def _gray_first(root: Path) -> None:
    """An RGB set whose first image (class 'a') is grayscale."""
    from PIL import Image

    helpers.write_image_tree(root, ["a", "b", "c"], {"train": 2, "test": 1}, 3, 6, 6)
    first = sorted((root / "train" / "a").iterdir())[0]
    with Image.open(first) as im:
        im.convert("L").save(first)


def test_gray_first_image_in_rgb_set_decodes_everything_as_rgb(tmp_path, capsys):
    _gray_first(tmp_path)
    cfg = folder_cfg(tmp_path)
    assert estimate_decoded_bytes(cfg) == (6 + 3) * 3 * 6 * 6  # sizing the tree scans it once already
    out = image_folder.load(cfg)
    assert out["train"].images.shape == (6, 3, 6, 6) and out["test"].images.shape == (3, 3, 6, 6)
    stream = load_stream(cfg, 0)
    assert stream["train"].sample_shape == (3, 6, 6)
    assert torch.equal(stream["train"].head(6), out["train"].images)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warnings) == 1, warnings  # one line, however often the tree is scanned
    assert warnings[0].startswith("kd-train: warning:") and "'a'" in warnings[0] and "RGB" in warnings[0]


def test_explicit_channels_are_kept_without_a_warning(tmp_path, capsys):
    _gray_first(tmp_path)
    out = image_folder.load(folder_cfg(tmp_path, channels=1))
    assert out["train"].images.shape[1] == 1
    assert capsys.readouterr().err == ""


def test_all_gray_set_stays_one_channel(tmp_path, capsys):
    helpers.write_image_tree(tmp_path, ["a", "b"], {"train": 2, "test": 1}, 1, 6, 6)
    assert image_folder.load(folder_cfg(tmp_path))["train"].images.shape[1] == 1
    assert capsys.readouterr().err == ""


# =========================================================================== 5. wording


def test_directory_as_checkpoint_says_it_is_a_directory(tmp_path):
    from kd_runner import checkpoints

    with pytest.raises(UserError) as err:
        checkpoints.load_weights(tmp_path, Tiny(), "teacher")
    assert "is a directory" in str(err.value) and "does not exist" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        checkpoints.load_weights(tmp_path / "nope.pt", Tiny(), "teacher")
