"""Soak: `predict` over 2,000 phantoms and `explain` over 500 keep resident memory flat and add no hooks.

`python benchmarks/soak.py [--predict 2000] [--explain 500] [--warmup 0.1] [--limit 10]` (from the
repository root, with the project importable). Writes 64 px phantoms to a temporary folder, runs
both commands in-process on the CPU with the shipped demo model (see `tests/soak.py`) and prints, for
each, resident memory after the warm-up and at the end, its growth and the hook counts. Exit status 1
when memory grew by more than --limit percent or hooks accumulated. The short run is `tests/test_soak.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.soak import phantoms, soak_explain, soak_predict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", type=int, default=2000, help="files to predict")
    parser.add_argument("--explain", type=int, default=500, help="files to explain (the first of the same phantoms)")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the files before the first reading")
    parser.add_argument("--limit", type=float, default=10.0, help="allowed memory growth after the warm-up, percent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        samples = phantoms(Path(tmp) / "phantoms", max(args.predict, args.explain))
        print(f"{len(samples)} phantoms of 64 px written in {time.monotonic() - start:.0f} s")
        results = [
            soak_predict(samples[: args.predict], warmup=max(1, int(args.warmup * args.predict))),
            soak_explain(
                samples[: args.explain], warmup=max(1, int(args.warmup * args.explain)), out_dir=Path(tmp) / "heatmaps"
            ),
        ]
    ok = True
    for result in results:
        print(result.line())
        if result.growth * 100 > args.limit or result.hooks_after != result.hooks_before or result.failed:
            ok = False
    print("ok" if ok else f"FAILED: memory growth above {args.limit:g}%, hooks accumulated or files failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
