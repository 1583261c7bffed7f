"""Training-step cost of ISNet variants relative to the plain classifier (same model, batch and input).

    python benchmarks/train_speed.py                       # ResNet-18 and DenseNet-121, 128 px, batch 8
    python benchmarks/train_speed.py --arch resnet18 --steps 5 --device cuda

A step is the production step of `isnet_cli.objective.objective.Objective`: forward (through the LRP engine for ISNet
variants), loss, backward, gradient clipping and an AdamW update (fused, as in training). Variants are timed side by
side, interleaved round-robin, and the median step time is reported, so machine load hits all of them alike.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` during the steps. On CPU (Linux), each variant
runs in its own subprocess, which resets its peak-RSS mark (`/proc/self/clear_refs`), runs two steps and
reports peak RSS (VmHWM) minus the RSS just before the first step: the extra memory the OS had to
provide for the steps (activations, relevance, gradients, optimizer state). Twice: with glibc's
default allocator ("RSS", what a user's process shows; glibc keeps freed blocks for reuse, so
fragmentation inflates it), and with MALLOC_MMAP_THRESHOLD_=65536 ("live"), where every large tensor
is its own mapping returned to the OS when freed, so the peak follows the live tensors (the CPU
counterpart of CUDA's max_memory_allocated; too slow for the timed runs).

Targets this benchmark checks: selective <= 3.0x plain; original with 3 classes <= 6x plain on DenseNet-121;
peak memory <= 2.5x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from isnet_cli.backbones import build_model
from isnet_cli.device import fused_optimizer
from isnet_cli.objective.objective import Objective
from isnet_cli.train.config import TrainConfig

# (label, variant, number of classes)
CASES = (
    ("plain", "none", 2),
    ("selective", "selective", 2),
    ("stochastic", "stochastic", 2),
    ("original K=2", "original", 2),
    ("plain K=3", "none", 3),
    ("original K=3", "original", 3),
)


def make_step(arch: str, variant: str, classes: int, size: int, batch: int, device: torch.device):
    """A closure running one full training step of the given variant."""
    torch.manual_seed(0)
    model = build_model(arch, classes).to(device).train()
    cfg = TrainConfig(arch=arch, variant=variant, img_size=size, batch_size=batch, device=str(device))
    objective = Objective(cfg.objective_settings(), model, device, (1.0, 25.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_optimizer(device))
    x = torch.rand(batch, 1, size, size, device=device)
    mask = torch.zeros(batch, 1, size, size, device=device)
    mask[:, :, size // 5 : -size // 5, size // 6 : -size // 6] = 1
    y = torch.arange(batch, device=device) % classes

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = objective(x, mask, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def time_cases(arch: str, size: int, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    closures = {label: make_step(arch, variant, k, size, batch, device) for label, variant, k in CASES}
    for fn in closures.values():  # warm-up (allocator, lazy init)
        fn()
    times: dict[str, list[float]] = {label: [] for label in closures}
    for _ in range(steps):
        for label, fn in closures.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in times.items()}


def _status_kb(field: str) -> int:
    """A kB field of /proc/self/status (Linux): VmRSS (resident now), VmHWM (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(
    arch: str, variant: str, classes: int, size: int, batch: int, device: torch.device, live: bool = False
) -> float:
    """Bytes: CUDA max allocated during 2 steps, or (CPU, in a subprocess) the peak-RSS growth; `live`:
    with large allocations unmapped as soon as they are freed."""
    if device.type == "cuda":
        step = make_step(arch, variant, classes, size, batch, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        step()
        return float(torch.cuda.max_memory_allocated(device) - base)
    code = (
        "import json, sys, torch\n"
        "from benchmarks.train_speed import make_step, _status_kb\n"
        f"step = make_step({arch!r}, {variant!r}, {classes}, {size}, {batch}, torch.device('cpu'))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "before = _status_kb('VmRSS')\n"
        "step(); step()\n"
        "print(json.dumps((_status_kb('VmHWM') - before) * 1024))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if live else None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="architecture(s) (default: resnet18 and densenet121)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    archs = args.arch or ["resnet18", "densenet121"]
    torch.set_grad_enabled(True)
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.size} px, batch {args.batch}, "
        f"median of {args.steps} steps"
    )
    kinds = ["CUDA"] if device.type == "cuda" else ["RSS", "live"]
    header = "".join(f" {kind + ' MB':>9} {'x':>5}" for kind in kinds)
    print(f"{'arch':<12} {'case':<14} {'step s':>8} {'x plain':>8}{header}")
    for arch in archs:
        times = time_cases(arch, args.size, args.batch, args.steps, device)
        mems: dict[str, dict[str, float]] = {}
        if not args.no_memory:
            for kind in kinds:
                mems[kind] = {
                    label: peak_memory(arch, variant, k, args.size, args.batch, device, live=kind == "live")
                    for label, variant, k in CASES
                }
        for label, _variant, k in CASES:
            ref = "plain K=3" if k == 3 else "plain"
            line = f"{arch:<12} {label:<14} {times[label]:8.3f} {times[label] / times[ref]:8.2f}"
            for by_case in mems.values():
                line += f" {by_case[label] / 2**20:9.1f} {by_case[label] / by_case[ref]:5.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
