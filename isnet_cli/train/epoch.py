"""One epoch of the training loop as named steps: train (`Trainer.run_epoch`), validate, select, save
(checkpoints, resume state, metrics, figures, model card, one terminal line). A Ctrl-C saves `last` and
the state to continue from, and ends the run with `TrainingInterrupted`."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from isnet_cli.console import console
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.train import run_folder, validation
from isnet_cli.train.card import model_card
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.health import epoch_status
from isnet_cli.train.run_folder import STEPS_FILE
from isnet_cli.train.start import Run
from isnet_cli.train.state import rng_state
from isnet_cli.train.stop import TrainingInterrupted

# curves.png and diagnostics.png are drawn after the first epoch, then at most this often, and always after
# the last epoch or an interruption: drawing them takes about 1.4 s, as long as a whole epoch of a small run
# (the test suite's trainings spent much of their time drawing). Long epochs still redraw after every epoch.
PLOT_EVERY_SECONDS = 30.0


def one_epoch(run: Run, epoch: int, progress: Any) -> None:
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
    _save_epoch(run, epoch, row, improved, final=stopped or epoch + 1 == run.cfg.epochs)
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
        _plot(run)
    raise TrainingInterrupted(
        f"interrupted at epoch {epoch + 1}, step {step}: saved {last}; "
        f"continue with: isnet train --resume {run.run_dir}"
    )


def _plot(run: Run) -> None:
    """curves.png (per epoch) and diagnostics.png (per step) from the rows so far (rank 0)."""
    run_folder.plot_curves(run.run_dir / "curves.png", run.rows)
    run_folder.plot_steps(run.run_dir / "diagnostics.png", run.trainer.step_rows)
    run.plotted_at = time.monotonic()


def _save_epoch(run: Run, epoch: int, row: dict[str, Any], improved: bool, final: bool) -> None:
    """End-of-epoch writes (rank 0): checkpoints, resume state, metrics, figures (the curves at most every
    `PLOT_EVERY_SECONDS`, and when the run ends), model card, one line."""
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
    if final or time.monotonic() - run.plotted_at >= PLOT_EVERY_SECONDS:
        _plot(run)
    validation.heatmap_figure(trainer, run.model, run.objective.lrp, run_dir / "heatmaps" / f"epoch_{epoch + 1}.png")
    card = model_card(
        dataclasses.asdict(run.cfg), run.meta(run.best_row or row), run.best_row, run_dir, run.health.message
    )
    run_folder.write_text(run_dir / "card.md", card)
    _report_epoch(row, run.cfg, improved)


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
