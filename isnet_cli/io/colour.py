"""Colour DICOM (RGB, YBR_FULL, YBR_FULL_422, ... : ultrasound, dermoscopy, secondary captures) -> RGB.

Kept apart from `isnet_cli.io.dicom`, whose pipeline (modality LUT, VOI window, MONOCHROME1) is for
grey radiographs only: a colour image has no window, its stored values are display values. pydicom
(>= 3) decodes the pixel data and converts YCbCr interpretations to RGB (`Dataset.pixel_array` applies
`pydicom.pixels.convert_color_space`); this module then scales by the bit depth, v / (2^BitsStored - 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.decoded import Decoded, brief

COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def is_colour_dicom(path: str | Path) -> bool:
    """True when the DICOM file has 3 samples per pixel (header only; unreadable files: False, the grey
    reader then reports the problem)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # pydicom raises many types for broken files; the grey reader names the problem
        return False
    return int(ds.get("SamplesPerPixel", 1) or 1) == 3


def read_colour_dicom(path: str | Path) -> Decoded:
    """A single-frame colour DICOM -> `Decoded` with an (H, W, 3) RGB image in [0, 1]. Raises InputError."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise InputError(path, f"not a readable DICOM file ({brief(exc)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames) is not supported", "export a single frame")
    if photometric not in COLOUR_PHOTOMETRICS:
        raise InputError(path, f"colour DICOM with photometric {photometric!r} is not supported", "convert to RGB")
    try:
        rgb = ds.pixel_array  # YBR_* -> RGB by pydicom's colour-space conversion
    except Exception as exc:  # decoders raise many types (ValueError, RuntimeError, plugin errors)
        raise InputError(path, f"cannot decode pixel data: {brief(exc)}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(path, f"pixel data has shape {list(rgb.shape)}; expected one RGB frame")
    bits = int(ds.get("BitsStored", 8) or 8)
    image = (rgb.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0)
    record: dict[str, Any] = {
        "format": "dicom",
        "path": str(path),
        "photometric": photometric,
        "colour": "RGB kept" if photometric == "RGB" else f"{photometric} -> RGB (pydicom)",
        "bits": bits,
        "scaling": f"{bits}-bit max ({2**bits - 1})",
        "modality": str(ds.get("Modality", "")),
        "shape": list(image.shape),
        "inverted": False,
    }
    return Decoded(np.ascontiguousarray(image, np.float32), record)


def write_colour_dicom(
    path: str | Path, image: np.ndarray, photometric: str = "RGB", compression: str | None = None
) -> Path:
    """Write an (H, W, 3) RGB float image in [0, 1] as an 8-bit single-frame Secondary Capture DICOM file.

    `photometric` RGB stores the values as they are; YBR_FULL stores them converted with pydicom's
    `convert_color_space` (what cameras and ultrasound scanners often write). `compression`: None or
    rle. The UIDs come from the pixels, so one image always gives the same file (as `write_dicom`).
    """
    import hashlib

    from pydicom.pixels import convert_color_space
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

    from isnet_cli.io.dicom import phantom_dataset

    if photometric not in ("RGB", "YBR_FULL"):
        raise InputError(None, f"photometric {photometric!r} is not supported", "use RGB or YBR_FULL")
    if compression not in (None, "rle"):
        raise InputError(None, f"compression {compression!r} is not supported for colour", "use rle or none")
    rgb = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    entropy = hashlib.sha256(stored.tobytes() + f"{photometric}{compression}".encode()).hexdigest()
    ds = phantom_dataset(SecondaryCaptureImageStorage, "OT", entropy)
    ds.ConversionType = "SYN"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    if compression == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
