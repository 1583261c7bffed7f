"""Validation of an epoch's model, on the machinery of a `Trainer` (loaders, ranks, LRP engine): precise
batch norm, the scores on a held-out set (all ranks pooled) and the per-epoch heatmap figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from isnet_cli.objective.objective import Objective, relevance_stats
from isnet_cli.report.metrics import classification_scores
from isnet_cli.train import ddp
from isnet_cli.train.data import EpochSampler
from isnet_cli.train.run_folder import heatmap_grid
from isnet_cli.train.trainer import Trainer, loss_means, loss_sums


def recalibrate_bn(trainer: Trainer, model: nn.Module) -> None:
    """Re-estimate batch-norm running statistics on the training data with the epoch's final weights.

    The running averages collected during the epoch mix statistics of weights that kept changing;
    the ISNet loss changes activations a lot, and eval-mode predictions (validation, checkpoint
    selection, every later use of the model) then drift from what training optimised. One
    no-grad forward pass per epoch (cumulative averages, momentum=None) fixes that ("precise BN").
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    train = trainer.sets.train
    sampler = EpochSampler(len(train), trainer.cfg.seed, trainer.dist.rank, trainer.dist.world, shuffle=False)
    with torch.no_grad():
        for x, _, _ in trainer.loader(train, sampler, 0, drop_last=trainer.sets.drop_last):
            model(x.to(trainer.device))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
        ddp.average_over_ranks(trainer.dist, [m.running_mean, m.running_var])


def evaluate(trainer: Trainer, model: nn.Module, objective: Objective, ds: Any, with_heat: bool) -> dict[str, float]:
    """Loss parts, accuracy, macro-F1, AUROC and share of |R| inside the mask on `ds` (all ranks pooled)."""
    parts = trainer.gather(_evaluate_here(trainer, model, objective, ds, with_heat))
    probs = np.concatenate([q[0] for q in parts])
    labels = np.concatenate([q[1] for q in parts])
    shares = np.concatenate([q[2] for q in parts])
    result = {**loss_means(sum(q[3] for q in parts)), **classification_scores(labels, probs)}
    if len(shares):
        result["share_inside"] = float(np.mean(shares))
    return result


def _evaluate_here(
    trainer: Trainer, model: nn.Module, objective: Objective, ds: Any, with_heat: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """This rank's part of `evaluate`: (probabilities, labels, in-mask shares, loss sums)."""
    model.eval()
    # no padding: every sample is scored exactly once over all ranks
    sampler = EpochSampler(len(ds), 0, trainer.dist.rank, trainer.dist.world, shuffle=False, pad=False)
    probs, labels, shares, sums = [], [], [], torch.zeros(5, dtype=torch.float64)
    explainer = objective.lrp if (with_heat and objective.lrp is not None) else None
    for x, mask, y in trainer.loader(ds, sampler, 0):
        x, mask, y = (t.to(trainer.device) for t in (x, mask, y))
        if with_heat:
            with torch.enable_grad() if trainer.cfg.method == "rrr" else torch.no_grad():
                out = objective(x, mask, y)
            share = out.share
            if share is None:
                share, _ = relevance_stats(explainer or trainer.explainer(model), x, mask, "predicted")
            shares.append(share.cpu())
        else:
            with torch.no_grad():
                out = objective(x, mask, y, heat=False)
        sums += loss_sums(out, len(y))
        probs.append(torch.softmax(out.logits.float(), 1).cpu())
        labels.append(y.cpu())
    return (
        torch.cat(probs).numpy() if probs else np.zeros((0, len(trainer.classes))),
        torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        torch.cat(shares).numpy() if shares else np.zeros(0),
        sums,
    )


def heatmap_figure(trainer: Trainer, model: nn.Module, lrp: Any, path: Path) -> None:
    """A few validation heatmaps (predicted class) of this epoch's model: heatmaps/epoch_N.png."""
    val = trainer.sets.val
    n = min(trainer.cfg.heatmaps, len(val))
    if n <= 0:
        return
    model.eval()
    xs, ms, ys = zip(*(val[i] for i in range(n)), strict=True)
    x, m = torch.stack(xs).to(trainer.device), torch.stack(ms)
    lrp = lrp or trainer.explainer(model)
    with torch.no_grad():
        relevance = lrp(x, "predicted").sum(1).cpu().numpy()
        pred = lrp.logits.argmax(1).cpu().tolist()
    titles = [f"true {trainer.classes[int(y)]} / pred {trainer.classes[p]}" for y, p in zip(ys, pred, strict=True)]
    images = x.cpu().numpy()
    images = images.transpose(0, 2, 3, 1) if images.shape[1] == 3 else images[:, 0]  # colour kept
    heatmap_grid(path, images, relevance, m[:, 0].numpy() > 0.5, titles)
