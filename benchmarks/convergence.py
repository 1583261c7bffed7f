"""Convergence study: does an ISNet trained with the defaults learn the lesion and ignore the shortcut?

Trains, for every architecture x seed x phantom contrast of the grid, three models on 64 px chest
phantoms with the `isnet train` defaults (only the architecture, image size, epochs and seed given):

- `isnet`:    the default ISNet, on training phantoms whose background marker is in every `opacity`
              image and in no `normal` one (bias 1.0);
- `standard`: the standard classifier (`--variant none`) on the same biased phantoms;
- `ceiling`:  the standard classifier on phantoms whose marker is uncorrelated with the label (bias 0.5):
              what the architecture can learn of the lesion in this budget; an ISNet should approach it.

Each run's `best` checkpoint (what a user gets) is scored on 200 held-out phantoms three ways: clean (no
marker), biased (same correlation) and flipped (marker only in `normal` images), plus the share of |LRP
relevance| (predicted class) inside the lungs and the `isnet audit` background-swap flip rate, both on the
flipped set. A run "ended at chance" when its clean accuracy is below 0.6. Judge an ISNet by its flipped
accuracy and swap flip rate, never by the in-lung share alone: a network can keep its relevance in the
lungs and still decide by the background.

    python benchmarks/convergence.py                                   # tinyresnet + resnet18, 5 seeds
    python benchmarks/convergence.py --archs tinycnn,densenet121 --seeds 0-2 --contrasts 0.22,0.16
    python benchmarks/convergence.py --models isnet --set ramp=5 --tag ramp5   # try a recipe change

Runs go to `--out` (default /tmp/isnet-convergence) and are reused when their `score.json` exists, so
an interrupted study continues where it stopped and a grid can be extended. `--jobs` runs trainings in
parallel processes, each with `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZE = 64
N_TRAIN = 400
N_TEST = 200
CHANCE = 0.6  # clean accuracy below this: the run learned nothing of the lesion
MODELS = ("isnet", "standard", "ceiling")
# Per test set: phantom bias (P(marker | opacity); "flip": marker only in normal images) and data seed.
TEST_SETS = {"clean": (None, 102), "biased": (1.0, 101), "flipped": ("flip", 103)}


@dataclass(frozen=True)
class Job:
    arch: str
    seed: int
    contrast: float
    model: str
    tag: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return f"{self.tag}_{self.model}_{self.arch}_c{self.contrast:g}_s{self.seed}"


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7'."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def parse_overrides(items: list[str]) -> tuple[tuple[str, Any], ...]:
    """KEY=VALUE pairs; VALUE as JSON where it parses (numbers, true/false), else as a string."""
    out = []
    for item in items:
        key, _, value = item.partition("=")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.append((key.strip(), parsed))
    return tuple(out)


def phantom_sets(root: Path, contrast: float) -> dict[str, Path]:
    """Training (biased and uncorrelated) and test manifests of one contrast, generated once."""
    from isnet_cli.synth import synthesize

    specs = {"train_biased": (1.0, 0, N_TRAIN), "train_uncorrelated": (0.5, 0, N_TRAIN)}
    specs.update({f"test_{name}": (bias, seed, N_TEST) for name, (bias, seed) in TEST_SETS.items()})
    out = {}
    for name, (bias, seed, n) in specs.items():
        folder = root / f"c{contrast:g}" / name
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            synthesize(folder, n=n, size=SIZE, bias=bias, seed=seed, contrast=contrast)
        out[name] = manifest
    return out


def train_config(job: Job, sets: dict[str, Path], out: Path, epochs: int) -> dict[str, Any]:
    """The `isnet train` options of one job: the defaults, plus size, epochs, seed and the job's overrides."""
    cfg: dict[str, Any] = {
        "data": str(sets["train_uncorrelated" if job.model == "ceiling" else "train_biased"]),
        "arch": job.arch,
        "img_size": SIZE,
        "epochs": epochs,
        "seed": job.seed,
        "out": str(out / "runs"),
        "name": job.name,
        "cache": str(out / "cache"),
        "no_progress": True,
        "heatmaps": 0,
    }
    if job.model != "isnet":
        cfg["variant"] = "none"
    cfg.update(dict(job.overrides))
    return cfg


def run_one(cfg: dict[str, Any], sets: dict[str, str]) -> dict[str, Any]:
    """Train one model (in this process) and score its best checkpoint; returns the score record."""
    import numpy as np

    from isnet_cli.infer.loading import TorchModel
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.report.audit import load_audit_set, run_audit
    from isnet_cli.report.evaluate import label_indices, macro_auroc, score_samples
    from isnet_cli.train import TrainConfig, train

    t0 = time.perf_counter()
    result = train(TrainConfig(**cfg))
    seconds = time.perf_counter() - t0
    backend = TorchModel(result.run_dir / "best.safetensors", device="cpu")
    record: dict[str, Any] = {"seconds": round(seconds, 1), "best_epoch": (result.best or {}).get("epoch")}
    for name in TEST_SETS:
        samples = read_dataset(sets[f"test_{name}"]).samples
        labels = label_indices(samples, backend.classes, sets[f"test_{name}"])
        scored = score_samples(backend, samples, labels, batch_size=50, with_relevance=name == "flipped")
        record[name] = float((scored.probs.argmax(1) == scored.y).mean())
        record[f"{name}_auroc"] = macro_auroc(scored.y, scored.probs)
        if name == "flipped":
            record["share"] = float(np.nanmean(scored.share_abs))
            audit_set, _, _ = load_audit_set(samples, backend.classes, backend.contract, 50, fail_fast=True)
            summary, _ = run_audit(backend, audit_set, batch_size=50)
            record["swap_flip"] = summary["flip_rate"]["background_swap"]
    last = result.last or {}
    record["train_ce"] = last.get("train_ce")
    record["at_chance"] = record["clean"] < CHANCE
    return record


