"""Everything a resumed run needs, saved and loaded in one place (`RunState`, `last.state.pt`), and the
random-number state it restores. The state carries its own copy of the weights, written in the same
atomic write, so that a run killed between two files still resumes from a consistent point.

Under `deterministic` a resumed run ends with the same weights as an uninterrupted one: the state
holds the optimizer, the scheduler, every rank's RNG states, the epoch and step to continue at, the
checkpoint selection so far, the skipped-step count and the foreground bounds C1/C2.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isnet_cli.errors import InputError
from isnet_cli.io.atomic import atomic_write_bytes
from isnet_cli.objective.settings import Cuts
from isnet_cli.train.run_folder import STATE_FILE


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with `deterministic`, deterministic kernels too."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors / plain values (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class RunState:
    """Where a run stands: `epoch` is the next epoch to run (0-based), `step` the batches of it already
    done; `optimizer`, `scheduler` and `rng` (one entry per rank) are filled in by `capture`."""

    epoch: int = 0
    step: int = 0
    best_score: float | None = None
    best_epoch: Any = None
    skipped: int = 0
    cuts: Cuts | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)
    # The model weights this state continues from, saved in the same atomic write: a kill between writing
    # last.safetensors and this file can then never pair new weights with an old optimizer and epoch.
    weights: dict[str, torch.Tensor] | None = None
    # The fp16 loss scaler's state (`--amp` on CUDA), where a run uses one.
    scaler: dict[str, Any] | None = None

    def capture(
        self, opt: torch.optim.Optimizer, sched: Any, rng: list[dict[str, Any]], model: torch.nn.Module | None = None
    ) -> RunState:
        """This state with the optimizer's and scheduler's current state dicts, the ranks' RNG states and the
        model's weights."""
        if model is not None:
            self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.optimizer = opt.state_dict()
        self.scheduler = sched.state_dict() if sched is not None else None
        self.rng = rng
        return self

    def restore(self, opt: torch.optim.Optimizer, sched: Any, epochs: int, rank: int) -> None:
        """Load the optimizer, the scheduler (stretched to `epochs`: --epochs may extend a resumed run) and
        this rank's RNG states."""
        opt.load_state_dict(self.optimizer)
        if sched is not None and self.scheduler is not None:
            sched.load_state_dict(self.scheduler)
            sched.T_max = epochs
        set_rng_state(self.rng[rank])

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so that it loads with torch.load(weights_only=True)."""
        cuts = self.cuts or Cuts(None, "not used")
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "skipped": self.skipped,
            "cut": list(cuts.input) if cuts.input else None,
            "cut_source": cuts.source,
            "lds_cuts": cuts.record()["lds_cuts"],
            "weights": self.weights,
            "scaler": self.scaler,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RunState:
        """The state `to_dict` wrote."""
        cuts = None
        if state.get("cut") is not None:
            c = state["cut"]
            hidden = {name: (float(v[0]), float(v[1])) for name, v in (state.get("lds_cuts") or {}).items()}
            cuts = Cuts((float(c[0]), float(c[1])), str(state.get("cut_source", "resumed")), hidden)
        return cls(
            epoch=int(state["epoch"]),
            step=int(state["step"]),
            best_score=state.get("best_score"),
            best_epoch=state.get("best_epoch"),
            skipped=int(state.get("skipped", 0)),
            cuts=cuts,
            optimizer=state["optimizer"],
            scheduler=state.get("scheduler"),
            rng=state["rng"],
            weights=state.get("weights"),
            scaler=state.get("scaler"),
        )

    def save(self, run_dir: Path) -> None:
        """Write `last.state.pt` atomically."""
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        atomic_write_bytes(run_dir / STATE_FILE, buffer.getvalue())

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """Read the run folder's `last.state.pt`."""
        path = run_dir / STATE_FILE
        try:
            # weights_only: a state file that holds anything but tensors and plain values is refused
            # before any of it runs (a crafted pickle would otherwise execute code on --resume)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputError(path, "resume state missing", "resume a run folder written by `isnet train`") from None
        except Exception as exc:
            raise InputError(
                path,
                f"refused: not a weights-only training state ({type(exc).__name__}); "
                "loading it could run code or it is damaged",
                "start a new run, or resume from a state file that isnet wrote",
            ) from None
        return cls.from_dict(state)
