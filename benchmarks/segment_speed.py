"""Segmenter speed and the cost of the segmenter-then-classifier pipeline, side by side in one run.

Usage: .venv/bin/python benchmarks/segment_speed.py [--segmenter models/lung-segmenter] [--arch resnet18]
       [--images 32] [--threads 1]

1. `isnet segment` throughput on CPU, torch vs ONNX (onnxruntime), on 256 x 256 px radiograph-like PNGs:
   - end to end (`segment_inputs`: decode, preprocess, network, back to 256 px, clean-up, QC, PNG
     written), with the bundled segmenter (an ensemble of a 128 px and a 256 px U-Net, input 256 px);
   - the segmenter's network alone at its input size (batch 8), where the network dominates.
   Ratio: ONNX latency / torch latency (the issue asks for <= 0.7).
2. Inference of the same classifier as an ISNet (the plain classifier: the ISNet needs no mask at run
   time) vs inside the pipeline (segmenter + mask + classifier, `isnet_cli.pipeline.MaskedPipeline`):
   parameters and latency (CPU, batch 1, torch), and the pipeline / ISNet ratios.

Latencies are medians over repeats after a warm-up, the compared functions called in turn within each
repeat (torch, ONNX, torch, ONNX, ...), so that a slow spell of a shared machine slows both alike; with
`--threads` CPU threads for torch and onnxruntime alike (1 by default); the end-to-end row runs `isnet
segment` as a user gets it (onnxruntime with its default thread pool), three interleaved runs each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from isnet_cli.backbones import build_model
from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, resolve_model
from isnet_cli.infer.export import export_model
from isnet_cli.infer.onnx_runtime import INPUT_NAME, LOGITS_NAME, make_session
from isnet_cli.pipeline import MaskedPipeline, export_form, parameter_count
from isnet_cli.segment.infer import segment_inputs

REPO = Path(__file__).resolve().parents[1]
SIZE = 256


def radiographs(folder: Path, n: int) -> Path:
    """`n` 256 px grey PNGs with two dark 'lungs' in a brighter body (what the segmenter reads)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    for i in range(n):
        body = 0.7 - 0.4 * (((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.48) ** 2 < 1)
        lungs = sum(((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.28) ** 2 < 1 for cx in (0.32, 0.68))
        image = np.clip(body + 0.5 * lungs * (-0.4) + 0.05 * rng.standard_normal((SIZE, SIZE)), 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"r{i:03d}.png")
    return folder


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds, the functions called in turn within a round
    (a, b, a, b, ...) after one untimed call each: a slow spell of a shared machine then slows every one
    of them alike instead of the one whose block it fell in."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def segment_throughput(seg: Path, onnx_seg: Path, images: Path, work: Path, repeats: int) -> dict[str, float]:
    """images/s of `segment_inputs` on every PNG of `images`, torch checkpoint vs ONNX export (interleaved)."""
    n = len(list(images.glob("*.png")))

    def run(model: Path, name: str) -> Callable[[], object]:
        return lambda: segment_inputs([str(images)], str(model), work / name, device="cpu", overwrite=True)

    seconds = interleaved_medians({"torch": run(seg, "torch"), "onnx": run(onnx_seg, "onnx")}, repeats)
    return {name: n / t for name, t in seconds.items()}


def network_latency(net: torch.nn.Module, size: int, work: Path, threads: int, repeats: int) -> dict[str, float]:
    """Seconds per batch of 8 at the segmenter's input size: its network on torch and exported to ONNX as
    `isnet export` writes it (`export_form`: the same function, PReLU as LeakyReLU, transposed convolutions
    as Conv + DepthToSpace)."""
    x = torch.rand(8, 1, size, size)
    path = work / "network.onnx"
    with warnings.catch_warnings():  # the legacy exporter's deprecation; MONAI's instance norm (exported right)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            export_form(net),
            (x,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[LOGITS_NAME],
            opset_version=17,
            dynamo=False,
        )
    session = make_session(path, "cpu", threads=threads)
    xn = x.numpy()
    with torch.inference_mode():
        return interleaved_medians(
            {"torch": lambda: net(x), "onnx": lambda: session.run([LOGITS_NAME], {INPUT_NAME: xn})}, repeats
        )


def pipeline_vs_isnet(seg: Path, arch: str, size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Parameters and latency (batch 1) of the classifier alone (an ISNet at run time) and the pipeline."""
    classifier = build_model(arch, 2).eval()
    segmenter, meta = load_segmenter_checkpoint(seg)
    pipeline = MaskedPipeline(classifier, segmenter, meta["contract"]["size"], 0.0).eval()
    x = torch.rand(1, 1, size, size)
    with torch.inference_mode():
        seconds = interleaved_medians(
            {
                "isnet": lambda: classifier(x),
                "segmenter": lambda: pipeline.lung_mask(x),
                "pipeline": lambda: pipeline(x),
            },
            repeats,
        )
    networks = {"isnet": classifier, "segmenter": segmenter, "pipeline": pipeline}
    return {name: {"parameters": parameter_count(net), "latency": seconds[name]} for name, net in networks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segmenter", default=str(REPO / "models" / "lung-segmenter" / "lung-segmenter.safetensors"))
    parser.add_argument("--arch", default="resnet18", help="classifier of the pipeline vs ISNet comparison")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seg = resolve_model(args.segmenter)
    net, meta = load_segmenter_checkpoint(seg)
    size = meta["contract"]["size"]
    out = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx_seg = work / "seg.onnx"
        export_model(seg, onnx_seg)
        rates = segment_throughput(seg, onnx_seg, radiographs(work / "images", args.images), work, 3)
        network = network_latency(net, size, work, args.threads, args.repeats)
    cmp = pipeline_vs_isnet(seg, args.arch, SIZE, args.repeats)

    t = Table(title=f"isnet segment on {SIZE} px images, CPU, {args.threads} thread(s)", title_justify="left")
    for col in ("what", "torch", "ONNX", "ONNX / torch latency"):
        t.add_column(col)
    t.add_row(
        f"end to end, segmenter {seg.name} ({size} px input), images/s",
        f"{rates['torch']:.1f}",
        f"{rates['onnx']:.1f}",
        f"{rates['torch'] / rates['onnx']:.2f}",
    )
    t.add_row(
        f"its network alone ({len(meta.get('ensemble', [meta]))} U-Net(s)) at {size} px, batch 8, images/s",
        f"{8 / network['torch']:.1f}",
        f"{8 / network['onnx']:.1f}",
        f"{network['onnx'] / network['torch']:.2f}",
    )
    out.print(t)
    t = Table(title=f"inference, {args.arch} at {SIZE} px, CPU, batch 1, torch", title_justify="left")
    for col in ("model", "parameters", "latency ms", "vs ISNet: parameters", "vs ISNet: latency"):
        t.add_column(col)
    base = cmp["isnet"]
    labels = {
        "isnet": "ISNet (the classifier alone)",
        "segmenter": "segmenter stage",
        "pipeline": "segmenter-then-classifier",
    }
    for name, label in labels.items():
        row = cmp[name]
        t.add_row(
            label,
            f"{row['parameters']:,}",
            f"{row['latency'] * 1e3:.1f}",
            f"{row['parameters'] / base['parameters']:.2f}x",
            f"{row['latency'] / base['latency']:.2f}x",
        )
    out.print(t)


if __name__ == "__main__":
    main()
