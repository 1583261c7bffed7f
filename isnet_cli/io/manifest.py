"""Datasets as lists of samples, from a manifest CSV or a folder tree (no torch: predict imports this).

- Manifest CSV: columns image, mask, label[, split] (paths relative to the CSV; other columns ignored).
  Labels are class names (any strings; all-integer labels sort numerically). `label_column` picks
  another column (e.g. `label_name` where `label` holds 0/1 codes).
- Folder tree: images/<class>/<stem>.* with masks/<class>/<stem>.* (mask optional per image).
- A folder holding manifest.csv (or labels.csv) is read as that manifest.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isnet_cli.errors import InputError
from isnet_cli.io.images import SUPPORTED_SUFFIXES, suffix_of

MANIFEST_NAMES = ("manifest.csv", "labels.csv")
VAL_NAMES = {"val", "valid", "validation", "dev"}
TRAIN_NAMES = {"train", "training"}


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None = None
    label: str | None = None
    split: str | None = None


@dataclass
class DatasetSpec:
    samples: list[Sample]
    classes: list[str]
    root: Path


def sort_classes(labels: set[str]) -> list[str]:
    """Sorted class names; numerically when every label is an integer ("2" before "10")."""
    if labels and all(lbl.lstrip("-").isdigit() for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name


def read_manifest(csv_path: Path, label_column: str | None = None, require_labels: bool = True) -> list[Sample]:
    """Rows of a manifest CSV -> samples (paths resolved against the CSV's folder)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(csv_path, f"cannot read manifest ({exc})") from None
    if "image" not in columns:
        raise InputError(csv_path, f"manifest has no 'image' column (columns: {', '.join(columns) or 'none'})")
    column = label_column or "label"
    if column not in columns:
        if label_column is not None or require_labels:
            raise InputError(
                csv_path,
                f"no label column {column!r} (columns: {', '.join(columns)})",
                "add a 'label' column with class names or choose one with --label-column",
            )
        column = None
    base = csv_path.parent
    samples = []
    for n, row in enumerate(rows, start=2):
        if not row.get("image"):
            raise InputError(csv_path, f"line {n}: empty image path")
        label = row.get(column) if column else None
        if column and not label and require_labels:
            raise InputError(csv_path, f"line {n}: empty label in column {column!r}")
        mask = row.get("mask") or None
        samples.append(
            Sample(
                image=base / row["image"],
                mask=None if mask is None else base / mask,
                label=label or None,
                split=(row.get("split") or "").lower() or None,
            )
        )
    return samples


def read_folder_tree(root: Path) -> list[Sample]:
    """images/<class>/* with masks/<class>/<same stem>.* -> samples."""
    samples = []
    for class_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        masks = {}
        mask_dir = root / "masks" / class_dir.name
        if mask_dir.is_dir():
            masks = {_stem(m): m for m in sorted(mask_dir.iterdir()) if m.is_file()}
        for image in sorted(class_dir.iterdir()):
            if image.is_file() and (suffix_of(image) in SUPPORTED_SUFFIXES or not image.suffix):
                samples.append(Sample(image, masks.get(_stem(image)), class_dir.name))
    return samples


def is_dataset_folder(folder: Path) -> bool:
    """A folder holding manifest.csv / labels.csv, or the images/ + masks/ layout."""
    return any((folder / name).is_file() for name in MANIFEST_NAMES) or (
        (folder / "images").is_dir() and (folder / "masks").is_dir()
    )


def read_dataset(
    path: str | Path, label_column: str | None = None, check_files: bool = True, require_labels: bool = True
) -> DatasetSpec:
    """Manifest CSV, a folder holding one, or a folder tree -> DatasetSpec (classes sorted).

    `check_files`: raise InputError naming the first missing image/mask (and how many more are missing).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "dataset not found")
    if path.is_dir():
        manifest = next((path / name for name in MANIFEST_NAMES if (path / name).is_file()), None)
        if manifest is not None:
            samples, root = read_manifest(manifest, label_column, require_labels), path
        elif (path / "images").is_dir():
            samples, root = read_folder_tree(path), path
        else:
            raise InputError(
                path, "folder has neither manifest.csv nor images/<class>/", "give a manifest CSV or that layout"
            )
    elif path.suffix.lower() == ".csv":
        samples, root = read_manifest(path, label_column, require_labels), path.parent
    else:
        raise InputError(path, "not a dataset", "give a manifest .csv or a folder")
    if not samples:
        raise InputError(path, "dataset is empty")
    if check_files:
        missing = [p for s in samples for p in (s.image, s.mask) if p is not None and not p.is_file()]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise InputError(missing[0], f"listed in the dataset but not found{more}")
    classes = sort_classes({s.label for s in samples if s.label is not None})
    return DatasetSpec(samples=samples, classes=classes, root=root)


def split_samples(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """(train, val). With a split column: train/val by it (other splits, e.g. test, are left out).

    Without: per class, a seeded permutation of the (path-sorted) samples; the first
    round(n * val_fraction) go to val (at least one when the class has two or more samples).
    """
    if any(s.split for s in samples):
        train = [s for s in samples if s.split in TRAIN_NAMES]
        val = [s for s in samples if s.split in VAL_NAMES]
        return train, val
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    by_label: dict[str, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label or "", []).append(s)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: str(s.image))
        order = rng.permutation(len(group))
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val_idx = set(order[:n_val].tolist())
        for i, s in enumerate(group):
            (val if i in val_idx else train).append(s)
    return train, val
