"""Decoded image (+ mask) -> model input per the `InputContract`; and back (`unletterbox`).

letterbox: scale s = size / max(H, W) (aspect kept), resized (h, w) = round(H s), round(W s), centred,
padded with 0 (air); stretch: each axis scaled to `size`. Images are resized with Pillow's bilinear
filter (antialiased when shrinking), masks with nearest neighbour. Then x = low + (high - low) v:
a grey (H, W) image is repeated over `channels`, a colour (H, W, 3) one becomes its 3 channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.io.contract import InputContract
from isnet_cli.io.images import load_image
from isnet_cli.io.masks import load_mask, resize_nearest


@dataclass
class Prepared:
    """`x` float32 (C, S, S) in [low, high]; `mask` float32 (1, S, S) in {0, 1} or None;
    `record` decode + resize record; `image` the decoded (H, W) or (H, W, 3) image before resizing."""

    x: np.ndarray
    mask: np.ndarray | None
    record: dict[str, Any]
    image: np.ndarray


def resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float (H, W) -> float32 `shape` with Pillow's bilinear filter (antialiased when shrinking);
    (H, W, C) images channel by channel."""
    from PIL import Image

    if image.ndim == 3:
        return np.stack([resize_bilinear(image[..., c], shape) for c in range(image.shape[2])], axis=-1)
    if image.shape == tuple(shape):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.ascontiguousarray(image, np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def resize_geometry(shape: tuple[int, int], size: int, mode: str) -> dict[str, Any]:
    """Where an (H, W) image lands in the (size, size) input: resized shape, padding, scale."""
    h, w = shape
    if mode == "stretch":
        rh, rw, top, left = size, size, 0, 0
    elif mode == "letterbox":
        s = size / max(h, w)
        rh, rw = max(1, round(h * s)), max(1, round(w * s))
        top, left = (size - rh) // 2, (size - rw) // 2
    else:
        raise ValueError(f"unknown resize mode {mode!r} (letterbox or stretch)")
    return {
        "resize": mode,
        "size": size,
        "original_shape": [h, w],
        "resized_shape": [rh, rw],
        "pad": [top, left],
        "scale": [rh / h, rw / w],
    }


def resize_pair(
    image: np.ndarray, mask: np.ndarray | None, size: int, mode: str
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(H, W) or (H, W, 3) image in [0, 1] (+ bool mask) -> (size, size[, 3]) float32 image (+ bool mask),
    and the geometry."""
    geo = resize_geometry(image.shape[:2], size, mode)
    rh, rw = geo["resized_shape"]
    top, left = geo["pad"]
    out = np.zeros((size, size, *image.shape[2:]), np.float32)
    out[top : top + rh, left : left + rw] = resize_bilinear(image, (rh, rw)).clip(0.0, 1.0)
    out_mask = None
    if mask is not None:
        out_mask = np.zeros((size, size), bool)
        out_mask[top : top + rh, left : left + rw] = resize_nearest(mask, (rh, rw))
    return out, out_mask, geo


def to_input(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """(S, S) or (S, S, 3) in [0, 1] -> (C, S, S) float32 in [low, high] (grey repeated over C)."""
    x = contract.low + (contract.high - contract.low) * image.astype(np.float32)
    if x.ndim == 3:
        if contract.channels != x.shape[2]:
            raise ValueError(f"a {x.shape[2]}-channel image for a {contract.channels}-channel contract")
        return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)
    return np.repeat(x[None], contract.channels, axis=0).astype(np.float32)


def preprocess_array(
    image: np.ndarray, mask: np.ndarray | None, contract: InputContract
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Decoded (H, W[, 3]) image in [0, 1] (+ bool mask) -> (x (C,S,S), mask (1,S,S) float32 or None, resize record)."""
    resized, rmask, geo = resize_pair(image, mask, contract.size, contract.resize)
    m = None if rmask is None else rmask[None].astype(np.float32)
    return to_input(resized, contract), m, geo


def preprocess_file(
    path: str | Path,
    contract: InputContract,
    mask_path: str | Path | None = None,
    mask_required: bool = False,
    mask_segment: str | None = None,
) -> Prepared:
    """File (+ mask file) -> Prepared, following `contract` (window policy, size, resize mode, range).

    `mask_segment`: the segment label to use when the mask is a DICOM SEG (default: its lung segments).
    """
    decoded = load_image(path, window=contract.window, percentiles=contract.percentiles, channels=contract.channels)
    mask = None
    if mask_path is not None:
        mask = load_mask(mask_path, decoded.image.shape[:2], mask_required, image=path, segment=mask_segment)
    x, m, geo = preprocess_array(decoded.image, mask, contract)
    return Prepared(x=x, mask=m, record={**decoded.record, **geo}, image=decoded.image)


def unletterbox(array2d: np.ndarray, resize_record: dict[str, Any]) -> np.ndarray:
    """A (size, size) map (heatmap, mask) -> the original (H, W): crop the padding, resize back bilinearly."""
    rh, rw = resize_record["resized_shape"]
    top, left = resize_record["pad"]
    h, w = resize_record["original_shape"]
    crop = np.asarray(array2d, np.float32)[top : top + rh, left : left + rw]
    return resize_bilinear(crop, (h, w))
