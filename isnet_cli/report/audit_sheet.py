"""The audit's contact sheet: the images most driven by the background, each with its mask contour, its
LRP heatmap (when the model has relevance) and its background-swapped counterfactual."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.report.audit import AuditSet
from isnet_cli.report.counterfactuals import perturb


def worst_offenders(per_image: list[dict[str, Any]], k: int = 8) -> list[int]:
    """Indices of the images most driven by the background: swap flips first, then lowest share, then |dp|."""

    def badness(i: int) -> tuple[float, float, float]:
        row = per_image[i]
        swap = row["background_swap"] or {}
        share = row["inside_mask_share"]
        return (
            float(swap.get("flipped", False)),
            -(share if share is not None else 1.0),
            swap.get("abs_prob_change", 0.0),
        )

    return sorted(range(len(per_image)), key=badness, reverse=True)[:k]


def contact_sheet(
    path: Path,
    backend: Any,
    audit_set: AuditSet,
    per_image: list[dict[str, Any]],
    indices: list[int],
    fills: dict[str, Any],
    roi_name: str = "lung",
) -> None:
    """PNG: per offender the input (in colour for colour models) with the mask contour, its LRP heatmap
    (if any) and the swapped input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not indices:
        return
    x, m = audit_set.x[indices], audit_set.masks[indices]
    relevance = backend.relevance(x)[1].sum(axis=1) if backend.has_relevance else None
    cols = 3 if relevance is not None else 2
    fig, axes = plt.subplots(len(indices), cols, figsize=(2.6 * cols, 2.7 * len(indices)), squeeze=False)
    for row, i in enumerate(indices):
        info = per_image[i]
        _input_panel(axes[row][0], x[row], m[row, 0], info, roi_name)
        if relevance is not None:
            _relevance_panel(axes[row][1], relevance[row], m[row, 0])
        _swap_panel(axes[row][cols - 1], audit_set, x[row : row + 1], m[row : row + 1], info, fills)
        for a in axes[row]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _input_panel(ax: Any, x: np.ndarray, mask: np.ndarray, info: dict[str, Any], roi_name: str) -> None:
    """The input with the mask contour, titled with its file, prediction, label and in-mask share."""
    _show_input(ax, x)
    ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    share = info["inside_mask_share"]
    ax.set_title(
        f"{Path(info['file']).name}\npred {info['predicted']} (true {info['label']})"
        + (f"\nin-{roi_name} |R| {share:.2f}" if share is not None else ""),
        fontsize=7,
    )


def _relevance_panel(ax: Any, r: np.ndarray, mask: np.ndarray) -> None:
    """The LRP relevance (symmetric colour limits) with the mask contour."""
    lim = float(np.abs(r).max()) or 1.0
    ax.imshow(r, cmap="bwr", vmin=-lim, vmax=lim)
    ax.contour(mask, levels=[0.5], colors="k", linewidths=0.5)
    ax.set_title("LRP relevance", fontsize=7)


def _swap_panel(
    ax: Any, audit_set: AuditSet, x: np.ndarray, m: np.ndarray, info: dict[str, Any], fills: dict[str, Any]
) -> None:
    """The input (1, C, S, S) with its swap partner's background, and whether that flipped the prediction;
    left empty when the image had no partner."""
    swap = info["background_swap"]
    if swap is None or info["swap_partner"] is None:
        return
    j = audit_set.files.index(info["swap_partner"])
    swapped = perturb("background_swap", x, m, fills, 1.0, audit_set.x[j : j + 1], audit_set.masks[j : j + 1])
    _show_input(ax, swapped[0])
    ax.set_title(f"background swapped\npred {swap['predicted']}" + (" (FLIP)" if swap["flipped"] else ""), fontsize=7)


def _show_input(ax: Any, x: np.ndarray) -> None:
    """Draw one (C, S, S) model input: RGB for 3 channels, grey (mean over channels) otherwise."""
    if x.shape[0] == 3:
        lo, hi = float(x.min()), float(x.max())
        ax.imshow(((x - lo) / max(hi - lo, 1e-6)).transpose(1, 2, 0))
        return
    img = x.mean(axis=0)
    ax.imshow(img, cmap="gray", vmin=0, vmax=max(float(img.max()), 1e-6))
