"""Inference speed: torch eager vs onnxruntime CPU, and the cold start of `isnet predict` (ONNX vs checkpoint).

Prints ratios measured side by side in one run (torch and onnxruntime runs alternate, so that load
from other processes hits both alike). Targets this benchmark checks: onnxruntime CPU latency <= 0.6x
torch eager at batch 1 on DenseNet-121, outputs equal within 1e-4; `isnet predict` on an ONNX model
starts well faster than on a checkpoint (it never imports torch).

    .venv/bin/python benchmarks/infer_speed.py                 # DenseNet-121 and ResNet-18, 224 px
    .venv/bin/python benchmarks/infer_speed.py --archs resnet18 --repeats 5 --size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from isnet_cli.backbones import build_model
from isnet_cli.infer.checkpoint import save_checkpoint
from isnet_cli.infer.export import export_model
from isnet_cli.infer.onnx_runtime import make_session
from isnet_cli.io.contract import InputContract


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def side_by_side(torch_fn, ort_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately after one warm-up call each."""
    torch_fn(), ort_fn()
    t, o = [], []
    for _ in range(repeats):
        t += timed(torch_fn, 1)
        o += timed(ort_fn, 1)
    return statistics.median(t), statistics.median(o)


def cold_start(model: Path, image: Path, repeats: int) -> float:
    """Median wall time of a fresh `python -m isnet_cli predict IMAGE --model MODEL --json` process."""
    cmd = [sys.executable, "-m", "isnet_cli", "predict", str(image), "--model", str(model), "--json", "--device", "cpu"]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dicom_input(tmp: Path, size: int) -> Path:
    """A real DICOM from ../shared/data when present, else a synthetic DICOM phantom."""
    shared = Path(os.environ.get("ISNET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    real = shared / "dicom" / "cr_chest_pa_mono2_jpeg_baseline_rsna.dcm"
    if real.is_file():
        return real
    from isnet_cli.synth import synthesize

    manifest = synthesize(tmp / "dcm", n=2, size=size, fmt="dcm")
    return next((manifest.parent / "images").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["densenet121", "resnet18"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per batch size (batch 16: a third)")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both runtimes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contract = InputContract(size=args.size)
    print(f"CPU threads: {args.threads} (torch {torch.__version__}), input {args.size} px, 1 channel\n")
    header = f"{'model':<12} {'batch':>5} {'torch ms/img':>13} {'ORT ms/img':>11} {'ORT/torch':>10} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    cold_rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for arch in args.archs:
            torch.manual_seed(0)
            model = build_model(arch, 2).eval()
            ckpt = save_checkpoint(
                tmp / arch / "best.safetensors",
                model,
                {"arch": arch, "num_classes": 2, "classes": ["normal", "opacity"], "contract": contract.to_dict()},
            )
            t0 = time.perf_counter()
            export_model(ckpt, tmp / arch / "model.onnx")
            export_s = time.perf_counter() - t0
            session = make_session(tmp / arch / "model.onnx", "cpu", threads=args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).random((batch, 1, args.size, args.size), dtype=np.float32)
                xt = torch.from_numpy(x)

                def run_torch(xt=xt, model=model):
                    with torch.inference_mode():
                        return model(xt).numpy()

                def run_ort(x=x, session=session):
                    return session.run(["logits"], {"input": x})[0]

                diff = float(np.abs(run_torch() - run_ort()).max())
                repeats = args.repeats if batch == 1 else max(2, args.repeats // 3)
                t, o = side_by_side(run_torch, run_ort, repeats)
                print(
                    f"{arch:<12} {batch:>5} {1e3 * t / batch:>13.1f} {1e3 * o / batch:>11.1f} "
                    f"{o / t:>9.2f}x {diff:>10.1e}"
                )
            print(f"{arch:<12} export (dynamo=False, verified): {export_s:.1f} s")
            image = dicom_input(tmp, args.size)
            cold_ckpt = cold_start(ckpt, image, args.cold_repeats)
            cold_onnx = cold_start(tmp / arch / "model.onnx", image, args.cold_repeats)
            cold_rows.append((arch, cold_onnx, cold_ckpt))
    print(f"\ncold start of `isnet predict {image.name} --json` (median of {args.cold_repeats} fresh processes)")
    print(f"{'model':<12} {'ONNX s':>7} {'checkpoint s':>13} {'ONNX/ckpt':>10}")
    for arch, onnx_s, ckpt_s in cold_rows:
        print(f"{arch:<12} {onnx_s:>7.2f} {ckpt_s:>13.2f} {onnx_s / ckpt_s:>9.2f}x")


if __name__ == "__main__":
    main()
