"""Lung masks: any image format -> bool (H, W) aligned with its image.

Binarised at half the mask's maximum (m > 0.5 max), nearest-resized to the image shape, after
checking that mask and image have the same aspect ratio (within 2%: a different aspect means the
mask belongs to another image or crop). A DICOM Segmentation (SEG) is read through
`isnet_cli.io.dicom_seg`: its lung segment(s) (or the one labelled `segment`) on the frame that
references the image. An empty mask is an error where masks are required
(training) and a warning elsewhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.dicom import read_dicom_pixels
from isnet_cli.io.dicom_seg import is_dicom_seg, read_seg_mask
from isnet_cli.io.images import detect_format, read_itk_array, read_pillow_array

ASPECT_TOLERANCE = 0.02


class EmptyMaskWarning(UserWarning):
    """A mask with no foreground pixel where one was not strictly required."""


def read_mask_array(path: Path, image: Path | None = None, segment: str | None = None) -> np.ndarray:
    """The raw mask values as float64 (H, W), whatever the format (DICOM: stored values; SEG: {0, 1}).

    `image` (the mask's image) and `segment` (a segment label) only matter for a DICOM SEG.
    """
    kind = detect_format(path)
    if kind == "pillow":
        arr, _ = read_pillow_array(path)
    elif kind == "itk":
        arr, _ = read_itk_array(path)
    elif is_dicom_seg(path):
        arr = read_seg_mask(path, image, segment)
    else:
        arr = read_dicom_pixels(path)
    return np.asarray(arr, dtype=np.float64)


def binarise(values: np.ndarray) -> np.ndarray:
    """m > 0.5 * max(m); all-zero (or non-positive) stays empty."""
    top = float(values.max()) if values.size else 0.0
    return values > 0.5 * top if top > 0 else np.zeros(values.shape, bool)


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `shape` (pixel centres: src = floor((dst + 0.5) * in / out))."""
    if mask.shape == tuple(shape):
        return mask
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def load_mask(
    path: str | Path,
    shape: tuple[int, int],
    required: bool = True,
    image: str | Path | None = None,
    segment: str | None = None,
) -> np.ndarray:
    """Mask file -> bool (H, W) == `shape`. Raises InputError on aspect mismatch, or when empty and `required`.

    `image`: the image file the mask belongs to, so that a DICOM SEG's frame is matched to it by SOP
    Instance UID; `segment`: the label of the SEG segment to use (default: the lung-coded segments).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "mask file not found")
    values = read_mask_array(path, None if image is None else Path(image), segment)
    if values.ndim != 2 or min(values.shape) < 1:
        raise InputError(path, f"mask has shape {list(values.shape)}; expected a 2-D image")
    mh, mw = values.shape
    ih, iw = shape
    ratio = (mw / mh) / (iw / ih)
    if abs(ratio - 1.0) > ASPECT_TOLERANCE:
        raise InputError(
            path,
            f"mask is {mw}x{mh} but its image is {iw}x{ih} (aspect differs by {abs(ratio - 1) * 100:.1f}%)",
            "the mask must cover the same field of view as the image",
        )
    mask = resize_nearest(binarise(values), (ih, iw))
    if not mask.any():
        if required:
            raise InputError(path, "mask is empty (no lung pixel)", "training needs a lung mask for every image")
        warnings.warn(f"{path}: mask is empty (no lung pixel)", EmptyMaskWarning, stacklevel=2)
    return mask
