"""Lung masks from DICOM Segmentation objects (SEG), as annotation tools and PACS export them.

A SEG holds one or more segments (each a label plus a coded "segmented property type") over the frames of
one or more source images. For a given image we need one 2-D lung mask, so:

- the segment: the one labelled `segment` (case-insensitive) when the user names one (`--mask-segment`),
  else the union of every segment whose property type is coded as lung, left lung or right lung
  (SNOMED CT; masks of the two lungs are often separate segments);
- the frame: the one whose referenced SOP Instance UID is the image's own. A SEG drawn on another image
  is refused rather than silently misaligned. A non-DICOM image has no UID: a SEG over exactly one source
  frame is then taken as is.

highdicom does the decoding (bit-packed BINARY or FRACTIONAL frames, sparse frames, frame matching).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.decoded import brief

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# SNOMED CT lung concepts (SCT, and SRT: the designator of older SEGs): lung, left lung, right lung, entire lung.
LUNG_CODES = frozenset({"39607008", "44029006", "3341006", "181216001"})
LUNG_SCHEMES = frozenset({"SCT", "SRT"})


def is_dicom_seg(path: Path) -> bool:
    """True when `path` is a DICOM file whose SOP Class is Segmentation Storage (header read only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM at all: the ordinary readers report what is wrong with it
        return False
    return str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE


def image_sop_instance_uid(image: Path | None) -> str | None:
    """The SOP Instance UID of a DICOM image, None for other formats or files without one."""
    if image is None:
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(image, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # a PNG or NIfTI image: no UID to match
        return None
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None


def _readable(ds: Any) -> Any:
    """Drop Pixel Measures without Slice Thickness (in memory) so that highdicom can read the SEG.

    A SEG of a 2-D radiograph may carry Pixel Spacing alone (Slice Thickness is Type 1C, only required for
    volumes; highdicom itself writes such SEGs), but highdicom 0.28's reader requires both. The mask does not
    depend on the spacing.
    """
    groups = [*ds.get("SharedFunctionalGroupsSequence", []), *ds.get("PerFrameFunctionalGroupsSequence", [])]
    for group in groups:
        measures = group.get("PixelMeasuresSequence")
        if measures and "SliceThickness" not in measures[0]:
            del group.PixelMeasuresSequence
    return ds


def _describe(seg: Any) -> list[tuple[int, str, str]]:
    """(number, label, property type meaning [code]) of every segment, for choosing and for error messages."""
    out = []
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        prop = desc.segmented_property_type
        out.append((number, str(desc.segment_label), f"{prop.meaning} [{prop.scheme_designator} {prop.value}]"))
    return out


def _listing(segments: list[tuple[int, str, str]]) -> str:
    return ", ".join(f"#{n} '{label}' ({prop})" for n, label, prop in segments) or "none"


def choose_segments(seg: Any, path: Path, segment: str | None) -> list[int]:
    """Segment numbers to merge: the one labelled `segment`, else every lung-coded one; InputError if none."""
    segments = _describe(seg)
    if segment is not None:
        chosen = [n for n, label, _ in segments if label.strip().lower() == segment.strip().lower()]
        if not chosen:
            raise InputError(
                path,
                f"SEG has no segment labelled {segment!r} (segments: {_listing(segments)})",
                "pass one of these labels with --mask-segment",
            )
        return chosen
    chosen = []
    for number in seg.segment_numbers:
        prop = seg.get_segment_description(number).segmented_property_type
        if prop.value in LUNG_CODES and prop.scheme_designator in LUNG_SCHEMES:
            chosen.append(number)
    if not chosen:
        raise InputError(
            path,
            f"SEG has no lung segment (segments: {_listing(segments)})",
            "choose one by its label with --mask-segment",
        )
    return chosen


def read_seg_mask(path: Path, image: Path | None = None, segment: str | None = None) -> np.ndarray:
    """The lung mask of `image` in the SEG at `path`: uint8 (H, W) in {0, 1} (chosen segments merged).

    Raises InputError when the file is not a readable SEG, when no segment matches (listing the
    segments), when the SEG does not reference `image`, or when it cannot tell which frame is meant.
    """
    import highdicom as hd
    import pydicom

    try:
        seg = hd.seg.Segmentation.from_dataset(_readable(pydicom.dcmread(path, force=True)), copy=False)
    except Exception as exc:  # pydicom/highdicom raise many types for malformed objects
        raise InputError(path, f"cannot read DICOM SEG ({brief(exc)})") from None
    numbers = choose_segments(seg, path, segment)
    sources = sorted({uid for _, _, uid in seg.get_source_image_uids()})
    uid = image_sop_instance_uid(image)
    if uid is None:
        if len(sources) != 1:
            raise InputError(
                path,
                f"SEG covers {len(sources)} source images and {image or 'the image'} has no SOP Instance UID to match",
                "give the DICOM image the SEG was drawn on",
            )
        uid = sources[0]
    elif uid not in sources:
        shown = ", ".join(sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise InputError(
            path,
            f"SEG references another image (SOP Instance UID {shown}), not {image} ({uid})",
            "pair each image with the SEG drawn on it",
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=numbers, combine_segments=False
        )
    except Exception as exc:
        raise InputError(path, f"cannot read the SEG frame of {uid} ({brief(exc)})") from None
    # (frames, rows, columns, segments); a single-frame image has one frame. FRACTIONAL SEGs come scaled to
    # [0, 1]: above one half is lung, as for every other mask format.
    return (np.asarray(pixels, dtype=np.float64)[0] > 0.5).any(axis=-1).astype(np.uint8)
