"""`isnet explain`: LRP heatmap overlays (+ raw relevance, + in-mask shares) for files, folders, manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from isnet_cli.commands.options import (
    anonymize_option,
    choice_option,
    device_option,
    exist_ok_option,
    fail_fast_option,
    format_option,
    model_option,
    no_progress_option,
    refuse_existing_output,
)
from isnet_cli.lrp.names import RULES
from isnet_cli.report.explain import OUT_FORMATS, write_summary


@click.command("explain")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@model_option(onnx=False)
@click.option("--arch", default=None, help="Architecture of a plain state dict given with --weights (e.g. resnet18).")
@click.option(
    "--weights", type=click.Path(dir_okay=False), default=None, help="Plain torch state dict (.pt) for --arch."
)
@click.option(
    "--target",
    default="predicted",
    show_default=True,
    help="What to explain: 'predicted', a class name or a class index.",
)
@click.option(
    "--mask", type=click.Path(dir_okay=False), default=None, help="Lung mask of a single INPUT (image or DICOM SEG)."
)
@click.option(
    "--mask-segment",
    default=None,
    help="Where a mask is a DICOM SEG: the label of the segment to use (default: the lung-coded segments).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(),
    required=True,
    help="PNG (or .dcm) file for one input; a folder (one file per input + summary.csv) for several.",
)
@format_option(
    OUT_FORMATS,
    help="png: a figure; dcm: the same figure as a DICOM Secondary Capture in the input's study "
    "(DICOM inputs only; one new Series per run and Study).",
)
@anonymize_option
@click.option(
    "--raw",
    type=click.Path(),
    default=None,
    help="Also save the relevance at the original geometry: .npy or .nii.gz file (one input) or a folder of .npy.",
)
@click.option("--side-by-side", is_flag=True, help="Show the plain X-ray beside the overlay.")
@choice_option("--rule", choices=RULES, help="LRP rule for conv/linear layers (zB at the first layer in all cases).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout (JSON lines).")
@exist_ok_option
@device_option
@fail_fast_option()
@no_progress_option
def command(
    inputs: tuple[str, ...],
    model: str | None,
    arch: str | None,
    weights: str | None,
    target: str,
    mask: str | None,
    mask_segment: str | None,
    out: str,
    fmt: str,
    anonymize: bool,
    raw: str | None,
    side_by_side: bool,
    rule: str,
    as_json: bool,
    exist_ok: bool,
    device: str,
    fail_fast: bool,
    no_progress: bool,
) -> None:
    """Explain the model's decision on every INPUT with an LRP heatmap overlay.

    One file gives one PNG at --out; several inputs (folders, manifest CSVs, '-' = paths on stdin)
    give one PNG each in the --out folder plus summary.csv. With a lung mask (--mask, or the mask
    column of a manifest) the share of positive relevance and of |R| inside the mask is reported.

    \b
    Example:
      isnet explain scan.dcm --mask lungs.png --out heatmap.png --raw heatmap.npy
      isnet explain scan.dcm --mask lungs-seg.dcm --format dcm --out heatmap.dcm
    """
    from isnet_cli.console import say
    from isnet_cli.errors import InputError
    from isnet_cli.io.dicom_out import require_dicom
    from isnet_cli.io.inputs import expand_inputs
    from isnet_cli.report.explainer import load_explainer

    samples = expand_inputs(list(inputs))
    single = _is_single(inputs, samples)
    if mask is not None and not single:
        raise click.UsageError("--mask goes with a single INPUT; use a manifest with a mask column for several")
    if fmt == "dcm":
        require_dicom([s.image for s in samples], "--format dcm")  # a Secondary Capture references its source
    out_path, raw_path = _outputs(single, out, raw, fmt, exist_ok)
    explainer = load_explainer(model, arch=arch, weights=weights, rule=rule, device=device)
    explainer.resolve_target(target)  # a bad --target fails before any work
    outputs = {
        "out_dir": None if single else out_path,
        "raw_dir": None if single else raw_path,
        "single_out": out_path if single else None,
        "single_raw": raw_path if single else None,
    }
    options = {"mask": mask, "side_by_side": side_by_side, "fail_fast": fail_fast, "fmt": fmt}
    options |= {"anonymize": anonymize, "mask_segment": mask_segment}
    done, failures = _explain_all(explainer, samples, target, as_json, no_progress, **outputs, **options)
    if not single and done:
        summary = write_summary(out_path / "summary.csv", done)
        say(f"{len(done)} explained, {failures} failed; summary in {summary}")
    if failures:
        raise InputError(None, f"{failures} of {len(samples)} inputs could not be explained (listed above)")


def _explain_all(
    explainer: Any, samples: list[Any], target: str, as_json: bool, no_progress: bool, **options: Any
) -> tuple[list[Any], int]:
    """Explain every sample (`options`: those of `explain_many`), with a progress bar and a status line
    (or a JSON line) per input; failures are reported as they come. Returns (explained, failures)."""
    from isnet_cli.console import make_progress, progress_enabled, say, say_error
    from isnet_cli.report.explain import explain_many

    done = []
    failures = 0
    with make_progress(progress_enabled(no_progress) and len(samples) > 1) as progress:
        task = progress.add_task("explain", total=len(samples))
        for item in explain_many(explainer, samples, target, on_item=lambda: progress.advance(task), **options):
            if isinstance(item, tuple):
                failures += 1
                say_error(item[1])
                continue
            done.append(item)
            if as_json:
                click.echo(json.dumps(item.to_json()))
            say(_line(item))
    return done, failures


def _is_single(inputs: tuple[str, ...], samples: list[Any]) -> bool:
    """One image file (not a folder, a manifest or stdin): --out and --raw are then files."""
    first = inputs[0]
    single = len(inputs) == 1 and len(samples) == 1 and first != "-" and Path(first).is_file()
    return single and not first.lower().endswith(".csv")


def _outputs(
    single: bool, out: str, raw: str | None, fmt: str = "png", exist_ok: bool = False
) -> tuple[Path, Path | None]:
    """--out and --raw checked: files for a single input (named .`fmt`), folders (created) for several.

    Existing outputs are refused (unless `exist_ok`) here, before the model is loaded, so that a
    refused run has written nothing.
    """
    out_path = Path(out)
    raw_path = None if raw is None else Path(raw)
    kind = {"png": "PNG", "dcm": "DICOM file"}[fmt]
    if single:
        if out_path.suffix.lower() != f".{fmt}":
            raise click.UsageError(f"--out {out}: one input gives one {kind}; name a .{fmt} file")
        if raw_path is not None and not raw_path.name.lower().endswith((".npy", ".nii.gz", ".nii")):
            raise click.UsageError(f"--raw {raw}: use a .npy or .nii.gz file")
        refuse_existing_output(out_path, exist_ok)
        refuse_existing_output(raw_path, exist_ok)
        return out_path, raw_path
    if out_path.suffix.lower() in (".png", ".dcm"):
        raise click.UsageError(f"--out {out}: several inputs need a folder, not a {out_path.suffix} file")
    refuse_existing_output(out_path, exist_ok)
    refuse_existing_output(raw_path, exist_ok)
    out_path.mkdir(parents=True, exist_ok=True)
    if raw_path is not None:
        raw_path.mkdir(parents=True, exist_ok=True)
    return out_path, raw_path


def _line(item: Any) -> str:
    """The status line of one explained input."""
    line = f"{item.file}: '{item.target}' p={item.probability:.3f} -> {item.png}"
    if item.abs_share_in_mask is not None:
        line += (
            f"; in mask: {item.positive_share_in_mask:.1%} of positive relevance, {item.abs_share_in_mask:.1%} of |R|"
        )
    return line
