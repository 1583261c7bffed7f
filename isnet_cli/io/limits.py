"""Guards every image reader applies before it trusts a file: a pixel limit and finite values.

A header can claim any size (a PNG of 40000 x 40000 pixels is 40 bytes of IHDR and a few of IDAT):
decoding it first and checking afterwards would already have spent the memory. So each reader
checks the size the header claims against `max_pixels()` before it decodes anything, and refuses
with a one-line error that says how to raise the limit. The default (50 megapixels) is well above
the largest radiograph detectors (about 4300 x 4300, 18.5 MP) and small enough that the float
copies the pipeline makes stay within a few GB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from isnet_cli.errors import InputError

MAX_PIXELS_ENV = "ISNET_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000


def max_pixels() -> int:
    """The pixel limit: `ISNET_MAX_PIXELS` when set (a positive integer), else `DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(None, f"{MAX_PIXELS_ENV}={raw!r} is not a positive integer", "set it to e.g. 100000000")
    return value


def check_pixels(path: str | Path, width: int, height: int, frames: int = 1) -> None:
    """Refuse an image whose header claims more than `max_pixels()` pixels (or a nonsensical size)."""
    if width < 0 or height < 0 or frames < 0:
        raise InputError(path, f"header claims a negative size ({width} x {height} x {frames})")
    total = width * height * max(frames, 1)
    limit = max_pixels()
    if total > limit:
        raise InputError(
            path,
            f"image of {width} x {height}" + (f" x {frames} frames" if frames > 1 else "") + f" = {total:,} pixels "
            f"is above the pixel limit ({limit:,})",
            f"if the file is genuine, raise the limit with {MAX_PIXELS_ENV}",
        )


def require_finite(path: str | Path, values: np.ndarray, what: str) -> None:
    """Refuse NaN/inf pixel values (e.g. from a NaN or overflowing rescale): they would poison min-max scaling."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InputError(path, f"{what} gives {bad:,} non-finite (NaN/inf) pixel values", "check the file's header")
