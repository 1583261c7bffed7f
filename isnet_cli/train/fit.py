"""The training loop as named steps, and its entry points.

`train(cfg)` runs one process, or spawns `cfg.devices` (DDP, see `ddp`). Each process: `_start` (data,
run folder, model, C1/C2, objective, optimizer, resume state, config files), then per epoch
`run_epoch` (`trainer`) -> `_validate` -> `_select` -> `_save_epoch` (checkpoints, resume state,
metrics, figures, model card). `variant="none"` is the standard classifier through the same code
(P = 0, no relevance pass); `method="rrr"` replaces the heatmap loss with the Right-for-the-Right-Reasons
input-gradient penalty.

Ctrl-C finishes the current step, saves `last` and raises `TrainingInterrupted` (exit 130); `resume`
restores weights and the `RunState`, so under `deterministic` a resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from isnet_cli.console import console, make_progress
from isnet_cli.distributed import Dist, process_group
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.objective.objective import Objective
from isnet_cli.objective.settings import Cuts
from isnet_cli.objective.tuning import parse_cut
from isnet_cli.train import ddp, run_folder, validation
from isnet_cli.train.card import model_card
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.data import DataBundle, prepare_data
from isnet_cli.train.health import Health, assess, epoch_status
from isnet_cli.train.run_folder import STEPS_FILE, checkpoint_meta, find_resume, load_resume_config, resolve_run_dir
from isnet_cli.train.state import RunState, rng_state, set_determinism
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


@dataclass
class Run:
    """One process's training run, as the loop's steps share it; `state` is where the run stands."""

    cfg: TrainConfig
    trainer: Trainer
    run_dir: Path
    model: nn.Module
    objective: Objective
    opt: Any
    sched: Any
    state: RunState
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_row: dict[str, Any] | None = None
    health: Health = field(default_factory=lambda: Health("ok", ""))
    # --variant masked: the segmenter-then-classifier module saved in the checkpoints, and its record
    pipeline: nn.Module | None = None
    segmenter: dict[str, Any] | None = None

    @property
    def saved_model(self) -> nn.Module:
        """What the checkpoints hold: the classifier, or with --variant masked the whole pipeline."""
        return self.pipeline if self.pipeline is not None else self.model

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder."""
        return self.trainer.dist.main

    @property
    def data(self) -> DataBundle:
        """The run's classes, samples and data summary."""
        return self.trainer.data

    @property
    def cuts(self) -> Cuts:
        """The foreground bounds C1/C2 in use (set before the first epoch)."""
        assert self.state.cuts is not None
        return self.state.cuts

    def meta(self, row: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint metadata after the epoch of `row`."""
        meta = checkpoint_meta(self.cfg, self.data.classes, self.trainer.contract, self.cuts, self.data.summary, row)
        return {**meta, "segmenter": self.segmenter} if self.segmenter else meta

    @property
    def majority(self) -> float:
        """The majority class's share of the validation set (what a constant guess scores)."""
        val_counts = self.data.summary["val_counts"].values()
        return max(val_counts) / max(1, sum(val_counts))

    def assess(self) -> Health:
        """The training-health verdict of the epochs so far (see `isnet_cli.train.health`)."""
        return assess(self.rows, self.best_row, self.majority, len(self.data.classes), self.cfg.uses_lrp_loss)


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
    run_dir, resumed = _run_folder(cfg, trainer, resuming)
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
        run = _start(cfg, trainer, model, run_dir, resumed, progress)
        for epoch in range(run.state.epoch, cfg.epochs):
            _epoch(run, epoch, progress)
        ddp.check_agreement(info, model)
    if info.main and not run.health.ok:
        console.print(f"[yellow]warning: {run.health.message}[/yellow]", soft_wrap=True)
    last = run.rows[-1] if run.rows else None
    return TrainResult(run_dir, run.best_row, last, run.cuts.input, model, trainer.skipped_total, run.health)


def _run_folder(cfg: TrainConfig, trainer: Trainer, resuming: bool) -> tuple[Path, RunState | None]:
    """The run folder (named by rank 0) and, when resuming, the saved state."""
    if resuming:
        run_dir = Path(cfg.out) / str(cfg.name)
        return run_dir, RunState.load(run_dir)
    run_dir = resolve_run_dir(cfg) if trainer.dist.main else Path()
    return Path(trainer.gather(str(run_dir))[0]), None


def _start(
    cfg: TrainConfig, trainer: Trainer, model: nn.Module, run_dir: Path, resumed: RunState | None, progress: Any
) -> Run:
    """C1/C2, the objective and the optimizer; the resumed state restored; config.json and config.yaml."""
    cuts = _resolve_cut(cfg, trainer, model, progress, resumed)
    objective = Objective(trainer.settings, model, trainer.device, cuts.input, cuts.hidden)
    if cfg.amp and cfg.uses_lrp_loss and trainer.dist.main:
        console.print(
            "[yellow]--amp: the relevance pass and the heatmap loss run in fp32; "
            "only plain forwards use autocast[/yellow]"
        )
    opt, sched = trainer.make_optimizer(model)
    run = Run(cfg, trainer, run_dir, model, objective, opt, sched, RunState(cuts=cuts))
    if cfg.masked:
        run.pipeline, run.segmenter = _pipeline(cfg, model, trainer)
    if resumed is not None:
        _resume(run, resumed)
    if run.main:
        _write_config(run)
    run.health = run.assess()
    return run


def _pipeline(cfg: TrainConfig, model: nn.Module, trainer: Trainer) -> tuple[nn.Module, dict[str, Any]]:
    """--variant masked: the segmenter (`--segmenter`) around the classifier, and its checkpoint record.
    Its input contract must place the radiograph like the classifier's (same resize and window)."""
    from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, resolve_model
    from isnet_cli.infer.onnx_runtime import model_id
    from isnet_cli.io.contract import InputContract
    from isnet_cli.pipeline import MaskedPipeline, parameter_count

    if not cfg.segmenter:
        raise InputError(None, "--variant masked needs a segmenter", "pass --segmenter RUN")
    path = resolve_model(cfg.segmenter)
    net, meta = load_segmenter_checkpoint(path, trainer.device)
    seg_contract, contract = InputContract.from_dict(meta["contract"]), trainer.contract
    for key in ("resize", "window"):
        if getattr(seg_contract, key) != getattr(contract, key):
            raise InputError(
                path,
                f"the segmenter's --{key} is {getattr(seg_contract, key)}, the classifier's {getattr(contract, key)}",
                f"train the classifier with --{key} {getattr(seg_contract, key)}",
            )
    for p in net.parameters():
        p.requires_grad_(False)
    record = {
        "source": str(path.resolve()),
        "id": model_id(path),
        "unet": meta["unet"],
        "contract": meta["contract"],
        "parameters": parameter_count(net),
        "metrics": meta.get("metrics"),
    }
    return MaskedPipeline(model, net, seg_contract.size, contract.low), record


def _resolve_cut(cfg: TrainConfig, trainer: Trainer, model: nn.Module, progress: Any, resumed: RunState | None) -> Cuts:
    """C1/C2: not used, resumed, given with --cut, or tuned after a plain warm-up."""
    if not cfg.uses_lrp_loss:
        return Cuts(None, "not used")
    if resumed is not None and resumed.cuts is not None:
        return resumed.cuts
    given = parse_cut(cfg.cut)
    if given is not None:
        return Cuts(given, "--cut")
    first, *hidden = trainer.tune_cut(model, progress, keep_weights=cfg.starts_from_warm_up)
    if trainer.dist.main:
        console.print(f"C1/C2 tuned after a {cfg.cut_epochs}-epoch plain warm-up: C1={first[0]:.4g}, C2={first[1]:.4g}")
        for name, (c1, c2) in zip(trainer.lds_layers, hidden, strict=True):
            console.print(f"  LDS layer {name}: C1={c1:.4g}, C2={c2:.4g}")
    return Cuts(first, f"auto ({cfg.cut_epochs}-epoch warm-up)", dict(zip(trainer.lds_layers, hidden, strict=True)))


def _resume(run: Run, resumed: RunState) -> None:
    """Continue where the saved state stopped: optimizer, scheduler, RNG, metrics rows, best checkpoint."""
    trainer, cfg = run.trainer, run.cfg
    resumed.restore(run.opt, run.sched, cfg.epochs, trainer.dist.rank)
    resumed.cuts = run.cuts
    run.state = resumed
    trainer.resume(resumed, run_folder.read_metrics(run.run_dir / STEPS_FILE))
    run.rows = [r for r in run_folder.read_metrics(run.run_dir / "metrics.csv") if int(r["epoch"]) <= resumed.epoch]
    run.best_row = next((r for r in run.rows if str(r["epoch"]) == str(resumed.best_epoch)), None)
    if run.main:
        console.print(f"resuming {run.run_dir} at epoch {resumed.epoch + 1}, step {resumed.step + 1}")


def _write_config(run: Run) -> None:
    """config.json (everything, as run) and config.yaml (the recipe, for `isnet train --config`)."""
    cfg, run_dir = run.cfg, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **dataclasses.asdict(cfg),
        "name": run_dir.name,
        **run.cuts.record(),
        "background_swap": cfg.background_swap,
        "warm_start_used": cfg.starts_from_warm_up,
        "ramp_epochs": cfg.ramp_epochs,
        "classes": run.data.classes,
        "world_size": run.trainer.dist.world,
        "contract": run.trainer.contract.to_dict(),
    }
    run_folder.write_json(run_dir / "config.json", config)
    run_folder.write_yaml(
        run_dir / "config.yaml",
        cfg.recipe(),
        header=f"# isnet train --config {run_dir / 'config.yaml'}   (recipe of run {run_dir.name})\n",
    )


