"""DICOM radiographs -> float32 (H, W) in [0, 1], air dark; and writing DICOM (for phantoms and tests).

Pipeline (PS3.3 C.11): stored values -> Modality LUT (LUT sequence or rescale slope/intercept,
`pydicom.pixels.apply_modality_lut`) -> VOI (VOI LUT sequence or window centre/width, pydicom) or
the data's min-max / percentiles -> MONOCHROME1 inverted (v -> 1 - v) -> padding pixels set to 0.
Compressed transfer syntaxes are decoded by pydicom's plugins (Pillow, pylibjpeg-libjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.decoded import Decoded, brief, has_dicom_magic, scale_range
from isnet_cli.io.limits import check_pixels, require_finite

COMPRESSIONS = ("rle", "jpeg2000", "jpeg2000-lossy", "jpegls")


def _read_dataset(path: Path) -> tuple[Any, dict[str, Any]]:
    """dcmread with force (old files have no preamble/meta); the transfer syntax is inferred when absent."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    preamble = has_dicom_magic(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, OverflowError) as exc:
        raise InputError(path, f"not a readable DICOM file ({brief(exc)})") from None
    except MemoryError:  # a corrupted element length can claim gigabytes
        raise InputError(path, "not a readable DICOM file (an element claims more memory than there is)") from None
    record: dict[str, Any] = {"format": "dicom", "preamble": preamble, "read_with_force": not preamble}
    if "PixelData" not in ds:
        hint = "" if preamble else " (not a DICOM file?)"
        raise InputError(path, f"no pixel data{hint}", "give a DICOM image, not a report or a non-DICOM file")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        implicit, little = ds.original_encoding
        tsyntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = tsyntax
        record["transfer_syntax_inferred"] = True
    record["transfer_syntax"] = tsyntax.name
    record["transfer_syntax_uid"] = str(tsyntax)
    return ds, record


def read_dicom_pixels(path: str | Path) -> np.ndarray:
    """The stored pixel values of a single-frame DICOM file (no modality or VOI transform): masks."""
    import pydicom

    try:
        arr = pydicom.dcmread(path, force=True).pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise InputError(path, f"cannot read mask ({brief(exc)})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(path, f"mask has shape {list(arr.shape)}; expected one 2-D frame")
    return arr


def _check_supported(path: Path, ds: Any) -> None:
    """Refuse what a single-image grey classifier cannot take, with the reason and the fix."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames) is not supported", "export a single frame")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples > 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            path,
            f"colour DICOM ({photometric or '?'}, {samples} samples per pixel) is not supported",
            "give a greyscale radiograph (MONOCHROME1/2), or train a colour model (isnet train --channels 3)",
        )


def _padding_mask(ds: Any, stored: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Pixels equal to PixelPaddingValue (or within it..PixelPaddingRangeLimit), in stored values."""
    if "PixelPaddingValue" not in ds:
        return None, {}
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    lo, hi = min(a, b), max(a, b)
    pad = (stored >= lo) & (stored <= hi)
    return pad, {"padding_value": [lo, hi] if lo != hi else lo, "padding_pixels": int(pad.sum())}


def _modality(ds: Any, stored: np.ndarray) -> tuple[np.ndarray, str]:
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        how = "modality LUT sequence"
        if "RescaleSlope" in ds:
            how += " (rescale slope/intercept also present: ignored, the LUT takes precedence)"
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        how = f"rescale slope={float(ds.get('RescaleSlope', 1))} intercept={float(ds.get('RescaleIntercept', 0))}"
    else:
        return stored, "none"
    return apply_modality_lut(stored, ds), how


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued element (several windows: the first is the default)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0])
    return float(value)


