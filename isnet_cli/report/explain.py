"""LRP explanations of files: preprocessing from the model's contract, relevance, figures, mask shares.

The library behind `isnet explain`. A file is preprocessed only through
`isnet_cli.io.preprocess.preprocess_file` with the checkpoint's input contract, explained with the
LRP engine at the model input, and the relevance (summed over input channels) is mapped back to the
original image geometry with `unletterbox` for the figure and the raw output. Mask shares are
computed on the model-input grid, where the relevance is exact. The model and its LRP engine come
from `isnet_cli.report.explainer`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isnet_cli.errors import InputError, IsnetError, ModelError
from isnet_cli.report.explainer import Explainer
from isnet_cli.report.metrics import mask_shares

RAW_SUFFIXES = (".npy", ".nii.gz", ".nii")
# Overlay outputs: a PNG figure, or the same figure as a DICOM Secondary Capture in the source's study.
OUT_FORMATS = ("png", "dcm")
DICOM_CAPTION = "LRP heatmap, not for diagnosis"
SUMMARY_COLUMNS = (
    "file",
    "png",
    "predicted",
    "target",
    "probability",
    "relevance_sum",
    "positive_share_in_mask",
    "abs_share_in_mask",
)


@dataclass
class Explanation:
    """One explained input: what was explained, the relevance map at the original geometry, shares."""

    file: str
    predicted: str
    target: str
    target_index: int
    probability: float
    probabilities: dict[str, float]
    relevance: np.ndarray  # (H, W) float32, original geometry, input channels summed
    image: np.ndarray  # (H, W) decoded image in [0, 1]
    mask: np.ndarray | None  # (H, W) bool at original geometry
    relevance_sum: float  # Σ R at the model input
    positive_share_in_mask: float | None = None  # Σ_in R⁺ / Σ R⁺
    abs_share_in_mask: float | None = None  # Σ_in |R| / Σ |R|
    record: dict[str, Any] = field(default_factory=dict)
    png: str | None = None
    raw: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "predicted": self.predicted,
            "target": self.target,
            "probability": round(self.probability, 6),
            "probabilities": self.probabilities,
            "relevance_sum": self.relevance_sum,
            "positive_share_in_mask": self.positive_share_in_mask,
            "abs_share_in_mask": self.abs_share_in_mask,
            "png": self.png,
            "raw": self.raw,
            "preprocessing": self.record,
        }

    def summary_row(self) -> list[Any]:
        def fmt(v: float | None) -> str:
            return "" if v is None else f"{v:.6g}"

        return [
            self.file,
            self.png or "",
            self.predicted,
            self.target,
            f"{self.probability:.6f}",
            fmt(self.relevance_sum),
            fmt(self.positive_share_in_mask),
            fmt(self.abs_share_in_mask),
        ]


def write_raw(path: str | Path, relevance: np.ndarray) -> Path:
    """Save an (H, W) relevance map as .npy (float32) or NIfTI (.nii/.nii.gz via SimpleITK)."""
    path = Path(path)
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".npy"):
        from isnet_cli.io.atomic import atomic_write_bytes

        buffer = io.BytesIO()
        np.save(buffer, relevance.astype(np.float32))
        atomic_write_bytes(path, buffer.getvalue())
    elif name.endswith((".nii.gz", ".nii")):
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(relevance.astype(np.float32)), str(path))
    else:
        raise InputError(path, "unsupported --raw format", f"use one of {', '.join(RAW_SUFFIXES)}")
    return path


def explain_file(
    explainer: Explainer,
    image: str | Path,
    target: str | int,
    mask: str | Path | None = None,
    mask_segment: str | None = None,
) -> Explanation:
    """Explain one file: preprocess with the model's contract, LRP, back to the original geometry.
    `mask_segment`: the segment label to use when the mask is a DICOM SEG (default: its lung segments)."""
    from isnet_cli.io.preprocess import preprocess_file, unletterbox

    prepared = preprocess_file(
        image, explainer.contract, mask_path=mask, mask_required=mask is not None, mask_segment=mask_segment
    )
    probs, relevance = explainer.explain_array(prepared.x, target)
    index = int(probs.argmax()) if target == "predicted" else int(target)
    grid = relevance.sum(axis=0)
    original = unletterbox(grid, prepared.record).astype(np.float32)
    shares: tuple[float | None, float | None] = (None, None)
    mask_original = None
    if prepared.mask is not None:
        pos, absolute = mask_shares(grid[None], prepared.mask[:1] > 0.5)
        shares = (float(np.nan_to_num(pos[0])), float(np.nan_to_num(absolute[0])))  # no relevance: share 0
        mask_original = unletterbox(prepared.mask[0], prepared.record) > 0.5
    return Explanation(
        file=str(image),
        predicted=explainer.classes[int(probs.argmax())],
        target=explainer.classes[index],
        target_index=index,
        probability=float(probs[index]),
        probabilities={c: round(float(p), 6) for c, p in zip(explainer.classes, probs, strict=True)},
        relevance=original,
        image=prepared.image,
        mask=mask_original,
        relevance_sum=float(grid.sum()),
        positive_share_in_mask=shares[0],
        abs_share_in_mask=shares[1],
        record=prepared.record,
    )


def title_of(exp: Explanation) -> str:
    text = f"{Path(exp.file).name}: LRP for '{exp.target}' (p = {exp.probability:.3f})"
    if exp.predicted != exp.target:
        text += f", predicted '{exp.predicted}'"
    if exp.abs_share_in_mask is not None:
        text += f"; |R| in mask {exp.abs_share_in_mask:.0%}"
    return text


def caption_of(exp: Explanation) -> str:
    """The caption burned into a DICOM overlay: what it is and is not, and what was explained. Unlike
    `title_of` it does not name the file, which may carry the patient's name."""
    text = f"{DICOM_CAPTION}: '{exp.target}' (p = {exp.probability:.3f})"
    if exp.predicted != exp.target:
        text += f", predicted '{exp.predicted}'"
    return text


