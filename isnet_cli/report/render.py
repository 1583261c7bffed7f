"""Heatmap figures: the image (grey X-ray, or in colour) with LRP relevance overlaid (matplotlib, Agg, no pyplot).

Relevance uses a symmetric diverging map centred at zero (positive red, negative blue, zero
transparent), clipped at the 99th percentile of |R| so one hot pixel does not wash out the rest;
the overlay's opacity grows with |R|, so the anatomy stays visible where relevance is small. A mask,
when given, is drawn as a contour with a legend naming its region ("lungs", or "region of interest
(face)" for other data sets). The image panel keeps the X-ray's aspect ratio and a
deterministic pixel size (`panel_shape`), so figures of one dataset line up.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

PANEL_MIN = 512  # shortest side of small images is upscaled to this (phantoms are 64 px)
PANEL_MAX = 1024  # longest side of large images (3000 px radiographs) is downscaled to this
TITLE_PX = 48
COLORBAR_PX = 110
CMAP = "bwr"
MASK_COLOUR = "#00e000"


def panel_shape(h: int, w: int) -> tuple[int, int]:
    """Pixel (height, width) of one image panel for an (h, w) image: aspect kept, sides in range."""
    scale = min(max(PANEL_MIN / min(h, w), 1.0), PANEL_MAX / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def figure_shape(h: int, w: int, side_by_side: bool = False) -> tuple[int, int]:
    """Pixel (height, width) of the whole PNG: title band on top, colour bar on the right."""
    ph, pw = panel_shape(h, w)
    return ph + TITLE_PX, pw * (2 if side_by_side else 1) + COLORBAR_PX


def clip_value(relevance: np.ndarray, percentile: float = 99.0) -> float:
    """Symmetric colour limit: the `percentile` of |R| (of its non-zero part), never 0."""
    mag = np.abs(relevance[np.isfinite(relevance)])
    mag = mag[mag > 0]
    if mag.size == 0:
        return 1.0
    return float(np.percentile(mag, percentile)) or float(mag.max())


def overlay_rgba(relevance: np.ndarray, vmax: float, max_alpha: float = 0.85) -> np.ndarray:
    """RGBA (H, W, 4) of the relevance: diverging colour, opacity ∝ |R| / vmax (clipped)."""
    from matplotlib import colormaps

    norm = np.clip(relevance / vmax, -1.0, 1.0)
    rgba = colormaps[CMAP]((norm + 1.0) / 2.0)
    rgba[..., 3] = max_alpha * np.abs(norm)
    return rgba


def render_heatmap(
    image: np.ndarray,
    relevance: np.ndarray,
    out: str | Path | None = None,
    mask: np.ndarray | None = None,
    title: str = "",
    side_by_side: bool = False,
    percentile: float = 99.0,
    roi_label: str = "lungs",
) -> bytes:
    """Draw the overlay figure; write it atomically to `out` (if given) and return the PNG bytes.

    `image`: (H, W) grey or (H, W, 3) RGB in [0, 1]; `relevance`: (H, W); `mask`: (H, W) bool or None,
    its contour labelled `roi_label`. With `side_by_side` the plain image is shown left of the overlay.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if image.shape[:2] != relevance.shape:
        raise ValueError(f"image {image.shape} and relevance {relevance.shape} differ in shape")
    h, w = relevance.shape
    ph, pw = panel_shape(h, w)
    fh, fw = figure_shape(h, w, side_by_side)
    image, relevance, mask = _at_panel_size(image, relevance, mask, (ph, pw))
    dpi = 100
    fig = Figure(figsize=(fw / dpi, fh / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    vmax = clip_value(relevance, percentile)
    panels = 2 if side_by_side else 1
    axes = [_image_panel(fig, image, (i * pw / fw, 0.0, pw / fw, ph / fh)) for i in range(panels)]
    axes[-1].imshow(overlay_rgba(relevance, vmax), interpolation="bilinear", aspect="auto")
    if mask is not None and mask.any() and not mask.all():
        _mask_contours(axes, mask, roi_label)
    _colour_bar(fig, vmax, ((panels * pw + 18) / fw, 0.08 * ph / fh, 16 / fw, 0.84 * ph / fh))
    if title:
        fig.text(0.5, 1.0 - (TITLE_PX / 2) / fh, title, ha="center", va="center", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    if out is not None:
        from isnet_cli.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(out), data)
    return data


def _at_panel_size(
    image: np.ndarray, relevance: np.ndarray, mask: np.ndarray | None, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The image, the relevance (non-finite values as 0) and the mask, downscaled to the panel's `shape`
    where that is smaller: a 3000 px radiograph is drawn at panel size, with no 200 MB RGBA overlay."""
    from isnet_cli.io.masks import resize_nearest
    from isnet_cli.io.preprocess import resize_bilinear

    relevance = np.nan_to_num(relevance.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if shape[0] < relevance.shape[0]:
        image = resize_bilinear(image, shape)
        relevance = resize_bilinear(relevance, shape)
        mask = None if mask is None else resize_nearest(mask, shape)
    return image, relevance, mask


def _image_panel(fig: Any, image: np.ndarray, rect: tuple[float, float, float, float]) -> Any:
    """Axes at `rect` (figure fractions) showing the image, in colour or in grey; returns the axes."""
    ax = fig.add_axes(rect)
    if image.ndim == 3:
        ax.imshow(np.clip(image, 0.0, 1.0), interpolation="bilinear", aspect="auto")
    else:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear", aspect="auto")
    ax.set_axis_off()
    return ax


def _mask_contours(axes: list[Any], mask: np.ndarray, roi_label: str) -> None:
    """The mask's contour on every panel, and a legend naming its region on the last."""
    from matplotlib.lines import Line2D

    for ax in axes:
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.2)
    legend = [Line2D([], [], color=MASK_COLOUR, linewidth=1.2, label=roi_label)]
    axes[-1].legend(handles=legend, loc="lower right", fontsize=8, framealpha=0.6)


def _colour_bar(fig: Any, vmax: float, rect: tuple[float, float, float, float]) -> None:
    """The relevance colour bar (-vmax..vmax) at `rect` (figure fractions)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = fig.add_axes(rect)
    bar = fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), cmap=CMAP), cax=cax)
    bar.set_label("relevance (clipped at p99 |R|)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
