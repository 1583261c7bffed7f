"""The audit's counterfactual images: masked images with the background or the lungs replaced.

For a model input x (values per the model's input contract) with lung mask M:
- background replaced, lungs kept (x' = x M + b (1 - M)) with b =
  `background_mean`: the mean background intensity of the audited set (one constant for all images),
  `background_blur`: the image blurred with a Gaussian of sigma = size / 16,
  `background_swap`: the background of an image of another class (true label, else predicted class;
  partner drawn with seed 0); where the partner's own lungs fall in our background, the mean is used;
- lungs hidden, background kept (`lungs_hidden`: x' = x (1 - M) + mean lung intensity of the set M).
The means are per channel (a colour background is filled with its mean colour), the blur channel by
channel. `isnet_cli.report.audit` scores the model on them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLUR_SIGMA_FRACTION = 1 / 16
PERTURBATIONS = ("background_mean", "background_blur", "background_swap", "lungs_hidden")
SEED = 0


def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """G (S, S) with rows summing to 1: blur(img) = G img G^T (renormalised at the borders)."""
    i = np.arange(size, dtype=np.float64)
    g = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * sigma**2))
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (B, C, S, S) images."""
    g = gaussian_matrix(x.shape[-1], sigma)
    return np.einsum("ij,bcjk,lk->bcil", g, x, g, optimize=True).astype(np.float32)


def swap_partners(groups: np.ndarray, seed: int = SEED) -> np.ndarray:
    """For every image, a random image of another group (-1 where no other group exists)."""
    rng = np.random.default_rng(seed)
    partners = np.full(len(groups), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        others = np.flatnonzero(groups != g)
        if len(others):
            partners[i] = rng.choice(others)
    return partners


def perturb(
    kind: str,
    x: np.ndarray,
    m: np.ndarray,
    fills: dict[str, Any],
    sigma: float,
    other: np.ndarray | None = None,
    other_m: np.ndarray | None = None,
) -> np.ndarray:
    """One counterfactual batch (see the module docstring for the formulas); `fills`: per channel (C,), or
    one number for every channel (audit.json's `fill_values`)."""
    bg = 1.0 - m
    background, lungs = (np.asarray(fills[k], np.float32).reshape(1, -1, 1, 1) for k in ("background", "lungs"))
    if kind == "background_mean":
        return x * m + background * bg
    if kind == "background_blur":
        return x * m + blur(x, sigma) * bg
    if kind == "background_swap":
        assert other is not None and other_m is not None
        return x * m + bg * (other * (1.0 - other_m) + background * other_m)
    if kind == "lungs_hidden":
        return x * bg + lungs * m
    raise ValueError(kind)


def channel_fills(x: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    """Mean background and mean in-mask value of the set, per channel: (C,) each."""
    inside = np.broadcast_to(m.astype(bool), x.shape)
    count_in = np.maximum(inside.sum(axis=(0, 2, 3)), 1)
    count_out = np.maximum((~inside).sum(axis=(0, 2, 3)), 1)
    return {
        "background": (np.where(inside, 0.0, x).sum(axis=(0, 2, 3)) / count_out).astype(np.float32),
        "lungs": (np.where(inside, x, 0.0).sum(axis=(0, 2, 3)) / count_in).astype(np.float32),
    }


def fill_record(fills: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """audit.json's fill values: one number per fill for grey models, a list per channel for colour ones."""
    return {k: float(v[0]) if len(v) == 1 else [float(c) for c in v] for k, v in fills.items()}
