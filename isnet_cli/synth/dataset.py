"""A phantom data set on disk: balanced labels, the shortcut marker drawn with the bias's probability,
images (PNG or DICOM), masks and manifest.csv.

Deterministic for a seed: image i depends only on (seed, i) and its label.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.synth.chest import make_phantom
from isnet_cli.synth.faces import make_face

Bias = float | Literal["flip"] | None
Kind = Literal["chest", "faces"]
KINDS: tuple[str, ...] = ("chest", "faces")
DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {"chest": ("normal", "opacity"), "faces": ("neutral", "smiling")}


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
