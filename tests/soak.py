"""Soak runs shared by `tests/test_soak.py` (short) and `benchmarks/soak.py` (2,000 / 500 files).

`predict` and `explain` are run in-process through the library calls the commands make
(`predict_samples`, `explain_many`), so that what stays behind after each file (tensors, figures,
hooks, caches) stays in this process where it can be measured: resident memory is read after a
warm-up (when the allocator, torch's kernels and matplotlib's font cache have settled) and again at
the end; the forward/backward hooks on every module are counted before and after.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo-tinyresnet" / "model.safetensors"
SIZE = 64  # the demo model's input size


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (psutil is not a dependency)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hook_count(*objects: Any) -> int:
    """Forward, forward-pre and backward hooks over every torch module reachable from `objects`
    (a module, or an object such as the LRP engine whose attributes hold modules)."""
    import torch

    modules: dict[int, torch.nn.Module] = {}
    for obj in objects:
        roots = [obj] if isinstance(obj, torch.nn.Module) else list(vars(obj).values())
        for root in roots:
            if isinstance(root, torch.nn.Module):
                modules.update((id(m), m) for m in root.modules())
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind, {})) for m in modules.values() for kind in kinds)


@dataclass
class SoakResult:
    """One soak: `n` files, resident memory after `warmup` of them and at the end, hooks before and after."""

    what: str
    n: int
    warmup: int
    failed: int
    rss_warm: int
    rss_end: int
    hooks_before: int
    hooks_after: int
    seconds: float

    @property
    def growth(self) -> float:
        """Relative growth of resident memory from the end of the warm-up to the end of the run."""
        return (self.rss_end - self.rss_warm) / self.rss_warm

    def line(self) -> str:
        mib = 1024 * 1024
        return (
            f"{self.what}: {self.n} files ({self.failed} failed) in {self.seconds:.0f} s; resident memory "
            f"{self.rss_warm / mib:.0f} MiB after {self.warmup} (warm-up) -> {self.rss_end / mib:.0f} MiB at the end: "
            f"growth {100 * self.growth:+.1f}%; hooks {self.hooks_before} before, {self.hooks_after} after"
        )


def phantoms(root: Path, n: int) -> list[Any]:
    """`n` 64 px phantoms (with lung masks) written under `root`, as the samples `isnet` would expand."""
    from isnet_cli.io.manifest import read_dataset
    from isnet_cli.synth import synthesize

    return read_dataset(synthesize(root, n=n, size=SIZE, seed=11)).samples


def _measure(
    what: str, items: Iterator[Any], is_failure: Callable[[Any], bool], warmup: int, hooked: tuple[Any, ...]
) -> SoakResult:
    """Consume `items` (one per file), reading resident memory once `warmup` have been consumed and at the end."""
    hooks_before = hook_count(*hooked)
    start = time.monotonic()
    failed = seen = 0
    rss_warm = 0
    for item in items:
        failed += is_failure(item)
        seen += 1
        if seen == warmup:
            gc.collect()
            rss_warm = rss_bytes()
    gc.collect()
    return SoakResult(
        what=what,
        n=seen,
        warmup=warmup,
        failed=failed,
        rss_warm=rss_warm,
        rss_end=rss_bytes(),
        hooks_before=hooks_before,
        hooks_after=hook_count(*hooked),
        seconds=time.monotonic() - start,
    )


def soak_predict(samples: list[Any], warmup: int, batch_size: int = 16, model: Path = DEMO_MODEL) -> SoakResult:
    """`isnet predict` over `samples` (one `predict_samples` pass, as the command makes it), on the CPU."""
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.infer.predict import Failure, predict_samples

    backend = load_backend(str(model), device="cpu")
    items = predict_samples(backend, samples, batch_size=batch_size)
    return _measure("predict", items, lambda i: isinstance(i, Failure), warmup, (backend.model,))


def soak_explain(samples: list[Any], warmup: int, out_dir: Path, model: Path = DEMO_MODEL) -> SoakResult:
    """`isnet explain` over `samples` into `out_dir` (one figure per file, with the lung mask), on the CPU."""
    from isnet_cli.report.explain import explain_many
    from isnet_cli.report.explainer import load_explainer

    explainer = load_explainer(str(model), device="cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    items = explain_many(explainer, samples, "predicted", out_dir=out_dir, raw_dir=None)
    hooked = (explainer.model, explainer.lrp)
    return _measure("explain", items, lambda i: isinstance(i, tuple), warmup, hooked)
