"""The drawing pieces every phantom uses: shape tests, smooth noise, the side-marker glyph (the shortcut),
and `Phantom`, what a drawing returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 5x5 glyphs ("L", "R", "A"), the kind of side markers burned into real radiographs.
_GLYPHS = (
    np.array([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]),
    np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]]),
    np.array([[0, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1]]),
)


@dataclass(frozen=True)
class Phantom:
    """One generated phantom: `image` float32 (S, S) in [0, 1] (faces: (S, S, 3) RGB), `mask` bool (S, S),
    and what is in it."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    marker: bool


def ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Inside test ((y - cy) / ry)^2 + ((x - cx) / rx)^2 <= 1."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    """Gaussian bump exp(-r^2 / (2 sigma^2)), peak 1."""
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma**2))


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    from PIL import Image

    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def draw_marker(
    img: np.ndarray, free: np.ndarray, rng: np.random.Generator, colour: tuple[float, float, float] | None = None
) -> None:
    """Burn a bright letter-like glyph ("L", "R", "A"; cell size S/32) into a top corner of `img` in place,
    only on pixels where `free` is True (outside the body or the lungs). Grey images: a bright level drawn
    from the stream; colour (S, S, 3) images: `colour`."""
    size = img.shape[0]
    glyph = _GLYPHS[int(rng.integers(0, len(_GLYPHS)))]
    cell = max(1, round(size / 32))
    g = np.kron(glyph, np.ones((cell, cell), int)).astype(bool)
    gh, gw = g.shape
    margin = max(1, round(size * 0.03))
    corner = int(rng.integers(0, 2))  # top-left or top-right
    y0 = margin
    x0 = margin if corner == 0 else img.shape[1] - margin - gw
    patch = img[y0 : y0 + gh, x0 : x0 + gw]
    level = float(rng.uniform(0.9, 1.0))
    on = g & free[y0 : y0 + gh, x0 : x0 + gw]
    patch[on] = level if colour is None else np.array(colour, np.float32) * level
