"""Synthetic phantoms with exact region masks and an optional background shortcut: chest X-rays
(`kind="chest"`, grey) and faces (`kind="faces"`, colour).

Each phantom is a float image in [0, 1] (air dark) built from simple shapes:
body ellipse (soft tissue) -> two lung fields (dark, rib-like texture) -> mediastinum and heart
(bright) -> diaphragm domes (lungs end at a curved lower border). The lung mask is exact.
Class 0 (`normal`) has no lesion; class k >= 1 has a lesion inside a lung whose pattern depends on k
(1: one round opacity, 2: basal haze, 3+: several small nodules). The shortcut marker is a bright
letter-like glyph in a corner outside the body, so it never touches a lung.

Faces (the analogue in colour, after the paper's facial-attribute experiment): a skin-toned face
ellipse with eyes, eyebrows and nose on a muted, randomly coloured, textured background; the mask is
the face. The label is an attribute of the mouth: class 0 (`neutral`) a straight mouth, class 1
(`smiling`) an upward arc, class 2+ an open (round) mouth. The shortcut marker is a glyph in a
saturated colour (red) in a top corner, outside the face.

Deterministic for a seed: image i depends only on (seed, i) and its label.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from isnet_cli.errors import InputError

Bias = float | Literal["flip"] | None
Kind = Literal["chest", "faces"]
KINDS: tuple[str, ...] = ("chest", "faces")
DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {"chest": ("normal", "opacity"), "faces": ("neutral", "smiling")}

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


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Inside test ((y - cy) / ry)^2 + ((x - cx) / rx)^2 <= 1."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    """Gaussian bump exp(-r^2 / (2 sigma^2)), peak 1."""
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma**2))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    from PIL import Image

    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))


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
    body = _ellipse(yy, xx, s * u(0.52, 0.56), s * u(0.48, 0.52), s * u(0.44, 0.48), s * u(0.38, 0.42))
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
    img += 0.03 * _smooth_noise(rng, size, 6)
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
        lung = _ellipse(yy, xx, cy, cx, ry, rx) & (yy < dome_y) & body
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
    heart = _ellipse(yy, xx, s * u(0.62, 0.66), mid + s * u(0.05, 0.08), s * 0.12, s * 0.12) & body
    img[heart & ~mask] = np.maximum(img[heart & ~mask], u(0.62, 0.70))
    img[heart & mask] += 0.10  # overlap is denser, not masked out (the mask is the lung field)


def _lesion(label: int, lung: tuple[Any, ...], yy: np.ndarray, xx: np.ndarray, s: float, lu: Any) -> np.ndarray:
    """The lesion of class `label` (>= 1) in one lung, peak 1: a blob, a basal opacity or small nodules."""
    _, cy, cx, ry, rx = lung
    kind = (label - 1) % 3
    if kind == 0:
        sigma = s * lu(0.06, 0.08)
        ly, lx = cy + lu(-0.4, 0.3) * ry, cx + lu(-0.35, 0.35) * rx
        return _blob(yy, xx, ly, lx, sigma)
    if kind == 1:
        return np.clip((yy - (cy + 0.1 * ry)) / (0.5 * ry), 0.0, 1.0) * 0.9
    lesion = np.zeros_like(yy)
    for _ in range(4):
        lesion = np.maximum(lesion, _blob(yy, xx, cy + lu(-0.6, 0.5) * ry, cx + lu(-0.5, 0.5) * rx, s * 0.03))
    return lesion


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
        img[..., c] = base[c] + 0.08 * _smooth_noise(rng, size, 5)

    # Face: a skin-toned ellipse (tones from pale to dark), lit a little from the top left.
    cy, cx = s * u(0.52, 0.56), s * u(0.47, 0.53)
    ry, rx = s * u(0.32, 0.36), s * u(0.24, 0.28)
    mask = _ellipse(yy, xx, cy, cx, ry, rx)
    skin = np.array([0.90, 0.70, 0.56], np.float32) * u(0.55, 1.05)
    shade = 1.0 - 0.12 * ((yy - cy) / ry + (xx - cx) / rx) / 2.0
    img[mask] = np.clip(skin[None, :] * shade[mask][:, None], 0.0, 1.0)

    # Eyes (dark), eyebrows (hair colour) and a nose shadow: structure shared by every class.
    hair = np.array([u(0.05, 0.35)] * 3, np.float32) * np.array([1.0, 0.85, 0.7], np.float32)
    eye_y, eye_dx = cy - ry * u(0.22, 0.30), rx * u(0.36, 0.44)
    for side in (-1, 1):
        eye = _ellipse(yy, xx, eye_y, cx + side * eye_dx, s * 0.035, s * 0.05) & mask
        img[eye] = np.array([0.08, 0.06, 0.05], np.float32)
        brow = _ellipse(yy, xx, eye_y - s * 0.07, cx + side * eye_dx, s * 0.015, s * 0.065) & mask
        img[brow] = hair
    nose = _ellipse(yy, xx, cy + ry * 0.12, cx, s * 0.07, s * 0.025) & mask
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
    return _ellipse(yy, xx, my, cx, s * 0.05, half * 0.6)


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
    bump = _blob(yy, xx, ys[i] + 0.5, xs[i] + 0.5, sigma) * contrast * float(rng.uniform(0.9, 1.1))
    return np.clip(image + bump * mask, 0.0, 1.0).astype(np.float32)


def marker_probability(bias: Bias, label: int) -> float:
    """P(marker | label): `bias` for class 1, 1 - bias for the others; "flip": class 0 only; None: never."""
    if bias is None:
        return 0.0
    if bias == "flip":
        return 1.0 if label == 0 else 0.0
    p = float(bias)
    return p if label == 1 else 1.0 - p


def parse_bias(value: str | float | None) -> Bias:
    """`none`/None, `flip`, or a probability in [0, 1]."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, str) and value.lower() == "flip":
        return "flip"
    try:
        p = float(value)
    except ValueError:
        raise InputError(None, f"bias {value!r} is not a number, 'flip' or 'none'", "use e.g. --bias 1.0") from None
    if not 0.0 <= p <= 1.0:
        raise InputError(None, f"bias {p} is outside [0, 1]", "use a probability, 'flip' or 'none'")
    return p


