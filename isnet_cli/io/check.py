"""Dataset check: read every image and mask once, report counts, sizes, mask coverage and bad files."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isnet_cli.errors import InputError


def _stats(values: list[float]) -> dict[str, float] | None:
    """min / median / max of a list (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"min": s[0], "median": median, "max": s[-1]}


@dataclass
class _Tally:
    """What the check has seen so far."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    shapes: Counter[tuple[int, int]] = field(default_factory=Counter)
    coverage: list[float] = field(default_factory=list)
    coverage_resized: list[float] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    masks: int = 0

    def problem(self, file: Any, problem: str) -> None:
        self.bad.append({"file": str(file), "problem": problem})


def check_dataset(
    data: str | Path,
    label_column: str | None = None,
    size: int | None = None,
    window: str = "dicom-window",
    progress: bool = False,
    mask_segment: str | None = None,
) -> dict[str, Any]:
    """Read every image and mask of a dataset; return counts, sizes, mask coverage and every bad file.

    A bad file is one that is missing or unreadable, a mask with the wrong aspect or no lung pixel
    (the dataset is training data: masks are required when listed), or, with `size`, a mask that
    vanishes when resized to `size`. `mask_segment`: the segment label to use where a mask is a DICOM SEG.
    """
    from isnet_cli.console import track

    spec = _read_spec(Path(data), label_column)
    split_of, split_source = _splits(spec)
    tally = _Tally()
    for sample in track(spec.samples, "checking", enabled=progress):
        tally.counts[(sample.label or "(none)", split_of.get(id(sample)) or "(none)")] += 1
        _check_sample(sample, window, size, tally, mask_segment)
    return _report(data, spec, split_source, size, tally)


def _read_spec(path: Path, label_column: str | None) -> Any:
    """The dataset; a plain folder of images (e.g. DICOMs to predict on) has no labels, masks or splits."""
    from isnet_cli.io.inputs import expand_inputs
    from isnet_cli.io.manifest import DatasetSpec, is_dataset_folder, read_dataset

    if path.is_dir() and not is_dataset_folder(path):
        return DatasetSpec(samples=expand_inputs([str(path)]), classes=[], root=path)
    return read_dataset(path, label_column=label_column, check_files=False, require_labels=False)


def _splits(spec: Any) -> tuple[dict[int, str], str]:
    """Each sample's split (by id) and where the splits come from: the split column, or training's own split."""
    from isnet_cli.io.manifest import split_samples

    if any(s.split for s in spec.samples):
        return {id(s): s.split for s in spec.samples}, "split column"
    if spec.classes:
        train, val = split_samples(spec.samples)
        return {**{id(s): "train (auto)" for s in train}, **{id(s): "val (auto)" for s in val}}, (
            "automatic stratified 80/20 (seed 0)"
        )
    return {}, "unlabelled: no split"


def _check_sample(sample: Any, window: str, size: int | None, tally: _Tally, mask_segment: str | None = None) -> None:
    """Decode one image and its mask; record its shape and mask coverage, or what is wrong with it."""
    from isnet_cli.io.images import load_image
    from isnet_cli.io.masks import load_mask
    from isnet_cli.io.preprocess import resize_pair

    try:
        decoded = load_image(sample.image, window=window)
    except InputError as exc:
        tally.problem(sample.image, exc.problem)
        if sample.mask is not None and not sample.mask.is_file():
            tally.problem(sample.mask, "mask file not found")
        return
    except Exception as exc:  # a checker reports whatever breaks, then carries on
        tally.problem(sample.image, f"unexpected {type(exc).__name__}: {exc}")
        return
    tally.shapes[decoded.image.shape] += 1
    if sample.mask is None:
        return
    tally.masks += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = load_mask(sample.mask, decoded.image.shape[:2], True, image=sample.image, segment=mask_segment)
    except InputError as exc:
        tally.problem(sample.mask, exc.problem)
        return
    except Exception as exc:
        tally.problem(sample.mask, f"unexpected {type(exc).__name__}: {exc}")
        return
    tally.coverage.append(100.0 * float(mask.mean()))
    if size:
        _, small, _ = resize_pair(decoded.image, mask, size, "letterbox")
        tally.coverage_resized.append(100.0 * float(small.mean()))
        if not small.any():
            tally.problem(sample.mask, f"mask vanishes when resized to {size} px")


def _report(data: str | Path, spec: Any, split_source: str, size: int | None, tally: _Tally) -> dict[str, Any]:
    """The JSON report of `check_dataset`."""
    import numpy as np

    shapes = tally.shapes
    heights = [h for (h, _), k in shapes.items() for _ in range(k)]
    widths = [w for (_, w), k in shapes.items() for _ in range(k)]
    table: dict[str, dict[str, int]] = {}
    for (label, split), k in sorted(tally.counts.items()):
        table.setdefault(label, {})[split] = k
    return {
        "dataset": str(data),
        "root": str(spec.root),
        "samples": len(spec.samples),
        "classes": spec.classes,
        "split_source": split_source,
        "counts": table,
        "readable_images": sum(shapes.values()),
        "distinct_shapes": len(shapes),
        "common_shapes": [{"height": h, "width": w, "count": k} for (h, w), k in shapes.most_common(5)],
        "height": _stats(heights),
        "width": _stats(widths),
        "masks": tally.masks,
        "mask_coverage_percent": _stats(tally.coverage),
        "mask_coverage_percent_resized": _stats(tally.coverage_resized) if size else None,
        "mean_mask_coverage_percent": float(np.mean(tally.coverage)) if tally.coverage else None,
        "bad": tally.bad,
        "ok": not tally.bad,
    }
