"""Face phantoms (colour), the analogue of the chest phantoms after the paper's facial-attribute experiment.

A skin-toned face ellipse with eyes, eyebrows and nose on a muted, randomly coloured, textured background;
the mask is the face. The label is an attribute of the mouth: class 0 (`neutral`) a straight mouth,
class 1 (`smiling`) an upward arc, class 2+ an open (round) mouth. The shortcut marker is a glyph in a
saturated colour (red) in a top corner, outside the face.
"""

from __future__ import annotations

import numpy as np

from isnet_cli.synth.shapes import Phantom, draw_marker, ellipse, smooth_noise


def make_face(rng: np.random.Generator, size: int, label: int, marker: bool) -> Phantom:
    """Draw one colour face phantom (see the module docstring); the mask is the face ellipse."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    # As for the chest: the mouth and the marker draw from their own streams, so the label changes only
    # the mouth, and two phantoms of one (seed, i) differ only inside the face.
    mouth_rng, marker_rng = rng.spawn(2)

    # Background: a muted colour with low-frequency colour texture (each channel its own noise).
    base = np.array([u(0.15, 0.55), u(0.15, 0.55), u(0.15, 0.55)], np.float32)
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        img[..., c] = base[c] + 0.08 * smooth_noise(rng, size, 5)

    # Face: a skin-toned ellipse (tones from pale to dark), lit a little from the top left.
    cy, cx = s * u(0.52, 0.56), s * u(0.47, 0.53)
    ry, rx = s * u(0.32, 0.36), s * u(0.24, 0.28)
    mask = ellipse(yy, xx, cy, cx, ry, rx)
    skin = np.array([0.90, 0.70, 0.56], np.float32) * u(0.55, 1.05)
    shade = 1.0 - 0.12 * ((yy - cy) / ry + (xx - cx) / rx) / 2.0
    img[mask] = np.clip(skin[None, :] * shade[mask][:, None], 0.0, 1.0)

    # Eyes (dark), eyebrows (hair colour) and a nose shadow: structure shared by every class.
    hair = np.array([u(0.05, 0.35)] * 3, np.float32) * np.array([1.0, 0.85, 0.7], np.float32)
    eye_y, eye_dx = cy - ry * u(0.22, 0.30), rx * u(0.36, 0.44)
    for side in (-1, 1):
        eye = ellipse(yy, xx, eye_y, cx + side * eye_dx, s * 0.035, s * 0.05) & mask
        img[eye] = np.array([0.08, 0.06, 0.05], np.float32)
        brow = ellipse(yy, xx, eye_y - s * 0.07, cx + side * eye_dx, s * 0.015, s * 0.065) & mask
        img[brow] = hair
    nose = ellipse(yy, xx, cy + ry * 0.12, cx, s * 0.07, s * 0.025) & mask
    img[nose] *= 0.85

    # Mouth: the attribute (label), drawn only inside the face.
    mouth = _mouth(label, yy, xx, cy + ry * mouth_rng.uniform(0.48, 0.56), cx, rx, s, mouth_rng) & mask
    img[mouth] = np.array([0.55, 0.12, 0.15], np.float32) * float(mouth_rng.uniform(0.8, 1.1))

    img += rng.normal(0.0, 0.012, img.shape).astype(np.float32)
    if marker:
        draw_marker(img, ~mask, marker_rng, colour=(0.95, 0.08, 0.08))
    return Phantom(np.clip(img, 0.0, 1.0).astype(np.float32), mask, label, marker)


def _mouth(
    label: int, yy: np.ndarray, xx: np.ndarray, my: float, cx: float, rx: float, s: float, rng: np.random.Generator
) -> np.ndarray:
    """The mouth of class `label`: 0 a straight line, 1 an upward arc (smile), 2+ an open round mouth."""
    half = rx * float(rng.uniform(0.40, 0.50))
    thick = max(1.0, s * 0.022)
    across = np.abs(xx - cx) <= half
    kind = min(label, 2)
    if kind == 0:
        return across & (np.abs(yy - my) <= thick)
    if kind == 1:  # corners up: y = my - depth (1 - ((x - cx) / half)^2) + depth, depth ~ S/12
        depth = s * float(rng.uniform(0.07, 0.09))
        curve = my - depth * (((xx - cx) / half) ** 2)
        return across & (np.abs(yy - curve) <= thick)
    return ellipse(yy, xx, my, cx, s * 0.05, half * 0.6)
