"""`isnet evaluate`: metrics with 95% CIs, confusion matrix, ROC, relevance inside the lung mask."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from isnet_cli.commands import options as opt


def run_scoring(backend: Any, samples: list, labels: list[int], opts: dict[str, Any], what: str) -> Any:
    from isnet_cli.console import make_progress, progress_enabled
    from isnet_cli.report.evaluate import score_samples

    with make_progress(progress_enabled(opts["no_progress"])) as progress:
        task = progress.add_task(what, total=len(samples))
        return score_samples(
            backend,
            samples,
            labels,
            batch_size=opts["batch_size"],
            with_relevance=opts["relevance"],
            fail_fast=opts["fail_fast"],
            on_batch=lambda n: progress.advance(task, n),
        )


@click.command("evaluate")
@opt.report_options("report.json, confusion.png, roc.png", "eval", json_help="Print report.json to stdout.")
@click.option(
    "--compare",
    "compare_model",
    default=None,
    help="A second model: AUROC difference on the same data with a paired test.",
)
@opt.label_column_option
@opt.threshold_option("p")
@click.option(
    "--relevance/--no-relevance",
    default=True,
    show_default=True,
    help="Measure LRP relevance inside the masks (needs a checkpoint or a --with-heatmap export).",
)
@opt.dataset_run_options()
def command(
    request: opt.ReportRequest,
    compare_model: str | None,
    label_column: str | None,
    threshold: float | None,
    relevance: bool,
    batch_size: int,
    device: str,
    fail_fast: bool,
    no_progress: bool,
) -> None:
    """Evaluate a model on a labelled set (manifest CSV or images/<class>/ tree).

    Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1, AUROC with DeLong 95% CIs
    (bootstrap CIs for the others), confusion matrix, ROC curves and, where masks are given, the
    share of LRP relevance inside the mask. Unreadable images are reported and skipped (exit 2).

    \b
    Example:
      isnet evaluate data/test.csv --model runs/resnet18-1 --compare runs/baseline --json
    """
    from isnet_cli.console import say, say_error
    from isnet_cli.errors import InputError
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.infer.predict import check_threshold
    from isnet_cli.io.manifest import read_dataset
    from isnet_cli.report.evaluate import build_report, label_indices, write_report

    spec = read_dataset(request.data, label_column=label_column)
    backend = load_backend(request.model, device=device)
    check_threshold(threshold, backend.classes)
    out = request.out(backend.path)  # before scoring: a refused run costs nothing
    say(f"model {backend.model_id}: {backend.description}")
    labels = label_indices(spec.samples, backend.classes, request.data)
    opts = {"batch_size": batch_size, "relevance": relevance, "fail_fast": fail_fast, "no_progress": no_progress}
    scored = run_scoring(backend, spec.samples, labels, opts, "evaluate")
    for failure in scored.failed:
        say_error(failure["error"])
    report = build_report(scored, backend.classes, threshold)
    report["model"] = {"file": str(backend.path), "model_id": backend.model_id, "arch": backend.meta.get("arch")}
    report["data"] = {"path": str(request.data), "images": len(spec.samples)}
    report["roi"] = backend.contract.roi_label
    if relevance and report["inside_mask_share"] is None:
        reason = "no masks in the data" if not any(s.mask for s in spec.samples) else "no relevance for this model"
        report["inside_mask_share_note"] = reason
    if compare_model is not None:
        report["compare"] = _compare(compare_model, device, backend, scored, spec.samples, labels, opts, report)
    write_report(report, scored, out)
    if request.as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    say(f"wrote {out / 'report.json'}, {out / 'confusion.png'}, {out / 'roc.png'}")
    if scored.failed:
        raise InputError(None, f"{len(scored.failed)} of {len(spec.samples)} images could not be used (listed above)")


def _compare(
    compare_model: str,
    device: str,
    backend: Any,
    scored: Any,
    samples: list,
    labels: list[int],
    opts: dict[str, Any],
    report: dict[str, Any],
) -> dict[str, Any]:
    """The report's `compare` section: `compare_model` scored on the same samples (without relevance)."""
    from isnet_cli.console import say
    from isnet_cli.errors import InputError
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.report.evaluate import compare_models

    other = load_backend(compare_model, device=device)
    if other.classes != backend.classes:
        raise InputError(compare_model, f"classes {other.classes} differ from the model's {backend.classes}")
    say(f"compare with {other.model_id}: {other.description}")
    other_scored = run_scoring(other, samples, labels, {**opts, "relevance": False}, "evaluate (compare)")
    return {
        "model_a": report["model"],
        "model_b": {"file": str(other.path), "model_id": other.model_id, "arch": other.meta.get("arch")},
        **compare_models(scored, other_scored, backend.classes),
    }


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout)
    ci = report["ci95"]
    summary = Table(title=f"evaluation on {report['n']} images (95% CI)", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("accuracy", _fmt(report["accuracy"], ci["accuracy"]))
    summary.add_row("balanced accuracy", _fmt(report["balanced_accuracy"], ci["balanced_accuracy"]))
    summary.add_row("macro-F1", _fmt(report["macro_f1"], ci["macro_f1"]))
    summary.add_row("AUROC (macro, one-vs-rest)", _fmt(report["auroc"]["macro"], report["auroc"]["ci95"]))
    share = report["inside_mask_share"]
    if share:
        roi = report.get("roi", "lungs")
        region = "mask" if roi == "lungs" else roi  # X-ray wording unchanged; other data sets name their region
        summary.add_row(
            f"|R| inside {region} (mean / median)",
            f"{share['absolute']['mean']:.3f} / {share['absolute']['median']:.3f}",
        )
        summary.add_row(
            f"R+ inside {region} (mean / median)",
            f"{share['positive']['mean']:.3f} / {share['positive']['median']:.3f}",
        )
    out.print(summary)
    per = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "AUROC (95% CI)", "support"):
        per.add_column(col, justify="left" if col == "class" else "right")
    for name, row in report["per_class"].items():
        auc = report["auroc"]["per_class"][name]
        per.add_row(
            name,
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            _fmt(auc["auroc"], auc["ci95"]),
            str(row["support"]),
        )
    out.print(per)
    labels = report["confusion"]["labels"]
    conf = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    conf.add_column("true \\ predicted", style="bold")
    for name in labels:
        conf.add_column(name, justify="right")
    for name, row in zip(labels, report["confusion"]["matrix"], strict=True):
        conf.add_row(name, *[str(v) for v in row])
    out.print(conf)
    if "compare" in report:
        c = report["compare"]
        p_value = "n/a" if c["p_value"] is None else f"{c['p_value']:.2g}"
        out.print(
            f"AUROC {_fmt(c['auroc_a'])} vs {_fmt(c['auroc_b'])} ({c['model_b']['model_id']}): "
            f"difference {_fmt(c['difference'], c['ci95'])}, p = {p_value} ({c['test']}, n = {c['n']})"
        )
