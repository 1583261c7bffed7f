"""Shortcut benchmark on real chest X-rays: which models learn a lesion in the lungs and ignore a marker?

The task is built from real radiographs with lung masks (the shared data folder beside the project,
`--data`): every source image is letterboxed to `--size` px with the project's preprocessing, then
drawn `--draws` times in both classes, `normal` (as is) and `opacity` (a synthetic round opacity
implanted at a new random place inside its lungs each draw, `isnet_cli.synth.implant_lesion`). A bright
letter marker outside the lungs (`isnet_cli.synth.draw_marker`) is the shortcut: with correlation b it
is in a fraction b of the `opacity` training images and 1 - b of the `normal` ones (b = 1: every opacity
and no normal image). Sources are split train / validation / test by image (by patient where the set
has several images of one patient), so no anatomy is shared between the splits.

Models (`MODELS`), each trained with the `isnet train` defaults (only architecture, size, epochs, seed
and what defines the model given), on the same images and budget. `--jobs` runs train at a time, each in
its own process with `--threads` torch threads (on 2 cores, two one-thread runs side by side get ~12%
more done than one two-thread run), the longest first:

- `ceiling`:          the standard classifier on the same images without any marker (what can be learned);
- `standard`:         the standard classifier (`--variant none`) on the biased images;
- `isnet`:            the ISNet (`--variant selective`, the default);
- `isnet_stochastic`: the ISNet with `--variant stochastic`;
- `rrr`:              Right for the Right Reasons (`--method rrr`, input-gradient penalty outside the lungs);
- `pipeline`:         the segmenter-then-classifier baseline (`--variant masked`), where `isnet train`
                      offers it.

Each `best` checkpoint (what a user gets) is scored on the test sources: clean (no marker), biased
(marker with every opacity) and flipped (marker with every normal image): accuracy (bootstrap 95% CI)
and AUROC (DeLong 95% CI); on the flipped set the mean share of |LRP relevance| (predicted class) inside
the lungs and the `isnet audit` background-swap flip rate; the inference latency (batch of one, CPU,
median) and the parameter count. Three seeds for `standard` and `isnet` at b = 1 (mean and spread), one
for the others and for b = 0.9.

    python benchmarks/shortcut_cxr.py                  # everything (ResNet-18, 128 px, CPU; < 2 h on 2 cores)
    python benchmarks/shortcut_cxr.py --quick          # one seed, b = 1 only, 5 epochs, 96 px: a preview
    python benchmarks/shortcut_cxr.py --models ceiling # calibrate the lesion: the ceiling should reach 0.85
    python benchmarks/shortcut_cxr.py --models isnet --set ramp=0 --tag noramp   # try an `isnet train` option
    python benchmarks/shortcut_cxr.py --arch densenet121 --size 224 --set device=cuda   # the paper's setting

Writes `--results` (default `benchmarks/results/`, `OUT/results-quick` with `--quick`):
`shortcut_cxr.json` (per model: clean / biased / flipped accuracy and AUROC with CIs, `inside_mask_share`,
`background_swap_flip_rate`, `latency_ms`, `parameters`; for the pipeline also how much of each implanted
opacity its segmenter's mask keeps, `lesion_inside_segmenter_mask`; plus `config`), `shortcut_cxr.md` (the
table) and `shortcut_cxr.png`
(each model's heatmaps on the same flipped test images). `--out` keeps the built data, runs and per-run
scores (one folder per size, contrast and draws); a run whose score exists is not trained again.
`--merge` updates the published files instead of replacing them: this invocation's rows take the place of
theirs (unless the published row has more seeds), the rest stay, and `config.updates` records the change
(for rows measured again after a change that touches only them, such as new segmenter weights).
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from convergence import parse_overrides  # the sibling script (run as `python benchmarks/shortcut_cxr.py`)

REPO = Path(__file__).resolve().parents[1]
SETS = ("ieee8023_gb100", "tb_shenzhen_montgomery72", "v7_ieee8023_lungs345")
SPLIT = {"train": 0.6, "val": 0.1, "test": 0.3}
TESTS = ("clean", "biased", "flipped")
BIASES = (1.0, 0.9)
SEEDS = 3  # for the models marked `seeds=SEEDS`, at b = 1
SIZE = 128
EPOCHS = 10
# --quick: one seed, b = 1, half the epochs (ramp and cosine schedule scaled with the run, as `isnet train`
# does for any run length) and 96 px (an ISNet step costs 0.57x, a plain one 0.66x of 128 px's; the opacity and
# the marker scale with the image): a preview, 939 s on the 2-core machine, where 5 epochs at 128 px took 34 min
# on slow evenings (docs/benchmarks.md). The published results are the full run's.
QUICK_EPOCHS = 5
QUICK_SIZE = 96
LATENCY_RUNS = 30
FIGURE_IMAGES = 4


@dataclass(frozen=True)
class Model:
    """One row of the benchmark: the `isnet train` options that define it and where it is trained."""

    options: dict[str, Any]
    clean_data: bool = False  # trained on images without any marker (the ceiling)
    seeds: int = 1  # seeds at b = 1
    biases: tuple[float, ...] = BIASES
    needs: str | None = None  # the `--variant` value this row needs from `isnet train`, if not always there
    cost: float = 1.0  # training time relative to the standard classifier's (longest runs start first)


MODELS = {
    "standard": Model({"variant": "none"}, seeds=SEEDS),
    "isnet": Model({"variant": "selective"}, seeds=SEEDS, cost=2.2),  # LRP pass + the C1/C2 warm-up
    "isnet_stochastic": Model({"variant": "stochastic"}, cost=2.2),
    "rrr": Model({"variant": "none", "method": "rrr"}, cost=1.7),  # double backward
    "pipeline": Model({"variant": "masked"}, needs="masked"),
    "ceiling": Model({"variant": "none"}, clean_data=True, biases=(1.0,)),
}


def sources(data: Path) -> list[dict[str, str]]:
    """Every image with a lung mask in the shared sets: image, mask, and the group it is split by."""
    rows = []
    for name in SETS:
        labels = data / name / "labels.csv"
        if not labels.is_file():
            raise SystemExit(f"{labels}: not found; pass --data (the folder with {', '.join(SETS)})")
        with labels.open(newline="") as f:
            for r in csv.DictReader(f):
                group = f"{name}/patient-{r['patient']}" if r.get("patient") else f"{name}/{r['image']}"
                rows.append(
                    {"image": str(data / name / r["image"]), "mask": str(data / name / r["mask"]), "group": group}
                )
    return rows


def split_groups(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    groups = sorted({r["group"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(groups))
    cut_train = round(SPLIT["train"] * len(groups))
    cut_val = cut_train + round(SPLIT["val"] * len(groups))
    which = {}
    for rank, i in enumerate(order):
        which[groups[i]] = "train" if rank < cut_train else "val" if rank < cut_val else "test"
    return {part: [r for r in rows if which[r["group"]] == part] for part in SPLIT}


def build(
    rows: list[dict[str, str]],
    folder: Path,
    size: int,
    bias: float | str | None,
    contrast: float,
    draws: int,
    seed: int,
) -> Path:
    """`draws` images of both classes per source at `size` px. `bias`: None (no marker), "flip" (marker with
    every normal image) or b (marker with a fraction b of the opacity images and 1 - b of the normal ones).
    The classes stay balanced: a `normal` draw is the source itself (its marker, if any, moves)."""
    from PIL import Image

    from isnet_cli.synth import draw_marker, implant_lesion

    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    out = []
    for i, r in enumerate(rows):
        image, lungs = _letterboxed(r["image"], r["mask"], size)
        for draw, label in itertools.product(range(draws), ("normal", "opacity")):
            rng = np.random.default_rng([seed, i, draw, label == "opacity"])
            img = implant_lesion(image, lungs, rng, contrast) if label == "opacity" else image.copy()
            if _has_marker(bias, label, np.random.default_rng([seed, i, draw, label == "opacity", 7])):
                draw_marker(img, ~lungs, rng)
            stem = f"{i:04d}_{draw}_{label}"
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / "images" / f"{stem}.png")
            Image.fromarray(lungs.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}.png")
            out.append({"image": f"images/{stem}.png", "mask": f"masks/{stem}.png", "label": label})
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label"])
        writer.writeheader()
        writer.writerows(out)
    return manifest


@functools.cache
def _letterboxed(image: str, mask: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A source radiograph and its lung mask with the project's preprocessing at `size` px, decoded once
    per invocation (every set drawn from the same sources shares them)."""
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.preprocess import preprocess_file

    prepared = preprocess_file(image, InputContract(size=size), mask, mask_required=True)
    image_px, lungs = prepared.x[0], prepared.mask[0] > 0.5
    image_px.flags.writeable = False  # shared between sets: drawn on copies only
    lungs.flags.writeable = False
    return image_px, lungs