def launch(job: Job, cfg: dict[str, Any], sets: dict[str, Path], out: Path, threads: int) -> dict[str, Any]:
    """Run one job in a child process (own torch threads, own log); reuse a finished job's score."""
    score = out / "scores" / f"{job.name}.json"
    if score.is_file():
        return json.loads(score.read_text())
    score.parent.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_dir = Path(cfg["out"]) / cfg["name"]
    if run_dir.exists():  # an interrupted earlier attempt: start it again
        shutil.rmtree(run_dir)
    payload = json.dumps({"cfg": cfg, "sets": {k: str(v) for k, v in sets.items()}})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(out / "logs" / f"{job.name}.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", payload], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}, see {out / 'logs' / (job.name + '.log')}"}
    record = json.loads((out / "logs" / f"{job.name}.log").read_text().strip().splitlines()[-1])
    record.update(job={"arch": job.arch, "seed": job.seed, "contrast": job.contrast, "model": job.model})
    record["recipe"] = {"tag": job.tag, "overrides": dict(job.overrides)}
    score.write_text(json.dumps(record, indent=1))
    return record


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(rows: list[tuple[Job, dict[str, Any]]]) -> str:
    """Per run, then per (recipe, model, arch, contrast): median over seeds and runs at chance."""
    cols = ["clean", "biased", "flipped", "share", "swap_flip"]
    lines = ["| recipe | model | arch | contrast | seed | " + " | ".join(cols) + " | at chance | epochs best | s |"]
    lines.append("|" + "---|" * (len(cols) + 8))
    for job, r in rows:
        if "error" in r:
            lines.append(f"| {job.tag} | {job.model} | {job.arch} | {job.contrast:g} | {job.seed} | {r['error']} |")
            continue
        vals = " | ".join(_fmt(r.get(c)) for c in cols)
        lines.append(
            f"| {job.tag} | {job.model} | {job.arch} | {job.contrast:g} | {job.seed} | {vals} | "
            f"{'yes' if r['at_chance'] else 'no'} | {r.get('best_epoch')} | {r.get('seconds')} |"
        )
    lines.append("")
    lines.append(
        "| recipe | model | arch | contrast | seeds | " + " | ".join(f"median {c}" for c in cols) + " | at chance |"
    )
    lines.append("|" + "---|" * (len(cols) + 6))
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for job, r in rows:
        if "error" not in r:
            groups.setdefault((job.tag, job.model, job.arch, job.contrast), []).append(r)
    for (tag, model, arch, contrast), rs in groups.items():
        med = " | ".join(
            _fmt(statistics.median(x[c] for x in rs if x.get(c) is not None))
            if any(x.get(c) is not None for x in rs)
            else "-"
            for c in cols
        )
        chance = sum(x["at_chance"] for x in rs)
        lines.append(f"| {tag} | {model} | {arch} | {contrast:g} | {len(rs)} | {med} | {chance}/{len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="tinyresnet,resnet18")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--contrasts", default="0.22", help="phantom lesion contrasts (synth default 0.22)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="`isnet train` option")
    parser.add_argument("--tag", default="defaults", help="recipe name in the table (use with --set)")
    parser.add_argument("--out", default="/tmp/isnet-convergence")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        payload = json.loads(args.child)
        record = run_one(payload["cfg"], payload["sets"])
        print(json.dumps(record))
        return

    out = Path(args.out)
    overrides = parse_overrides(args.set)
    jobs = [
        Job(arch, seed, float(contrast), model, args.tag, overrides)
        for contrast in args.contrasts.split(",")
        for arch in args.archs.split(",")
        for seed in parse_seeds(args.seeds)
        for model in args.models.split(",")
    ]
    sets = {c: phantom_sets(out / "data", c) for c in {j.contrast for j in jobs}}
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; out {out}", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(
                launch, j, train_config(j, sets[j.contrast], out, args.epochs), sets[j.contrast], out, args.threads
            )
            for j in jobs
        ]
        rows = []
        for job, fut in zip(jobs, futures, strict=True):
            r = fut.result()
            rows.append((job, r))
            print(
                f"{job.name}: "
                + json.dumps({k: r.get(k) for k in ("clean", "biased", "flipped", "share", "swap_flip", "error")}),
                flush=True,
            )
    print()
    print(table(rows))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
