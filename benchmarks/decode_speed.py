"""Decode throughput: real DICOM radiographs decoded every epoch (cold) vs read back from the dataset cache.

Usage: .venv/bin/python benchmarks/decode_speed.py [--data ../shared/data/dicom] [--size 224] [--epochs 3]

Prints images/s for: no cache (every epoch decodes: DICOM codec + VOI + resize), the first epoch with a
cache (decode + write .npz), and later epochs with the cache (read .npz only), and the ratio cached/cold.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from isnet_cli.io.contract import InputContract
from isnet_cli.io.dataset import Sample, XrayDataset

REPO = Path(__file__).resolve().parents[1]


def epoch_rate(ds: XrayDataset, epochs: int) -> float:
    """Images per second over `epochs` full passes."""
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(ds)):
            ds[i]
    return epochs * len(ds) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dicom")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() == ".dcm")
    if not files:
        raise SystemExit(f"no .dcm files in {args.data}")
    samples = [Sample(image=p) for p in files]
    contract = InputContract(size=args.size)

    cold = XrayDataset(samples, [], contract, cache_dir=None, require_masks=False)
    cold_rate = epoch_rate(cold, args.epochs)
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = XrayDataset(samples, [], contract, cache_dir=cache_dir, require_masks=False)
        fill_rate = epoch_rate(cached, 1)
        decodes_after_fill = cached.decode_count
        cached_rate = epoch_rate(cached, args.epochs)
        extra_decodes = cached.decode_count - decodes_after_fill

    table = Table(title=f"{len(files)} DICOM files from {args.data}, {args.size} px, {args.epochs} epochs")
    table.add_column("pass")
    table.add_column("images/s", justify="right")
    table.add_column("decodes", justify="right")
    table.add_row("no cache (decode every epoch)", f"{cold_rate:.1f}", str(cold.decode_count))
    table.add_row("cache, first epoch (decode + write)", f"{fill_rate:.1f}", str(decodes_after_fill))
    table.add_row("cache, later epochs", f"{cached_rate:.1f}", str(extra_decodes))
    console = Console()
    console.print(table)
    console.print(f"ratio cached / cold: {cached_rate / cold_rate:.1f}x")


if __name__ == "__main__":
    main()
