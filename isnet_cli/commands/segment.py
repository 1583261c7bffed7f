"""`isnet segment`: lung masks for radiographs (`isnet segment INPUT...`), training the segmenter
(`isnet segment train DATA`) and combining trained ones (`isnet segment ensemble MODEL...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from isnet_cli.commands import options as opt
from isnet_cli.errors import InputError
from isnet_cli.io.contract import RESIZE_MODES
from isnet_cli.segment.config import SegmentConfig
from isnet_cli.segment.infer import MASK_FORMATS, QC_CHOICES

_DEFAULTS = SegmentConfig()


class _DefaultToMasks(click.Group):
    """`isnet segment INPUT...` runs the `masks` subcommand; `isnet segment train DATA` trains."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["masks", *args]
        return super().parse_args(ctx, args)


@click.group("segment", cls=_DefaultToMasks)
def command() -> None:
    """Lung masks: segment radiographs with a trained segmenter, train one (MONAI U-Net), or combine several.

    `isnet segment INPUT...` is short for `isnet segment masks INPUT...`.

    \b
    Example:
      isnet segment train data/phantoms/manifest.csv --img-size 64 --epochs 20 --name lungs
      isnet segment data/unmasked/manifest.csv --model runs/lungs --out data/masked
      isnet train data/masked/manifest.csv
    """


def _option(*decls: str, **attrs: Any) -> Any:
    """An option whose default is `SegmentConfig`'s field of the same name (shown in --help)."""
    field = decls[0].lstrip("-").split("/")[0].replace("-", "_")
    return click.option(*decls, default=getattr(_DEFAULTS, field), show_default=True, **attrs)


@command.command("train")
@click.argument("data", required=False)
@click.option("--val", help="Validation data with masks (manifest or folder); default: a split of DATA.")
@_option("--val-fraction", type=float, help="Validation share when --val is not given.")
@_option("--img-size", type=int, help="Input size (square, pixels; a multiple of the U-Net's downsampling).")
@_option("--resize", type=click.Choice(RESIZE_MODES))
@opt.window_option
@_option("--augment/--no-augment", help="Small affine + brightness jitter, the same on image and mask.")
@click.option(
    "--channels",
    default=",".join(map(str, _DEFAULTS.channels)),
    show_default=True,
    help="U-Net widths per level (comma-separated); each level after the first halves the resolution.",
)
@_option("--res-units", type=int, help="Residual units per U-Net block.")
@_option("--batch-size", type=int)
@_option("--epochs", type=int)
@_option("--lr", type=float, help="Adam learning rate (cosine schedule).")
@opt.device_option
@_option("--seed", type=int)
@click.option("--cache", help="Folder for decoded images (default: OUT/.cache).")
@_option("--out", help="Parent folder of the run folder.")
@click.option("--name", help="Run folder name (default: run-NNN, the next free number).")
@_option("--contours", type=int, help="Validation images drawn in contours.png.")
@_option("--amp/--no-amp", help="Mixed precision: autocast bf16 on CPU, fp16 with a loss scaler on CUDA.")
@_option("--devices", type=int, help="Processes for DDP (one per GPU; gloo on CPU).")
@click.option(
    "--resume",
    metavar="RUN",
    help="Continue an interrupted run (its folder or a checkpoint in it); DATA is not needed.",
)
@opt.no_progress_option
@click.pass_context
def train(ctx: click.Context, data: str | None, channels: str, resume: str | None, **options: Any) -> None:
    """Train a 2-D lung segmenter on DATA (manifest CSV or images/ + masks/ folders; every image needs a mask).

    Writes runs/<name>/: best/last.safetensors (task: segmentation), metrics.csv (validation Dice and HD95
    per epoch), contours.png, config.json, last.state.pt (what --resume continues from, written after
    every epoch: an interrupted run resumes where its last epoch ended, with the same result). At the end
    the clean-up's closing radius is chosen on the validation images and recorded in best.safetensors.

    \b
    Example:
      isnet segment train data/lungs/manifest.csv --img-size 256 --epochs 40 --name lungs
      isnet segment train --resume runs/lungs
    """
    from isnet_cli.segment.fit import train_segmenter

    if resume:
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        result = train_segmenter(SegmentConfig(), resume=resume, resume_overrides=given)
    else:
        try:
            widths = tuple(int(c) for c in channels.split(",") if c.strip())
        except ValueError as exc:
            fix = "e.g. --channels 16,32,64"
            raise InputError(None, f"--channels {channels!r}: not a list of integers", fix) from exc
        result = train_segmenter(SegmentConfig(data=data or "", channels=widths, **options))
    click.echo(
        f"run folder: {result.run_dir}  (best: epoch {result.best['epoch']}, "
        f"dice {result.best['val_dice']:.4f}, hd95 {result.best['val_hd95']:.2f} px)"
    )


