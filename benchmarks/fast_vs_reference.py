"""Images/s of kd-runner's engine vs the PyTorch KD tutorial's own loop, same images, same device, one process.

Two arms, the same DeepNN teacher / LightNN student classes (kd_runner/models/tutorial.py, identical to the
tutorial's, built from the same seed), the same subset of the JPEG copy of CIFAR-10:

  reference  the tutorial's loop as written (benchmarks/tutorial_reference.py): ImageFolder + ToTensor/Normalize
             in 2 DataLoader workers, batch 128, Adam 1e-3, ``loss.item()`` every step, the teacher run under
             ``no_grad`` on every KD batch, ``test()`` with ``.item()`` per batch.
  kd-runner  kd-runner's engine on its decode-once uint8 tensors, with the config ``kd-train
             experiment=cifar10_tutorial`` composes (plus ``--kd-overrides``): ``engine.fit`` per epoch,
             ``TeacherOutputs`` (teacher logits cached once, then indexed) for KD, ``predict_accuracy`` to test.

Phases (``--phases``), each one epoch / one pass, reference then kd-runner (the order flips on odd repeats):
  teacher  DeepNN with CE                      ce    LightNN with CE (the baseline)
  kd       LightNN with 0.25 * KL * T^2 + 0.75 * CE at T=2 (kd-runner: cache pass timed separately)
  eval     one test pass of DeepNN and one of LightNN

It prints one line per arm and phase, then a markdown table (images/s, ratio kd-runner / reference, peak RSS,
CUDA peak allocation) and a projection of the whole tutorial experiment (teacher, CE baseline, three
distilled students, 10 epochs each, five test passes) from the measured per-epoch rates. Only the epochs and
passes are timed: building datasets, loaders and models is not, and kd-runner's one-off JPEG decode (cached on
disk under paths.cache_dir) is reported on its own line.

Repeat 1 is a cold start: the first epoch of each kind in the process pays one-off costs (on a GPU, cuDNN
autotuning, lazy kernel loads, CUDA-graph capture: seconds, against sub-second kd-runner epochs). With
``--repeats 3`` the table shows the steady state (median of repeats 2..3), a second table the cold start and
each arm's one-off seconds, and the projection counts those once. Before either arm, one arm-neutral fp32
training step of each network initialises the device. Peak RSS is sampled every 20 ms on a thread (reference:
plus its DataLoader workers' private memory); ``--no-memory`` turns the sampler off.

Run from the repository root:

    .venv/bin/python benchmarks/fast_vs_reference.py --smoke --threads 1          # sanity check, < 1 min on CPU
    .venv/bin/python benchmarks/fast_vs_reference.py --device cuda --repeats 3 --json outputs/bench/fvr.json
    .venv/bin/python benchmarks/fast_vs_reference.py --device cuda --kd-overrides trainer.amp=off \\
        trainer.channels_last=off                                                 # ablate kd-runner's compute path

Data: ``--data`` (default $KD_DATA_DIR, else ../shared/data beside the repo) must hold
``cifar10/{train,test}/<class>/*.jpg``; ``--cache-dir`` (default $KD_CACHE_DIR, else outputs/.cache) is where
kd-runner's decoded tensors live.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

import kd_runner
import kd_runner.config
import kd_runner.data
import kd_runner.engine
import kd_runner.methods
import kd_runner.models
import kd_runner.pipeline
import kd_runner.utils
from kd_runner.data.cache import set_cache_dir
from kd_runner.data.tensors import DataBundle
from kd_runner.models.tutorial import DeepNN, LightNN
from kd_runner.utils import keep_freed_memory

try:  # run as a script: benchmarks/ is on sys.path
    import tutorial_reference as ref
except ImportError:  # python -m benchmarks.fast_vs_reference
    from benchmarks import tutorial_reference as ref

REPO = Path(__file__).resolve().parents[1]
SEED = 42  # the tutorial's torch.manual_seed(42) before building each network
LR = 1e-3
T, SOFT_WEIGHT, CE_WEIGHT = 2.0, 0.25, 0.75
TUTORIAL_EPOCHS = 10
TEACHER_PARAMS, STUDENT_PARAMS = 1_186_986, 267_738
PHASES = ("teacher", "ce", "kd", "eval")
SMOKE_LIMIT = 256
MB = 2**20


# ----------------------------------------------------------------------------------------------- memory sampling


def _rss(pid: int | str) -> int:
    """Resident set size in bytes (``/proc/<pid>/statm``), 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _uss(pid: int) -> int:
    """Private (unshared) memory in bytes from ``/proc/<pid>/smaps_rollup``; 0 if unreadable."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


def _children() -> list[int]:
    """Live child processes started through multiprocessing (the DataLoader's workers); no /proc scan."""
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


class MemorySampler:
    """Peak memory of this process and its children while a ``with`` block runs, sampled on a thread.

    Every ``interval_s``: this process's RSS and each child's RSS (cheap reads of ``statm``). A child's private
    memory (USS: what a forked DataLoader worker adds beyond the pages it shares with its parent) comes from
    ``smaps_rollup``, which costs ~20 ms of CPU per read for a process with torch mapped, so it is read
    ``uss_delay_s`` after the child appears (not while it starts up) and then every ``uss_interval_s``.
    ``cpu_s`` is the sampler's own CPU time, so its overhead is on record.
    """

    def __init__(self, interval_s: float = 0.02, uss_delay_s: float = 1.0, uss_interval_s: float = 5.0) -> None:
        self.interval_s, self.uss_delay_s, self.uss_interval_s = interval_s, uss_delay_s, uss_interval_s
        self.pid = os.getpid()
        self.start_main = _rss(self.pid)
        self.peak_main = self.peak_total = self.peak_total_rss = self.peak_workers_uss = 0
        self.max_children = 0
        self.uss_reads = 0
        self.samples = 0
        self.cpu_s = 0.0
        self._uss: dict[int, int] = {}
        self._next_uss: dict[int, float] = {}  # child pid -> when to read its USS next
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        c0 = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self._sample()
        self.cpu_s += time.thread_time() - c0

    def _sample(self) -> None:
        now = time.perf_counter()
        kids = _children()
        for k in kids:
            due = self._next_uss.setdefault(k, now + self.uss_delay_s)
            if now >= due:
                self._uss[k] = _uss(k)
                self._next_uss[k] = now + self.uss_interval_s
                self.uss_reads += 1
        main = _rss(self.pid)
        kids_rss = [_rss(k) for k in kids]
        live = [k for k, r in zip(kids, kids_rss, strict=True) if r > 0]
        workers_uss = sum(self._uss.get(k, 0) for k in live)
        self.peak_main = max(self.peak_main, main)
        self.peak_workers_uss = max(self.peak_workers_uss, workers_uss)
        self.peak_total = max(self.peak_total, main + workers_uss)
        self.peak_total_rss = max(self.peak_total_rss, main + sum(kids_rss))
        self.max_children = max(self.max_children, len(live))
        self.samples += 1

    def summary(self) -> dict[str, Any]:
        return {"peak_rss_mb": round(self.peak_total / MB, 1), "rss_at_start_mb": round(self.start_main / MB, 1),
                "peak_rss_main_mb": round(self.peak_main / MB, 1),
                "peak_workers_uss_mb": round(self.peak_workers_uss / MB, 1),
                "peak_rss_with_workers_rss_mb": round(self.peak_total_rss / MB, 1),
                "worker_processes": self.max_children, "worker_uss_reads": self.uss_reads,
                "memory_samples": self.samples,
                "sampler_cpu_s": round(self.cpu_s, 3)}


# ----------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds, with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def override(key: str, value: object) -> str:
    """A Hydra override, quoted when the value holds characters the override grammar would parse."""
    text = str(value)
    if re.fullmatch(r"[\w./:+\-]+", text):
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(data_dir: Path, cache_dir: Path, device: str, extra: list[str]):
    """The config ``kd-train experiment=cifar10_tutorial`` would run, with this benchmark's paths and device."""
    from hydra import compose, initialize_config_dir

    from kd_runner.train import config_dir

    overrides = ["experiment=cifar10_tutorial", override("paths.data_dir", data_dir),
                 override("paths.cache_dir", cache_dir), f"trainer.device={device}", "trainer.progress=false",
                 *extra]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides), overrides


