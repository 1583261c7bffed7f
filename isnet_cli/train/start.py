"""Starting one process's training run, or resuming it: the run folder, C1/C2, the objective, the
optimizer, the resumed state, --variant masked's pipeline and the config files; and `Run`, what the
loop's steps (`isnet_cli.train.epoch`) share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from isnet_cli.console import console
from isnet_cli.errors import InputError
from isnet_cli.objective.objective import Objective
from isnet_cli.objective.settings import Cuts
from isnet_cli.objective.tuning import parse_cut
from isnet_cli.train import run_folder
from isnet_cli.train.config import TrainConfig
from isnet_cli.train.data import DataBundle
from isnet_cli.train.health import Health, assess
from isnet_cli.train.run_folder import STEPS_FILE, checkpoint_meta, resolve_run_dir
from isnet_cli.train.state import RunState
from isnet_cli.train.trainer import Trainer


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
    plotted_at: float = -math.inf  # time.monotonic() of the last curves.png / diagnostics.png
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


def open_run_folder(cfg: TrainConfig, trainer: Trainer, resuming: bool) -> tuple[Path, RunState | None]:
    """The run folder (named by rank 0) and, when resuming, the saved state."""
    if resuming:
        run_dir = Path(cfg.out) / str(cfg.name)
        return run_dir, RunState.load(run_dir)
    run_dir = resolve_run_dir(cfg) if trainer.dist.main else Path()
    return Path(trainer.gather(str(run_dir))[0]), None


def start_run(
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
    from isnet_cli.pipeline import MaskedPipeline, parameter_count, segmenter_arch

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
        **segmenter_arch(meta),
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
    if run.segmenter is not None:
        _check_same_segmenter(run.run_dir, run.segmenter)
    resumed.restore(run.opt, run.sched, cfg.epochs, trainer.dist.rank)
    resumed.cuts = run.cuts
    run.state = resumed
    trainer.resume(resumed, run_folder.read_metrics(run.run_dir / STEPS_FILE))
    run.rows = [r for r in run_folder.read_metrics(run.run_dir / "metrics.csv") if int(r["epoch"]) <= resumed.epoch]
    run.best_row = next((r for r in run.rows if str(r["epoch"]) == str(resumed.best_epoch)), None)
    if run.main:
        console.print(f"resuming {run.run_dir} at epoch {resumed.epoch + 1}, step {resumed.step + 1}")


def _check_same_segmenter(run_dir: Path, segmenter: dict[str, Any]) -> None:
    """--variant masked resumed: the segmenter file must still hold the weights the run started with (a
    run folder records it by path; other weights there would mask the rest of the training differently)."""
    from isnet_cli.infer.checkpoint import read_meta

    started = (read_meta(run_dir / "last.safetensors").get("segmenter") or {}).get("id")
    if started is not None and started != segmenter["id"]:
        raise InputError(
            Path(segmenter["source"]),
            f"this segmenter changed since run {run_dir.name} started (id {started}, now {segmenter['id']})",
            f"put the segmenter with id {started} back at this path, or start a new run",
        )


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
        **({"segmenter_id": run.segmenter["id"]} if run.segmenter else {}),
    }
    run_folder.write_json(run_dir / "config.json", config)
    run_folder.write_yaml(
        run_dir / "config.yaml",
        cfg.recipe(),
        header=f"# isnet train --config {run_dir / 'config.yaml'}   (recipe of run {run_dir.name})\n",
    )