def _first_text(value: Any) -> str:
    return str(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else str(value)


def _window_center_width(ds: Any) -> tuple[float, float, str] | None:
    """First (center, width) pair and the VOI LUT function, or None when the file has no usable window."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if w <= 0 or (func == "LINEAR" and w < 1) or func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return None
    return c, w, func


def _apply_window(values: np.ndarray, center: float, width: float, func: str, photometric: str) -> np.ndarray:
    """Window centre/width (LINEAR, LINEAR_EXACT, SIGMOID; PS3.3 C.11.2.1.2) through pydicom -> [0, 1].

    pydicom maps into the output range of the dataset it is given; a minimal dataset with an unsigned
    16-bit output makes that range [0, 65535] regardless of the file's rescale/LUT quirks.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels.processing import apply_windowing

    voi = Dataset()
    voi.PhotometricInterpretation = photometric
    voi.BitsStored = 16
    voi.PixelRepresentation = 0
    voi.WindowCenter = center
    voi.WindowWidth = width
    voi.VOILUTFunction = func
    return (apply_windowing(values.astype(np.float64), voi) / 65535.0).astype(np.float32)


def _apply_voi_sequence(ds: Any, values: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """VOI LUT sequence (first item) through pydicom; output scaled by the LUT's own min..max."""
    from pydicom.pixels.processing import apply_voi

    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    lut = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
    lo, hi = float(lut.min()), float(lut.max())
    ints = np.rint(values).astype(np.int64)  # the LUT indexes stored/modality integers
    out = apply_voi(ints, ds).astype(np.float64)
    scaled = np.zeros(values.shape, np.float32) if hi <= lo else ((out - lo) / (hi - lo)).astype(np.float32)
    info = {
        "voi": "VOI LUT sequence",
        "voi_lut": {"entries": entries, "first_mapped": first, "bits": bits, "range": [lo, hi]},
    }
    explanation = item.get("LUTExplanation")
    if explanation:
        info["voi_lut"]["explanation"] = str(explanation)
    return scaled, info


def read_dicom(
    path: str | Path, window: str = "dicom-window", percentiles: tuple[float, float] = (0.5, 99.5)
) -> Decoded:
    """DICOM file -> Decoded; `window`: dicom-window (VOI LUT, else window, else minmax), minmax, percentile."""
    path = Path(path)
    ds, record = _read_dataset(path)
    try:
        return _decode(path, ds, record, window, percentiles)
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "not enough memory to decode this image", "check its size, or free memory") from None
    except Exception as exc:  # a broken or hostile header breaks the pipeline in many ways; none may escape
        raise InputError(path, f"malformed DICOM header ({brief(exc)})", "re-export the file") from None


def _decode(path: Path, ds: Any, record: dict[str, Any], window: str, percentiles: tuple[float, float]) -> Decoded:
    """The pixel pipeline of `read_dicom` on a dataset whose header has been read."""
    _check_supported(path, ds)
    check_pixels(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))  # before decoding
    stored = _stored_pixels(path, ds, record)
    photometric = str(ds.PhotometricInterpretation).strip()
    record.update(
        {
            "path": str(path),
            "photometric": photometric,
            "bits": int(ds.get("BitsStored", 0) or 0),
            "bits_allocated": int(ds.get("BitsAllocated", 0) or 0),
            "signed": bool(int(ds.get("PixelRepresentation", 0) or 0)),
            "modality": str(ds.get("Modality", "")),
            "shape": list(stored.shape),
            "window_policy": window,
        }
    )
    pad, pad_info = _padding_mask(ds, stored)
    record.update(pad_info)
    values, record["modality_lut"] = _modality(ds, stored)
    require_finite(path, np.asarray(values), f"the modality transform ({record['modality_lut']})")
    image = _voi(ds, values, photometric, window, percentiles, None if pad is None else ~pad, record)
    require_finite(path, image, f"the VOI transform ({record['voi']})")
    if photometric == "MONOCHROME1":
        image = 1.0 - image  # MONOCHROME1: high values are dark; invert so that air is dark everywhere
    record["inverted"] = photometric == "MONOCHROME1"
    if pad is not None:
        image[pad] = 0.0  # padding is outside the detector: treat it as air
    return Decoded(np.ascontiguousarray(image.clip(0.0, 1.0), np.float32), record)


def _stored_pixels(path: Path, ds: Any, record: dict[str, Any]) -> np.ndarray:
    """The decoded stored values, one (H, W) frame; a decoder failure is the file's fault (InputError)."""
    try:
        stored = ds.pixel_array
    except BaseException as exc:  # decoders raise many types (ValueError, RuntimeError, plugin errors)
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit; a Rust decoder's panic (pylibjpeg-rle) is the file's fault
        raise InputError(
            path,
            f"cannot decode pixel data ({record['transfer_syntax']}): {brief(exc)}",
            "the file may be truncated, or a decoder plugin (pylibjpeg-libjpeg/-openjpeg/-rle) is missing",
        ) from None
    if stored.ndim != 2:
        raise InputError(path, f"pixel data has shape {list(stored.shape)}; expected one greyscale frame")
    return stored


