"""What every image reader returns (`Decoded`) and the helpers the readers share: `images.py` (Pillow,
SimpleITK, dispatch) and `dicom.py` both build on this module, so neither imports the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Decoded:
    """`image`: float32 (H, W) in [0, 1], air dark; `record`: what was done (JSON-serialisable)."""

    image: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def brief(exc: BaseException, limit: int = 140) -> str:
    """`Type: first clause of the message`, short enough for a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(" - ")[0]
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def has_dicom_magic(path: Path) -> bool:
    """True when the file has the 128-byte preamble followed by b'DICM'."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def scale_range(
    arr: np.ndarray, window: str, percentiles: tuple[float, float], valid: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Real-valued data -> [0, 1] by min-max, or by clipping at `percentiles` (`percentile` policy).

    v = (x - lo) / (hi - lo), clipped; `valid` excludes padding pixels from lo/hi.
    """
    values = arr[valid] if valid is not None else arr.ravel()
    if values.size == 0:
        values = arr.ravel()
    if window == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        how = f"percentile {percentiles[0]}-{percentiles[1]}"
    else:
        lo, hi = float(values.min()), float(values.max())
        how = "minmax"
    out = np.zeros(arr.shape, np.float32) if hi <= lo else ((arr - lo) / (hi - lo)).astype(np.float32)
    return out.clip(0.0, 1.0), {"scaling": how, "range": [lo, hi]}
