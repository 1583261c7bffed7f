"""Multi-process training plumbing: a process's place in the group (`Dist`), the process group's
lifetime, and `--devices N` spawning (what torchrun does, on one machine).

Each process reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from its environment,
as under torchrun; `spawn` sets them for the processes it starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's rank, the number of processes, and its rank on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


@contextlib.contextmanager
def process_group(info: Dist, device: str) -> Iterator[None]:
    """The default process group of a multi-process run (NCCL for CUDA devices, gloo otherwise), unless
    one exists already. After a normal run every rank meets at a barrier before the group is destroyed:
    a rank that tore its gloo connections down while another was still inside the last collective
    made that process abort (SIGABRT) at the very end of a good run."""
    started = False
    if info.world > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    finished = False
    try:
        yield
        finished = True
    finally:
        if started:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_worker(code: int = 0) -> NoReturn:
    """End a finished process of a multi-process run at once: flush stdout/stderr, then `os._exit`.

    Skipping the interpreter's teardown is deliberate: in CI a finished gloo worker, its files all
    written, was sometimes aborted after its run (SIGABRT, "terminate called without an active
    exception", the message of a C++ thread object destroyed while still joinable, as teardown does),
    which turned a good run into a failed one.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _entry(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    fn(*args)  # an exception propagates to torch.multiprocessing, which reports it to the parent
    exit_worker(0)


def spawn(fn: Callable[..., Any], args: tuple[Any, ...], processes: int) -> None:
    """Run fn(*args) in `processes` fresh processes with the torchrun environment set (each leaves through
    `exit_worker` when fn returns); a failure in any of them raises
    torch.multiprocessing.ProcessRaisedException (its message ends with the child's
    "module.ExceptionType: message")."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(fn, args, processes, free_port()), nprocs=processes, start_method="spawn")