def _voi(
    ds: Any,
    values: np.ndarray,
    photometric: str,
    window: str,
    percentiles: tuple[float, float],
    valid: np.ndarray | None,
    record: dict[str, Any],
) -> np.ndarray:
    """The VOI step: modality values -> [0, 1] by the file's VOI LUT or window (`dicom-window`), else by
    min-max or percentiles of the `valid` (not padding) pixels; how, recorded in `record`."""
    image: np.ndarray | None = None
    if window == "dicom-window":
        voi_seq = ds.get("VOILUTSequence")
        wcw = _window_center_width(ds)
        if voi_seq and "LUTDescriptor" in voi_seq[0] and "LUTData" in voi_seq[0]:
            image, info = _apply_voi_sequence(ds, values)
            record.update(info)
        elif wcw is not None:
            center, width, func = wcw
            image = _apply_window(values, center, width, func, photometric)
            record["voi"] = f"window center={center:g} width={width:g} function={func}"
            if ds.get("WindowCenterWidthExplanation"):
                record["window_explanation"] = str(_first_text(ds.WindowCenterWidthExplanation))
        else:
            record["window_fallback"] = "no VOI LUT or window in the file: minmax"
    if image is None:
        policy = "percentile" if window == "percentile" else "minmax"
        image, scaling = scale_range(values.astype(np.float64), policy, percentiles, valid)
        record["voi"] = scaling["scaling"]
        record["range"] = scaling["range"]
    return image


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    compression: str | None = None,
    rescale_intercept: float | None = None,
) -> Path:
    """Write a [0, 1] float image (air dark) as a single-frame CR DICOM file (Part 10, with preamble).

    Stored value s = round(v * (2^bits - 1)), inverted (s_max - s) for MONOCHROME1. Window centre/width
    are set to cover the full stored range exactly (c = 2^(bits-1) + intercept, w = 2^bits), so reading
    back with `dicom-window` returns s / (2^bits - 1). For bits > 8 a rescale intercept (default -1024)
    exercises the modality LUT. `compression`: rle (native), jpeg2000 (lossless), jpeg2000-lossy,
    jpegls (needs pyjpegls).
    """
    path = Path(path)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(None, f"photometric {photometric!r} is not supported", "use MONOCHROME1 or MONOCHROME2")
    if bits not in (8, 12, 16):
        raise InputError(None, f"bits must be 8, 12 or 16 (got {bits})")
    if compression not in (None, *COMPRESSIONS):
        raise InputError(None, f"unknown compression {compression!r}", f"use one of {', '.join(COMPRESSIONS)}")
    top = 2**bits - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(stored.dtype)
    ds = _radiograph(stored, photometric, bits, compression)
    intercept = 0.0
    if bits > 8:
        intercept = -1024.0 if rescale_intercept is None else float(rescale_intercept)
        ds.RescaleSlope = 1
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    ds.WindowCenter = 2 ** (bits - 1) + intercept
    ds.WindowWidth = 2**bits
    ds.PixelData = stored.tobytes()
    _compress(ds, compression)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_dataset(sop_class_uid: str, modality: str, entropy: str) -> Any:
    """File meta, SOP/Study/Series UIDs, modality and the phantom patient of a synthetic DICOM image (no
    image attributes yet). The UIDs are derived from `entropy` (a hash of the pixels and settings), so the
    same phantom always gives a byte-identical file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[entropy, "instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
    ds.Modality = modality
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "PHANTOM"
    return ds


def _radiograph(stored: np.ndarray, photometric: str, bits: int, compression: str | None) -> Any:
    """A CR dataset for `stored` (file meta, UIDs, patient and pixel-format attributes; no pixel data yet)."""
    from pydicom.uid import ComputedRadiographyImageStorage

    entropy = hashlib.sha256(stored.tobytes() + f"{photometric}{bits}{compression}".encode()).hexdigest()
    ds = phantom_dataset(ComputedRadiographyImageStorage, "CR", entropy)
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _compress(ds: Any, compression: str | None) -> None:
    """Re-encode the pixel data in place: rle, jpeg2000 (lossless), jpeg2000-lossy or jpegls; None keeps it."""
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

    if compression == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
    elif compression in ("jpeg2000", "jpeg2000-lossy"):
        lossless = compression == "jpeg2000"
        kwargs = {} if lossless else {"j2k_psnr": [45]}
        ds.compress(JPEG2000Lossless if lossless else JPEG2000, generate_instance_uid=False, **kwargs)
        if not lossless:
            ds.LossyImageCompression = "01"
    elif compression == "jpegls":
        from pydicom.pixels import get_encoder

        if not get_encoder(JPEGLSLossless).is_available:
            raise InputError(None, "JPEG-LS encoding needs the pyjpegls package", "pip install pyjpegls")
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
