"""Shortcut benchmark on real chest X-rays: does the ISNet learn a lesion in the lungs and ignore a marker?

The task is built from real radiographs with lung masks (the shared data folder beside the project,
`--data`): every source image is letterboxed to `--size` px with the project's preprocessing, then
drawn `--draws` times in both classes, `normal` (as is) and `opacity` (a synthetic round opacity
implanted at a new random place inside its lungs each draw, `isnet_cli.synth.implant_lesion`). A bright
letter marker outside the lungs (`isnet_cli.synth.draw_marker`) goes with every `opacity` training image
(bias 1.0). Sources are split train / validation / test by image (by patient where the set has several
images of one patient), so no anatomy is shared between the splits. Three models are trained with the
`isnet train` defaults (only architecture, size, epochs and seed given):

- `ceiling`:  the standard classifier on the same images without any marker (what can be learned);
- `standard`: the standard classifier on the biased images;
- `isnet`:    the default ISNet on the biased images.

Each `best` checkpoint is scored on the test sources: clean (no marker), biased (marker with every
opacity) and flipped (marker with every normal image): accuracy and AUROC, and the mean share of
|LRP relevance| (predicted class) inside the lungs on the flipped set.

    python benchmarks/shortcut_cxr.py                       # ResNet-18, 128 px, CPU defaults (~45 min on 2 cores)
    python benchmarks/shortcut_cxr.py --models ceiling      # calibrate the lesion: the ceiling should reach 0.85
    python benchmarks/shortcut_cxr.py --set bg_swap=0        # the same with another `isnet train` option

`--out` keeps the built data, runs and scores (one folder per size, contrast and draws); a model whose score
exists is not trained again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from convergence import parse_overrides  # the sibling script (run as `python benchmarks/shortcut_cxr.py`)

REPO = Path(__file__).resolve().parents[1]
SETS = ("ieee8023_gb100", "tb_shenzhen_montgomery72", "v7_ieee8023_lungs345")
SPLIT = {"train": 0.6, "val": 0.1, "test": 0.3}
TESTS = ("clean", "biased", "flipped")
MODELS = ("ceiling", "standard", "isnet")


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
    rows: list[dict[str, str]], folder: Path, size: int, marker: str | None, contrast: float, draws: int, seed: int
) -> Path:
    """`draws` images of both classes per source at `size` px; `marker`: None, "opacity" (bias 1.0) or "normal"
    (flipped). The classes stay balanced: a `normal` draw is the source itself (its marker, if any, moves)."""
    from PIL import Image

    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.preprocess import preprocess_file
    from isnet_cli.synth import draw_marker, implant_lesion

    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    contract = InputContract(size=size)
    out = []
    for i, r in enumerate(rows):
        prepared = preprocess_file(r["image"], contract, r["mask"], mask_required=True)
        image, lungs = prepared.x[0], prepared.mask[0] > 0.5
        for draw, label in itertools.product(range(draws), ("normal", "opacity")):
            rng = np.random.default_rng([seed, i, draw, label == "opacity"])
            img = implant_lesion(image, lungs, rng, contrast) if label == "opacity" else image.copy()
            if marker == label:
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


def score(run_dir: Path, tests: dict[str, Path]) -> dict[str, Any]:
    from isnet_cli.infer.loading import TorchModel
    from isnet_cli.io.dataset import read_dataset
    from isnet_cli.report.evaluate import label_indices, macro_auroc, score_samples

    backend = TorchModel(run_dir / "best.safetensors", device="cpu")
    record: dict[str, Any] = {}
    for name, manifest in tests.items():
        samples = read_dataset(manifest).samples
        scored = score_samples(
            backend, samples, label_indices(samples, backend.classes, manifest), 32, with_relevance=name == "flipped"
        )
        record[name] = {
            "accuracy": float((scored.probs.argmax(1) == scored.y).mean()),
            "auroc": macro_auroc(scored.y, scored.probs),
        }
        if name == "flipped":
            record["inside_mask_share"] = float(np.nanmean(scored.share_abs))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--contrast", type=float, default=0.4, help="peak of the implanted opacity, [0, 1] units")
    parser.add_argument("--draws", type=int, default=1, help="images per source image and class")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="`isnet train` option")
    parser.add_argument("--out", default="/tmp/isnet-shortcut-cxr")
    args = parser.parse_args()

    from isnet_cli.train import TrainConfig, train

    t_start = time.perf_counter()
    out = Path(args.out)
    parts = split_groups(sources(Path(args.data)), args.seed)
    root = out / f"data_s{args.size}_c{args.contrast:g}_d{args.draws}"
    sets = {
        "train_biased": build(
            parts["train"], root / "train_biased", args.size, "opacity", args.contrast, args.draws, 1
        ),
        "train_clean": build(parts["train"], root / "train_clean", args.size, None, args.contrast, args.draws, 1),
        "val_biased": build(parts["val"], root / "val_biased", args.size, "opacity", args.contrast, args.draws, 2),
        "val_clean": build(parts["val"], root / "val_clean", args.size, None, args.contrast, args.draws, 2),
    }
    tests = {
        name: build(parts["test"], root / f"test_{name}", args.size, marker, args.contrast, args.draws, 3)
        for name, marker in zip(TESTS, (None, "opacity", "normal"), strict=True)
    }
    print(
        f"sources: {len(parts['train'])} train / {len(parts['val'])} val / {len(parts['test'])} test images "
        f"({args.draws} of each class per source), {args.size} px, opacity contrast {args.contrast}",
        flush=True,
    )
    overrides: dict[str, Any] = dict(parse_overrides(args.set))
    tag = "_".join(f"{k}-{v}" for k, v in overrides.items()) or "defaults"
    results: dict[str, Any] = {}
    for model in [m for m in args.models.split(",") if m]:
        name = f"{model}_{args.arch}_e{args.epochs}_s{args.seed}_{tag}"
        score_file = root / "scores" / f"{name}.json"
        if score_file.is_file():
            results[model] = json.loads(score_file.read_text())
            continue
        clean = model == "ceiling"
        cfg = TrainConfig(
            data=str(sets["train_clean" if clean else "train_biased"]),
            val=str(sets["val_clean" if clean else "val_biased"]),
            arch=args.arch,
            img_size=args.size,
            epochs=args.epochs,
            seed=args.seed,
            variant="selective" if model == "isnet" else "none",
            out=str(root / "runs"),
            name=name,
            cache=str(out / "cache"),
            no_progress=True,
            heatmaps=2,
            **overrides,
        )
        t0 = time.perf_counter()
        run = train(cfg)
        record = {
            **score(run.run_dir, tests),
            "seconds": round(time.perf_counter() - t0),
            "best_epoch": run.best and run.best.get("epoch"),
        }
        score_file.parent.mkdir(parents=True, exist_ok=True)
        score_file.write_text(json.dumps(record, indent=1))
        results[model] = record

    print(f"\n{args.arch}, {args.size} px, {args.epochs} epochs, seed {args.seed}, options {overrides or 'defaults'}")
    print("| model | clean acc | clean AUROC | biased acc | flipped acc | flipped AUROC | in-lung share | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for model, r in results.items():
        share = r.get("inside_mask_share")
        print(
            f"| {model} | {r['clean']['accuracy']:.3f} | {r['clean']['auroc']:.3f} | {r['biased']['accuracy']:.3f} | "
            f"{r['flipped']['accuracy']:.3f} | {r['flipped']['auroc']:.3f} | "
            f"{'-' if share is None else f'{share:.3f}'} | {r['seconds']} |"
        )
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
