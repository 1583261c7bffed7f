"""The segmenter inside `isnet train`: `--masks auto` fills in missing masks (cached, recorded), and
`--variant masked` (segmenter-then-classifier) trains, predicts and exports with both stages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.test_segment import SIZE, train_run, without_masks
from tests.tiny_models import isnet

TINY_TRAIN = ("--arch", "tinycnn", "--img-size", SIZE, "--epochs", 1, "--batch-size", 8, "--device", "cpu")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("pipe-phantoms"), n=48, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def segmenter(phantoms, tmp_path_factory) -> Path:
    return train_run(phantoms, tmp_path_factory.mktemp("pipe-seg"), seed=0)


def test_masks_auto_generates_caches_and_records_the_segmenter(phantoms, segmenter, tmp_path):
    """Half the masks missing: the segmenter fills them (QC-flagged ones left out), the run records its id,
    and a second run segments nothing (cache)."""
    from isnet_cli.infer.onnx_runtime import model_id

    rows = list(csv.DictReader(phantoms.open()))
    partial = tmp_path / "partial.csv"
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label"])
        writer.writeheader()
        for i, r in enumerate(rows):
            mask = str(phantoms.parent / r["mask"]) if i % 2 else ""
            writer.writerow({"image": str(phantoms.parent / r["image"]), "mask": mask, "label": r["label"]})
    code, _, stderr = isnet("train", partial, *TINY_TRAIN, "--cut", "1,25", "--out", tmp_path / "runs", "--name", "x")
    assert code == 2 and "no mask" in stderr  # without --masks auto, missing masks are an error
    args = ("--masks", "auto", "--segmenter", segmenter, "--cut", "1,25", "--out", tmp_path / "runs")
    code, stdout, stderr = isnet("train", partial, *TINY_TRAIN, *args, "--name", "auto")
    assert code == 0, stderr
    assert "segmenting 24 image(s)" in stdout + stderr
    config = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())
    auto = config["auto_masks"]
    seg_file = segmenter / "best.safetensors"
    assert auto["segmenter_id"] == model_id(seg_file) and auto["given"] == 24
    assert auto["generated"] + auto["excluded"] == 24 and auto["generated"] >= 20
    assert Path(config["data"]).is_file() and auto["data"] == str(partial)
    assert model_id(seg_file) in (tmp_path / "runs" / "auto" / "card.md").read_text()
    recipe = (tmp_path / "runs" / "auto" / "config.yaml").read_text()
    assert str(partial.resolve()) in recipe and "auto_masks" not in recipe
    code, stdout, stderr = isnet("train", partial, *TINY_TRAIN, *args, "--name", "again")
    assert code == 0, stderr
    assert "segmenting" not in stdout + stderr  # every generated mask came from the cache


def test_segment_then_train_on_its_manifest_is_the_same_as_masks_auto(phantoms, segmenter, tmp_path):
    """No masks at all: `--masks auto` trains on the masks `isnet segment` would have written."""
    source = without_masks(phantoms, tmp_path / "nomask.csv")
    code, _, stderr = isnet(
        "train", source, *TINY_TRAIN, "--masks", "auto", "--segmenter", segmenter, "--cut", "1,25",
        "--out", tmp_path / "runs", "--name", "auto",
    )  # fmt: skip
    assert code == 0, stderr
    completed = Path(json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())["data"])
    generated = list(csv.DictReader(completed.open()))
    code, _, stderr = isnet("segment", source, "--model", segmenter, "--out", tmp_path / "seg", "--device", "cpu")
    assert code == 0, stderr
    segmented = list(csv.DictReader((tmp_path / "seg" / "manifest.csv").open()))
    assert len(generated) == len(segmented)
