"""`isnet segment train`: a MONAI U-Net trained on image + mask pairs; writes the run folder runs/<name>/.

Data come through the readers and the preprocessing of `isnet train` (`isnet_cli.io`: manifests or
images/ + masks/ folders, decoded once into the cache, the same augmentation on image and mask). Loss:
MONAI `DiceCELoss` (soft Dice + cross-entropy on the softmax of 2 classes). Validation per epoch: MONAI
`DiceMetric` and `HausdorffDistanceMetric(percentile=95)` on the lung class of the argmax mask, in pixels
of the model input; best.safetensors is the epoch with the highest validation Dice.

Not built yet: resume, DDP (`--devices`) and `--amp`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from isnet_cli.console import make_progress, progress_enabled, say
from isnet_cli.device import resolve_device
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.io.dataset import XrayDataset, read_dataset, split_samples
from isnet_cli.pipeline import build_unet
from isnet_cli.segment.config import SegmentConfig
from isnet_cli.segment.model import segmenter_meta
from isnet_cli.train import run_folder
from isnet_cli.train.state import set_determinism

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_hd95", "lr", "seconds")


@dataclass
class SegmentResult:
    """What `train_segmenter` returns: the run folder, the best and last metrics rows, the trained net."""

    run_dir: Path
    best: dict[str, Any]
    last: dict[str, Any]
    model: nn.Module


def _datasets(cfg: SegmentConfig) -> tuple[XrayDataset, XrayDataset, dict[str, Any]]:
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
    problems = [str(e) for ds in sets for e in ds.prefetch(progress_enabled(cfg.no_progress))]
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


def _evaluate(net: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> dict[str, float]:
    """Mean validation loss, Dice and HD95 (pixels; NaN-free mean over masks where both are non-empty)."""
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
            logits = net(x)
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


def train_segmenter(cfg: SegmentConfig) -> SegmentResult:
    """Train as configured; write best/last.safetensors, metrics.csv, contours.png, config.json."""
    from monai.losses import DiceCELoss

    cfg.validate()
    set_determinism(cfg.seed, deterministic=False)
    device = resolve_device(cfg.device)
    train_ds, val_ds, summary = _datasets(cfg)
    run_dir = run_folder.resolve_run_dir(cfg, resumable=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    contract = cfg.contract()
    run_folder.write_json(
        run_dir / "config.json", {**cfg.record(), "name": run_dir.name, "contract": contract.to_dict()}
    )
    net = build_unet(cfg.unet()).to(device)
    params = sum(p.numel() for p in net.parameters())
    say(f"segmenter: MONAI U-Net {list(cfg.channels)}, {params / 1e6:.2f} M parameters, on {device}")
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    with make_progress(progress_enabled(cfg.no_progress)) as progress:
        task = progress.add_task("segment train", total=cfg.epochs * len(train_loader))
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            net.train()
            losses = []
            for x, m, _ in train_loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x.to(device)), m.to(device))
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                progress.advance(task)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                **_evaluate(net, val_loader, loss_fn, device),
            }
            row.update(lr=opt.param_groups[0]["lr"], seconds=round(time.perf_counter() - t0, 2))
            sched.step()
            rows.append(row)
            improved = best is None or row["val_dice"] > best["val_dice"]
            meta = segmenter_meta(cfg.unet(), contract, row, summary)
            save_checkpoint(run_dir / "last.safetensors", net, meta)
            if improved:
                best = row
                save_checkpoint(run_dir / "best.safetensors", net, meta)
                contour_figure(run_dir / "contours.png", net, val_ds, cfg.contours, device)
            run_folder.write_metrics(run_dir / "metrics.csv", rows, METRIC_COLUMNS)
            say(
                f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}"
                f"  dice {row['val_dice']:.4f}  hd95 {row['val_hd95']:.2f} px" + ("  best" if improved else "")
            )
    assert best is not None
    return SegmentResult(run_dir, best, rows[-1], net)
