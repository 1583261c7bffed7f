"""`isnet segment train`: a MONAI U-Net trained on image + mask pairs; writes the run folder runs/<name>/.

Data come through the readers and the preprocessing of `isnet train` (`isnet_cli.io`: manifests or
images/ + masks/ folders, decoded once into the cache, the same augmentation on image and mask). Loss:
MONAI `DiceCELoss` (soft Dice + cross-entropy on the softmax of 2 classes). Validation per epoch: MONAI
`DiceMetric` and `HausdorffDistanceMetric(percentile=95)` on the lung class of the argmax mask, in pixels
of the model input; best.safetensors is the epoch with the highest validation Dice. After the last epoch
the clean-up's closing radius is chosen on the validation images at their original geometry and recorded
in best.safetensors (`isnet_cli.segment.closing`).

The conventions of `isnet train`, through its pieces: the batch order depends only on (seed, epoch)
(`EpochSampler`); after every epoch `last.state.pt` (`RunState`: weights, optimizer, scheduler, loss
scaler, every rank's RNG states, the next epoch and the best score) is written, so `--resume` continues
an interrupted run exactly where its last epoch ended; `--amp` runs the forwards under autocast (bf16 on
CPU, fp16 with a loss scaler on CUDA, `isnet_cli.device`); `--devices N` spawns N processes
(`isnet_cli.train.ddp`: gradients averaged over ranks, each rank a shard of every epoch's batches; every
rank validates the whole validation set, rank 0 writes the run folder).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from isnet_cli.console import make_progress, progress_enabled, say
from isnet_cli.device import autocast, fused_optimizer, grad_scaler, resolve_device
from isnet_cli.distributed import Dist, process_group
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.io.dataset import XrayDataset, read_dataset, split_samples
from isnet_cli.pipeline import build_unet
from isnet_cli.segment.closing import describe, record_closing
from isnet_cli.segment.config import SegmentConfig
from isnet_cli.segment.model import segmenter_meta
from isnet_cli.train import ddp, run_folder
from isnet_cli.train.data import EpochSampler
from isnet_cli.train.state import RunState, rng_state, set_determinism

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_hd95", "lr", "seconds")


@dataclass
class SegmentResult:
    """What `train_segmenter` returns: the run folder, the best and last metrics rows, the trained net (None
    after `--devices N`: it stayed in the spawned processes)."""

    run_dir: Path
    best: dict[str, Any]
    last: dict[str, Any]
    model: nn.Module | None


def _datasets(cfg: SegmentConfig, progress: bool) -> tuple[XrayDataset, XrayDataset, dict[str, Any]]:
    """Training and validation datasets (every image needs a mask), and the data summary for the checkpoint."""
    spec = read_dataset(cfg.data, require_labels=False)
    if cfg.val:
        train, val, source = spec.samples, read_dataset(cfg.val, require_labels=False).samples, f"--val {cfg.val}"
    else:
        train, val = split_samples(spec.samples, cfg.val_fraction, cfg.seed)
        source = f"split of the training data (val fraction {cfg.val_fraction}, seed {cfg.seed})"
    unmasked = [s.image for s in [*train, *val] if s.mask is None]
    if unmasked:
        more = f" (and {len(unmasked) - 1} more)" if len(unmasked) > 1 else ""
        raise InputError(unmasked[0], f"no mask{more}", "a segmenter trains on image + mask pairs: add a mask column")
    if not val:
        raise InputError(cfg.data, "the validation split is empty", "pass --val DATA or use more images")
    if len(train) < cfg.batch_size:
        raise InputError(cfg.data, f"only {len(train)} training images for batch size {cfg.batch_size}", "lower it")
    contract = cfg.contract()
    cache = Path(cfg.cache) if cfg.cache else Path(cfg.out) / ".cache"
    classes = sorted({s.label for s in [*train, *val] if s.label is not None})
    sets = (
        XrayDataset(train, classes, contract, cache_dir=cache, augment=cfg.augment),
        XrayDataset(val, classes, contract, cache_dir=cache),
    )
    problems = [str(e) for ds in sets for e in ds.prefetch(progress)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(None, f"{len(problems)} unusable file(s): " + " | ".join(problems[:3]) + more)
    summary = {
        "manifest": str(Path(cfg.data).resolve()),
        "train": len(train),
        "val": len(val),
        "val_source": source,
    }
    return sets[0], sets[1], summary


def _evaluate(
    net: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Mean validation loss, Dice and HD95 (pixels; NaN-free mean over masks where both are non-empty);
    with `amp` the forwards run under autocast, the loss and the metrics in fp32."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean")
    total, n = 0.0, 0
    net.eval()
    # MONAI's surface-distance helper warns about its own deprecated argument on every call
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        for x, m, _ in loader:
            x, m = x.to(device), m.to(device)
            with autocast(device, amp):
                logits = net(x)
            logits = logits.float()
            total += float(loss_fn(logits, m)) * len(x)
            n += len(x)
            pred = nn.functional.one_hot(logits.argmax(1), 2).permute(0, 3, 1, 2).float()
            true = nn.functional.one_hot(m[:, 0].long(), 2).permute(0, 3, 1, 2).float()
            dice(pred, true)
            hd95(pred, true)
    hd = hd95.get_buffer()
    finite = hd[torch.isfinite(hd)] if hd is not None else torch.empty(0)
    return {
        "val_loss": total / max(n, 1),
        "val_dice": float(dice.aggregate()),
        "val_hd95": float(finite.mean()) if finite.numel() else math.nan,
    }


def contour_figure(path: Path, net: nn.Module, ds: XrayDataset, n: int, device: torch.device) -> None:
    """contours.png: the first `n` validation images with the true (green) and predicted (red) lung outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(ds))
    if n == 0:
        return
    items = [ds[i] for i in range(n)]
    x = torch.stack([it[0] for it in items]).to(device)
    net.eval()
    with torch.no_grad():
        pred = net(x).argmax(1).cpu().numpy()
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(items[i][0][0].numpy(), cmap="gray")
        for mask, colour in ((items[i][1][0].numpy(), "lime"), (pred[i], "red")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(ds.samples[i].image.name, fontsize=6)
        ax.axis("off")
    fig.suptitle("validation: true (green) vs predicted (red) lung contours", fontsize=8)
    fig.tight_layout()
    run_folder.save_figure(fig, path)


@dataclass
class _Run:
    """One process's training run, as the loop's steps share it."""

    cfg: SegmentConfig
    info: Dist
    device: torch.device
    run_dir: Path
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    val_ds: XrayDataset
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_score: float | None  # the best validation Dice at full precision (the rows are read back rounded)


def train_segmenter(
    cfg: SegmentConfig, resume: str | Path | None = None, resume_overrides: dict[str, Any] | None = None
) -> SegmentResult:
    """Train as configured, or continue the run `resume` (its run folder or a checkpoint in it; the runtime
    options of `resume_overrides` replace the run's own); spawns `cfg.devices` processes if > 1. Writes
    best/last.safetensors, last.state.pt, metrics.csv, contours.png, config.json."""
    if resume is not None:
        run_dir = run_folder.find_resume(resume, "isnet segment train")
        cfg = run_folder.load_resume_config(run_dir, resume_overrides or {}, SegmentConfig)
    cfg.validate()
    if cfg.devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if resume is None:  # named here, so that all ranks agree
            cfg = dataclasses.replace(cfg, name=run_folder.resolve_run_dir(cfg).name)
        ddp.spawn_training(segment_process, (cfg, resume is not None), cfg.devices)
        run_dir = Path(cfg.out) / str(cfg.name)
        rows = run_folder.read_metrics(run_dir / "metrics.csv")
        best = max(rows, key=lambda r: float(r["val_dice"]))
        return SegmentResult(run_dir, _numbers(best), _numbers(rows[-1]), None)
    return segment_process(cfg, resume is not None)


def segment_process(cfg: SegmentConfig, resuming: bool) -> SegmentResult:
    """One process of a run: the only one, or a rank of `--devices N` (RANK/WORLD_SIZE in its environment)."""
    info = Dist.from_env()
    with process_group(info, cfg.device):
        return _fit(cfg, resuming, info)


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row read back: epoch as int, the other columns as float."""
    return {k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v not in (None, "")}


def _fit(cfg: SegmentConfig, resuming: bool, info: Dist) -> SegmentResult:
    """Data, run folder, model, optimizer (restored when resuming), then every remaining epoch."""
    from monai.losses import DiceCELoss

    set_determinism(cfg.seed, deterministic=False)
    device = resolve_device(cfg.device, info.local_rank, info.world)
    show = progress_enabled(cfg.no_progress) and info.main
    train_ds, val_ds, summary = _datasets(cfg, show)
    if resuming:
        run_dir = Path(cfg.out) / str(cfg.name)
        resumed: RunState | None = RunState.load(run_dir)
    else:
        named = run_folder.resolve_run_dir(cfg) if info.main else Path()
        run_dir, resumed = Path(ddp.gather(info, str(named))[0]), None
    net = build_unet(cfg.unet()).to(device)
    ddp.broadcast_weights(info, net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=fused_optimizer(device))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    scaler = grad_scaler(device, cfg.amp)
    run = _Run(cfg, info, device, run_dir, net, opt, sched, scaler, val_ds, summary, [], None, None)
    start = _resume(run, resumed) if resumed is not None else _begin(run)
    sampler = EpochSampler(len(train_ds), cfg.seed, info.rank, info.world)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size)
    steps = len(sampler) // cfg.batch_size
    with make_progress(show) as progress:
        task = progress.add_task("segment train", total=(cfg.epochs - start) * steps)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
            train_loss = _train_epoch(run, loader, loss_fn, lambda: progress.advance(task))
            ddp.broadcast_buffers(info, net)
            row = {"epoch": epoch + 1, "train_loss": train_loss, **_evaluate(net, val_loader, loss_fn, device, cfg.amp)}
            row.update(lr=opt.param_groups[0]["lr"], seconds=round(time.perf_counter() - t0, 2))
            sched.step()
            _end_epoch(run, row)
    ddp.check_agreement(info, net)
    assert run.best is not None
    if info.main:
        say(describe(record_closing(run_dir / "best.safetensors", val_ds.samples, str(device))))
    return SegmentResult(run_dir, run.best, run.rows[-1], net)


def _begin(run: _Run) -> int:
    """A new run: config.json written (rank 0); training starts at epoch 0."""
    if run.info.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**run.cfg.record(), "name": run.run_dir.name, "contract": run.cfg.contract().to_dict()}
        run_folder.write_json(run.run_dir / "config.json", record)
        params = sum(p.numel() for p in run.net.parameters())
        say(
            f"segmenter: MONAI U-Net {list(run.cfg.channels)}, {params / 1e6:.2f} M parameters, on {run.device}"
            + (f" x {run.info.world} processes" if run.info.world > 1 else "")
        )
    return 0


def _resume(run: _Run, state: RunState) -> int:
    """Weights, optimizer, scheduler, loss scaler and this rank's RNG states from `last.state.pt`, the
    metrics rows up to its epoch and the best row so far; returns the epoch to continue at."""
    if state.weights is None:
        raise InputError(run.run_dir / run_folder.STATE_FILE, "no weights in the resume state", "start a new run")
    run.net.load_state_dict({k: v.to(run.device) for k, v in state.weights.items()})
    state.restore(run.opt, run.sched, run.cfg.epochs, run.info.rank)
    if state.scaler is not None:
        run.scaler.load_state_dict(state.scaler)
    rows = run_folder.read_metrics(run.run_dir / "metrics.csv")
    run.rows = [_numbers(r) for r in rows if int(r["epoch"]) <= state.epoch]
    run.best = next((r for r in run.rows if r["epoch"] == state.best_epoch), None)
    run.best_score = state.best_score
    if run.info.main:
        say(f"resuming {run.run_dir} at epoch {state.epoch + 1} of {run.cfg.epochs}")
    return state.epoch


def _train_epoch(run: _Run, loader: DataLoader, loss_fn: nn.Module, advance: Any) -> float:
    """One epoch of optimizer steps (gradients averaged over ranks); the mean training loss over all ranks."""
    net, device = run.net, run.device
    net.train()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, batches
    for x, m, _ in loader:
        run.opt.zero_grad(set_to_none=True)
        with autocast(device, run.cfg.amp):
            logits = net(x.to(device))
        loss = loss_fn(logits.float(), m.to(device))
        run.scaler.scale(loss).backward()
        ddp.sync_gradients(run.info, net, False, False, device)
        run.scaler.step(run.opt)
        run.scaler.update()
        sums += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
        advance()
    total = ddp.sum_over_ranks(run.info, sums, device)
    return float(total[0] / max(float(total[1]), 1.0))


def _end_epoch(run: _Run, row: dict[str, Any]) -> None:
    """After an epoch: the row and the best epoch updated; on rank 0 the checkpoints, `last.state.pt`,
    metrics.csv, contours.png (at a new best) and one line."""
    run.rows.append(row)
    improved = run.best_score is None or row["val_dice"] > run.best_score
    if improved:
        run.best, run.best_score = row, float(row["val_dice"])
    rng = ddp.gather(run.info, rng_state())
    if not run.info.main:
        return
    assert run.best is not None and run.best_score is not None
    cfg, contract = run.cfg, run.cfg.contract()
    meta = segmenter_meta(cfg.unet(), contract, row, run.summary)
    save_checkpoint(run.run_dir / "last.safetensors", run.net, meta)
    state = RunState(epoch=int(row["epoch"]), best_score=run.best_score, best_epoch=run.best["epoch"])
    state.scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
    state.capture(run.opt, run.sched, rng, run.net).save(run.run_dir)
    if improved:
        save_checkpoint(run.run_dir / "best.safetensors", run.net, meta)
        contour_figure(run.run_dir / "contours.png", run.net, run.val_ds, cfg.contours, run.device)
    run_folder.write_metrics(run.run_dir / "metrics.csv", run.rows, METRIC_COLUMNS)
    say(
        f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}"
        f"  dice {row['val_dice']:.4f}  hd95 {row['val_hd95']:.2f} px" + ("  best" if improved else "")
    )
