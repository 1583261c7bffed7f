"""What multi-process (DDP) training adds to the loop: gradient all-reduce, broadcast of weights and
batch-norm buffers, gathering objects from every rank, the final agreement check, and `--devices N`
spawning with the children's errors turned back into the CLI's. The process group's lifetime and the
low-level spawn are in `isnet_cli.distributed`. With one process every function is a no-op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from isnet_cli.distributed import Dist, spawn
from isnet_cli.errors import InputError, IsnetError
from isnet_cli.train.stop import TrainingInterrupted


def gather(info: Dist, obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order."""
    if info.world == 1:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_weights(info: Dist, model: nn.Module) -> None:
    """Every tensor of the state dict from rank 0: all ranks start from the same initialisation."""
    if info.world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def broadcast_buffers(info: Dist, model: nn.Module) -> None:
    """BN running statistics from rank 0 (as DDP does), so every rank validates and saves the same model."""
    if info.world > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def sync_gradients(info: Dist, model: nn.Module, bad: bool, stop: bool, device: torch.device) -> tuple[bool, bool]:
    """All-reduce (average) the gradients and OR the 'bad step' / 'stop' flags over ranks."""
    if info.world == 1:
        return bad, stop
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None and not bad else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(bad), float(stop)], device=device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = (flat[offset : offset + n] / info.world).view_as(p).to(p.dtype)
        offset += n
    return bool(flat[-2] > 0), bool(flat[-1] > 0)


def sum_over_ranks(info: Dist, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over ranks (through `device`, which the backend needs)."""
    if info.world == 1:
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def average_over_ranks(info: Dist, buffers: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over ranks (batch-norm statistics of precise BN)."""
    if info.world > 1:
        for buf in buffers:
            dist.all_reduce(buf)
            buf /= info.world


def check_agreement(info: Dist, model: nn.Module) -> None:
    """Under DDP every rank must end with identical weights (a cheap checksum comparison)."""
    if info.world == 1:
        return
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    sums = gather(info, checksum)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise IsnetError(f"DDP ranks disagree on the final weights (checksums {sums}); please report this")


def spawn_training(process: Callable[..., Any], args: tuple[Any, ...], devices: int) -> None:
    """`--devices N`: `process(*args)` in N processes on this machine (one GPU each, or gloo on CPU), like
    torchrun; a child's interruption or input error is raised here as the same error type."""
    import torch.multiprocessing as mp

    try:
        spawn(process, args, devices)
    except mp.ProcessRaisedException as exc:
        # the child's traceback ends with "module.ExceptionType: message": keep the type's exit code
        kind, _, message = str(exc).strip().splitlines()[-1].partition(": ")
        if kind.endswith("TrainingInterrupted"):
            raise TrainingInterrupted(message) from None
        if kind.endswith("InputError"):
            raise InputError(None, message) from None
        raise IsnetError(f"a training process failed: {kind}: {message}") from None