def prepare_model(model: nn.Module, env: kd_runner.engine.Env) -> nn.Module:
    """kd-runner's model preparation (device, memory format) for ``env``'s compute path."""
    engine_prepare = getattr(kd_runner.engine, "prepare_model", None)
    if engine_prepare is not None:
        return engine_prepare(model, env)
    from kd_runner.compute import prepare_model as compute_prepare

    return compute_prepare(model, env.device, env.compute)


def folder_root(data_dir: Path) -> Path:
    """The folder with train/ and test/ class folders, searched where kd-runner's cifar10 loader searches."""
    for candidate in (data_dir / "cifar10", data_dir / "CIFAR10", data_dir):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    sys.exit(f"fast_vs_reference: no cifar10/{{train,test}}/<class>/ image folders under '{data_dir}'")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


# ------------------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Setup:
    """What both arms share: config, device, the subset's indices, full sizes for the projection."""

    cfg: Any
    overrides: list[str]
    trainer: kd_runner.config.Trainer
    device: torch.device
    root: Path
    train_idx: torch.Tensor | None  # None: the whole split, in file order
    test_idx: torch.Tensor | None
    n_train: int
    n_test: int
    full_train: int
    full_test: int
    reference_data: str
    reference_cudnn_benchmark: bool
    memory: bool
    info: dict
    allocator: str = ""


