"""Where torch runs: `--device auto|cpu|cuda|cuda:N`, resolved and checked in one place; `--amp`'s autocast
and loss scaler, and the optimizers' fused kernels, for that device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from isnet_cli.errors import InputError


def resolve_device(spec: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """auto -> cuda (this rank's GPU) if available, else cpu; cuda:N and cpu as given (checked)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {spec}: no CUDA GPU is available", "use --device cpu or auto")
        if spec == "cuda":
            spec = f"cuda:{local_rank % torch.cuda.device_count()}" if world > 1 else "cuda"
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(None, f"--device {spec}: only {torch.cuda.device_count()} GPU(s)", "pick another index")
        return device
    if spec != "cpu":
        raise InputError(None, f"--device {spec}: unknown device", "use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """`--amp`: mixed-precision autocast for forwards on `device` (fp16 on CUDA, bf16 on CPU); a no-op
    context when not `enabled`. Losses should be computed on `.float()` outputs."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler that fp16 autocast needs on CUDA (bf16 on CPU has fp32's range: disabled there)."""
    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")


def fused_optimizer(device: torch.device) -> bool:
    """Whether torch's fused Adam/AdamW/SGD kernels run on `device` (CPU and CUDA): one pass over all the
    parameters instead of a loop of small ops per tensor. On one CPU thread an AdamW step of ResNet-18
    takes 10 ms fused and 74 ms looped: the saving is about 15% of a plain training step at 64 px
    (batch 16) and 6% of an ISNet step."""
    return device.type in ("cpu", "cuda")
