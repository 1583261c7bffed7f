"""Turn any supported image file into a float32 (H, W) image in [0, 1], air dark, plus a record.

With `channels=3` colour files stay in colour, (H, W, 3) RGB (colour DICOM via `isnet_cli.io.colour`);
grey files stay (H, W) and are repeated over the channels by the preprocessing.

Dispatch by content and suffix: DICOM (`isnet_cli.io.dicom`), PNG/JPEG/TIFF/BMP (Pillow),
NIfTI/MHA/MHD/NRRD (SimpleITK, 2-D only); the `Decoded` record and the helpers both readers share are
in `isnet_cli.io.decoded`. Every decision lands in `Decoded.record`, which
predict/explain print in their JSON so that a user can see what was done to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.colour import is_colour_dicom, read_colour_dicom
from isnet_cli.io.contract import WINDOW_POLICIES
from isnet_cli.io.decoded import Decoded, brief, has_dicom_magic, scale_range
from isnet_cli.io.dicom import read_dicom
from isnet_cli.io.limits import check_pixels, require_finite

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
SUPPORTED_SUFFIXES = PILLOW_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES


def suffix_of(path: Path) -> str:
    """Lower-case suffix, with the double suffix `.nii.gz` kept whole."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def detect_format(path: Path) -> str:
    """`dicom`, `pillow` or `itk` from the suffix; files without a known suffix are DICOM if they say so."""
    suffix = suffix_of(path)
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in PILLOW_SUFFIXES:
        return "pillow"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if has_dicom_magic(path) or suffix == "":
        return "dicom"  # DICOM files often have no suffix at all (and old ones no preamble either)
    raise InputError(path, f"unsupported file type {suffix!r}", f"use one of {', '.join(SUPPORTED_SUFFIXES)} or DICOM")


def check_policy(window: str) -> None:
    if window not in WINDOW_POLICIES:
        raise InputError(None, f"unknown window policy {window!r}", f"use one of {', '.join(WINDOW_POLICIES)}")


