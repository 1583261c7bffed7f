"""`isnet data check` (is every file readable, every mask aligned?) and `isnet data synth` (phantoms)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from isnet_cli.commands.options import label_column_option, no_progress_option, window_option
from isnet_cli.errors import InputError
from isnet_cli.io.check import check_dataset


@click.group("data")
def command() -> None:
    """Check a dataset, or generate synthetic chest phantoms.

    \b
    Example:
      isnet data synth data/phantoms --n 400 --bias 1.0
      isnet data check data/phantoms/manifest.csv
    """


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
@click.option(
    "--mask-segment",
    default=None,
    help="Where masks are DICOM SEG files: the label of the segment to use (default: the lung-coded segments).",
)
@label_column_option
@window_option
@no_progress_option
def check(
    data: Path,
    as_json: bool,
    size: int | None,
    mask_segment: str | None,
    label_column: str | None,
    window: str,
    no_progress: bool,
) -> None:
    """Read every image and mask of DATA (manifest CSV or folder); exit 2 if any file is bad.

    \b
    Example:
      isnet data check data/manifest.csv --size 224
    """
    from isnet_cli.console import progress_enabled

    report = check_dataset(
        data, label_column, size, window, progress=progress_enabled(no_progress), mask_segment=mask_segment
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if report["bad"]:
        raise InputError(data, f"{len(report['bad'])} bad file(s), listed above")


@command.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(["chest", "faces"]),
    default="chest",
    show_default=True,
    help="chest: grey X-ray phantoms with lung masks; faces: colour faces with face masks, mouth as the label.",
)
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
@click.option(
    "--classes", default=None, help="Comma-separated class names [default: normal,opacity; faces: neutral,smiling]."
)
@click.option("--contrast", type=float, default=0.22, show_default=True, help="Lesion peak contrast (0-1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it already holds a manifest.")
@no_progress_option
def synth(
    out: Path,
    kind: str,
    n: int,
    size: int,
    bias: str,
    fmt: str,
    photometric: str,
    bits: str,
    compression: str,
    classes: str | None,
    contrast: float,
    seed: int,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Write synthetic phantoms with region masks and a manifest to OUT.

    Chest (default): class `normal` has no lesion, `opacity` a faint opacity inside a lung; `--bias` adds
    a bright letter marker outside the body that correlates with the label (a background shortcut).
    Faces (`--kind faces`, colour): the mouth is the label (`neutral` straight, `smiling` an arc), the
    mask is the face, and the marker a red letter in the background (train with --roi-name face).

    \b
    Example:
      isnet data synth data/phantoms --n 400 --size 64 --bias 1.0
      isnet data synth data/dcm --n 8 --format dcm --photometric MONOCHROME1 --bits 16 --compression rle
      isnet data synth data/faces --kind faces --n 400 --size 64 --bias 1.0
    """
    from isnet_cli.console import console, progress_enabled
    from isnet_cli.synth import DEFAULT_CLASSES, parse_bias, synthesize

    if (out / "manifest.csv").exists() and not overwrite:
        raise click.UsageError(f"{out} already holds a manifest.csv; pass --overwrite or choose another folder")
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else list(DEFAULT_CLASSES[kind])
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
        kind=kind,  # type: ignore[arg-type]
    )
    console.print(f"wrote {n} {fmt} phantoms ({', '.join(names)}; bias {bias}) and masks; manifest: {manifest}")