def _has_marker(bias: float | str | None, label: str, coin: np.random.Generator) -> bool:
    if bias is None:
        return False
    if bias == "flip":
        return label == "normal"
    share = float(bias) if label == "opacity" else 1.0 - float(bias)
    return share >= 1.0 or (share > 0.0 and coin.random() < share)


def datasets(parts: dict[str, list[dict[str, str]]], root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Every manifest the benchmark needs: training and validation sets per correlation, the test sets."""
    built = {}
    for bias in (None, *args.biases):
        tag = "clean" if bias is None else "biased" if bias == 1.0 else f"b{bias:g}"
        for part, seed in (("train", 1), ("val", 2)):
            built[f"{part}_{tag}"] = build(
                parts[part], root / f"{part}_{tag}", args.size, bias, args.contrast, args.draws, seed
            )
    for name, bias in zip(TESTS, (None, 1.0, "flip"), strict=True):
        built[f"test_{name}"] = build(
            parts["test"], root / f"test_{name}", args.size, bias, args.contrast, args.draws, 3
        )
    return built


def score(run_dir: Path, tests: dict[str, Path]) -> dict[str, Any]:
    """The benchmark's measures of one trained model (see the module docstring)."""
    from isnet_cli.infer.loading import load_backend
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.report.audit import load_audit_set, run_audit
    from isnet_cli.report.evaluate import label_indices, score_samples

    backend = load_backend(run_dir / "best.safetensors", device="cpu")
    record: dict[str, Any] = {}
    for name, manifest in tests.items():
        samples = read_dataset(manifest).samples
        if name == "flipped":  # the audit's share is `isnet evaluate`'s: |R| of the predicted class
            audit_set, _, _ = load_audit_set(samples, backend.classes, backend.contract, 32, fail_fast=True)
            summary, rows = run_audit(backend, audit_set, 32, perturbations=("background_swap",))
            positive = _audited_positive(rows, backend.classes, len(samples), manifest)
            record[name] = accuracy_and_auroc(audit_set.labels, positive, len(backend.classes))
            record["inside_mask_share"] = (summary["inside_mask_share"] or {}).get("mean")
            record["background_swap_flip_rate"] = summary["flip_rate"]["background_swap"]
        else:
            labels = label_indices(samples, backend.classes, manifest)
            scored = score_samples(backend, samples, labels, 32, with_relevance=False)  # the share: the audit's
            record[name] = accuracy_and_auroc(scored.y, scored.probs[:, 1], len(backend.classes))
    record["parameters"] = parameters(backend)
    return record


def _audited_positive(rows: list[dict[str, Any]], classes: list[str], expected: int, manifest: Path) -> np.ndarray:
    """P(second class) of every image from the audit's rows (its forward pass of the originals), so the flipped
    set is not forwarded a second time; two classes, so p_predicted determines it."""
    if len(classes) != 2:
        raise SystemExit(f"{manifest}: {len(classes)} classes; the benchmark's test sets have two")
    if len(rows) != expected:
        raise SystemExit(f"{manifest}: the audit kept {len(rows)} of {expected} images; every test image needs a mask")
    return np.array([r["p_predicted"] if r["predicted"] == classes[1] else 1.0 - r["p_predicted"] for r in rows])


def accuracy_and_auroc(y: np.ndarray, positive: np.ndarray, classes: int) -> dict[str, Any]:
    """Accuracy (bootstrap 95% CI) and AUROC (DeLong 95% CI) of P(second class) against the labels."""
    from isnet_cli.report.metrics import auroc_ci, bootstrap_summary_ci

    pred = (positive > 0.5).astype(int)
    auroc, auroc_ci95 = auroc_ci(positive, y == 1)
    return {
        "accuracy": float((pred == y).mean()),
        "accuracy_ci95": bootstrap_summary_ci(y, pred, classes)["accuracy"],
        "auroc": auroc,
        "auroc_ci95": auroc_ci95,
    }


def latency_ms(run_dir: str) -> float:
    """Median wall time of one image through the run's best model (batch of one, CPU, after warm-up), in ms.
    Measured by the parent process once every run has finished, so no training competes for the CPU."""
    from isnet_cli.infer.loading import load_backend

    backend = load_backend(Path(run_dir) / "best.safetensors", device="cpu")
    x = np.random.default_rng(0).random((1, backend.contract.channels, backend.contract.size, backend.contract.size))
    x = x.astype(np.float32)
    for _ in range(3):
        backend.logits(x)
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter()
        backend.logits(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def parameters(backend: Any) -> int:
    """Parameters of every network the model runs at inference (a pipeline's segmenter included)."""
    counted = getattr(backend, "parameter_count", None)
    if counted is not None:
        return int(counted() if callable(counted) else counted)
    return int(sum(p.numel() for p in backend.model.parameters()))


LESION_CORE = 0.1  # an opacity pixel: at least this much brighter than the same source's normal draw


def lesion_kept(clean: Path) -> dict[str, float]:
    """How much of each implanted opacity the bundled segmenter's mask keeps (about what the pipeline's
    classifier can still see: its own stage thresholds the segmenter's output and does not close the lungs,
    so the masks here are `isnet segment`'s without closing), on the clean test set: the lesion core is
    where an `opacity` image is more than
    `LESION_CORE` brighter than the `normal` draw of the same source. Mean share of core pixels inside the
    segmenter's mask and inside the true mask, and the share of lesions less than half inside the segmenter's."""
    from PIL import Image

    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.segment.infer import Segmented, predict_masks
    from isnet_cli.segment.model import open_segmenter

    opacities = [s for s in read_dataset(clean).samples if s.label == "opacity"]
    inside_segmenter, inside_true = [], []
    for item in predict_masks(open_segmenter(None, "cpu"), opacities, closing=0.0):
        if not isinstance(item, Segmented):
            continue
        normal = np.asarray(Image.open(str(item.sample.image).replace("_opacity", "_normal")), np.float32)
        opacity = np.asarray(Image.open(item.sample.image), np.float32)
        core = (opacity - normal) / 255.0 > LESION_CORE
        if core.any():
            true = np.asarray(Image.open(item.sample.mask)) > 127
            inside_segmenter.append(float((core & item.mask).sum() / core.sum()))
            inside_true.append(float((core & true).sum() / core.sum()))
    return {
        "lesion_inside_segmenter_mask": float(np.mean(inside_segmenter)),
        "lesion_inside_true_mask": float(np.mean(inside_true)),
        "lesions_mostly_cut_out": float(np.mean(np.array(inside_segmenter) < 0.5)),
    }


def runs_to_do(args: argparse.Namespace, available: set[str]) -> list[tuple[str, float, int]]:
    """(model, correlation, seed) of every run of this invocation, in the order they are trained."""
    jobs = []
    for key in args.models:
        model = MODELS[key]
        if model.needs and model.needs not in available:
            print(f"{key}: skipped, `isnet train --variant {model.needs}` is not available in this version")
            continue
        for bias in args.biases:
            if bias not in model.biases:
                continue
            seeds = args.seeds if bias == 1.0 and model.seeds > 1 else min(args.seeds, 1)
            jobs.extend((key, bias, args.seed + s) for s in range(seeds))
    return jobs


def launch(job: tuple[str, float, int], args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one run in a child process with `--threads` torch threads (its output in OUT/logs/);
    stops the benchmark with the log's name when the run fails."""
    key, bias, seed = job
    log = Path(args.out) / "logs" / f"{key}_b{bias:g}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with log.open("w") as fh:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", json.dumps(job)]
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{key} b={bias:g} seed {seed}: exit {code}; see {log}")
    return json.loads(log.read_text().strip().splitlines()[-1])


def train_and_score(
    key: str, bias: float, seed: int, sets: dict[str, Path], root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one model (unless its score exists) and return its score record."""
    from isnet_cli.segment.auto import prepare_masks
    from isnet_cli.train import TrainConfig, train

    model = MODELS[key]
    overrides = dict(parse_overrides(args.set))
    tag = args.tag or "_".join(f"{k}-{v}" for k, v in overrides.items()) or "defaults"
    data = "clean" if model.clean_data else "biased" if bias == 1.0 else f"b{bias:g}"
    cfg = TrainConfig(
        data=str(sets[f"train_{data}"]),
        val=str(sets[f"val_{data}"]),
        arch=args.arch,
        img_size=args.size,
        epochs=args.epochs,
        seed=seed,
        out=str(root / "runs"),
        cache=str(Path(args.out) / "cache"),
        no_progress=True,
        heatmaps=2,
        **{**model.options, **overrides},
    )
    cfg = prepare_masks(cfg)  # as `isnet train` does: --variant masked takes the bundled segmenter
    cfg.name = f"{key}_{args.arch}_e{args.epochs}_b{bias:g}_s{seed}_{tag}_{recipe_hash(cfg)}"
    score_file = root / "scores" / f"{cfg.name}.json"
    tests = {name: sets[f"test_{name}"] for name in TESTS}
    if score_file.is_file():
        return json.loads(score_file.read_text())
    run_dir = root / "runs" / cfg.name
    if not finished(run_dir, cfg.epochs):  # a finished run (same recipe: same name) is scored, not retrained
        run_dir = train(cfg).run_dir
    record = {**score(run_dir, tests), "seconds": epoch_seconds(run_dir), "run": str(run_dir)}
    score_file.parent.mkdir(parents=True, exist_ok=True)
    score_file.write_text(json.dumps(record, indent=1))
    return record


def finished(run_dir: Path, epochs: int) -> bool:
    """The run folder holds every epoch (metrics.csv has one row per finished epoch)."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return False
    with metrics.open(newline="") as f:
        return sum(1 for _ in csv.DictReader(f)) >= epochs


def epoch_seconds(run_dir: Path) -> int:
    """Training time of the run's epochs (metrics.csv; the C1/C2 warm-up not included)."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return round(sum(float(r["seconds"] or 0) for r in csv.DictReader(f)))


# The `isnet train` options that define a trained model here: a run is reused only when all of them (defaults
# resolved) and every option set away from its default match, so a changed default retrains, while an
# option added later with an inert default does not invalidate the runs already made.
RECIPE_FIELDS = (
    "data", "val", "arch", "pretrained", "img_size", "resize", "window", "augment", "batch_size", "epochs",
    "lr", "optimizer", "momentum", "weight_decay", "scheduler", "clip", "variant", "method", "P", "d", "E",
    "A", "B", "eps", "cut", "cut_epochs", "lds", "rrr_lambda", "select_by", "seed", "precise_bn",
)  # fmt: skip


def recipe_hash(cfg: Any) -> str:
    """8 hex digits of the recipe that defines the trained model (`RECIPE_FIELDS` plus every non-default
    option, with the background swap, warm start and ramp as resolved, and the segmenter's weights)."""
    import dataclasses
    import hashlib

    defaults = dataclasses.asdict(type(cfg)())
    recipe = cfg.recipe()
    kept = {k: v for k, v in recipe.items() if k in RECIPE_FIELDS or (k not in ("out", "cache") and v != defaults[k])}
    kept.update(background_swap=cfg.background_swap, warm_start=cfg.starts_from_warm_up, ramp=cfg.ramp_epochs)
    if cfg.segmenter:  # the pipeline's test masks: new segmenter weights at the same path make a new recipe
        from isnet_cli.infer.onnx_runtime import model_id

        kept["segmenter_id"] = model_id(Path(cfg.segmenter))
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's published entry: the first seed's CIs, means over seeds and their spread (min, max)."""
    first = records[0]
    out: dict[str, Any] = {}
    for test in TESTS:
        out[test] = {}
        for metric in ("accuracy", "auroc"):
            values = [r[test][metric] for r in records]
            out[test][metric] = float(np.mean(values))
            out[test][f"{metric}_ci95"] = first[test][f"{metric}_ci95"]
            if len(values) > 1:
                out[test][f"{metric}_seeds"] = values
    for key in ("inside_mask_share", "background_swap_flip_rate", "latency_ms"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["parameters"] = first["parameters"]
    out["seeds"] = len(records)
    out["train_seconds"] = [r["seconds"] for r in records]
    return out


def table(results: dict[str, Any]) -> str:
    """The Markdown table of the published results."""
    lines = [
        "| model | b | seeds | clean acc | biased acc | flipped acc | flipped AUROC | in-lung share | swap flips "
        "| latency ms | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def acc(entry: dict[str, Any], test: str) -> str:
        e = entry[test]
        spread = e.get("accuracy_seeds")
        text = f"{e['accuracy']:.3f}"
        if spread:
            text += f" ({min(spread):.3f}-{max(spread):.3f})"
        return text + f" [{e['accuracy_ci95'][0]:.2f}, {e['accuracy_ci95'][1]:.2f}]"

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row, entry in results.items():
        if row == "config":
            continue
        key, _, bias = row.partition("@")
        lines.append(
            f"| {key} | {bias or '1'} | {entry['seeds']} | {acc(entry, 'clean')} | {acc(entry, 'biased')} | "
            f"{acc(entry, 'flipped')} | {entry['flipped']['auroc']:.3f} | {num(entry['inside_mask_share'], '.2f')} | "
            f"{num(entry['background_swap_flip_rate'], '.2f')} | {num(entry['latency_ms'], '.1f')} | "
            f"{entry['parameters']:,} |"
        )
    return "\n".join(lines)


def merged(published: Path, new: dict[str, Any]) -> dict[str, Any]:
    """`--merge`: the published results with `new`'s rows in place of theirs, except where the published row
    has more seeds; the published config, with this invocation's command, rows and wall time in `updates`."""
    if not published.is_file():
        return new
    results = json.loads(published.read_text())
    config, update = results.pop("config"), new.pop("config")
    replaced = []
    for row, entry in new.items():
        if results.get(row, {}).get("seeds", 0) > entry["seeds"]:
            print(f"{row}: kept the published {results[row]['seeds']}-seed row", flush=True)
            continue
        results[row] = entry
        replaced.append(row)
    update = {key: update[key] for key in ("command", "wall_seconds", "machine")}
    config.setdefault("updates", []).append({"date": time.strftime("%Y-%m-%d"), "rows": replaced, **update})
    return {**results, "config": config}


def figure(runs: dict[str, str], flipped: Path, out: Path) -> None:
    """Each model's LRP heatmap (predicted class) on the same flipped test images, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from isnet_cli.infer.loading import load_backend
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.io.preprocess import preprocess_file
    from isnet_cli.report.render import clip_value, overlay_rgba

    samples = read_dataset(flipped).samples
    picked = [s for s in samples if s.label == "normal"][: FIGURE_IMAGES // 2]
    picked += [s for s in samples if s.label == "opacity"][: FIGURE_IMAGES - len(picked)]
    fig, axes = plt.subplots(len(runs), len(picked), figsize=(2.2 * len(picked), 2.3 * len(runs)), squeeze=False)
    for row, (key, run_dir) in enumerate(runs.items()):
        backend = load_backend(Path(run_dir) / "best.safetensors", device="cpu")
        for col, sample in enumerate(picked):
            prepared = preprocess_file(sample.image, backend.contract, sample.mask, mask_required=True)
            ax = axes[row][col]
            ax.imshow(prepared.x[0], cmap="gray", vmin=0, vmax=1)
            if backend.has_relevance:
                logits, relevance = backend.relevance(prepared.x[None])
                r = relevance[0].sum(axis=0)
                ax.imshow(overlay_rgba(r, clip_value(r)))
                pred = backend.classes[int(np.argmax(logits[0]))]
            else:
                pred = backend.classes[int(np.argmax(backend.logits(prepared.x[None])[0]))]
            ax.contour(prepared.mask[0], levels=[0.5], colors="lime", linewidths=0.5)
            ax.set_title(f"true {sample.label} / {pred}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(key, fontsize=8)
    fig.suptitle("LRP heatmaps on flipped test images (marker with the normal images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--size", type=int, help=f"image size, px (default {SIZE}, {QUICK_SIZE} with --quick)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--contrast", type=float, default=0.4, help="peak of the implanted opacity, [0, 1] units")
    parser.add_argument("--draws", type=int, default=1, help="images per source image and class")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--biases", default=",".join(f"{b:g}" for b in BIASES), help="marker-label correlations")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds of the multi-seed models at b = 1")
    parser.add_argument("--seed", type=int, default=0, help="first training seed (the data split is fixed)")
    parser.add_argument(
        "--quick", action="store_true", help=f"one seed, b = 1 only, {QUICK_EPOCHS} epochs, {QUICK_SIZE} px: a preview"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="`isnet train` option")
    parser.add_argument("--tag", help="name of the --set recipe in run names (default: the options)")
    parser.add_argument("--out", default="/tmp/isnet-shortcut-cxr", help="work folder: data, runs, scores")
    parser.add_argument(
        "--results", help="where the results go (default benchmarks/results; OUT/results-quick with --quick)"
    )
    parser.add_argument("--merge", action="store_true", help="update the published results, keep other rows")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at a time (child processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, [model, b, seed] as JSON
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    args.biases = [float(b) for b in args.biases.split(",") if b]
    if args.quick:
        args.seeds, args.biases = 1, [1.0]
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else EPOCHS
    if args.size is None:
        args.size = QUICK_SIZE if args.quick else SIZE
    if args.results is None:  # a quick run is a preview: it never replaces the published results
        args.results = str(Path(args.out) / "results-quick" if args.quick else REPO / "benchmarks" / "results")
    return args


def main() -> None:
    args = parse_args()
    from isnet_cli.objective.settings import VARIANTS

    t_start = time.perf_counter()
    parts = split_groups(sources(Path(args.data)), 0)
    root = Path(args.out) / f"data_s{args.size}_c{args.contrast:g}_d{args.draws}"
    sets = datasets(parts, root, args)
    if args.child:
        key, bias, seed = json.loads(args.child)
        print(json.dumps(train_and_score(key, bias, seed, sets, root, args)))
        return
    jobs = runs_to_do(args, set(VARIANTS))
    print(
        f"sources: {len(parts['train'])} train / {len(parts['val'])} val / {len(parts['test'])} test images "
        f"({args.draws} of each class per source), {args.size} px, opacity contrast {args.contrast}; "
        f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each",
        flush=True,
    )
    records: dict[str, list[dict[str, Any]]] = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        started = {job: pool.submit(launch, job, args) for job in sorted(jobs, key=lambda j: -MODELS[j[0]].cost)}
        try:
            for key, bias, seed in jobs:
                record = started[(key, bias, seed)].result()
                records.setdefault(key if bias == 1.0 else f"{key}@{bias:g}", []).append(record)
                accuracies = ", ".join(f"{t} {record[t]['accuracy']:.3f}" for t in TESTS)
                print(f"{key} b={bias:g} seed {seed}: {accuracies}", flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the runs in flight finish; none start
            raise
    for runs in records.values():
        for record in runs:
            record["latency_ms"] = latency_ms(record["run"])
    results: dict[str, Any] = {row: summarise(rs) for row, rs in records.items()}
    if "pipeline" in results:  # why the pipeline misses lesions: its segmenter cuts them out
        results["pipeline"].update(lesion_kept(sets["test_clean"]))
    results["config"] = {
        "arch": args.arch,
        "size": args.size,
        "epochs": args.epochs,
        "contrast": args.contrast,
        "draws": args.draws,
        "biases": args.biases,
        "options": dict(parse_overrides(args.set)) or "isnet train defaults",
        "sources": {part: len(rows) for part, rows in parts.items()},
        "test_images": 2 * args.draws * len(parts["test"]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "wall_seconds": round(time.perf_counter() - t_start),
        "command": "python benchmarks/shortcut_cxr.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = merged(out / "shortcut_cxr.json", results)
    (out / "shortcut_cxr.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "shortcut_cxr.md").write_text(text + "\n")
    first_runs = {row: rs[0]["run"] for row, rs in records.items() if "@" not in row}
    if set(first_runs) >= {row for row in results if "@" not in row and row != "config"}:
        figure(first_runs, sets["test_flipped"], out / "shortcut_cxr.png")
    else:  # a --merge of some models: the figure shows every model, so it stays as published
        print(f"{out / 'shortcut_cxr.png'}: kept (this run has the first-seed runs of {', '.join(first_runs)} only)")
    print("\n" + text)
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s, {os.cpu_count()} CPUs; results in {out}")


if __name__ == "__main__":
    main()
