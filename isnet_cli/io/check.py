"""Dataset check: read every image and mask once, report counts, sizes, mask coverage and bad files."""

from __future__ import annotations

import warnings
from collections import Counter
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


def check_dataset(
    data: str | Path,
    label_column: str | None = None,
    size: int | None = None,
    window: str = "dicom-window",
    progress: bool = False,
) -> dict[str, Any]:
    """Read every image and mask of a dataset; return counts, sizes, mask coverage and every bad file.

    A bad file is one that is missing or unreadable, a mask with the wrong aspect or no lung pixel
    (the dataset is training data: masks are required when listed), or, with `size`, a mask that
    vanishes when resized to `size`.
    """
    import numpy as np

    from isnet_cli.console import track
    from isnet_cli.io.images import load_image
    from isnet_cli.io.inputs import expand_inputs
    from isnet_cli.io.manifest import DatasetSpec, is_dataset_folder, read_dataset, split_samples
    from isnet_cli.io.masks import load_mask
    from isnet_cli.io.preprocess import resize_pair

    path = Path(data)
    if path.is_dir() and not is_dataset_folder(path):
        # A plain folder of images (e.g. DICOMs to predict on): no labels, masks or splits to count.
        spec = DatasetSpec(samples=expand_inputs([str(path)]), classes=[], root=path)
    else:
        spec = read_dataset(data, label_column=label_column, check_files=False, require_labels=False)
    has_split = any(s.split for s in spec.samples)
    if has_split:
        split_of, split_source = {id(s): s.split for s in spec.samples}, "split column"
    elif spec.classes:
        train, val = split_samples(spec.samples)
        split_of = {**{id(s): "train (auto)" for s in train}, **{id(s): "val (auto)" for s in val}}
        split_source = "automatic stratified 80/20 (seed 0)"
    else:
        split_of, split_source = {}, "unlabelled: no split"

    counts: Counter[tuple[str, str]] = Counter()
    shapes: Counter[tuple[int, int]] = Counter()
    coverage: list[float] = []
    coverage_resized: list[float] = []
    bad: list[dict[str, str]] = []
    n_masks = 0
    for sample in track(spec.samples, "checking", enabled=progress):
        counts[(sample.label or "(none)", split_of.get(id(sample)) or "(none)")] += 1
        try:
            decoded = load_image(sample.image, window=window)
        except InputError as exc:
            bad.append({"file": str(sample.image), "problem": exc.problem})
            if sample.mask is not None and not sample.mask.is_file():
                bad.append({"file": str(sample.mask), "problem": "mask file not found"})
            continue
        except Exception as exc:  # a checker reports whatever breaks, then carries on
            bad.append({"file": str(sample.image), "problem": f"unexpected {type(exc).__name__}: {exc}"})
            continue
        shapes[decoded.image.shape] += 1
        if sample.mask is None:
            continue
        n_masks += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mask = load_mask(sample.mask, decoded.image.shape, required=True)
        except InputError as exc:
            bad.append({"file": str(sample.mask), "problem": exc.problem})
            continue
        except Exception as exc:
            bad.append({"file": str(sample.mask), "problem": f"unexpected {type(exc).__name__}: {exc}"})
            continue
        coverage.append(100.0 * float(mask.mean()))
        if size:
            _, small, _ = resize_pair(decoded.image, mask, size, "letterbox")
            coverage_resized.append(100.0 * float(small.mean()))
            if not small.any():
                bad.append({"file": str(sample.mask), "problem": f"mask vanishes when resized to {size} px"})

    heights = [h for (h, _), k in shapes.items() for _ in range(k)]
    widths = [w for (_, w), k in shapes.items() for _ in range(k)]
    table: dict[str, dict[str, int]] = {}
    for (label, split), k in sorted(counts.items()):
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
        "masks": n_masks,
        "mask_coverage_percent": _stats(coverage),
        "mask_coverage_percent_resized": _stats(coverage_resized) if size else None,
        "mean_mask_coverage_percent": float(np.mean(coverage)) if coverage else None,
        "bad": bad,
        "ok": not bad,
    }