def _epoch(run: Run, epoch: int, progress: Any) -> None:
    """Train one epoch, validate, select, save; a Ctrl-C ends the run after saving."""
    t0 = time.perf_counter()
    means, step, stopped = run.trainer.run_epoch(run.model, run.objective, run.opt, epoch, run.state.step, progress)
    if stopped and step < run.trainer.steps_per_epoch:
        _save_interrupted(run, epoch, step)
    run.state.step = 0
    row = _validate(run, epoch, means, t0)
    if run.sched is not None:
        run.sched.step()
    improved = _select(run, row)
    run.rows.append(row)
    run.health = run.assess()
    _save_epoch(run, epoch, row, improved)
    if stopped and epoch + 1 < run.cfg.epochs:
        raise TrainingInterrupted(
            f"interrupted after epoch {epoch + 1}: saved {run.run_dir / 'last.safetensors'}; "
            f"continue with: isnet train --resume {run.run_dir}"
        )


def _validate(run: Run, epoch: int, means: dict[str, float], t0: float) -> dict[str, Any]:
    """The epoch's metrics.csv row: training means, validation (after precise BN) and OOD scores."""
    trainer, cfg, model = run.trainer, run.cfg, run.model
    if cfg.precise_bn:
        validation.recalibrate_bn(trainer, model)
    trainer.broadcast_buffers(model)
    val = validation.evaluate(trainer, model, run.objective, trainer.sets.val, with_heat=True)
    ood_ds = trainer.sets.ood
    ood = validation.evaluate(trainer, model, run.objective, ood_ds, with_heat=False) if ood_ds is not None else None
    row = {
        "epoch": epoch + 1,
        **{f"train_{k}": v for k, v in means.items()},
        **{f"val_{k}": v for k, v in val.items()},
        "ood_ce": ood["ce"] if ood else None,
        "ood_accuracy": ood["accuracy"] if ood else None,
        "lr": run.opt.param_groups[0]["lr"],
        "skipped_steps": trainer.skipped_total,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    row["health"] = epoch_status(row, run.majority, len(run.data.classes), cfg.uses_lrp_loss)
    return row


def _select(run: Run, row: dict[str, Any]) -> bool:
    """Is this epoch the best so far by --select-by (loss: lower; the others: higher)? Records it if so."""
    key = {"loss": "val_loss", "accuracy": "val_accuracy", "auroc": "val_auroc", "macro_f1": "val_macro_f1"}
    value = row.get(key[run.cfg.select_by])
    score = float(value) if value is not None else float("nan")
    best = run.state.best_score
    lower = run.cfg.select_by == "loss"
    improved = best is None or (math.isfinite(score) and (score < best if lower else score > best))
    if improved:
        run.state.best_score, run.best_row = score, row
    return improved


def _save_state(run: Run, epoch: int, step: int) -> None:
    """Rank 0 writes last.state.pt: continue at (`epoch`, `step`); every rank's RNG states gathered first."""
    rng = run.trainer.gather(rng_state())
    if not run.main:
        return
    state = run.state
    state.epoch, state.step, state.skipped = epoch, step, run.trainer.skipped_total
    state.best_epoch = run.best_row.get("epoch") if run.best_row else None
    state.capture(run.opt, run.sched, rng, run.model).save(run.run_dir)


def _save_interrupted(run: Run, epoch: int, step: int) -> None:
    """Ctrl-C mid-epoch: save `last` and the state to continue at this step, then stop the run."""
    run.trainer.broadcast_buffers(run.model)
    last = run.run_dir / "last.safetensors"
    if run.main:
        save_checkpoint(last, run.saved_model, run.meta({"epoch": epoch, "partial_steps": step}))
    _save_state(run, epoch, step)
    if run.main:
        run_folder.write_metrics(run.run_dir / STEPS_FILE, run.trainer.step_rows, run_folder.STEP_COLUMNS)
    raise TrainingInterrupted(
        f"interrupted at epoch {epoch + 1}, step {step}: saved {last}; "
        f"continue with: isnet train --resume {run.run_dir}"
    )


def _save_epoch(run: Run, epoch: int, row: dict[str, Any], improved: bool) -> None:
    """End-of-epoch writes (rank 0): checkpoints, resume state, metrics, figures, model card, one line."""
    if run.main:
        save_checkpoint(run.run_dir / "last.safetensors", run.saved_model, run.meta(row))
        if improved:
            save_checkpoint(run.run_dir / "best.safetensors", run.saved_model, run.meta(row))
    _save_state(run, epoch + 1, 0)
    if not run.main:
        return
    run_dir, trainer = run.run_dir, run.trainer
    run_folder.write_metrics(run_dir / "metrics.csv", run.rows)
    run_folder.write_metrics(run_dir / STEPS_FILE, trainer.step_rows, run_folder.STEP_COLUMNS)
    run_folder.plot_curves(run_dir / "curves.png", run.rows)
    run_folder.plot_steps(run_dir / "diagnostics.png", trainer.step_rows)
    validation.heatmap_figure(trainer, run.model, run.objective.lrp, run_dir / "heatmaps" / f"epoch_{epoch + 1}.png")
    card = model_card(
        dataclasses.asdict(run.cfg), run.meta(run.best_row or row), run.best_row, run_dir, run.health.message
    )
    run_folder.write_text(run_dir / "card.md", card)
    _report_epoch(row, run.cfg, improved)


def _stats_column() -> Any:
    """The progress bar's column of step statistics (loss terms, throughput)."""
    from rich.progress import TextColumn

    return TextColumn("{task.fields[stats]}")


def _report_epoch(row: dict[str, Any], cfg: TrainConfig, improved: bool) -> None:
    """One terminal line per epoch."""
    parts = [
        f"epoch {row['epoch']}/{cfg.epochs}",
        f"train loss {row['train_loss']:.4f}",
        f"val loss {row['val_loss']:.4f}",
        f"acc {row['val_accuracy']:.3f}",
        f"auroc {row['val_auroc']:.3f}",
    ]
    if row.get("val_share_inside") is not None:
        parts.append(f"in-mask {row['val_share_inside']:.3f}")
    if row.get("ood_accuracy") is not None:
        parts.append(f"ood acc {row['ood_accuracy']:.3f}")
    console.print("  ".join(parts) + ("  [green]best[/green]" if improved else ""), soft_wrap=True)