def choose(n_total: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The first ``limit`` indices of a seeded permutation, in file order; None for the whole split."""
    if limit is None or limit >= n_total:
        return None
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[:limit].sort().values


def subset_split(split: kd_runner.data.tensors.Split, idx: torch.Tensor | None) -> kd_runner.data.tensors.Split:
    return split if idx is None else split.subset(idx)


def check_same_images(bundle: DataBundle, root: Path, train_idx: torch.Tensor | None,
                      test_idx: torch.Tensor | None) -> dict:
    """Assert kd-runner's tensors and torchvision's ImageFolder list the same files in the same order."""
    checked = {}
    for name, split, idx in (("train", bundle.train, train_idx), ("test", bundle.test, test_idx)):
        folder = ImageFolder(str(root / name))
        assert folder.classes == bundle.classes, f"{name}: class order {folder.classes} != {bundle.classes}"
        assert len(folder) == len(split), f"{name}: ImageFolder has {len(folder)} images, kd-runner {len(split)}"
        targets = torch.tensor(folder.targets, dtype=torch.long)
        assert torch.equal(targets, split.labels.cpu()), f"{name}: ImageFolder and kd-runner order labels differently"
        chosen = idx if idx is not None else torch.arange(len(split))
        g = torch.Generator().manual_seed(1)
        probe = sorted({0, len(chosen) - 1, *torch.randint(len(chosen), (6,), generator=g).tolist()})
        for j in probe:
            i = int(chosen[j])
            img, label = folder[i]
            pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            assert label == int(split.labels[i]), f"{name}[{i}]: label {label} != {int(split.labels[i])}"
            assert torch.equal(pixels, split.images[i].cpu()), f"{name}[{i}] ({folder.samples[i][0]}): pixels differ"
        checked[name] = {"images": len(split), "labels_equal": True, "pixel_checked_indices": len(probe)}
    return checked


def build_setup(args: argparse.Namespace) -> Setup:
    data_dir = Path(args.data).expanduser().resolve()
    cache_dir = Path(args.cache_dir).expanduser().resolve()
    cfg, overrides = compose_config(data_dir, cache_dir, args.device, args.kd_overrides)
    trainer = kd_runner.config.validate(cfg)
    device = kd_runner.utils.resolve_device(trainer.device)
    threads = args.threads or trainer.num_threads
    if threads:
        torch.set_num_threads(threads)
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    root = folder_root(data_dir)

    set_cache_dir(cache_dir)
    bundle, load_s = timed(torch.device("cpu"), lambda: kd_runner.data.build_data(cfg.dataset))
    first_decode = "decoded now" in bundle.source
    if bundle.val is not None:
        sys.exit("fast_vs_reference: dataset.val_fraction must be 0 (the tutorial trains on the whole train split)")
    train_idx = choose(len(bundle.train), args.train_limit, args.subset_seed)
    test_idx = choose(len(bundle.test), args.test_limit, args.subset_seed + 1)
    checked = check_same_images(bundle, root, train_idx, test_idx)

    # the same networks: the same class, the same seed, the same weights; the tutorial's parameter counts
    torch.manual_seed(SEED)
    kd_teacher = kd_runner.models.build_model(cfg.teacher, bundle.input_shape(), bundle.num_classes)
    torch.manual_seed(SEED)
    ref_teacher = DeepNN(input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(SEED)
    kd_student = kd_runner.models.build_model(cfg.student, bundle.input_shape(), bundle.num_classes)
    torch.manual_seed(SEED)
    ref_student = LightNN(input_shape=(3, 32, 32), num_classes=10)
    for kd_m, ref_m, n in ((kd_teacher, ref_teacher, TEACHER_PARAMS), (kd_student, ref_student, STUDENT_PARAMS)):
        assert type(kd_m) is type(ref_m), f"kd-runner builds {type(kd_m).__name__}, not {type(ref_m).__name__}"
        assert count_params(kd_m) == count_params(ref_m) == n, f"{type(ref_m).__name__}: {count_params(kd_m)} != {n}"
        assert all(torch.equal(a, b) for a, b in zip(kd_m.state_dict().values(), ref_m.state_dict().values(),
                                                     strict=True)), "same seed, different initial weights"

    info = {
        "data_dir": str(data_dir), "image_root": str(root), "cache_dir": str(cache_dir),
        "kd_data_source": bundle.source,
        "kd_first_time_decode_s": round(load_s, 2) if first_decode else None,
        "kd_data_load_s": round(load_s, 3),
        "same_images": checked,
        "params": {"DeepNN": TEACHER_PARAMS, "LightNN": STUDENT_PARAMS},
    }
    n_train = len(bundle.train) if train_idx is None else len(train_idx)
    n_test = len(bundle.test) if test_idx is None else len(test_idx)
    setup = Setup(cfg=cfg, overrides=overrides, trainer=trainer, device=device, root=root, train_idx=train_idx,
                  test_idx=test_idx, n_train=n_train, n_test=n_test, full_train=len(bundle.train),
                  full_test=len(bundle.test), reference_data=args.reference_data,
                  reference_cudnn_benchmark=args.reference_cudnn_benchmark, memory=not args.no_memory, info=info,
                  allocator=keep_freed_memory() if args.allocator == "kd-runner" else "glibc defaults")
    del bundle, kd_teacher, ref_teacher, kd_student, ref_student
    gc.collect()
    return setup


def warm_up(device: torch.device) -> float:
    """One fp32 forward+backward of each network on random data: device context, library handles.

    Run once before either arm, so neither pays the process's first-use costs.
    """
    def step() -> None:
        for cls in (DeepNN, LightNN):
            model = cls(input_shape=(3, 32, 32), num_classes=10).to(device)
            x = torch.randn(ref.BATCH_SIZE, 3, 32, 32, device=device)
            y = torch.randint(10, (ref.BATCH_SIZE,), device=device)
            nn.functional.cross_entropy(model(x), y).backward()

    return timed(device, step)[1]


# ------------------------------------------------------------------------------------------------------- arms


class Arm:
    """One side of the comparison; each phase builds its data (untimed), then times one epoch or pass."""

    name = ""

    def __init__(self, setup: Setup) -> None:
        self.s = setup
        self.models: dict[str, nn.Module] = {}

    def new_repeat(self) -> None:
        self.models = {}

    def data(self) -> Any:
        raise NotImplementedError

    def run(self, phase: str, data: Any) -> dict:
        raise NotImplementedError

    def before(self) -> None:
        """Global switches this arm runs under."""

    def measure(self, phase: str) -> dict:
        gc.collect()
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()
        self.before()
        data = self.data()  # untimed, and before the memory window: the split it leaves resident is counted
        if self.s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.s.device)
            cuda_start = torch.cuda.memory_allocated(self.s.device)
        sampler = MemorySampler() if self.s.memory else None
        with sampler or contextlib.nullcontext():
            out = self.run(phase, data)
        if sampler is not None:
            out.update(sampler.summary())
            out["peak_rss_growth_mb"] = round(out["peak_rss_mb"] - out["rss_at_start_mb"], 1)
        if self.s.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.s.device)
            out["cuda_max_alloc_mb"] = round(peak / MB, 1)
            out["cuda_alloc_at_start_mb"] = round(cuda_start / MB, 1)
            out["cuda_growth_mb"] = round((peak - cuda_start) / MB, 1)
        out["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        out["img_s"] = out["images"] / out["seconds"]
        out.setdefault("img_s_amortised", out["img_s"])
        del data
        return out


class ReferenceArm(Arm):
    name = "reference"

    def before(self) -> None:
        torch.backends.cudnn.benchmark = self.s.reference_cudnn_benchmark  # the tutorial leaves it off

    def data(self) -> tuple[Any, Any]:
        transform = ref.tutorial_transform()
        if self.s.reference_data == "imagefolder":
            train: Dataset = ImageFolder(str(self.s.root / "train"), transform=transform)
            test: Dataset = ImageFolder(str(self.s.root / "test"), transform=transform)
            if self.s.train_idx is not None:
                train = Subset(train, self.s.train_idx.tolist())
            if self.s.test_idx is not None:
                test = Subset(test, self.s.test_idx.tolist())
        else:  # the tutorial's CIFAR10 dataset: uint8 arrays in memory, PIL + transform per item
            set_cache_dir(Path(self.s.info["cache_dir"]))
            bundle = kd_runner.data.build_data(self.s.cfg.dataset)
            splits = (subset_split(bundle.train, self.s.train_idx), subset_split(bundle.test, self.s.test_idx))
            train, test = (ref.InMemoryCIFAR(sp.images.permute(0, 2, 3, 1).contiguous().numpy(), sp.labels.tolist(),
                                             transform) for sp in splits)
            del bundle, splits
        return ref.loaders(train, test)

    def run(self, phase: str, data: tuple[Any, Any]) -> dict:
        train_loader, test_loader = data
        dev = self.s.device
        if phase in ("teacher", "ce"):
            torch.manual_seed(SEED)
            model = DeepNN(input_shape=(3, 32, 32), num_classes=10) if phase == "teacher" else LightNN(
                input_shape=(3, 32, 32), num_classes=10)
            loss, secs = timed(dev, lambda: ref.train(model, train_loader, epochs=1, learning_rate=LR, device=dev))
            self.models[phase] = model
            return {"images": len(train_loader.dataset), "seconds": secs, "loss": loss}
        if phase == "kd":
            teacher = self.teacher()
            torch.manual_seed(SEED)
            student = LightNN(input_shape=(3, 32, 32), num_classes=10)
            loss, secs = timed(dev, lambda: ref.train_knowledge_distillation(
                teacher=teacher, student=student, train_loader=train_loader, epochs=1, learning_rate=LR, T=T,
                soft_target_loss_weight=SOFT_WEIGHT, ce_loss_weight=CE_WEIGHT, device=dev))
            self.models["kd"] = student
            return {"images": len(train_loader.dataset), "seconds": secs, "loss": loss,
                    "teacher": "trained" if "teacher" in self.models else "untrained (teacher phase not run)"}
        model = self.teacher() if phase == "eval_teacher" else self.student()
        acc, secs = timed(dev, lambda: ref.test(model, test_loader, dev))
        return {"images": len(test_loader.dataset), "seconds": secs, "acc": acc}

    def teacher(self) -> nn.Module:
        if "teacher" not in self.models:
            torch.manual_seed(SEED)
            self.models["teacher"] = DeepNN(input_shape=(3, 32, 32), num_classes=10)
        return self.models["teacher"]

    def student(self) -> nn.Module:
        if "kd" in self.models or "ce" in self.models:
            return self.models.get("kd", self.models.get("ce"))
        torch.manual_seed(SEED)
        return LightNN(input_shape=(3, 32, 32), num_classes=10)


class KdRunnerArm(Arm):
    name = "kd-runner"

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.paths: dict | None = None

    def data(self) -> tuple[DataBundle, kd_runner.engine.Env]:
        set_cache_dir(Path(self.s.info["cache_dir"]))
        bundle = kd_runner.data.build_data(self.s.cfg.dataset)
        bundle = dataclasses.replace(bundle, train=subset_split(bundle.train, self.s.train_idx),
                                     test=subset_split(bundle.test, self.s.test_idx))
        env = kd_runner.pipeline.make_env(self.s.trainer, bundle, self.s.device)
        return bundle, env

    def build(self, role: str, env: kd_runner.engine.Env, bundle: DataBundle) -> nn.Module:
        torch.manual_seed(SEED)
        model_cfg = self.s.cfg.teacher if role == "teacher" else self.s.cfg.student
        return prepare_model(kd_runner.models.build_model(model_cfg, bundle.input_shape(), bundle.num_classes), env)

    def run(self, phase: str, data: tuple[DataBundle, kd_runner.engine.Env]) -> dict:
        bundle, env = data
        cfg, dev = self.s.cfg, self.s.device
        fit_kw = {"epochs": 1, "optimizer_cfg": cfg.optimizer, "scheduler_cfg": cfg.scheduler, "seed": 0}
        if phase in ("teacher", "ce"):
            model = self.build("teacher" if phase == "teacher" else "student", env, bundle)
            res, secs = timed(dev, lambda: kd_runner.engine.fit(
                "teacher" if phase == "teacher" else "baseline", model, kd_runner.methods.CE(), bundle.train, None,
                env, **fit_kw))
            self.models[phase] = model
            self.record_paths(env, bundle, {"teacher" if phase == "teacher" else "student": model})
            return {"images": len(bundle.train), "seconds": secs, "loss": res.history[-1]["train_loss"]}
        if phase == "kd":
            method = kd_runner.methods.build_method(cfg.method)
            teacher = self.teacher(env, bundle) if method.needs_teacher else None
            student = self.build("student", env, bundle)
            extra, _ = kd_runner.pipeline.build_extra(method, student, teacher, bundle.train, env,
                                                      bundle.num_classes)
            mode = "live" if self.s.trainer.teacher_outputs == "live" else "cache"
            t_out, cache_s = (timed(dev, lambda: kd_runner.engine.TeacherOutputs(
                teacher, method.teacher_taps, env, bundle.train, mode, reduce=method.reduce_teacher))
                if teacher is not None else (None, 0.0))
            res, secs = timed(dev, lambda: kd_runner.engine.fit("student", student, method, bundle.train, None, env,
                                                                teacher=t_out, extra=extra, **fit_kw))
            self.models["kd"] = student
            self.record_paths(env, bundle, {"student": student, **({} if teacher is None else {"teacher": teacher})})
            n = len(bundle.train)
            amortise = self.s.trainer.student_epochs
            if mode == "live":  # no cache pass: the teacher runs inside every timed epoch
                cache_s = 0.0
            return {"images": n, "seconds": secs, "loss": res.history[-1]["train_loss"], "method": method.name,
                    "teacher_outputs": mode, "cache_seconds": cache_s, "cache_img_s": n / cache_s if cache_s else None,
                    "amortised_over_epochs": amortise,
                    "img_s_amortised": n / (secs + cache_s / amortise),
                    "teacher": "trained" if "teacher" in self.models else "untrained (teacher phase not run)"}
        model = self.teacher(env, bundle) if phase == "eval_teacher" else self.student(env, bundle)
        acc, secs = timed(dev, lambda: kd_runner.engine.predict_accuracy(model, bundle.test, env))
        return {"images": len(bundle.test), "seconds": secs, "acc": acc}

    def record_paths(self, env: kd_runner.engine.Env, bundle: DataBundle, models: dict[str, nn.Module]) -> None:
        """The data and compute paths kd-runner took (as its report states them), read after the timed epoch."""
        try:  # best effort: this describes the run, it measures nothing
            paths = kd_runner.pipeline.run_paths(env, bundle, models, str(self.s.cfg.optimizer.name),
                                                 self.s.allocator)
        except Exception as err:
            self.paths = {"error": f"kd_runner.pipeline.run_paths failed: {type(err).__name__}: {err}"}
            return
        if "compute" not in (self.paths or {}):
            self.paths = None
        if self.paths is not None:  # one entry per model that ran channels_last, over all phases
            key = "channels_last_models"
            paths["compute"][key] = sorted(set(self.paths["compute"].get(key, [])) | set(paths["compute"].get(key, [])))
        self.paths = paths

    def teacher(self, env: kd_runner.engine.Env, bundle: DataBundle) -> nn.Module:
        if "teacher" not in self.models:
            self.models["teacher"] = self.build("teacher", env, bundle)
        return self.models["teacher"]

    def student(self, env: kd_runner.engine.Env, bundle: DataBundle) -> nn.Module:
        if "kd" in self.models or "ce" in self.models:
            return self.models.get("kd", self.models.get("ce"))
        return self.build("student", env, bundle)


# ------------------------------------------------------------------------------------------------------ report

ROWS = [  # label, phase, which rate
    ("teacher epoch (DeepNN, CE)", "teacher", "img_s"),
    ("CE student epoch (LightNN)", "ce", "img_s"),
    ("KD student epoch, teacher-output cache pass excluded", "kd", "img_s"),
    ("KD student epoch, cache pass amortised over {E} epochs", "kd", "img_s_amortised"),
    ("test pass (DeepNN)", "eval_teacher", "img_s"),
    ("test pass (LightNN)", "eval_student", "img_s"),
]
ARMS = ("reference", "kd-runner")


def phase_stats(rows: list[dict], phase: str, arm: str) -> dict | None:
    """Rates of one arm and phase: steady state (median over repeats 2..R) apart from the cold first repeat.

    Repeat 1 is the first time this process runs that kind of epoch or pass: it carries one-off costs (cuDNN
    autotuning under ``cudnn.benchmark``, lazy kernel loading, allocator growth). ``one_off_s`` is what it
    took beyond a steady-state epoch, so a projection can count it once instead of every epoch.
    """
    mine = [r for r in rows if r["phase"] == phase and r["arm"] == arm]
    if not mine:
        return None
    cold = next(r for r in mine if r["repeat"] == 0)
    warm = [r for r in mine if r["repeat"] > 0]
    base = warm or [cold]

    def med(key: str) -> float | None:
        vals = [r[key] for r in base if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def peak(key: str) -> float | None:
        vals = [r[key] for r in mine if r.get(key) is not None]
        return max(vals) if vals else None

    out = {"steady": bool(warm), "img_s": med("img_s"), "img_s_amortised": med("img_s_amortised"),
           "cache_seconds": med("cache_seconds"), "cache_img_s": med("cache_img_s"), "images": cold["images"],
           "cold_seconds": cold["seconds"], "cold_img_s": cold["img_s"],
           "cold_cache_seconds": cold.get("cache_seconds"),
           "one_off_s": None, "cache_one_off_s": None,
           **{k: peak(k) for k in ("peak_rss_mb", "peak_rss_growth_mb", "cuda_max_alloc_mb", "cuda_growth_mb")}}
    if warm:
        out["one_off_s"] = max(0.0, cold["seconds"] - cold["images"] / out["img_s"])
        if out["cache_seconds"] is not None:
            out["cache_one_off_s"] = max(0.0, cold["cache_seconds"] - out["cache_seconds"])
    return out


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _mem(st: dict | None, key: str, growth: str) -> str:
    if st is None or st.get(key) is None:
        return "n/a"
    return f"{st[key]:,.0f} MB (+{st[growth]:,.0f})" if st.get(growth) is not None else f"{st[key]:,.0f} MB"


def summarise(rows: list[dict], cuda: bool, epochs: int) -> tuple[list[dict], str]:
    """The markdown table (steady-state rates when there are repeats after the first) and its rows as dicts."""
    table, lines = [], []
    head = "| phase | reference img/s | kd-runner img/s | ratio | reference peak RSS | kd-runner peak RSS |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if cuda:
        head += " reference CUDA max alloc | kd-runner CUDA max alloc |"
        sep += "---:|---:|"
    lines += [head, sep]
    kd_method = next((r.get("method") for r in rows if r["phase"] == "kd" and r["arm"] == "kd-runner"), "kd")
    for label, phase, key in ROWS:
        if phase == "kd" and kd_method != "kd":
            label += f" (kd-runner ran method={kd_method}, the reference the tutorial's KD)"
        st = {arm: phase_stats(rows, phase, arm) for arm in ARMS}
        r_rate, k_rate = (st[a][key] if st[a] else None for a in ARMS)
        if r_rate is None and k_rate is None:
            continue
        entry = {"row": label.format(E=epochs), "phase": phase, "reference_img_s": r_rate, "kd_runner_img_s": k_rate,
                 "ratio": k_rate / r_rate if r_rate and k_rate else None, "reference": st["reference"],
                 "kd_runner": st["kd-runner"]}
        table.append(entry)
        line = (f"| {entry['row']} | {_num(r_rate, ',.0f')} | {_num(k_rate, ',.0f')} | {_num(entry['ratio'], '.2f')}x"
                f" | {_mem(st['reference'], 'peak_rss_mb', 'peak_rss_growth_mb')}"
                f" | {_mem(st['kd-runner'], 'peak_rss_mb', 'peak_rss_growth_mb')} |")
        if cuda:
            line += (f" {_mem(st['reference'], 'cuda_max_alloc_mb', 'cuda_growth_mb')}"
                     f" | {_mem(st['kd-runner'], 'cuda_max_alloc_mb', 'cuda_growth_mb')} |")
        lines.append(line)
    return table, "\n".join(lines)


def cold_table(rows: list[dict]) -> str:
    """First epoch / pass of each kind in this process, and its one-off cost beyond a steady-state one."""
    lines = ["| phase | reference img/s (cold) | kd-runner img/s (cold) | reference one-off | kd-runner one-off |",
             "|---|---:|---:|---:|---:|"]
    for phase in ("teacher", "ce", "kd", "eval_teacher", "eval_student"):
        st = {arm: phase_stats(rows, phase, arm) for arm in ARMS}
        if not all(st.values()):
            continue
        extra = {a: _num(st[a]["one_off_s"], ".2f") + " s" for a in ARMS}
        if st["kd-runner"]["cache_one_off_s"] is not None:
            extra["kd-runner"] += f" + {st['kd-runner']['cache_one_off_s']:.2f} s cache pass"
        lines.append(f"| {phase} | {st['reference']['cold_img_s']:,.0f} | {st['kd-runner']['cold_img_s']:,.0f} | "
                     f"{extra['reference']} | {extra['kd-runner']} |")
    return "\n".join(lines)


def project(rows: list[dict], full_train: int, full_test: int) -> tuple[dict | None, str]:
    """Seconds for the whole tutorial experiment from the measured rates (a projection, not a measurement).

    Steady-state rates times epochs, scaled to the full splits, plus each kind's one-off first-use cost once
    (a kd-train process, or a multirun's sequential jobs, pays it once); with one repeat there is no steady
    state and the cold rates stand for every epoch.
    """
    kinds = ("teacher", "ce", "kd", "eval_teacher", "eval_student")
    st = {(p, a): phase_stats(rows, p, a) for p in kinds for a in ARMS}
    if any(v is None for v in st.values()):
        return None, "Projection skipped: it needs every phase (--phases teacher,ce,kd,eval)."
    e, n, m = TUTORIAL_EPOCHS, full_train, full_test
    steady = all(v["steady"] for v in st.values())
    parts: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        kd = st[("kd", arm)]
        cache_pass = n / kd["cache_img_s"] if kd["cache_img_s"] else 0.0
        parts[arm] = {
            "teacher": e * n / st[("teacher", arm)]["img_s"],
            "ce_student": e * n / st[("ce", arm)]["img_s"],
            "distilled_students": 3 * (cache_pass + e * n / kd["img_s"]),
            "test_passes": m / st[("eval_teacher", arm)]["img_s"] + 4 * m / st[("eval_student", arm)]["img_s"],
        }
        if steady:
            parts[arm]["one_off"] = sum(st[(p, arm)]["one_off_s"] or 0.0 for p in kinds) + (kd["cache_one_off_s"] or 0)
        parts[arm]["total"] = sum(parts[arm].values())
    rates = ("steady-state rates (median of repeats 2..R)" if steady else
             "rates of a single cold repeat (first-use costs counted in every epoch: use --repeats 3 to separate them)")
    lines = [
        f"PROJECTION (not measured): the whole tutorial experiment from the {rates}, scaled to {n:,} train / "
        f"{m:,} test images:",
        f"  reference = {e} teacher + {e} CE-student + 3 x {e} KD-student epochs + 5 test passes "
        "(1 DeepNN, 4 LightNN);",
        "    cosine and hint are counted at the KD rate: the tutorial's loops for them run the same live teacher "
        "forward on every batch plus a loss of similar cost;",
        f"  kd-runner = {e} teacher + {e} CE-student + 3 x (teacher-output cache pass + {e} student epochs) "
        "+ 5 test passes, likewise at the KD rate.",
        "",
        "| part | reference | kd-runner | ratio |",
        "|---|---:|---:|---:|",
    ]
    labels = [("teacher", f"teacher ({e} epochs)"), ("ce_student", f"CE student ({e} epochs)"),
              ("distilled_students", f"3 distilled students ({e} epochs each)"), ("test_passes", "5 test passes")]
    if steady:
        labels.append(("one_off", "one-off first-use costs, once per kind"))
    for key, label in [*labels, ("total", "total")]:
        r, k = parts["reference"][key], parts["kd-runner"][key]
        ratio = f"{r / k:.2f}x faster" if k > 0 and key != "one_off" else "-"
        lines.append(f"| {label} | {r / 60:,.2f} min | {k / 60:,.2f} min | {ratio} |")
    lines.append("Not included on either side: dataset preparation (kd-runner: one-off JPEG decode, then a cached "
                 "load per run), kd-runner's checkpoints, reports, model store and latency benchmark.")
    return parts, "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("KD_DATA_DIR") or str(REPO.parent / "shared" / "data"),
                    help="folder holding cifar10/{train,test}/<class>/*.jpg (default: $KD_DATA_DIR, else "
                         "../shared/data beside the repo)")
    ap.add_argument("--cache-dir", default=os.environ.get("KD_CACHE_DIR") or str(REPO / "outputs" / ".cache"),
                    help="kd-runner's decoded-tensor cache (default: $KD_CACHE_DIR, else outputs/.cache, "
                         "kd-train's default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list from {','.join(PHASES)}")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="first N train images of a seeded permutation (default: all)")
    ap.add_argument("--test-limit", type=int, default=None, help="first M test images of a seeded permutation")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both arms")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every phase this many times; repeat 1 is the cold start, the table shows the median "
                         "of the others (use 3 on a GPU, where first-use costs are large)")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement and the summary here")
    ap.add_argument("--kd-overrides", nargs="*", default=[],
                    help="extra Hydra overrides for the kd-runner arm, e.g. trainer.amp=off trainer.channels_last=off "
                         "(the reference arm always runs the tutorial's loop)")
    ap.add_argument("--reference-data", default="imagefolder", choices=["imagefolder", "memory"],
                    help="imagefolder: torchvision ImageFolder over the JPEGs (decoded per item, every epoch); "
                         "memory: uint8 arrays in memory served like torchvision's CIFAR10 (the tutorial's dataset)")
    ap.add_argument("--reference-cudnn-benchmark", action="store_true",
                    help="run the reference with torch.backends.cudnn.benchmark=True (the tutorial leaves it off)")
    ap.add_argument("--allocator", choices=("kd-runner", "glibc"), default="kd-runner",
                    help="kd-runner: glibc tuned as kd-train tunes it (kd_runner.utils.keep_freed_memory), for the "
                         "whole process, so the reference arm gets it too; glibc: untouched defaults for both arms. "
                         "The setting is process-wide: run the script once with each to see its share")
    ap.add_argument("--no-warmup", action="store_true", help="skip the arm-neutral warm-up step")
    ap.add_argument("--no-memory", action="store_true",
                    help="no RSS sampling thread (timings without its small overhead; CUDA peaks are still read)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny run to check the script: --train-limit/--test-limit {SMOKE_LIMIT} unless given")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_limit = args.train_limit or SMOKE_LIMIT
        args.test_limit = args.test_limit or SMOKE_LIMIT
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        ap.error(f"--phases: unknown {bad}; valid: {','.join(PHASES)}")
    args.phases = [p for p in PHASES if p in phases]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def expand(phases: list[str]) -> list[str]:
    out = []
    for p in phases:
        out += ["eval_teacher", "eval_student"] if p == "eval" else [p]
    return out


def describe(r: dict) -> str:
    detail = f"loss {r['loss']:.3f}" if "loss" in r else f"acc {r['acc']:.2f}%"
    if r.get("cache_seconds"):
        detail += f"; cache pass {r['cache_seconds']:.2f} s; amortised {r['img_s_amortised']:,.0f} img/s"
    if r.get("teacher", "trained") != "trained":
        detail += f"; teacher {r['teacher']}"
    mem = f"peak RSS {r['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in r else "RSS not sampled"
    if r.get("worker_processes"):
        mem += (f" (main {r['peak_rss_main_mb']:,.0f} + {r['worker_processes']} workers' USS)" if r["worker_uss_reads"]
                else f" (main only: the {r['worker_processes']} workers ended before their USS was read)")
    if "cuda_max_alloc_mb" in r:
        mem += f", CUDA {r['cuda_max_alloc_mb']:,.0f} MB"
    return (f"  r{r['repeat']} {r['phase']:<13} {r['arm']:<9} {r['images']:>6} img {r['seconds']:8.2f} s "
            f"{r['img_s']:>9,.0f} img/s  {mem}  {detail}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    setup = build_setup(args)
    dev = setup.device
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(dev), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "kd_runner_git": git_rev(), "kd_overrides": args.kd_overrides, "compose_overrides": setup.overrides,
    }
    print("# fast_vs_reference: kd-runner engine vs the PyTorch KD tutorial's loop")
    print(f"date {meta['date']}; device {meta['device']}; torch {meta['torch']}, torchvision {meta['torchvision']}; "
          f"torch threads {meta['torch_threads']}; CPU {meta['cpu_model']} x {meta['cpu_count']} "
          f"({meta['cpus_usable']} usable); load average "
          f"{', '.join(f'{v:.2f}' for v in meta['load_average_at_start'])}")
    print(f"kd-runner {meta['kd_runner_git']}; compose overrides: {' '.join(setup.overrides)}")
    print(f"host allocator (both arms, process-wide): {setup.allocator}")
    print(f"data: {setup.root}; train {setup.n_train:,} of {setup.full_train:,} images, test {setup.n_test:,} of "
          f"{setup.full_test:,} (seeded subset, seed {args.subset_seed}); reference dataset: {setup.reference_data}")
    if setup.info["kd_first_time_decode_s"] is not None:
        print("kd-runner first-time decode of the JPEGs into the tensor cache: "
              f"{setup.info['kd_first_time_decode_s']} s (one-off, not in any rate below)")
    else:
        print(f"kd-runner data: {setup.info['kd_data_source']}; load {setup.info['kd_data_load_s']} s "
              "(not timed below)")
    print("checked: ImageFolder and kd-runner list the same labels in the same order and the same pixels "
          f"(train {setup.info['same_images']['train']['pixel_checked_indices']}, test "
          f"{setup.info['same_images']['test']['pixel_checked_indices']} images compared); DeepNN "
          f"{TEACHER_PARAMS:,} / LightNN {STUDENT_PARAMS:,} params, identical initial weights in both arms")
    if not args.no_warmup:
        print(f"warm-up (arm-neutral, one fp32 step of each network): {warm_up(dev):.2f} s")

    arms: list[Arm] = [ReferenceArm(setup), KdRunnerArm(setup)]
    rows: list[dict] = []
    for r in range(args.repeats):
        order = arms if r % 2 == 0 else arms[::-1]
        for arm in arms:
            arm.new_repeat()
        for phase in expand(args.phases):
            for arm in order:
                row = {"repeat": r, "phase": phase, "arm": arm.name, **arm.measure(phase)}
                rows.append(row)
                print(describe(row), flush=True)
    torch.backends.cudnn.benchmark = False

    epochs = setup.trainer.student_epochs
    table, md = summarise(rows, dev.type == "cuda", epochs)
    kd_paths = arms[1].paths or {}
    steady = args.repeats > 1
    print()
    which = (f"steady state: median of repeats 2..{args.repeats} (repeat 1 is the cold start, below)" if steady else
             "one cold repeat: first-use costs (e.g. cuDNN autotuning, lazy kernel loads) are inside these rates; "
             "--repeats 3 separates them")
    print(f"## images/s, {which}; ratio = kd-runner / reference; {setup.n_train:,} train / {setup.n_test:,} test "
          f"images; {meta['device']}")
    print()
    print(md)
    print()
    kd_st = phase_stats(rows, "kd", "kd-runner")
    kd_mode = next((r.get("teacher_outputs") for r in rows if r["phase"] == "kd" and r["arm"] == "kd-runner"), None)
    if kd_mode == "live":
        print("kd-runner ran the teacher live on every batch (teacher_outputs=live): no cache pass.")
    elif kd_st is not None and kd_st["cache_seconds"] is not None:
        print(f"kd-runner teacher-output cache pass (one per distilled student, teacher_outputs={kd_mode}): "
              f"{kd_st['cache_seconds']:.3f} s for {setup.n_train:,} images"
              + (f" ({kd_st['cache_img_s']:,.0f} img/s)" if kd_st["cache_img_s"] else "")
              + f"; the amortised row is images / (epoch + cache pass / {epochs}).")
    if steady:
        print()
        print("### cold start (repeat 1): the first epoch / pass of each kind in this process; one-off = its time "
              "beyond a steady-state one")
        print()
        print(cold_table(rows))
        print()
    if kd_paths:
        print(f"kd-runner paths: {json.dumps(kd_paths)}")
    print("Peak RSS, sampled every 20 ms over the timed region, (+ growth over the process's RSS when the region "
          "began; imports alone hold several hundred MB): reference = main process + its DataLoader workers' "
          "private memory (USS from smaps_rollup, read 1 s after a worker starts, then every 5 s; the plain RSS sum, "
          "which counts pages shared with "
          "the parent again, is in the JSON); kd-runner = main process (it has no workers). The datasets each arm "
          f"holds are built before its region and counted. reference cudnn.benchmark={setup.reference_cudnn_benchmark}"
          " (the tutorial leaves it off).")
    if setup.memory:
        cost = {arm: (sum(r["sampler_cpu_s"] for r in rows if r["arm"] == arm),
                      sum(r["seconds"] for r in rows if r["arm"] == arm)) for arm in ARMS}
        print("Sampler thread CPU over the timed regions: " + "; ".join(
            f"{arm} {c:.2f} s in {t:.1f} s" for arm, (c, t) in cost.items()) + " (--no-memory to time without it).")
    print()
    parts, proj = project(rows, setup.full_train, setup.full_test)
    print(proj)
    if dev.type == "cuda":
        print("CUDA max alloc: torch.cuda.max_memory_allocated over the timed region (+ growth over what was "
              "allocated when it began: models kept from earlier phases).")
    print(f"\nbenchmark wall time {time.perf_counter() - wall0:.1f} s")

    if args.json:
        out = {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "setup": {**setup.info, "n_train": setup.n_train, "n_test": setup.n_test, "full_train": setup.full_train,
                         "full_test": setup.full_test, "reference_data": setup.reference_data,
                         "reference_cudnn_benchmark": setup.reference_cudnn_benchmark},
               "kd_runner_paths": kd_paths, "measurements": rows, "summary": table, "projection_seconds": parts}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
