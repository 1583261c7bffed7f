"""`isnet segment INPUTS`: a lung mask per input at the input's original geometry, QC, a new manifest.

Inputs are decoded and preprocessed by the contract recorded in the segmenter (`iter_prepared`, the same
path as `isnet predict`); the lung probability is taken back to the original (H, W) by undoing the
letterbox or stretch (`unletterbox`), thresholded at 0.5, cleaned (`clean_mask`) and checked (`quality`).
Each mask PNG is written atomically as soon as it is computed and each qc.csv row is flushed, so a run
stopped by a bad input (`--fail-fast`) or killed keeps everything written before. With `fmt="seg"` each
mask is a binary DICOM SEG referencing its DICOM input instead (`isnet_cli.io.dicom_out`; one Series
per run and Study), which PACS viewers show over the image and `isnet train` reads back.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli import __version__
from isnet_cli.errors import InputError
from isnet_cli.infer.onnx_runtime import model_id
from isnet_cli.infer.predict import Failure, iter_prepared, usable
from isnet_cli.io.atomic import atomic_write_bytes
from isnet_cli.io.dicom_out import RunSeries, require_dicom, write_seg
from isnet_cli.io.manifest import MANIFEST_NAMES, Sample, is_dataset_folder
from isnet_cli.io.preprocess import unletterbox
from isnet_cli.segment.closing import recorded_closing
from isnet_cli.segment.model import Segmenter
from isnet_cli.segment.postprocess import Qc, QcLimits, clean_mask, quality

QC_COLUMNS = ("image", "mask", "ok", "contrast", "area_fraction", "components", "balance", "problems")
QC_CHOICES = ("exclude", "keep")
MASK_FORMATS = ("png", "seg")
SEGMENTER_NAME = "isnet lung segmenter"


@dataclass
class Segmented:
    """One input's result: the cleaned bool mask at the original geometry, its QC, and the decoded image
    (H, W) in [0, 1] (for overlays)."""

    sample: Sample
    mask: np.ndarray
    qc: Qc
    image: np.ndarray


def predict_masks(
    segmenter: Segmenter,
    samples: list[Sample],
    batch_size: int = 8,
    fail_fast: bool = False,
    limits: QcLimits = QcLimits(),  # noqa: B008 (frozen, immutable)
    closing: float | None = None,
) -> Iterator[Segmented | Failure]:
    """Masks and failures, in input order; an unreadable input raises with `fail_fast`, else is a `Failure`.
    Each lung is closed by `closing` (fraction of the long side; None: the segmenter's recorded radius)."""
    if closing is None:
        closing = recorded_closing(segmenter.meta)
    for batch in iter_prepared(samples, segmenter.contract, batch_size):
        good, failed = usable(batch, fail_fast)
        yield from failed
        if not good:
            continue
        lung = segmenter.lung(np.stack([p.x[:1] for _, p in good]))
        for (sample, prepared), prob in zip(good, lung, strict=True):
            mask = clean_mask(unletterbox(prob, prepared.record) > 0.5, closing)
            yield Segmented(sample, mask, quality(mask, prepared.image, limits), prepared.image)


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as an 8-bit PNG {0, 255} (what `isnet_cli.io.masks` reads back)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(image: np.ndarray, mask: np.ndarray, ok: bool) -> bytes:
    """The radiograph in grey with the mask's outline (2 px): green when QC passed, red when it flagged it."""
    from PIL import Image
    from scipy import ndimage

    grey = (np.clip(image[..., 0] if image.ndim == 3 else image, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    outline = ndimage.binary_dilation(mask & ~ndimage.binary_erosion(mask))
    rgb[outline] = (0, 220, 0) if ok else (230, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class MaskNames:
    """Where each input's mask goes: masks/<path relative to the inputs' common folder>.png (or `suffix`), unique."""

    def __init__(self, samples: Sequence[Sample], suffix: str = ".png") -> None:
        parents = [str(s.image.resolve().parent) for s in samples]
        self.root = Path(os.path.commonpath(parents)) if parents else Path()
        self.suffix = suffix
        self.used: set[str] = set()

    def __call__(self, image: Path) -> str:
        rel = image.resolve().relative_to(self.root).with_suffix("")
        name, n = f"masks/{rel.as_posix()}{self.suffix}", 1
        while name in self.used:  # a.png and a.dcm in one folder
            n += 1
            name = f"masks/{rel.as_posix()}_{n}{self.suffix}"
        self.used.add(name)
        return name


class QcFile:
    """qc.csv: one row per input (flagged ones with ok = 0 and their problems), flushed as written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.DictWriter(self.fh, fieldnames=list(QC_COLUMNS))
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def source_rows(inputs: Sequence[str], samples: Sequence[Sample]) -> tuple[list[str], list[dict[str, str]]] | None:
    """The manifest rows to complete with masks, image paths absolute, when INPUTS is one dataset: a manifest
    CSV (or a folder holding one; every column kept) or an images/<class>/ folder tree (image, mask, label).
    None for anything else (files, plain folders, several inputs)."""
    if len(inputs) != 1 or inputs[0] == "-":
        return None
    path = Path(inputs[0])
    if path.is_dir():
        csv_path = next((path / n for n in MANIFEST_NAMES if (path / n).is_file()), None)
        if csv_path is None:
            if not is_dataset_folder(path):
                return None
            return ["image", "mask", "label"], [
                {"image": str(s.image.resolve()), "mask": "", "label": s.label or ""} for s in samples
            ]
        path = csv_path
    if path.suffix.lower() != ".csv":
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "mask" not in columns:
        columns.insert(columns.index("image") + 1, "mask")
    for row in rows:
        row["image"] = str((path.parent / row["image"]).resolve())
    return columns, rows


def write_manifest(path: Path, columns: list[str], rows: list[dict[str, str]], masks: dict[str, str]) -> int:
    """manifest.csv at `path`: `rows` with image paths relative to its folder and `mask` set from `masks`
    (absolute image path -> mask path relative to the folder); rows without a mask (excluded, failed) are
    left out. Returns the number of rows written."""
    out_dir = path.parent.resolve()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    written = 0
    for row in rows:
        if row["image"] not in masks:
            continue
        writer.writerow({**row, "image": os.path.relpath(row["image"], out_dir), "mask": masks[row["image"]]})
        written += 1
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return written


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier run's masks unless `overwrite`."""
    if not overwrite and any((out / name).exists() for name in ("qc.csv", "manifest.csv", "masks")):
        raise InputError(out, "already holds segment output (qc.csv, manifest.csv or masks/)", "pass --overwrite")


@dataclass
class SegmentSummary:
    """What `segment_inputs` did: masks written, flagged by QC, failed inputs, the new manifest (if any)."""

    written: int
    flagged: int
    failed: int
    manifest: Path | None
    manifest_rows: int


def segment_inputs(
    inputs: Sequence[str],
    model: str | None,
    out: Path,
    qc: str = "exclude",
    device: str = "auto",
    batch_size: int = 8,
    fail_fast: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    fmt: str = "png",
    anonymize: bool = False,
    overlay: Path | None = None,
    closing: float | None = None,
) -> SegmentSummary:
    """Segment every input into OUT/masks/, write OUT/qc.csv and, for a dataset, OUT/manifest.csv; with
    `overlay`, a contour overlay per input there (same relative name as its mask).

    Flagged masks are written and reported; `qc="exclude"` leaves them out of the manifest, `"keep"` keeps
    them, except empty masks, which `isnet train` cannot use and which are always left out. Unreadable
    inputs are reported one line each and counted in `failed` (the caller turns that into exit 2);
    with `fail_fast` the first one raises, after everything before it was written. `fmt`: `png` masks, or
    `seg` (DICOM inputs only; `anonymize` replaces the patient and study identifiers they copy).
    `closing`: each lung's closing radius (fraction of the long side), instead of the segmenter's own.
    """
    from isnet_cli.console import make_progress, say
    from isnet_cli.io.inputs import expand_inputs
    from isnet_cli.segment.model import open_segmenter

    _check_choices(qc, fmt)
    samples = expand_inputs(list(inputs))
    if fmt == "seg":
        require_dicom([s.image for s in samples], "--format seg")  # a SEG references its image by UID
    segmenter = open_segmenter(model, device)
    if closing is None:
        closing = recorded_closing(segmenter.meta)
    members = segmenter.meta.get("ensemble")
    network = f"ensemble of {len(members)} MONAI U-Nets" if members else "MONAI U-Net"
    say(
        f"segmenter {segmenter.path} ({network}, {segmenter.contract.size} px input, {segmenter.description}; "
        f"lungs closed by {closing:g} x the long side)"
    )
    source = source_rows(inputs, samples)
    check_out_dir(out, overwrite)
    names = MaskNames(samples, ".dcm" if fmt == "seg" else ".png")
    writer = MaskWriter(out, fmt, names, model_id(segmenter.path), anonymize, overlay)
    qc_file = QcFile(out / "qc.csv")
    kept: dict[str, str] = {}
    written = flagged = failed = 0
    try:
        with make_progress(progress and len(samples) > 1) as bar:
            task = bar.add_task("segment", total=len(samples))
            for item in predict_masks(segmenter, samples, batch_size, fail_fast, closing=closing):
                bar.advance(task)
                if isinstance(item, Failure):
                    failed += 1
                    _record_failure(item, qc_file)
                    continue
                name = writer.write(item)
                written += 1
                if _record_qc(item, name, qc, qc_file, kept, in_manifest=source is not None):
                    flagged += 1
    finally:
        qc_file.close()
    manifest, rows = None, 0
    if source is not None:
        manifest = out / "manifest.csv"
        rows = write_manifest(manifest, *source, kept)
    return SegmentSummary(written, flagged, failed, manifest, rows)


def _check_choices(qc: str, fmt: str) -> None:
    """Refuse a --qc or --format that is not one of the choices."""
    if qc not in QC_CHOICES:
        raise InputError(None, f"--qc {qc}: unknown choice", f"one of {', '.join(QC_CHOICES)}")
    if fmt not in MASK_FORMATS:
        raise InputError(None, f"--format {fmt}: unknown choice", f"one of {', '.join(MASK_FORMATS)}")


@dataclass
class MaskWriter:
    """Writes each input's mask under OUT (an 8-bit PNG, or with `fmt="seg"` a DICOM SEG in this run's
    Series of its Study) and, with `overlay`, its contour overlay there."""

    out: Path
    fmt: str
    names: MaskNames
    segmenter_id: str
    anonymize: bool
    overlay: Path | None
    series: RunSeries = field(default_factory=RunSeries)  # one SEG Series per run and Study

    def write(self, item: Segmented) -> str:
        """Write `item`'s mask (and overlay); returns the mask's path relative to OUT."""
        name = self.names(item.sample.image)
        if self.fmt == "seg":
            write_seg(
                self.out / name,
                item.sample.image,
                item.mask,
                SEGMENTER_NAME,
                self.segmenter_id,
                __version__,
                self.anonymize,
                self.series,
            )
        else:
            atomic_write_bytes(self.out / name, mask_png(item.mask))
        if self.overlay is not None:
            png = overlay_png(item.image, item.mask, item.qc.ok)
            atomic_write_bytes(self.overlay / Path(name.removeprefix("masks/")).with_suffix(".png"), png)
        return name


def _record_failure(item: Failure, qc_file: QcFile) -> None:
    """An unreadable input: one line on stderr and its qc.csv row (ok = 0, the message as its problem)."""
    from isnet_cli.console import say_error

    say_error(item.message)
    qc_file.write({"image": item.file, "ok": 0, "problems": item.message})


def _record_qc(item: Segmented, name: str, qc: str, qc_file: QcFile, kept: dict[str, str], in_manifest: bool) -> bool:
    """The input's qc.csv row; its mask into `kept` (for the manifest) when QC passed or `qc` keeps it;
    a flagged mask reported in one line. Returns whether QC flagged it."""
    from isnet_cli.console import say

    qc_file.write({"image": str(item.sample.image), "mask": name, **item.qc.row()})
    use = item.qc.ok or (qc == "keep" and not item.qc.empty)
    if use:
        kept[str(item.sample.image.resolve())] = name
    if item.qc.ok:
        return False
    fate = "" if not in_manifest else (", kept in the manifest" if use else ", left out of the manifest")
    say(f"qc: {item.sample.image}: {'; '.join(item.qc.problems)} (mask {name}{fate})")
    return True