def figure_rgb(png: bytes) -> np.ndarray:
    """The rendered figure (PNG bytes) as uint8 (H, W, 3) RGB, the pixels of a Secondary Capture."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def unique_stems(files: list[str]) -> list[str]:
    """Output names per input: the file stem, with a numeric suffix where two inputs share a stem."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        stem = Path(f).name
        for suffix in (".nii.gz", *[Path(f).suffix]):
            if suffix and stem.lower().endswith(suffix.lower()):
                stem = stem[: -len(suffix)]
                break
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names


def explain_many(
    explainer: Explainer,
    samples: list[Any],
    target: str,
    out_dir: Path | None,
    raw_dir: Path | None,
    single_out: Path | None = None,
    single_raw: Path | None = None,
    mask: str | None = None,
    side_by_side: bool = False,
    fail_fast: bool = False,
    on_item: Any = None,
    fmt: str = "png",
    anonymize: bool = False,
    mask_segment: str | None = None,
) -> Iterator[Explanation | tuple[str, str]]:
    """Explain `samples` in order, writing one figure (and raw map) per input; yields Explanations or
    (file, message) failures. One input: `single_out`/`single_raw` are the file paths.

    `fmt="dcm"`: each figure, captioned `DICOM_CAPTION`, becomes a Secondary Capture in its DICOM input's
    study; this call's go into one new Series per Study (`anonymize`: see `isnet_cli.io.dicom_out`).
    """
    from isnet_cli.io.dicom_out import RunSeries

    if fmt not in OUT_FORMATS:
        raise InputError(None, f"--format {fmt}: unknown choice", f"one of {', '.join(OUT_FORMATS)}")
    resolved = explainer.resolve_target(target)
    names = unique_stems([str(s.image) for s in samples])
    series = RunSeries()
    for sample, name in zip(samples, names, strict=True):
        try:
            mask_path = mask or getattr(sample, "mask", None)
            exp = explain_file(explainer, sample.image, resolved, mask=mask_path, mask_segment=mask_segment)
            figure = single_out if single_out is not None else out_dir / f"{name}.{fmt}"
            roi_label = explainer.contract.roi_label
            _write_figure(exp, figure, sample.image, fmt, side_by_side, roi_label, anonymize, series)
            exp.png = str(figure)
            raw = single_raw if single_raw is not None else (raw_dir / f"{name}.npy" if raw_dir else None)
            if raw is not None:
                exp.raw = str(write_raw(raw, exp.relevance))
            yield exp
        except ModelError:
            raise
        except RuntimeError as exc:  # torch failing inside the model: no other file will fare better
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"LRP failed on {sample.image}: {first}") from exc
        except IsnetError as exc:
            if fail_fast:
                raise
            yield (str(sample.image), str(exc))
        except (OSError, ValueError) as exc:
            if fail_fast:
                raise InputError(sample.image, f"cannot explain ({type(exc).__name__}: {exc})") from exc
            yield (str(sample.image), f"{sample.image}: cannot explain ({type(exc).__name__}: {exc})")
        if on_item is not None:
            on_item()


def _write_figure(
    exp: Explanation,
    figure: Path,
    source: Any,
    fmt: str,
    side_by_side: bool,
    roi_label: str,
    anonymize: bool,
    series: Any,
) -> None:
    """The heatmap figure of `exp` at `figure`: a PNG, or (`fmt="dcm"`) a Secondary Capture in the study
    of the DICOM `source`, in this run's `series`."""
    from isnet_cli.io.dicom_out import write_secondary_capture
    from isnet_cli.report.render import render_heatmap

    if fmt == "dcm":
        png = render_heatmap(
            exp.image,
            exp.relevance,
            mask=exp.mask,
            title=caption_of(exp),
            side_by_side=side_by_side,
            roi_label=roi_label,
        )
        write_secondary_capture(figure, source, figure_rgb(png), _derivation(exp), anonymize, series)
    else:
        render_heatmap(
            exp.image,
            exp.relevance,
            figure,
            mask=exp.mask,
            title=title_of(exp),
            side_by_side=side_by_side,
            roi_label=roi_label,
        )


def _derivation(exp: Explanation) -> str:
    """Derivation Description of a DICOM overlay: how the pixels were made from the source."""
    return (
        f"LRP relevance for class '{exp.target}' (p = {exp.probability:.3f}) overlaid on the source image "
        "(red positive, blue negative, clipped at the 99th percentile of |R|); not for diagnosis"
    )


def write_summary(path: Path, explanations: list[Explanation]) -> Path:
    """summary.csv: one row per explained input (`SUMMARY_COLUMNS`), written atomically."""
    from isnet_cli.io.atomic import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SUMMARY_COLUMNS)
    for exp in explanations:
        writer.writerow(exp.summary_row())
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path