def synthesize(
    out: str | Path,
    n: int = 400,
    size: int = 64,
    bias: Bias = None,
    classes: Sequence[str] | None = None,
    fmt: Literal["png", "dcm"] = "png",
    seed: int = 0,
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    bits: int = 8,
    compression: str | None = None,
    contrast: float = 0.22,
    progress: bool = False,
    kind: Kind = "chest",
) -> Path:
    """Write `n` phantoms (balanced classes) to OUT/images, OUT/masks and OUT/manifest.csv; return the manifest.

    Manifest columns: image, mask, label (class name), marker (0/1: the shortcut is present).
    Chest images are PNG (8-bit, or 16-bit when `bits` > 8) or DICOM (`fmt="dcm"`, see
    `isnet_cli.io.dicom.write_dicom`); face images RGB PNG or RGB DICOM (`isnet_cli.io.colour`), and
    `contrast`, `bits` and `photometric` are for chest phantoms only. Masks are always 8-bit PNG {0, 255}.
    `classes` defaults to the kind's (`DEFAULT_CLASSES`).
    """
    from PIL import Image

    from isnet_cli.console import track

    if kind not in KINDS:
        raise InputError(None, f"unknown phantom kind {kind!r}", f"use one of {', '.join(KINDS)}")
    classes = list(classes) if classes else list(DEFAULT_CLASSES[kind])
    _check_settings(classes, n, size, fmt, bits, compression)
    bias = parse_bias(bias) if isinstance(bias, str) else bias
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)

    # Balanced labels in a seeded random order; each image then has its own stream (seed, i).
    labels = np.random.default_rng(seed).permutation(np.arange(n) % len(classes))
    rows = []
    for i in track(range(n), "synthesising", total=n, enabled=progress):
        label = int(labels[i])
        rng = np.random.default_rng([seed, i])
        marker = bool(rng.random() < marker_probability(bias, label))
        if kind == "faces":
            ph = make_face(rng, size, label, marker)
        else:
            ph = make_phantom(rng, size, label, marker, contrast)
        stem = f"{i:05d}_{classes[label]}"
        mask_rel = f"masks/{stem}.png"
        Image.fromarray(ph.mask.astype(np.uint8) * 255).save(out / mask_rel)
        image_rel = _write_image(out, stem, ph.image, fmt, bits, photometric, compression)
        rows.append({"image": image_rel, "mask": mask_rel, "label": classes[label], "marker": int(marker)})

    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label", "marker"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _check_settings(classes: list[str], n: int, size: int, fmt: str, bits: int, compression: str | None) -> None:
    """Refuse settings `synthesize` cannot honour, naming the fix."""
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise InputError(None, f"classes {classes} must be at least two distinct names", "e.g. normal,opacity")
    if n < 1 or size < 16:
        raise InputError(None, f"need n >= 1 and size >= 16 (got n={n}, size={size})")
    if fmt not in ("png", "dcm"):
        raise InputError(None, f"unknown format {fmt!r}", "use png or dcm")
    if bits not in (8, 12, 16):
        raise InputError(None, f"bits must be 8, 12 or 16 (got {bits})")
    if fmt == "png" and compression:
        raise InputError(None, "compression applies to DICOM only", "add --format dcm")


def _write_image(
    out: Path, stem: str, image: np.ndarray, fmt: str, bits: int, photometric: str, compression: str | None
) -> str:
    """Write one phantom image (PNG, 8 or 16 bit, or DICOM) under OUT/images; its path relative to OUT."""
    from PIL import Image

    if fmt != "png" and image.ndim == 3:
        from isnet_cli.io.colour import write_colour_dicom

        image_rel = f"images/{stem}.dcm"
        write_colour_dicom(out / image_rel, image, compression=compression)
        return image_rel
    if fmt != "png":
        from isnet_cli.io.dicom import write_dicom

        image_rel = f"images/{stem}.dcm"
        write_dicom(out / image_rel, image, photometric=photometric, bits=bits, compression=compression)
        return image_rel
    image_rel = f"images/{stem}.png"
    if bits == 8:
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out / image_rel)
    else:
        top = 2**bits - 1
        Image.fromarray(np.round(image * top).astype(np.uint16)).save(out / image_rel)
    return image_rel
