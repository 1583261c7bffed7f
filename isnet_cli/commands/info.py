"""`isnet info`: the model card of a checkpoint or exported model, read without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

SECTIONS = (
    ("Input contract", "contract"),
    ("Training data", "data"),
    ("ISNet hyper-parameters", "isnet"),
    ("Segmenter (--variant masked)", "segmenter"),
    ("Segmenter network: U-Net", "unet"),
    ("Segmenter network: ensemble members", "ensemble"),
    ("Segmenter clean-up", "postprocess"),
    ("Metrics", "metrics"),
    ("Export", "export"),
    ("Versions", "versions"),
)


def model_card(path: Path) -> dict[str, Any]:
    """Metadata of a checkpoint (safetensors header) or an export (sidecar), plus file name, size and sha256."""
    from isnet_cli.infer.checkpoint import read_meta
    from isnet_cli.io.cache import file_digest

    if path.suffix.lower() == ".onnx":
        from isnet_cli.infer.onnx_runtime import read_onnx_meta

        meta = read_onnx_meta(path)
    else:
        meta = read_meta(path)
    return {"file": str(path), "sha256": file_digest(path), "size_bytes": path.stat().st_size, **meta}


def _is_records(value: Any) -> bool:
    """A non-empty list of dicts (the members of a segmenter ensemble)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts (and lists of dicts, by index) as dotted keys; other lists and scalars as compact JSON."""
    if _is_records(value):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        rows: list[tuple[str, str]] = []
        for key, sub in value.items():
            nested = isinstance(sub, dict) or _is_records(sub)
            rows.extend(_flatten(sub, f"{prefix}{key}." if nested else f"{prefix}{key}"))
        return rows
    text = value if isinstance(value, str) else json.dumps(value)
    return [(prefix.rstrip("."), text)]


@click.command("info")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the card as one JSON object.")
def command(model: str | None, as_json: bool) -> None:
    """Show a model card: architecture, classes, input contract, training data, ISNet settings, metrics.

    MODEL is a checkpoint, a run folder or an exported .onnx (default: the newest run under runs/). For a
    segmenter-then-classifier checkpoint (--variant masked) it also measures each stage's latency (CPU).

    \b
    Example:
      isnet info runs/resnet18-1 --json
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from isnet_cli.infer.checkpoint import resolve_model

    path = Path(resolve_model(model))
    card = model_card(path)
    if card.get("segmenter") and path.suffix.lower() != ".onnx":
        from isnet_cli.infer.loading import pipeline_stages

        card["stages"] = pipeline_stages(path)
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    out = Console()
    head = Table(title=f"isnet model card: {Path(card['file']).name}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    head.add_row("file", Text(card["file"]))
    head.add_row("sha256", card["sha256"])
    head.add_row("size", f"{card['size_bytes'] / 1e6:.2f} MB")
    export = card.get("export") or {}
    fmt = str(card.get("format", "?"))
    if export:
        fmt = f"{export.get('format')} export (opset {export.get('opset', '-')}) of {fmt}"
    head.add_row("format", fmt)
    head.add_row("architecture", f"{card.get('arch', '?')} ({card.get('in_channels', 1)} input channel(s))")
    head.add_row("classes", ", ".join(f"{i}: {c}" for i, c in enumerate(card.get("classes", []))))
    for key in ("epoch", "created"):
        if card.get(key) is not None:
            head.add_row(key, str(card[key]))
    out.print(head)
    if card.get("stages"):
        stages = Table(title="Pipeline stages (latency: this machine, CPU, 1 image)", title_justify="left")
        for name in ("stage", "parameters", "latency ms"):
            stages.add_column(name)
        for s in card["stages"]:
            stages.add_row(s["stage"], f"{s['parameters']:,}", f"{s['latency_ms']:.2f}")
        out.print(stages)
    for title, key in SECTIONS:
        if not card.get(key):
            continue
        table = Table(title=title, show_header=False, title_justify="left", min_width=len(title) + 4)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, value in _flatten(card[key]):
            table.add_row(Text(name), Text(value))
        out.print(table)
