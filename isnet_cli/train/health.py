"""Did the run learn? The end-of-training check that tells a user when a model ended at chance.

A run of the heatmap loss can satisfy it without learning the classes: relevance spread over the
lungs with no class evidence (the degenerate optimum). Its signs, read from the per-epoch metrics:

- `chance`: validation AUROC below `CHANCE_AUROC` (accuracy at most the majority-class share plus
  `CHANCE_MARGIN` where no AUROC is defined): the model does not separate the classes;
- `ce-stalled` (heatmap-loss runs only): the classes separate a little, but the training
  cross-entropy is still at least `STALLED_CE_FRACTION` of a uniform guess's ln K: the heatmap loss is
  being satisfied at the cost of the classification.

`epoch_status` labels one metrics.csv row (the `health` column); `assess` gives the verdict of a
finished run, with the likely cause and what to try, for the terminal and the model card.
`step_diagnostics` is one row of steps.csv: the loss terms, relevance mass, logit range and gradient
norms of one training step (`gradient_split`: the CE and heatmap parts of the gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CHANCE_AUROC = 0.6
CHANCE_MARGIN = 0.05
STALLED_CE_FRACTION = 0.9

_ISNET_ADVICE = (
    "try more --epochs, a longer --ramp (P reaches its value later), a lower --P, or --variant none "
    "to see whether the classes are learnable at all; check that the masks cover where the label lives"
)
_PLAIN_ADVICE = "try more --epochs, a larger --img-size, another --lr; check the labels"


@dataclass(frozen=True)
class Health:
    """`status`: ok | chance | ce-stalled; `message`: one line for the terminal and the model card."""

    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def epoch_status(row: Mapping[str, Any], majority_share: float, num_classes: int, heat_loss: bool) -> str:
    """ok | chance | ce-stalled for one epoch's metrics row."""
    auroc = _number(row, "val_auroc")
    accuracy = _number(row, "val_accuracy")
    if auroc is not None:
        if auroc < CHANCE_AUROC:
            return "chance"
    elif accuracy is not None and accuracy <= majority_share + CHANCE_MARGIN:
        return "chance"
    ce = _number(row, "train_ce")
    if heat_loss and ce is not None and ce >= STALLED_CE_FRACTION * math.log(num_classes):
        return "ce-stalled"
    return "ok"


def assess(
    rows: Sequence[Mapping[str, Any]],
    selected: Mapping[str, Any] | None,
    majority_share: float,
    num_classes: int,
    heat_loss: bool,
) -> Health:
    """The verdict on a finished run: its selected checkpoint's row, and the training curve."""
    if not rows:
        return Health("ok", "no completed epoch")
    row = selected or rows[-1]
    status = epoch_status(row, majority_share, num_classes, heat_loss)
    if status == "ok":
        return Health("ok", f"learned: validation AUROC {_fmt(row, 'val_auroc')}, accuracy {_fmt(row, 'val_accuracy')}")
    advice = _ISNET_ADVICE if heat_loss else _PLAIN_ADVICE
    if status == "chance":
        cause = (
            "the heatmap loss was satisfied without class evidence (the degenerate optimum)"
            if heat_loss
            else "the classes were not learned in this budget"
        )
        return Health(
            "chance",
            f"the model ended at chance on validation (AUROC {_fmt(row, 'val_auroc')}, accuracy "
            f"{_fmt(row, 'val_accuracy')}): {cause}; {advice}",
        )
    return Health(
        "ce-stalled",
        f"the training cross-entropy stayed near a uniform guess ({_fmt(row, 'train_ce')} vs ln K = "
        f"{math.log(num_classes):.3f}) while the heatmap loss was met: the model barely learned the classes; "
        f"{advice}",
    )


def _fmt(row: Mapping[str, Any], key: str) -> str:
    value = _number(row, key)
    return "n/a" if value is None else f"{value:.3f}"


# steps.csv: the per-term gradient norms cost one extra plain backward, so only every this many steps.
GRAD_TERMS_EVERY = 10


def gradient_split(model: nn.Module, ce_grads: list[torch.Tensor | None], ce_weight: float) -> tuple[float, float]:
    """Norms of the CE part (1-P)·∂CE/∂θ of the current (unclipped) gradient and of the rest, the heatmap part."""
    ce_sq = heat_sq = 0.0
    for p, g in zip((p for p in model.parameters() if p.requires_grad), ce_grads, strict=True):
        if p.grad is None:
            continue
        ce_part = ce_weight * g if g is not None else torch.zeros_like(p.grad)
        ce_sq += float(ce_part.double().pow(2).sum())
        heat_sq += float((p.grad - ce_part).double().pow(2).sum())
    return math.sqrt(ce_sq), math.sqrt(heat_sq)


def step_diagnostics(
    phase: str, epoch: int, step: int, out: Any, norm: torch.Tensor | None, split: tuple[float, float] | None
) -> dict[str, Any]:
    """One steps.csv row: the loss terms, the explained quantity's relevance mass (Σ|R|), the logit range,
    the gradient norm before clipping and, every `GRAD_TERMS_EVERY` steps, its CE and heatmap parts."""
    logits = out.logits.float()
    return {
        "phase": phase,
        "epoch": epoch + 1,
        "step": step + 1,
        "loss": out.loss.item(),
        "ce": out.ce.item(),
        "background": out.background.item(),
        "foreground": out.foreground.item(),
        "relevance_mass": out.mass.mean().item() if out.mass is not None else None,
        "logit_range": (logits.amax(1) - logits.amin(1)).mean().item(),
        "grad_norm": norm.item() if norm is not None else None,
        "grad_ce": split[0] if split else None,
        "grad_heat": split[1] if split else None,
    }
