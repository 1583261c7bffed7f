"""The training loop as named steps, and its entry points.

`train(cfg)` runs one process, or spawns `cfg.devices` (DDP, see `ddp`). Each process: data, model
and `start_run` (`start`: run folder, C1/C2, objective, optimizer, resume state, config files), then
per epoch `one_epoch` (`epoch`): `run_epoch` (`trainer`) -> validate (`validation`) -> select -> save
(checkpoints, resume state, metrics, figures, model card). `variant="none"` is the standard classifier
through the same code (P = 0, no relevance pass); `method="rrr"` replaces the heatmap loss with the
Right-for-the-Right-Reasons input-gradient penalty.

Ctrl-C finishes the current step, saves `last` and raises `TrainingInterrupted` (exit 130); `resume`
restores weights and the `RunState`, so under `deterministic` a resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from isnet_cli.console import console, make_progress
from isnet_cli.distributed import Dist, process_group
from isnet_cli.train import ddp, run_folder
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.data import prepare_data
from isnet_cli.train.epoch import one_epoch
from isnet_cli.train.health import Health
from isnet_cli.train.run_folder import find_resume, load_resume_config, resolve_run_dir
from isnet_cli.train.start import open_run_folder, start_run
from isnet_cli.train.state import set_determinism
from isnet_cli.train.stop import StopFlag, TrainingDiverged, TrainingInterrupted
from isnet_cli.train.trainer import StepCallback, Trainer

__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train", "train_process"]


@dataclass
class TrainResult:
    """What `train` returns on the calling process."""

    run_dir: Path
    best: dict[str, Any] | None
    last: dict[str, Any] | None
    cut: tuple[float, float] | None
    model: nn.Module | None = None
    skipped_steps: int = 0
    health: Health | None = None  # did the run learn (see isnet_cli.train.health)


# ---------------------------------------------------------------------------------------------- entry points


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    resume_overrides: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train as configured (or continue the run `resume`); spawns `cfg.devices` processes if > 1."""
    if resume is not None:
        run_dir = find_resume(resume)
        cfg = load_resume_config(run_dir, resume_overrides or {})
    cfg.validate()
    if cfg.devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _spawn(cfg, resume is not None)
    return train_process(cfg, resume is not None, on_step)


def train_process(cfg: TrainConfig, resuming: bool, on_step: StepCallback | None = None) -> TrainResult:
    """One process of a run (the only one, or a rank of DDP with RANK/WORLD_SIZE in its environment)."""
    info = Dist.from_env()
    stop = StopFlag()
    stop.install()
    try:
        with process_group(info, cfg.device):
            return _fit(cfg, resuming, info, stop, on_step)
    finally:
        stop.uninstall()


def _spawn(cfg: TrainConfig, resuming: bool) -> TrainResult:
    """`--devices N`: N processes on this machine; the run folder is named here so that all ranks agree."""
    if not resuming:
        cfg = dataclasses.replace(cfg, name=resolve_run_dir(cfg).name)
    ddp.spawn_training(train_process, (cfg, resuming), cfg.devices)
    run_dir = Path(cfg.out) / str(cfg.name)
    rows = run_folder.read_metrics(run_dir / "metrics.csv")
    return TrainResult(run_dir, None, rows[-1] if rows else None, None, None)


# ---------------------------------------------------------------------------------------------- the loop


def _fit(cfg: TrainConfig, resuming: bool, info: Dist, stop: StopFlag, on_step: StepCallback | None) -> TrainResult:
    """Start, train every remaining epoch, check that the ranks agree, warn when the run did not learn."""
    set_determinism(cfg.seed, cfg.deterministic)
    trainer = Trainer(cfg, info, stop, prepare_data(cfg), on_step)
    trainer.check_files()
    run_dir, resumed = open_run_folder(cfg, trainer, resuming)
    model = trainer.build_model()
    if resumed is not None:
        from safetensors.torch import load_file

        if resumed.weights:  # the model's weights, saved in the same atomic write as the state
            weights = resumed.weights
        else:  # a state from before that: last.safetensors was written with it (a pipeline's holds both stages)
            weights = load_file(str(run_dir / "last.safetensors"))
            if cfg.masked:
                weights = {k.removeprefix("classifier."): v for k, v in weights.items() if k.startswith("classifier.")}
        model.load_state_dict({k: v.to(trainer.device) for k, v in weights.items()})
    with make_progress(trainer.progress_on, _stats_column()) as progress:
        run = start_run(cfg, trainer, model, run_dir, resumed, progress)
        for epoch in range(run.state.epoch, cfg.epochs):
            one_epoch(run, epoch, progress)
        ddp.check_agreement(info, model)
    if info.main and not run.health.ok:
        console.print(f"[yellow]warning: {run.health.message}[/yellow]", soft_wrap=True)
    last = run.rows[-1] if run.rows else None
    return TrainResult(run_dir, run.best_row, last, run.cuts.input, model, trainer.skipped_total, run.health)


def _stats_column() -> Any:
    """The progress bar's column of step statistics (loss terms, throughput)."""
    from rich.progress import TextColumn

    return TextColumn("{task.fields[stats]}")
