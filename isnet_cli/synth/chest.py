"""Chest X-ray phantoms (grey) with an exact lung mask, and a lesion implanted into a real radiograph.

Each phantom is a float image in [0, 1] (air dark) built from simple shapes:
body ellipse (soft tissue) -> two lung fields (dark, rib-like texture) -> mediastinum and heart
(bright) -> diaphragm domes (lungs end at a curved lower border). The lung mask is exact.
Class 0 (`normal`) has no lesion; class k >= 1 has a lesion inside a lung whose pattern depends on k
(1: one round opacity, 2: basal haze, 3+: several small nodules). The shortcut marker is a bright
letter-like glyph in a corner outside the body, so it never touches a lung.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from isnet_cli.synth.shapes import Phantom, blob, draw_marker, ellipse, smooth_noise


def make_phantom(
    rng: np.random.Generator,
    size: int,
    label: int,
    marker: bool,
    contrast: float = 0.22,
) -> Phantom:
    """Draw one phantom; lesion peak brightness above the lung is `contrast` (in [0, 1] units)."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731  (short alias for readability)
    # Lesion and marker draw from their own streams: the anatomy and noise of a phantom do not depend on
    # its label or marker, so label-0 and label-1 versions of one phantom differ only inside the lungs.
    lesion_rng, marker_rng = rng.spawn(2)
    lu = lambda lo, hi: float(lesion_rng.uniform(lo, hi))  # noqa: E731

    # Body: soft tissue ellipse; air around it stays dark.
    img = np.full((size, size), u(0.02, 0.06), np.float32)
    body = ellipse(yy, xx, s * u(0.52, 0.56), s * u(0.48, 0.52), s * u(0.44, 0.48), s * u(0.38, 0.42))
    img[body] = u(0.50, 0.60)
    mid = s * u(0.48, 0.52)
    top = s * u(0.18, 0.24)
    mask, lungs = _lungs(yy, xx, s, mid, top, body, u)
    img[mask] = u(0.18, 0.26)
    _ribs_and_heart(img, yy, xx, s, mid, top, body, mask, lungs, u)
    sick = int(rng.integers(0, 2))  # the lung that gets the lesion, if any

    # Lesion: restricted to the lung mask so the label lives only inside the lungs.
    if label >= 1:
        lung, *_ = lungs[sick]
        lesion = _lesion(label, lungs[sick], yy, xx, s, lu)  # drawn before the strength: the stream's order
        img[lung] += contrast * lu(0.9, 1.1) * lesion[lung]

    # Film texture and quantum noise, everywhere.
    img += 0.03 * smooth_noise(rng, size, 6)
    img += rng.normal(0.0, 0.012, img.shape).astype(np.float32)

    # Marker: bright glyph in a top corner, outside the body ellipse (hence outside the lungs).
    if marker:
        draw_marker(img, ~body, marker_rng)

    return Phantom(np.clip(img, 0.0, 1.0).astype(np.float32), mask, label, marker)


def _lungs(
    yy: np.ndarray, xx: np.ndarray, s: float, mid: float, top: float, body: np.ndarray, u: Any
) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
    """Two ellipses either side of the midline, cut below by diaphragm domes: the mask, and per lung
    (its pixels, centre y, centre x, radius y, radius x)."""
    mask = np.zeros(yy.shape, bool)
    lungs = []
    for side in (-1, 1):
        rx = s * u(0.13, 0.16)
        ry = s * u(0.27, 0.31)
        cx = mid + side * (s * u(0.04, 0.06) + rx)
        cy = top + ry
        dome_y = cy + ry * u(0.55, 0.7) - (s * 0.10) * np.exp(-(((xx - cx) / rx) ** 2))
        lung = ellipse(yy, xx, cy, cx, ry, rx) & (yy < dome_y) & body
        lungs.append((lung, cy, cx, ry, rx))
        mask |= lung
    return mask, lungs


def _ribs_and_heart(
    img: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    s: float,
    mid: float,
    top: float,
    body: np.ndarray,
    mask: np.ndarray,
    lungs: list[tuple[Any, ...]],
    u: Any,
) -> None:
    """Ribs (slanted bright bands in the lungs: texture the model must look through), the mediastinum
    (bright between the lungs) and the heart, which bulges into the left lung (image right)."""
    period = s * u(0.09, 0.11)
    phase = u(0.0, 2 * np.pi)
    for side, (lung, *_rest) in zip((-1, 1), lungs, strict=True):
        bands = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + side * 0.35 * (xx - mid)) / period + phase)
        img[lung] += 0.07 * (bands[lung] ** 4)
    medi = body & ~mask & (np.abs(xx - mid) < s * 0.08) & (yy > top * 0.6)
    img[medi] = np.maximum(img[medi], u(0.62, 0.70))
    heart = ellipse(yy, xx, s * u(0.62, 0.66), mid + s * u(0.05, 0.08), s * 0.12, s * 0.12) & body
    img[heart & ~mask] = np.maximum(img[heart & ~mask], u(0.62, 0.70))
    img[heart & mask] += 0.10  # overlap is denser, not masked out (the mask is the lung field)


def _lesion(label: int, lung: tuple[Any, ...], yy: np.ndarray, xx: np.ndarray, s: float, lu: Any) -> np.ndarray:
    """The lesion of class `label` (>= 1) in one lung, peak 1: a blob, a basal opacity or small nodules."""
    _, cy, cx, ry, rx = lung
    kind = (label - 1) % 3
    if kind == 0:
        sigma = s * lu(0.06, 0.08)
        ly, lx = cy + lu(-0.4, 0.3) * ry, cx + lu(-0.35, 0.35) * rx
        return blob(yy, xx, ly, lx, sigma)
    if kind == 1:
        return np.clip((yy - (cy + 0.1 * ry)) / (0.5 * ry), 0.0, 1.0) * 0.9
    lesion = np.zeros_like(yy)
    for _ in range(4):
        lesion = np.maximum(lesion, blob(yy, xx, cy + lu(-0.6, 0.5) * ry, cx + lu(-0.5, 0.5) * rx, s * 0.03))
    return lesion


def implant_lesion(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, contrast: float, sigma_fraction: float = 0.07
) -> np.ndarray:
    """A round opacity inside the lungs of a real radiograph (float image in [0, 1], bool lung mask).

    A Gaussian bump of peak `contrast` and sigma `sigma_fraction`·S, centred on a random lung pixel at
    least one sigma from the lung border where there is one, added inside the mask only (the label lives
    in the lungs, as in the phantoms). Returns a new image.
    """
    from PIL import Image, ImageFilter

    size = image.shape[0]
    sigma = sigma_fraction * size
    window = 2 * max(1, round(sigma)) + 1  # erosion by a square of this side: the centre keeps off the border
    inner = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(window))) > 0
    ys, xs = np.nonzero(inner if inner.any() else mask)
    i = int(rng.integers(0, len(ys)))
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float32)
    bump = blob(yy, xx, ys[i] + 0.5, xs[i] + 0.5, sigma) * contrast * float(rng.uniform(0.9, 1.1))
    return np.clip(image + bump * mask, 0.0, 1.0).astype(np.float32)
