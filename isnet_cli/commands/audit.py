"""`isnet audit`: does this model look at the lungs? (relevance share + background counterfactuals)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from isnet_cli.commands import options as opt


@click.command("audit")
@opt.report_options("audit.json and audit_worst.png", "audit", json_help="Print the summary as JSON on stdout.")
@opt.label_column_option
@click.option(
    "--worst",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Images in the contact sheet of worst offenders.",
)
@opt.dataset_run_options("image or mask")
def command(
    request: opt.ReportRequest,
    label_column: str | None,
    worst: int,
    batch_size: int,
    device: str,
    fail_fast: bool,
    no_progress: bool,
) -> None:
    """Audit whether a model's decisions come from the lungs or from the background.

    For every image with a lung mask: the share of |LRP relevance| inside the lungs, and how often the
    prediction flips when the background is replaced (mean-filled, blurred, swapped with another
    class's background) or the lungs are hidden. Works on any model, ISNet or not.

    \b
    Example:
      isnet audit data/test.csv --model runs/isnet-1 --out audit/
    """
    from isnet_cli.console import say, say_error
    from isnet_cli.errors import InputError
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.io.manifest import read_dataset

    spec = read_dataset(request.data, label_column=label_column, require_labels=False)
    backend = load_backend(request.model, device=device)
    out = request.out(backend.path)  # before the audit runs: a refused run costs nothing
    say(f"model {backend.model_id}: {backend.description}")
    if not backend.has_relevance:
        say("no relevance for this model (ONNX without --with-heatmap): counterfactual tests only")
    audit_set, failed, unmasked, summary, per_image = _audit(backend, spec.samples, batch_size, fail_fast, no_progress)
    for failure in failed:
        say_error(failure["error"])
    summary["model"] = {"file": str(backend.path), "model_id": backend.model_id, "arch": backend.meta.get("arch")}
    summary["data"] = {
        "path": str(request.data),
        "images": len(spec.samples),
        "without_mask": unmasked,
        "failed": failed,
    }
    sheet = _write_audit(out, backend, audit_set, summary, per_image, worst)
    if request.as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    say(f"wrote {out / 'audit.json'}" + (f" and {sheet}" if worst else ""))
    if failed:
        raise InputError(None, f"{len(failed)} images could not be audited (listed above)")


def _audit(backend: Any, samples: list, batch_size: int, fail_fast: bool, no_progress: bool) -> tuple:
    """Load the masked images and run the audit, with a progress bar: (audit set, failed, without mask,
    summary, per image)."""
    from isnet_cli.console import make_progress, progress_enabled
    from isnet_cli.report.audit import load_audit_set, run_audit
    from isnet_cli.report.counterfactuals import PERTURBATIONS

    with make_progress(progress_enabled(no_progress)) as progress:
        task = progress.add_task("load", total=len(samples))
        audit_set, failed, unmasked = load_audit_set(
            samples,
            backend.classes,
            backend.contract,
            batch_size,
            fail_fast,
            on_batch=lambda n: progress.advance(task, n),
        )
        steps = progress.add_task("audit", total=2 + len(PERTURBATIONS))
        summary, per_image = run_audit(backend, audit_set, batch_size, on_step=lambda _: progress.advance(steps))
    return audit_set, failed, unmasked, summary, per_image


def _write_audit(out: Path, backend: Any, audit_set: Any, summary: dict, per_image: list, worst: int) -> Path:
    """audit.json and the contact sheet of the `worst` offenders in `out`; returns the sheet's path."""
    from isnet_cli.report.audit import write_audit
    from isnet_cli.report.audit_sheet import contact_sheet, worst_offenders

    out.mkdir(parents=True, exist_ok=True)
    write_audit(out / "audit.json", summary, per_image)
    sheet = out / "audit_worst.png"
    offenders = worst_offenders(per_image, worst)
    contact_sheet(sheet, backend, audit_set, per_image, offenders, summary["fill_values"], backend.contract.roi_name)
    return sheet


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(file=sys.stdout)
    table = Table(title=f"audit of {summary['n']} masked images", show_header=True, title_justify="left")
    table.add_column("test")
    table.add_column("flip rate", justify="right")
    table.add_column("mean |dp|", justify="right")
    table.add_column("accuracy", justify="right")
    acc = summary["accuracy"] or {}
    table.add_row("original", "", "", _pct(acc.get("original")))
    for kind, rate in summary["flip_rate"].items():
        key = "background_removed" if kind == "background_mean" else kind
        table.add_row(
            kind.replace("_", " "), _pct(rate), f"{summary['mean_abs_prob_change'][kind] or 0:.3f}", _pct(acc.get(key))
        )
    out.print(table)
    share = summary["inside_mask_share"]
    if share:
        out.print(
            f"|R| inside the {summary.get('roi', 'lungs')}: mean {share['mean']:.3f}, median {share['median']:.3f}"
        )
    out.print(f"[bold]verdict:[/bold] {escape(summary['verdict'])}")
