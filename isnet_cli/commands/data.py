"""`isnet data check` (is every file readable, every mask aligned?) and `isnet data synth` (phantoms)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import click

from isnet_cli.errors import InputError


@click.group("data")
def command() -> None:
    """Check a dataset, or generate synthetic chest phantoms.

    \b
    Example:
      isnet data synth data/phantoms --n 400 --bias 1.0
      isnet data check data/phantoms/manifest.csv
    """


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

    from isnet_cli.io.images import load_image
    from isnet_cli.io.inputs import expand_inputs
    from isnet_cli.io.manifest import DatasetSpec, is_dataset_folder, read_dataset, split_samples
    from isnet_cli.io.masks import load_mask
    from isnet_cli.io.preprocess import resize_pair
    from isnet_cli.progress import track

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


def _print_report(report: dict[str, Any]) -> None:
    """Rich tables on stdout: counts per class and split, sizes, mask coverage, bad files."""
    from rich.console import Console
    from rich.table import Table

    out = Console()
    splits = sorted({split for row in report["counts"].values() for split in row})
    counts = Table(title=f"{report['dataset']}: {report['samples']} samples ({report['split_source']})")
    counts.add_column("class")
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_column("total", justify="right")
    for label, row in report["counts"].items():
        counts.add_row(label, *(str(row.get(s, 0)) for s in splits), str(sum(row.values())))
    out.print(counts)

    summary = Table(title="images and masks")
    summary.add_column("measure")
    for col in ("min", "median", "max"):
        summary.add_column(col, justify="right")
    for name, key, fmt in (
        ("height (px)", "height", "{:.0f}"),
        ("width (px)", "width", "{:.0f}"),
        ("mask coverage (%)", "mask_coverage_percent", "{:.1f}"),
        ("mask coverage at --size (%)", "mask_coverage_percent_resized", "{:.1f}"),
    ):
        st = report.get(key)
        if st:
            summary.add_row(name, *(fmt.format(st[c]) for c in ("min", "median", "max")))
    out.print(summary)
    shapes = ", ".join(f"{s['width']}x{s['height']} ({s['count']})" for s in report["common_shapes"])
    out.print(
        f"readable images: {report['readable_images']}/{report['samples']}, masks: {report['masks']}, "
        f"{report['distinct_shapes']} distinct sizes; most common (WxH): {shapes or '-'}"
    )
    if report["bad"]:
        bad = Table(
            title=f"{len(report['bad'])} bad files (paths relative to {report['root']})", title_style="bold red"
        )
        bad.add_column("file", overflow="fold")
        bad.add_column("problem", overflow="fold")
        root = Path(report["root"])
        for item in report["bad"]:
            file = Path(item["file"])
            bad.add_row(str(file.relative_to(root)) if file.is_relative_to(root) else str(file), item["problem"])
        out.print(bad)


@command.command("check")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Also check masks after resizing to N px.")
@click.option("--label-column", default=None, help="Manifest column holding class names (default: label).")
@click.option(
    "--window",
    type=click.Choice(["dicom-window", "minmax", "percentile"]),
    default="dicom-window",
    show_default=True,
    help="DICOM grey-level policy used to decode.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def check(
    data: Path,
    as_json: bool,
    size: int | None,
    label_column: str | None,
    window: str,
    no_progress: bool,
) -> None:
    """Read every image and mask of DATA (manifest CSV or folder); exit 2 if any file is bad.

    \b
    Example:
      isnet data check data/manifest.csv --size 224
    """
    from isnet_cli.progress import progress_enabled

    report = check_dataset(data, label_column, size, window, progress=progress_enabled(no_progress))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if report["bad"]:
        raise InputError(data, f"{len(report['bad'])} bad file(s), listed above")


@command.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=400, show_default=True, help="Number of images.")
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True, help="Image side in px.")
@click.option(
    "--bias",
    default="none",
    show_default=True,
    help="Background marker: P(marker|class 1) (1.0 = always with class 1, 0.5 = uncorrelated), "
    "'flip' (only with class 0) or 'none'.",
)
@click.option("--format", "fmt", type=click.Choice(["png", "dcm"]), default="png", show_default=True)
@click.option(
    "--photometric", type=click.Choice(["MONOCHROME2", "MONOCHROME1"]), default="MONOCHROME2", show_default=True
)
@click.option("--bits", type=click.Choice(["8", "12", "16"]), default="8", show_default=True, help="Stored bits.")
@click.option(
    "--compression",
    type=click.Choice(["none", "rle", "jpeg2000", "jpeg2000-lossy", "jpegls"]),
    default="none",
    show_default=True,
    help="DICOM transfer syntax (jpegls needs pyjpegls).",
)
@click.option("--classes", default="normal,opacity", show_default=True, help="Comma-separated class names.")
@click.option("--contrast", type=float, default=0.22, show_default=True, help="Lesion peak contrast (0-1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it already holds a manifest.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def synth(
    out: Path,
    n: int,
    size: int,
    bias: str,
    fmt: str,
    photometric: str,
    bits: str,
    compression: str,
    classes: str,
    contrast: float,
    seed: int,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Write synthetic chest phantoms with lung masks and a manifest to OUT.

    Class `normal` has no lesion, `opacity` a faint opacity inside a lung; `--bias` adds a bright
    letter marker outside the body that correlates with the label (a background shortcut).

    \b
    Example:
      isnet data synth data/phantoms --n 400 --size 64 --bias 1.0
      isnet data synth data/dcm --n 8 --format dcm --photometric MONOCHROME1 --bits 16 --compression rle
    """
    from isnet_cli.progress import console, progress_enabled
    from isnet_cli.synth import parse_bias, synthesize

    if (out / "manifest.csv").exists() and not overwrite:
        raise click.UsageError(f"{out} already holds a manifest.csv; pass --overwrite or choose another folder")
    names = [c.strip() for c in classes.split(",") if c.strip()]
    manifest = synthesize(
        out,
        n=n,
        size=size,
        bias=parse_bias(bias),
        classes=names,
        fmt=fmt,  # type: ignore[arg-type]
        seed=seed,
        photometric=photometric,  # type: ignore[arg-type]
        bits=int(bits),
        compression=None if compression == "none" else compression,
        contrast=contrast,
        progress=progress_enabled(no_progress),
    )
    console.print(f"wrote {n} {fmt} phantoms ({', '.join(names)}; bias {bias}) and masks; manifest: {manifest}")
