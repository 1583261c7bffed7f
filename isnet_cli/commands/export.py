"""`isnet export`: the plain classifier as ONNX or TorchScript, verified against torch before it is written."""

from __future__ import annotations

import json

import click

from isnet_cli.commands.options import model_option


@click.command("export")
@model_option(onnx=False)
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Output file (.onnx / .pt).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (the dynamo exporter needs >= 18).")
@click.option(
    "--dynamo/--no-dynamo",
    default=False,
    show_default=True,
    help="Use torch's dynamo ONNX exporter (~15 s, needs onnxscript) instead of the TorchScript-based one (<1 s).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run the export on onnxruntime against torch; fail if max |diff| > 1e-4.",
)
@click.option(
    "--with-heatmap",
    is_flag=True,
    help="Also write <stem>.heatmap.onnx: outputs logits and the LRP relevance of the predicted class.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar metadata as JSON.")
def command(
    model: str | None,
    fmt: str,
    out: str,
    opset: int,
    dynamo: bool,
    verify: bool,
    with_heatmap: bool,
    as_json: bool,
) -> None:
    """Export a trained model for deployment (plain classifier, dynamic batch, metadata embedded).

    Writes FILE and the sidecar FILE.json (classes, input contract, ISNet settings, opset, verification).
    A --variant masked run exports as one graph holding segmenter and classifier; a segmenter run (from
    `isnet segment train`) exports its U-Net for `isnet segment --model FILE.onnx` (no torch needed).

    \b
    Example:
      isnet export --model runs/resnet18-1 --format onnx --out model.onnx --with-heatmap
      isnet export --model runs/lungs --out lungs.onnx
    """
    from isnet_cli.console import say
    from isnet_cli.infer.export import export_model
    from isnet_cli.infer.onnx_runtime import sidecar_path

    meta = export_model(model, out, fmt=fmt, opset=opset, dynamo=dynamo, verify=verify, with_heatmap=with_heatmap)
    info = meta["export"]
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    check = info.get("verified")
    verdict = f"verified, max |diff| {check['max_abs_diff']:.2g}" if check else "not verified"
    say(f"wrote {out} ({fmt}, {verdict}) and {sidecar_path(out)}")
    if info.get("heatmap"):
        heat = info["heatmap"]
        hv = heat.get("verified")
        note = f"verified, max rel diff {hv['max_rel_diff']:.2g}" if hv else "not verified"
        say(f"wrote {heat['file']} (logits + relevance, {note})")
