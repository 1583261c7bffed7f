"""Command-line input arguments -> samples: files, folders, manifest CSVs, and `-` (paths on stdin)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from isnet_cli.errors import InputError
from isnet_cli.io.decoded import has_dicom_magic
from isnet_cli.io.images import SUPPORTED_SUFFIXES, suffix_of
from isnet_cli.io.manifest import Sample, is_dataset_folder, read_dataset


def _is_image_file(path: Path) -> bool:
    """Supported suffix, or a suffix-less file that is DICOM by its preamble."""
    suffix = suffix_of(path)
    if suffix in SUPPORTED_SUFFIXES:
        return True
    return suffix == "" and has_dicom_magic(path)


def _expand_folder(folder: Path) -> list[Sample]:
    """Dataset folders (manifest, or images/ + masks/) are read as datasets, so their masks are not
    taken for inputs; other folders are walked recursively for image files."""
    if is_dataset_folder(folder):
        return read_dataset(folder, require_labels=False).samples
    samples: list[Sample] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            samples.extend(_expand_folder(child))
        elif child.is_file() and _is_image_file(child):
            samples.append(Sample(image=child))
    return samples


def expand_inputs(args: Sequence[str]) -> list[Sample]:
    """Each argument: an image file, a folder (recursive), a manifest .csv (labels/masks kept) or `-`.

    `-` reads newline-separated paths from stdin (blank lines and lines starting with # skipped).
    Raises InputError for a path that does not exist or a folder without images.
    """
    samples: list[Sample] = []
    for arg in args:
        if arg == "-":
            lines = [ln.strip() for ln in sys.stdin.read().splitlines()]
            samples.extend(expand_inputs([ln for ln in lines if ln and not ln.startswith("#")]))
            continue
        path = Path(arg)
        if not path.exists():
            raise InputError(path, "file not found")
        if path.is_dir():
            found = _expand_folder(path)
            if not found:
                raise InputError(
                    path, "folder contains no supported image", f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
                )
            samples.extend(found)
        elif path.suffix.lower() == ".csv":
            samples.extend(read_dataset(path, require_labels=False).samples)
        else:
            samples.append(Sample(image=path))
    return samples