@command.command("ensemble")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="The ensemble's .safetensors file.")
@click.option("--val", help="Validation images with masks (manifest or folder) to choose the closing radius on.")
@opt.device_option
def ensemble(models: tuple[str, ...], out: str, val: str | None, device: str) -> None:
    """Combine trained segmenters (checkpoints or run folders) into one that averages their lung probabilities.

    Members may have different input sizes if each divides the largest (e.g. 128 and 256 px); everything
    else in their input contracts must agree. The result is a segmenter checkpoint like any other
    (`isnet segment --model`, `isnet export`, `isnet train --segmenter`). With --val the clean-up's closing
    radius is chosen again on those images (the members' radii do not carry over); without it, none.

    \b
    Example:
      isnet segment ensemble runs/lungs-128 runs/lungs-256 --val data/lungs/val.csv --out lungs.safetensors
    """
    from isnet_cli.console import say
    from isnet_cli.segment.closing import describe
    from isnet_cli.segment.ensemble import combine_segmenters

    result = combine_segmenters(list(models), Path(out), val, device)
    say(f"{result.path}: ensemble of {len(models)} segmenters, input {result.size} px")
    if result.closing is None:
        say("clean-up: no closing (pass --val to choose its radius)")
    else:
        say(describe(result.closing))


@command.command("masks")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "--model",
    "-m",
    help="Segmenter checkpoint, run folder (from `isnet segment train`) or exported .onnx (runs without torch); "
    "default: the bundled demonstration "
    "segmenter (models/lung-segmenter, research only) or $ISNET_SEGMENTER.",
)
@click.option(
    "--out", "-o", type=click.Path(file_okay=False), required=True, help="Folder for masks/, qc.csv, manifest.csv."
)
@opt.choice_option(
    "--qc",
    choices=QC_CHOICES,
    help="Masks flagged by quality control: left out of the new manifest, or kept (empty masks are always left out).",
)
@click.option(
    "--overlay",
    type=click.Path(file_okay=False),
    help="Folder for contour overlays (the image with the mask outline: green = QC passed, red = flagged).",
)
@click.option(
    "--closing",
    type=click.FloatRange(0.0, 0.5),
    help="Close each lung by a disk of this fraction of the image's long side (keeps opacities at the lung's "
    "edge inside the mask); default: the radius chosen on the segmenter's validation set, recorded in it.",
)
@click.option("--overwrite", is_flag=True, help="Write into an --out folder that already holds segment output.")
@opt.format_option(
    MASK_FORMATS,
    help="Mask files: PNG, or DICOM SEG referencing each DICOM input (same Study, one new Series per run and Study).",
)
@opt.anonymize_option
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True)
@opt.device_option
@opt.fail_fast_option()
@opt.no_progress_option
def masks(
    inputs: tuple[str, ...],
    model: str | None,
    out: str,
    qc: str,
    overlay: str | None,
    closing: float | None,
    overwrite: bool,
    fmt: str,
    anonymize: bool,
    batch_size: int,
    device: str,
    fail_fast: bool,
    no_progress: bool,
) -> None:
    """Segment the lungs of every INPUT (files, folders, manifest CSVs, '-' = paths on stdin).

    Writes OUT/masks/*.png (with --format seg: DICOM SEG *.dcm) at each input's original size, OUT/qc.csv
    (lung area, components, left/right balance per mask; flagged ones with ok = 0) and, when INPUT is a
    manifest or images/<class>/ folder, OUT/manifest.csv with the mask column filled, ready for
    `isnet train`. Unreadable inputs are reported and skipped; the exit code is then 2.

    \b
    Example:
      isnet segment scans/manifest.csv --out scans-masked --overlay scans-masked/overlays
      isnet segment scans/ --out scans-seg --format seg
      isnet segment scans/manifest.csv --model lungs.onnx --out scans-masked   (onnxruntime, no torch)
    """
    from isnet_cli.console import progress_enabled, say
    from isnet_cli.segment.infer import segment_inputs

    result = segment_inputs(
        inputs,
        model,
        Path(out),
        qc,
        device,
        batch_size,
        fail_fast,
        overwrite,
        progress_enabled(no_progress),
        fmt=fmt,
        anonymize=anonymize,
        overlay=None if overlay is None else Path(overlay),
        closing=closing,
    )
    line = f"{result.written} masks written to {Path(out) / 'masks'}, {result.flagged} flagged by QC (qc.csv)"
    if result.manifest is not None:
        line += f"; {result.manifest} lists {result.manifest_rows} image(s) with masks"
    say(line + (f", {result.failed} failed" if result.failed else ""))
    if result.failed:
        raise InputError(None, f"{result.failed} input(s) could not be segmented (listed above)")
