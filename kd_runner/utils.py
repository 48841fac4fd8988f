"""Small helpers shared across phases: seeding, hashing, atomic writes."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches so reruns are identical."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass


# the code that shapes a trained teacher or CE baseline: architectures, data, the loop, optimisers,
# seeding, and the CE loss they train with. Other methods, reports, sweeps and the CLI are left out,
# so adding or editing a distillation method does not invalidate every stored teacher.
TRAINING_CODE = ("models", "data", "engine.py", "step.py", "optim.py", "compute.py", "taps.py", "utils.py",
                 "pipeline.py", "checkpoints.py", "methods/base.py", "methods/ce.py")


def training_code_files(parts: tuple[str, ...] = TRAINING_CODE) -> list[Path]:
    """The package's source files under ``parts`` (files or folders), sorted."""
    root = Path(__file__).resolve().parent
    found = {f for part in parts for f in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])}
    return sorted(found)


@functools.cache
def code_hash() -> str:
    """Hash of the training code (:data:`TRAINING_CODE`): a stored teacher trained by other code is not the
    same teacher, and the version string alone misses edits between releases (a checkout, an editable install).
    """
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in training_code_files():
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> str:
    """Let glibc keep large freed blocks for reuse instead of unmapping them; process-wide and one-way.

    A CPU training step allocates and frees activations of tens of MB. glibc serves each from a fresh
    mmap and returns it on free, so every step page-faults its activations in again: about a fifth of a
    DeepNN step on 2 cores (docs/BENCHMARKS.md). Raising the mmap and trim thresholds keeps that memory
    in the heap; the process holds on to its peak instead of shrinking between steps. There is no undo:
    setting the thresholds back by hand would not restore glibc's default, self-adjusting ones.
    Returns what was done, for the report.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system allocator (not glibc)"
    if not all(mallopt(k, 1 << 30) == 1 for k in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD)):
        return "glibc defaults (mallopt refused)"
    return "glibc, freed blocks kept (mmap/trim threshold 1 GiB)"


def derive_seed(seed: int, role: str) -> int:
    """A seed for ``role`` that no other (seed, role) pair shares: ``seed + k`` streams would overlap."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{role}".encode()).digest()[:8], "little") % 2**62


def weights_hash(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers: proves two models start identical."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# dataset keys that say where the data is read from or how it is cached, not what it is
DATASET_LOCATION_KEYS = ("root", "download", "decode_cache", "verify_md5")


def _numbers_alike(obj: Any) -> Any:
    """Ints as floats (not bools): ``method.T=4`` on the command line and ``T: 4.0`` in a YAML are one value."""
    if isinstance(obj, dict):
        return {k: _numbers_alike(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numbers_alike(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    return obj


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order and of ``4`` vs ``4.0``."""
    blob = json.dumps(_numbers_alike(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so readers never see half a file. The file gets the permissions a plain
    ``open()`` would give it (mkstemp's are 0600: a sweep's pages and reports could not be shared or served)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torchvision_version() -> str:
    """torchvision's version from its package metadata: importing torchvision for it costs ~1.8 s (its ops import
    torch._dynamo), paid by every kd-train process that never builds a torchvision model."""
    from importlib.metadata import version

    return version("torchvision")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda|mps`` to a device, failing clearly if unavailable."""
    from kd_runner.errors import UserError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("trainer.device=mps but MPS is not available; use auto or cpu")
    return torch.device(name)


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