def scale_unsigned(arr: np.ndarray, nominal_bits: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Unsigned integers -> [0, 1]: v / (2^b - 1).

    8-bit data: b = 8. Deeper data (16-bit PNG/TIFF often holds 10-12-bit values): b = the smallest
    bit depth that holds the image's maximum, at most the nominal one, so a 12-bit image stored in 16 bits
    is not crushed into the bottom 1/16 of the range; full precision is kept either way (float32).
    """
    top = int(arr.max()) if arr.size else 0
    if nominal_bits <= 8:
        bits, how = 8, "8-bit max (255)"
    else:
        bits = min(nominal_bits, max(8, top.bit_length()))
        how = f"{nominal_bits}-bit max" if bits == nominal_bits else f"effective {bits}-bit max (image max {top})"
        how += f" ({2**bits - 1})"
    return (arr.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0), {"bits": nominal_bits, "scaling": how}


def to_grey(arr: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W, C) -> (H, W) by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B); alpha dropped."""
    plane = grey_plane(arr)
    if plane is not None:
        return plane, None
    weights = np.array([0.299, 0.587, 0.114], np.float64)
    return (arr[..., :3].astype(np.float64) @ weights).astype(arr.dtype), "RGB -> grey (0.299 R + 0.587 G + 0.114 B)"


def drop_alpha(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) without its alpha channel (grey+alpha, RGBA)."""
    return arr[..., :-1] if arr.shape[2] in (2, 4) else arr


def grey_plane(arr: np.ndarray) -> np.ndarray | None:
    """The (H, W) plane of a grey image ((H, W), or one channel once alpha is dropped); None for colour."""
    if arr.ndim == 2:
        return arr
    arr = drop_alpha(arr)
    return arr[..., 0] if arr.shape[2] == 1 else None


def keep_colour(arr: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W, C) -> (H, W, 3) RGB (alpha dropped); grey stays (H, W): the input repeats it per channel."""
    plane = grey_plane(arr)
    if plane is not None:
        return plane, None
    return np.ascontiguousarray(arr[..., :3]), "RGB kept"


def read_pillow_array(path: Path, channels: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw pixel array of a PNG/JPEG/TIFF/BMP and its mode: grey (colour converted) or, with
    `channels=3`, (H, W, 3) RGB for colour files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            check_pixels(path, *im.size)  # before decoding: the header alone may claim gigapixels
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise InputError(path, f"multi-page image ({n_frames} pages) is not supported", "save one page")
            mode = im.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGB" if mode != "1" else "L")
            arr = np.asarray(im)
    except InputError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, hit at open() for the largest claims
        check_pixels(path, *_claimed_size(path))
        raise InputError(path, "image is a decompression bomb (Pillow refused it)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(path, f"cannot read image ({brief(exc)})") from None
    arr, converted = keep_colour(arr) if channels == 3 else to_grey(arr)
    record: dict[str, Any] = {"format": "pillow", "mode": mode}
    if converted:
        record["colour"] = converted
    return arr, record


def _claimed_size(path: Path) -> tuple[int, int]:
    """Width and height a Pillow-refused file claims, read without Pillow's bomb guard (header only)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_itk_array(path: Path, channels: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw 2-D pixel array of a NIfTI/MHA/NRRD file; singleton dimensions squeezed, anything else refused.
    Vector pixels become grey, or stay RGB with `channels=3`."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()
        check_pixels(path, int(size[0]), int(np.prod(size[1:], dtype=np.int64)) if len(size) > 1 else 1)
        img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(path, f"cannot read image ({first})") from None
    arr = sitk.GetArrayFromImage(img)
    record: dict[str, Any] = {
        "format": "itk",
        "itk_pixel_type": img.GetPixelIDTypeAsString(),
        "dims": img.GetDimension(),
    }
    colour = img.GetNumberOfComponentsPerPixel() > 1
    if colour:
        arr, converted = keep_colour(arr) if channels == 3 else to_grey(arr)
        if converted:
            record["colour"] = converted
    arr = np.squeeze(arr)
    if arr.ndim != 2 and not (colour and arr.ndim == 3 and arr.shape[2] == 3):
        raise InputError(path, f"image has shape {list(arr.shape)}: only 2-D images are supported", "save one slice")
    return arr, record


def load_image(
    path: str | Path,
    window: str = "dicom-window",
    percentiles: tuple[float, float] = (0.5, 99.5),
    channels: int = 1,
) -> Decoded:
    """Any supported file -> `Decoded` (float32 (H, W) in [0, 1], air dark, plus a record). Raises InputError.

    `channels=3`: colour files give (H, W, 3) RGB in [0, 1] (each channel scaled like grey data).

    Scaling: unsigned 8-bit: v / 255; deeper unsigned integers: see `scale_unsigned`; signed or float
    data (NIfTI/MHA): min-max, or percentiles with `window="percentile"`; DICOM: see `isnet_cli.io.dicom`.
    """
    path = Path(path)
    check_policy(window)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a file")
    kind = detect_format(path)
    if kind == "dicom":
        if channels == 3 and is_colour_dicom(path):
            return read_colour_dicom(path)
        return read_dicom(path, window=window, percentiles=percentiles)
    arr, record = read_pillow_array(path, channels) if kind == "pillow" else read_itk_array(path, channels)
    if arr.size == 0 or min(arr.shape[:2]) < 2:
        raise InputError(path, f"image is too small ({'x'.join(map(str, arr.shape))})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    unsigned = np.issubdtype(arr.dtype, np.unsignedinteger)
    # Pillow's 16-bit modes ("I;16", "I") may come as int32: non-negative integers from Pillow count as unsigned.
    if unsigned or (kind == "pillow" and np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0):
        nominal = 8 if arr.dtype.itemsize == 1 else 16 if arr.max() < 2**16 else 8 * arr.dtype.itemsize
        image, scaling = scale_unsigned(arr, nominal)
    else:
        require_finite(path, arr, "the image")
        policy = "minmax" if window == "dicom-window" else window
        image, scaling = scale_range(arr.astype(np.float64), policy, percentiles)
        if window == "dicom-window":
            scaling["window_fallback"] = "no DICOM window in this format: minmax"
    record.update(scaling)
    record.update({"path": str(path), "shape": list(image.shape), "window_policy": window, "inverted": False})
    return Decoded(np.ascontiguousarray(image, np.float32), record)


COLOUR_SPREAD = 0.03  # channel spread (max - min, in units of the image's maximum) that counts as colour ...
COLOUR_SHARE = 0.01  # ... on at least this share of the pixels


def is_colour_file(path: str | Path) -> bool:
    """True when the file holds a colour image: channels that differ by more than `COLOUR_SPREAD` on more
    than `COLOUR_SHARE` of the pixels. An RGB file of a grey radiograph (JPEG chroma noise included)
    counts as grey. DICOM: 3 samples per pixel."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "dicom":
        return is_colour_dicom(path)
    arr, _ = read_pillow_array(path, channels=3) if kind == "pillow" else read_itk_array(path, channels=3)
    if arr.ndim != 3:
        return False
    values = arr.astype(np.float32)
    spread = (values.max(axis=2) - values.min(axis=2)) / max(float(values.max()), 1e-12)
    return bool((spread > COLOUR_SPREAD).mean() > COLOUR_SHARE)


def detect_channels(paths: list[Path], limit: int = 16) -> int:
    """Input channels for a data set: 3 when any of its first `limit` images is in colour, else 1.
    Unreadable files count as grey here: the training's file check reports them."""
    for path in paths[:limit]:
        try:
            if is_colour_file(path):
                return 3
        except InputError:
            continue
    return 1
