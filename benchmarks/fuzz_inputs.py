"""Full input fuzz run: every corrupted variant of the real and synthetic images, decoded in a guarded worker.

`python benchmarks/fuzz_inputs.py [--seed 0] [--timeout 20] [--show]` (from the repository root,
with the project importable). Writes the cases to a temporary folder (see `tests/fuzz.py` for what
they are), decodes each with `load_image` under a per-file timeout and an address-space limit, and
prints: cases tried, decoded, clean errors, crashes, hangs, the worker's peak memory and the counts
by kind. Exit status 1 when any case crashed or hung. The fast subset runs in `tests/test_fuzz_inputs.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import SHARED_DICOM, make_cases, run_cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per file before it counts as a hang")
    parser.add_argument("--show", action="store_true", help="list the cases of each kind with their outcome")
    args = parser.parse_args()
    if not SHARED_DICOM.is_dir():
        print(f"note: {SHARED_DICOM} is absent: fuzzing the synthetic files only")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        cases = make_cases(Path(tmp), seed=args.seed)
        tally = run_cases(cases, timeout=args.timeout)
        kinds = Counter(case.kind.split(":")[0] for case in cases)
        print(f"{tally.line()} ({time.monotonic() - start:.0f} s)")
        print("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        if args.show:
            for kind, outcome, detail in tally.log:
                print(f"  {outcome:8s} {kind:28s} {detail}")
        for kind, path, detail in tally.failures:
            print(f"FAIL {kind} {path}: {detail}")
    return 1 if tally.counts["crash"] or tally.counts["hang"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
