"""Why ``trainer.channels_last`` and ``trainer.amp`` default the way they do: time one training step
(forward, backward, Adam) of the tutorial models in each memory format and precision, side by side.

    python benchmarks/compute_defaults.py                  # CPU, the tutorial's batch of 128
    python benchmarks/compute_defaults.py --device cuda

Prints seconds per step and each variant's speed relative to contiguous float32 for the same model.
Random inputs: this measures compute only (data handling is benchmarks/fast_vs_reference.py's job).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from kd_runner.models.tutorial import DeepNN, LightNN
from kd_runner.utils import keep_freed_memory


def step_seconds(model_cls, device: torch.device, channels_last: bool, bf16: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = model_cls(input_shape=(3, 32, 32), num_classes=10).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc as kd-train does (kd_runner.utils.keep_freed_memory); compare with a run "
                             "without it (the setting is process-wide)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        print("host allocator:", keep_freed_memory())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print("| model | memory format | precision | s/step | vs contiguous fp32 |\n|---|---|---|---|---|")
    for name, cls in (("DeepNN", DeepNN), ("LightNN", LightNN)):
        base = None
        for cl in (False, True):
            for bf16 in (False, True):
                s = step_seconds(cls, device, cl, bf16, args.batch, args.steps)
                base = base or s
                print(f"| {name} | {'channels_last' if cl else 'contiguous'} | {'bf16 autocast' if bf16 else 'fp32'} "
                      f"| {s:.4f} | {base / s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
