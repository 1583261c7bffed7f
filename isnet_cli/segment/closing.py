"""The closing radius of a segmenter's clean-up, chosen on its validation set and recorded in its checkpoint.

Closing each lung (`postprocess.close_lungs`) keeps an opacity at the lung's edge inside the mask, but a
large disk also fills the lung's true concavities (the cardiac notch) and the Dice against the annotated
outlines falls. The rule: every radius of `CLOSING_GRID` (fractions of the image's long side) is scored
by the mean Dice at each validation image's original geometry (MONAI `compute_dice`, on the masks that
`isnet segment` writes), and the largest radius whose Dice is within `CLOSING_TOLERANCE` of the best is
taken: as much lesion kept as the outlines allow. A segmenter without the record (trained before it
existed) closes nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from isnet_cli.io.manifest import Sample
from isnet_cli.io.masks import load_mask
from isnet_cli.segment.postprocess import close_lungs

CLOSING_GRID = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2)
CLOSING_TOLERANCE = 0.001  # Dice given up for lesions kept: a third of a 35-image test's standard error
RECORD_KEY = "postprocess"


def recorded_closing(meta: dict[str, Any]) -> float:
    """The closing radius recorded in a segmenter's metadata (0 when there is none)."""
    return float((meta.get(RECORD_KEY) or {}).get("closing", 0.0))


@dataclass(frozen=True)
class ClosingChoice:
    """The chosen radius and the validation Dice of every radius tried."""

    closing: float
    dice: dict[float, float]
    images: int

    def record(self) -> dict[str, Any]:
        """What goes into the checkpoint's metadata under `RECORD_KEY`."""
        return {
            "closing": self.closing,
            "rule": f"largest radius within {CLOSING_TOLERANCE} of the best validation Dice",
            "validation_dice": {f"{k:g}": round(v, 5) for k, v in self.dice.items()},
            "validation_images": self.images,
        }


def choose_closing(segmenter: Any, samples: list[Sample]) -> ClosingChoice:
    """Score every radius of `CLOSING_GRID` on `samples` (images with masks) with `segmenter`; the rule above.

    MONAI's functional `compute_dice`, not `DiceMetric`: the metric object gathers its buffer over the
    ranks of a process group, and under `--devices N` only rank 0 runs this.
    """
    import torch
    from monai.metrics import compute_dice

    from isnet_cli.segment.infer import Segmented, predict_masks

    scores: dict[float, list[float]] = {closing: [] for closing in CLOSING_GRID}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        for item in predict_masks(segmenter, samples, closing=0.0):
            if not isinstance(item, Segmented) or item.sample.mask is None:
                continue
            true = torch.from_numpy(load_mask(item.sample.mask, item.mask.shape) > 0.5)[None, None].float()
            for closing, values in scores.items():
                closed = ndimage.binary_fill_holes(close_lungs(item.mask, closing))
                values.append(float(compute_dice(torch.from_numpy(closed)[None, None].float(), true).item()))
    images = len(scores[0.0])
    if images == 0:
        return ClosingChoice(0.0, {}, 0)
    if all(np.isnan(scores[0.0])):  # every true mask empty: nothing to score a lung outline against
        return ClosingChoice(0.0, {}, images)
    dice = {closing: float(np.nanmean(values)) for closing, values in scores.items()}  # NaN: an empty true mask
    best = max(dice.values())
    chosen = max(closing for closing, value in dice.items() if value >= best - CLOSING_TOLERANCE)
    return ClosingChoice(chosen, dice, images)


def record_closing(checkpoint: Path, samples: list[Sample], device: str = "cpu") -> ClosingChoice:
    """Choose the closing of the segmenter `checkpoint` on `samples` and write it into its metadata
    (the weights are rewritten unchanged, atomically)."""
    from isnet_cli.device import resolve_device
    from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, save_checkpoint
    from isnet_cli.segment.model import torch_segmenter

    net, meta = load_segmenter_checkpoint(checkpoint, resolve_device(device))
    choice = choose_closing(torch_segmenter(net, meta, checkpoint), samples)
    save_checkpoint(checkpoint, net, {**meta, RECORD_KEY: choice.record()})
    return choice


def describe(choice: ClosingChoice) -> str:
    """One line for the terminal."""
    if not choice.dice:
        return "clean-up: no validation image with a lung mask could be segmented; no closing"
    return (
        f"clean-up: each lung closed by a disk of {choice.closing:g} x the long side "
        f"(validation Dice {choice.dice[choice.closing]:.4f}; without closing {choice.dice[0.0]:.4f}; "
        f"{choice.images} images)"
    )
