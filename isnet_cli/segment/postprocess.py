"""Predicted lung masks: clean-up (two largest components, holes filled, each lung closed) and quality
control.

Closing (Serra, *Image Analysis and Mathematical Morphology*, 1982): each lung L separately becomes
(L ⊕ D_r) ⊖ D_r, D_r the disk of radius r = closing x the image's long side. It fills the lung's
concavities narrower than the disk and leaves its convex outline alone, so an opacity at the lung's edge
that the segmenter cut out (a dense consolidation looks like soft tissue to it) comes back inside the
mask; the rolling-ball idea that keeps juxtapleural nodules in lung masks (Armato et al., Radiology
1999). Lungs are closed one at a time, so the disk never bridges the mediastinum. The radius is the
segmenter's own, chosen on its validation set (`isnet_cli.segment.closing`) and recorded in its checkpoint.

QC measures, per mask at the image's original geometry (H, W), and its decoded image v in [0, 1]:
- contrast c = std(v): a blank frame (c near 0) gives the segmenter nothing to find, whatever it outputs;
- area fraction a = |mask| / (H W);
- components n: 8-connected components after clean-up;
- left/right balance b = min(L, R) / max(L, R), L and R the mask pixels in the left and right halves
  of the image (columns < W/2 and >= W/2); 0 when one side is empty.
A mask is flagged when it is empty, or c, a, n or b fall outside `QcLimits`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# 8-connectivity: two lung pixels touching at a corner are one lung.
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class QcLimits:
    """The sane ranges of a chest radiograph's lung mask. Lungs typically cover 15-40% of a PA/AP film;
    the bounds are wide so that only masks that are clearly wrong (a lung missing, the body segmented,
    almost nothing found) are flagged."""

    min_contrast: float = 0.02
    min_area: float = 0.05
    max_area: float = 0.60
    components: int = 2
    min_balance: float = 0.33


@dataclass
class Qc:
    """One mask's QC measures and, when flagged, why (`problems`, empty when the mask looks sane)."""

    contrast: float
    area_fraction: float
    components: int
    balance: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def empty(self) -> bool:
        return self.components == 0

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = "; ".join(self.problems)
        d["ok"] = int(self.ok)
        return d


def keep_largest(mask: np.ndarray, n: int = 2) -> np.ndarray:
    """The `n` largest 8-connected components of a bool mask (ties: the lower label)."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count <= n:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:n] + 1
    return np.isin(labels, keep)


# Closing works on masks of at most this long side: the disk is a tenth of the image, so a 3000 px
# radiograph's mask closed at full size costs seconds (distance transforms) and gains nothing.
CLOSING_WORK_SIZE = 512


def close_lungs(mask: np.ndarray, closing: float) -> np.ndarray:
    """Each 8-connected component of a bool mask closed by a disk of radius `closing` x the long side, and
    united with the input, so no lung pixel is lost. A mask longer than `CLOSING_WORK_SIZE` is closed at
    that size (nearest neighbour) and the pixels the closing adds are taken back to full size."""
    mask = mask.astype(bool)
    long_side = max(mask.shape)
    if closing * long_side < 1.0:
        return mask
    if long_side <= CLOSING_WORK_SIZE:
        return mask | _close_components(mask, closing * long_side)
    small_shape = tuple(max(1, round(n * CLOSING_WORK_SIZE / long_side)) for n in mask.shape)
    small = _nearest(mask, small_shape)
    added = _close_components(small, closing * CLOSING_WORK_SIZE) & ~small
    return mask | _nearest(added, mask.shape)


def _close_components(mask: np.ndarray, radius: float) -> np.ndarray:
    """The union of each component's closing by a disk of `radius` pixels (Euclidean distance transforms:
    dilation = within r of the component, erosion = more than r from the outside of the dilation)."""
    labels, _ = ndimage.label(mask, structure=_EIGHT)
    pad = int(np.ceil(radius)) + 1  # room for the dilation around the component
    out = np.zeros_like(mask)
    # a closing stays inside the component's convex hull, so its bounding box (padded) is all it needs
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        lung = np.pad(labels[box] == label, pad)
        dilated = ndimage.distance_transform_edt(~lung) <= radius
        out[box] |= (ndimage.distance_transform_edt(dilated) > radius)[pad:-pad, pad:-pad]
    return out


def _nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`mask` resampled to `shape` by nearest neighbour (pixel centres)."""
    rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int)
    return mask[np.ix_(rows, cols)]


def clean_mask(mask: np.ndarray, closing: float = 0.0) -> np.ndarray:
    """Keep the two largest components (the lungs), close each by `closing` (a fraction of the long side),
    fill their holes."""
    return ndimage.binary_fill_holes(close_lungs(keep_largest(mask, 2), closing))


def quality(mask: np.ndarray, image: np.ndarray, limits: QcLimits = QcLimits()) -> Qc:
    """The QC measures of a bool (H, W) mask of the (H, W) `image` in [0, 1], and the problems against `limits`."""
    h, w = mask.shape
    contrast = float(np.std(image))
    area = float(mask.sum()) / float(h * w)
    _, components = ndimage.label(mask, structure=_EIGHT)
    left, right = float(mask[:, : w // 2].sum()), float(mask[:, w // 2 :].sum())
    balance = min(left, right) / max(left, right) if max(left, right) > 0 else 0.0
    problems = []
    if contrast < limits.min_contrast:
        problems.append(f"blank image (grey-level std {contrast:.3f} < {limits.min_contrast})")
    if components == 0:
        problems.append("empty mask (no lung found)")
    else:
        if not limits.min_area <= area <= limits.max_area:
            problems.append(f"lung area {area:.1%} outside [{limits.min_area:.0%}, {limits.max_area:.0%}]")
        if components != limits.components:
            problems.append(f"{components} component(s), expected {limits.components}")
        if balance < limits.min_balance:
            problems.append(f"left/right balance {balance:.2f} below {limits.min_balance:.2f} (a lung missing?)")
    return Qc(round(contrast, 4), round(area, 4), int(components), round(balance, 4), problems)
