"""Recipe of the bundled lung segmenter (models/lung-segmenter/): split, train, ensemble, test, install.

    python models/lung-segmenter/recipe.py --data ../shared/data --work /tmp/lung-seg          # all steps
    python models/lung-segmenter/recipe.py --data ../shared/data --work /tmp/lung-seg --step test

Data: the two shared real sets whose masks follow the lung fields and exclude the heart
(`ieee8023_gb100`, `tb_shenzhen_montgomery72`). `v7_ieee8023_lungs345` is left out: its outlines include
most of the heart, and mixing the two conventions would teach the segmenter a blur of both (see card.md).
Split per source, seeded: 20% held out for the test (never seen in training or checkpoint selection), 10%
validation (best epoch), the rest training. Each image of these sets is a different radiograph and the
sets do not say which patient is whose; Shenzhen and Montgomery have one image per patient.

The segmenter is an ensemble of two U-Nets of the same widths, one at 128 px and one at 256 px (`MEMBERS`).

Steps: `split` writes train/val/test.csv into --work (absolute image paths; the shared data are never
copied); `train` runs `isnet segment train` for each member into WORK/runs/<member>; `ensemble` combines
them with `isnet segment ensemble` into WORK/lung-segmenter.safetensors, choosing the clean-up's closing
radius on the validation split; `test` measures Dice and HD95 on the held-out split (MONAI metrics, at each
image's original geometry after the clean-up of `isnet segment`) into test.json; `install` copies the
ensemble, the members' config.json and metrics.csv and test.json into models/lung-segmenter/.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("ieee8023_gb100", "tb_shenzhen_montgomery72")
TEST_FRACTION, VAL_FRACTION, SEED = 0.2, 0.1, 0
TRAIN_OPTIONS = [
    "--channels", "16,32,64,128,256", "--res-units", "1", "--batch-size", "8", "--lr", "0.002", "--seed", "0",
    "--device", "cpu",
]  # fmt: skip
MEMBERS = {  # run name: its own options
    "lung-segmenter-128": ["--img-size", "128", "--epochs", "120"],
    "lung-segmenter-256": ["--img-size", "256", "--epochs", "200"],
}
ENSEMBLE = "lung-segmenter.safetensors"


def split(data: Path, work: Path) -> None:
    """train/val/test.csv (image, mask, source) from each set's labels.csv, split per source."""
    parts: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for name in SETS:
        with open(data / name / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        by_source: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_source.setdefault(f"{name}/{row.get('source', '')}".rstrip("/"), []).append(row)
        for source, group in sorted(by_source.items()):
            group = sorted(group, key=lambda r: r["image"])
            random.Random(f"{SEED}-{source}").shuffle(group)
            n_test = round(len(group) * TEST_FRACTION)
            n_val = max(1, round(len(group) * VAL_FRACTION))
            for i, row in enumerate(group):
                part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
                parts[part].append(
                    {
                        "image": str((data / name / row["image"]).resolve()),
                        "mask": str((data / name / row["mask"]).resolve()),
                        "source": source,
                    }
                )
    work.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        with open(work / f"{part}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "mask", "source"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"{part}: {len(rows)} images")


def train(work: Path, extra: list[str]) -> None:
    """`isnet segment train` of each member on the split into WORK/runs/<member>."""
    for name, options in MEMBERS.items():
        cmd = [sys.executable, "-m", "isnet_cli", "segment", "train", str(work / "train.csv")]
        cmd += ["--val", str(work / "val.csv"), *TRAIN_OPTIONS, *options, "--out", str(work / "runs")]
        cmd += ["--name", name, "--no-progress", *extra]
        subprocess.run(cmd, check=True)


def ensemble(work: Path) -> None:
    """`isnet segment ensemble` of the members into WORK/lung-segmenter.safetensors, closing chosen on val."""
    cmd = [sys.executable, "-m", "isnet_cli", "segment", "ensemble", *(str(work / "runs" / m) for m in MEMBERS)]
    cmd += ["--val", str(work / "val.csv"), "--out", str(work / ENSEMBLE)]
    subprocess.run(cmd, check=True)


def test(work: Path) -> dict:
    """Held-out Dice and HD95 of the ensemble at each image's original geometry after the clean-up (pixels
    of the shared PNGs, long side <= 512), overall and per source."""
    import warnings

    import numpy as np
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from isnet_cli.io.manifest import read_manifest
    from isnet_cli.io.masks import load_mask
    from isnet_cli.segment.infer import Segmented, predict_masks
    from isnet_cli.segment.model import open_segmenter

    segmenter = open_segmenter(work / ENSEMBLE, "cpu")
    meta, contract = segmenter.meta, segmenter.contract
    samples = read_manifest(work / "test.csv", require_labels=False)
    dice, hd95 = DiceMetric(include_background=False), HausdorffDistanceMetric(include_background=False, percentile=95)
    per_source: dict[str, list[float]] = {}
    with open(work / "test.csv", newline="") as f:
        sources = {r["image"]: r["source"] for r in csv.DictReader(f)}
    flagged = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        for item in predict_masks(segmenter, samples):
            assert isinstance(item, Segmented), item
            true = load_mask(item.sample.mask, item.mask.shape) > 0.5
            pred_t = torch.from_numpy(item.mask)[None, None].float()
            true_t = torch.from_numpy(true)[None, None].float()
            d = float(dice(pred_t, true_t).item())
            hd95(pred_t, true_t)
            per_source.setdefault(sources[str(item.sample.image)], []).append(d)
            flagged += not item.qc.ok
    result = {
        "images": len(samples),
        "dice_original_geometry": float(dice.aggregate()),
        "hd95_original_px": float(hd95.aggregate()),
        "dice_by_source": {k: round(float(np.mean(v)), 4) for k, v in per_source.items()},
        "qc_flagged": flagged,
        "closing": meta.get("postprocess"),
        "model_input_px": contract.size,
        "members_best_epoch_val": {m["source"]: m["metrics"] for m in meta["ensemble"]},
    }
    (work / "test.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def install(work: Path) -> None:
    """Copy the ensemble (weights + metadata), each member's config.json and metrics.csv (as <file>-<size>)
    and test.json here (not contours.png: it shows radiographs whose licences forbid redistribution)."""
    shutil.copy(work / ENSEMBLE, HERE / ENSEMBLE)
    for name in MEMBERS:
        size = name.rsplit("-", 1)[1]
        for file in ("config.json", "metrics.csv"):
            stem, suffix = file.split(".")
            shutil.copy(work / "runs" / name / file, HERE / f"{stem}-{size}.{suffix}")
    shutil.copy(work / "test.json", HERE / "test.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared real sets")
    parser.add_argument("--work", type=Path, required=True, help="folder for the split, the run and test.json")
    parser.add_argument("--step", choices=["all", "split", "train", "ensemble", "test", "install"], default="all")
    args, extra = parser.parse_known_args()
    if args.step in ("all", "split"):
        split(args.data.resolve(), args.work)
    if args.step in ("all", "train"):
        train(args.work, extra)
    if args.step in ("all", "ensemble"):
        ensemble(args.work)
    if args.step in ("all", "test"):
        test(args.work)
    if args.step in ("all", "install"):
        install(args.work)


if __name__ == "__main__":
    main()
