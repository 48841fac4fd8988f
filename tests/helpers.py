"""Shared helpers: tiny datasets in the real on-disk formats and a subprocess CLI runner.

Imported by conftest.py and the test modules (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Every CLI run is toy-sized and CPU-only; tests override any of these by key.
FAST = {
    "trainer.device": "cpu",
    "trainer.teacher_epochs": "1",
    "trainer.student_epochs": "1",
    "trainer.bench_iters": "2",
    "trainer.progress": "false",
    "trainer.num_threads": "1",
    "dataset.label_fraction": "1.0",  # every image labelled (digits' default is the scarce-label demo)
}

CLI_TIMEOUT_S = 300

# the shared digits runs (conftest) and the runs compared with them (test_reproducibility)
KD_DIGITS_ARGS = ["method=kd", "method.T=3.0", "method.soft_weight=0.5", "method.ce_weight=0.5",
                  "trainer.student_epochs=2", "trainer.teacher_outputs=cache"]
HINT_DIGITS_ARGS = ["method=hint", "trainer.student_epochs=2", "trainer.teacher_outputs=cache"]


# --------------------------------------------------------------------------- images


def pattern_images(n: int, num_classes: int, channels: int, height: int, width: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, C, H, W) of a learnable pattern and their labels (``i % num_classes``).

    Class k lights one cell of a 4x4 grid (and, in colour, a class-specific tint) over low noise.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = rng.integers(0, 40, size=(n, channels, height, width), dtype=np.uint8)
    ch, cw = max(1, height // 4), max(1, width // 4)
    for i, k in enumerate(labels):
        r, c = divmod(int(k) % 16, 4)
        images[i, :, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = 255
        if channels == 3:
            images[i, int(k) % 3] = np.maximum(images[i, int(k) % 3], 60 + 15 * int(k))
    return images, labels.astype(np.uint8)


# --------------------------------------------------------------------------- MNIST (IDX)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3: big-endian magic 2051, count, rows, cols, then uint8 pixels."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1: big-endian magic 2049, count, then uint8 labels."""
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> dict:
    """``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` as torchvision reads them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = pattern_images(n, 10, 1, 28, 28, seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


# --------------------------------------------------------------------------- CIFAR-10 (pickles)


def write_cifar_batches(root: Path, per_batch: int = 10, n_test: int = 20) -> dict:
    """``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` in torchvision's format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for j, name in enumerate(names):
        images, labels = pattern_images(n_test if name == "test_batch" else per_batch, 10, 3, 32, 32, seed=10 + j)
        entry = {"batch_label": name, "labels": [int(v) for v in labels],
                 "data": images.reshape(len(images), 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(len(images))]}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
        out[name] = (images, labels)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return out


# --------------------------------------------------------------------------- image folders


def write_image_tree(root: Path, classes: list[str], per_class: dict[str, int], channels: int,
                     height: int, width: int, suffix: str = ".png") -> dict:
    """``root/{train,test}/<class>/<i><suffix>`` written with PIL; returns the arrays per split."""
    from PIL import Image

    out = {}
    for j, (split, n) in enumerate(per_class.items()):
        images, labels = pattern_images(n * len(classes), len(classes), channels, height, width, seed=20 + j)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            d = root / split / classes[int(lab)]
            d.mkdir(parents=True, exist_ok=True)
            arr = img[0] if channels == 1 else img.transpose(1, 2, 0)
            Image.fromarray(np.ascontiguousarray(arr)).save(d / f"{i:03d}{suffix}")  # 2-D: L, (H, W, 3): RGB
        out[split] = (images, labels)
    return out


# --------------------------------------------------------------------------- CLI


def cli_env(base: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: every output, cache and data path inside ``base``."""
    env = os.environ.copy()
    env.update({
        "KD_OUTPUT_DIR": str(base / "outputs"),
        "KD_CACHE_DIR": str(base / "cache"),
        "KD_DATA_DIR": str(base / "data"),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "0",
    })
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


def merge_overrides(args: list[str], fast: bool = True) -> list[str]:
    """FAST defaults first, minus any key the test sets itself (Hydra rejects duplicate keys)."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    base = [f"{k}={v}" for k, v in FAST.items() if k not in keys] if fast else []
    return base + list(args)


def run_cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, run_dir: Path | None = None,
            fast: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``python -m kd_runner.train`` in ``tmp_path``; return ``(proc, run_dir)``.

    ``env`` entries are added to :func:`cli_env`'s, so data/cache/output paths stay in ``tmp_path``.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir) if run_dir is not None else tmp_path / "run"
    cmd = [sys.executable, "-m", "kd_runner.train", *merge_overrides(args, fast), f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path, **(env or {})), capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    return proc, run_dir


def run_many(jobs: dict[str, dict], workers: int | None = None) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run several :func:`run_cli` jobs concurrently; ``jobs[name]`` holds run_cli's keyword arguments.

    The machine is shared with other work, so a few runs side by side finish far sooner than one after
    another; results are independent (each job has its own cwd, run dir, caches).
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = int(os.environ.get("KD_TEST_WORKERS", workers or 4))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {name: pool.submit(run_cli, **kw) for name, kw in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_ok(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    """The run succeeded and wrote report.json; return it."""
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    report = run_dir / "report.json"
    assert report.is_file(), f"no report.json in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    return json.loads(report.read_text())


def assert_user_error(proc: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> str:
    """Exit 2, one ``kd-train: error:`` line naming every needle, no traceback, no report.json."""
    detail = f"rc={proc.returncode}\nSTDERR:\n{proc.stderr[-5000:]}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, detail
    last = lines[-1]
    assert last.startswith("kd-train: error:"), detail
    assert len([ln for ln in lines if ln.startswith("kd-train: error:")]) == 1, detail
    for needle in needles:
        assert needle in last, f"{needle!r} not in error line: {last}"
    assert not (run_dir / "report.json").exists()
    return last


def read_metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def loss_columns(rows: list[dict]) -> dict[tuple[str, str], list[str]]:
    """``{(phase, column): [values per epoch]}`` for every train_* loss column (not timings)."""
    out: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("train_") or k in ("val_acc", "lr"):
                out.setdefault((row["phase"], k), []).append(v)
    return out


# --------------------------------------------------------------------------- CIFAR-100 (pickles, image folders)

# the fine_label_names of cifar-100-python/meta, in label order (the loader's own list: these files must match it)
from kd_runner.data.cifar import CIFAR100_CLASSES  # noqa: E402


def cifar100_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 (N, 3, 32, 32) images and fine labels ``i % 100``: class k lights grid cell ``k % 16``
    and tints channel ``(k // 16) % 3`` at one of three levels, so every class looks different."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 100
    images = rng.integers(0, 40, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k) % 16, 4)
        images[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 255
        group = int(k) // 16
        images[i, group % 3] = np.maximum(images[i, group % 3], 90 + 50 * (group // 3))
    return images, labels.astype(np.int64)


def _py2_pickle(obj) -> bytes:
    """Protocol-2 pickle of ``obj`` as Python 2 wrote cifar-100-python: ``str`` as byte strings (SHORT_BINSTRING /
    BINSTRING, so ``encoding='bytes'`` gives ``b'data'`` keys and ``'latin1'`` gives ``'data'``), ints, lists,
    dicts, and numpy arrays (numpy's own reduce)."""
    def emit(o) -> bytes:
        if isinstance(o, bool) or o is None:
            raise TypeError(f"not in the CIFAR format: {o!r}")
        if isinstance(o, str):
            b = o.encode("latin1")
            return (b"U" + struct.pack("<B", len(b)) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
        if isinstance(o, int | np.integer):
            return b"J" + struct.pack("<i", int(o))
        if isinstance(o, list):
            return b"](" + b"".join(emit(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, np.ndarray):  # one array per file: its memo indices cannot clash
            return pickle.dumps(o, protocol=2)[2:-1]
        raise TypeError(f"not in the CIFAR format: {type(o).__name__}")
    return b"\x80\x02" + emit(obj) + b"."


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict:
    """``<root>/cifar-100-python/{train,test,meta}`` in torchvision's (Python 2 pickle) format.

    ``train``/``test``: ``data`` (N, 3072) uint8, ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``;
    ``meta``: ``fine_label_names``, ``coarse_label_names``. The md5s are not torchvision's.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for j, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = cifar100_images(n, seed=30 + j)
        entry = {"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch 1 of 1",
                 "fine_labels": [int(v) for v in labels], "coarse_labels": [int(v) // 5 for v in labels],
                 "data": images.reshape(n, 3072)}
        (folder / name).write_bytes(_py2_pickle(entry))
        out[name] = (images, labels)
    meta = {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": [f"superclass_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(_py2_pickle(meta))
    return out


def write_cifar100_tree(root: Path, per_class: dict[str, int] | None = None, suffix: str = ".png") -> dict:
    """``root/{train,test}/<fine label>/<i><suffix>`` for all 100 CIFAR-100 classes; returns the arrays per split."""
    from PIL import Image

    out = {}
    for j, (split, n) in enumerate((per_class or {"train": 1, "test": 1}).items()):
        images, labels = cifar100_images(n * 100, seed=40 + j)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            d = root / split / CIFAR100_CLASSES[int(lab)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(d / f"{i:03d}{suffix}")
        out[split] = (images, labels)
    return out
