"""`isnet predict`: class probabilities for files, folders, manifests or a list on stdin."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from isnet_cli.commands import options as opt


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@opt.model_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout (JSON lines).")
@click.option(
    "--csv",
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write results to this file (CSV; JSON lines if it ends in .jsonl). Appended per batch.",
)
@click.option("--resume", is_flag=True, help="Skip inputs already in the --out file and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@opt.batch_size_option
@opt.device_option
@opt.threshold_option("its probability")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Decoding threads (0 = up to 4).")
@click.option(
    "--sr",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the prediction of a single DICOM INPUT as a DICOM Structured Report (Comprehensive SR) here.",
)
@opt.anonymize_option
@opt.fail_fast_option()
@opt.no_progress_option
def command(
    inputs: tuple[str, ...],
    model: str | None,
    as_json: bool,
    out: str | None,
    resume: bool,
    overwrite: bool,
    batch_size: int,
    device: str,
    threshold: float | None,
    workers: int,
    sr: str | None,
    anonymize: bool,
    fail_fast: bool,
    no_progress: bool,
) -> None:
    """Predict the class of every INPUT (files, folders, manifest CSVs, '-' = paths on stdin).

    Unreadable inputs are reported and skipped; the exit code is then 2. With an .onnx model this
    runs on onnxruntime and never imports torch.

    \b
    Example:
      isnet predict scans/ --model model.onnx --out results.csv --resume
      isnet predict scan.dcm --model runs/demo --sr scan-prediction.dcm
    """
    from isnet_cli.console import progress_enabled, say
    from isnet_cli.errors import InputError
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.infer.predict import ResultsFile, check_threshold, pending
    from isnet_cli.io.inputs import expand_inputs

    _check_resume(resume, out, sr)
    samples = expand_inputs(list(inputs))
    if sr is not None:
        _check_sr_input(samples)
    backend = load_backend(model, device=device)
    check_threshold(threshold, backend.classes)
    say(f"model {backend.model_id}: {backend.description}")
    results = ResultsFile(Path(out), backend.classes, resume=resume, overwrite=overwrite) if out else None
    todo = pending(samples, results)
    if results is not None and len(todo) < len(samples):
        say(f"resume: {len(samples) - len(todo)} of {len(samples)} inputs already in {out}")
    try:
        show = progress_enabled(no_progress) and len(todo) > 1
        run = (batch_size, threshold, fail_fast, workers)
        table_rows, failures, predictions = _predict_all(backend, todo, results, as_json, run, show, sr is not None)
    finally:
        if results is not None:
            results.close()
    if sr is not None and predictions:
        _write_sr(Path(sr), predictions[0], backend.model_id, anonymize)
    if table_rows:
        _print_table(table_rows, backend.classes)
    done = len(todo) - failures
    say(f"{done} predicted, {failures} failed" + (f", results in {out}" if out else ""))
    if failures:
        raise InputError(None, f"{failures} of {len(todo)} inputs could not be used (listed above)")


def _check_resume(resume: bool, out: str | None, sr: str | None) -> None:
    """--resume appends to an --out file, and has no prediction of this run for --sr to report."""
    if resume and out is None:
        raise click.UsageError("--resume needs --out FILE")
    if sr is not None and resume:
        raise click.UsageError("--sr reports a prediction made in this run; leave out --resume")


def _check_sr_input(samples: list[Any]) -> None:
    """--sr: one report for one DICOM image (it references the image by its UIDs); checked before any work."""
    from isnet_cli.errors import InputError
    from isnet_cli.io.dicom_out import require_dicom

    if len(samples) != 1:
        raise InputError(None, f"--sr reports on one image; {len(samples)} inputs given", "run predict per image")
    require_dicom([samples[0].image], "--sr")


def _write_sr(path: Path, prediction: Any, model_id: str, anonymize: bool) -> None:
    from isnet_cli import __version__
    from isnet_cli.console import say
    from isnet_cli.io.dicom_out import write_prediction_sr

    write_prediction_sr(
        path,
        prediction.file,
        prediction.predicted,
        prediction.probabilities,
        "isnet classifier",
        model_id,
        __version__,
        anonymize,
    )
    say(f"structured report: {path}")


def _predict_all(
    backend: Any, todo: list[Any], results: Any, as_json: bool, run: tuple[Any, ...], show: bool, keep: bool
) -> tuple[list[Any], int, list[Any]]:
    """Predict `todo` (`run`: batch size, threshold, fail-fast, workers): JSON lines, the results file
    (flushed per batch) or rows for the table; failures reported as they come.
    Returns (rows for the table, failures, the predictions when `keep`)."""
    from isnet_cli.console import make_progress, say_error
    from isnet_cli.infer.predict import Failure, predict_samples

    batch_size, threshold, fail_fast, workers = run
    table_rows, failures, predictions = [], 0, []
    with make_progress(show) as progress:
        task = progress.add_task("predict", total=len(todo))

        def after_batch(n: int) -> None:
            if results is not None:
                results.flush()
            progress.advance(task, n)

        for item in predict_samples(backend, todo, batch_size, threshold, fail_fast, workers, after_batch):
            if isinstance(item, Failure):
                failures += 1
                say_error(item.message)
                continue
            if keep:
                predictions.append(item)
            if as_json:
                click.echo(json.dumps(item.to_json(backend.model_id)))
            if results is not None:
                results.write(item, backend.model_id)
            if not as_json and results is None:
                table_rows.append(item)
    return table_rows, failures, predictions


def _print_table(rows: list, classes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("predicted", style="bold")
    for c in classes:
        table.add_column(f"p({c})", justify="right")
    with_labels = any(r.label is not None for r in rows)
    if with_labels:
        table.add_column("label")
    for r in rows:
        cells = [Text(r.file), Text(r.predicted), *[f"{r.probabilities[c]:.3f}" for c in classes]]
        if with_labels:
            cells.append(Text("" if r.label is None else str(r.label)))
        table.add_row(*cells)
    Console(file=sys.stdout).print(table)
