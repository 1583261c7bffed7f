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


def test_masked_variant_trains_predicts_explains_and_exports_both_stages(phantoms, segmenter, tmp_path):
    """The segmenter-then-classifier baseline: one checkpoint with both stages; predict, explain, export
    (one ONNX graph, verified) and info (parameters and latency per stage) use them."""
    import numpy as np
    import torch

    from isnet_cli.infer.checkpoint import load_checkpoint, read_meta
    from isnet_cli.pipeline import MaskedPipeline

    runs = tmp_path / "runs"
    code, _, stderr = isnet(
        "train", phantoms, *TINY_TRAIN, "--variant", "masked", "--segmenter", segmenter, "--out", runs, "--name", "m"
    )
    assert code == 0, stderr
    best = runs / "m" / "best.safetensors"
    meta = read_meta(best)
    assert meta["isnet"]["variant"] == "masked" and meta["isnet"]["P"] == 0.0
    assert meta["segmenter"]["source"] == str((segmenter / "best.safetensors").resolve())
    assert "segmenter-then-classifier" in (runs / "m" / "card.md").read_text()
    model, _ = load_checkpoint(best)
    assert isinstance(model, MaskedPipeline)
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        mask = model.lung_mask(x)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(model(x), model.classifier(x * mask))  # background = air (0)
    image = sorted((phantoms.parent / "images").rglob("*.png"))[0]
    code, stdout, stderr = isnet("predict", image, "--model", best, "--json", "--device", "cpu")
    assert code == 0, stderr
    code, _, stderr = isnet("explain", image, "--model", best, "--out", tmp_path / "h.png", "--raw", tmp_path / "r.npy")
    assert code == 0, stderr
    relevance = np.load(tmp_path / "r.npy")
    assert relevance.shape[-2:] == (SIZE, SIZE)
    code, stdout, stderr = isnet("export", "--model", best, "--out", tmp_path / "m.onnx", "--json")
    assert code == 0, stderr
    code, stdout, stderr = isnet("predict", image, "--model", tmp_path / "m.onnx", "--json")
    assert code == 0, stderr
    code, stdout, stderr = isnet("info", best, "--json")
    assert code == 0, stderr
    stages = json.loads(stdout)["stages"]
    assert [s["stage"] for s in stages] == ["segmenter", "classifier"]
    assert all(s["parameters"] > 0 and s["latency_ms"] > 0 for s in stages)


def test_resuming_a_masked_run_refuses_a_changed_segmenter(phantoms, segmenter, tmp_path):
    """The pipeline's run records its segmenter by path and id: other weights at that path stop --resume
    with exit 2 (nothing written); the original weights put back, the run continues."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from isnet_cli.infer.onnx_runtime import model_id

    seg = shutil.copytree(segmenter, tmp_path / "seg")
    weights = seg / "best.safetensors"
    original = weights.read_bytes()
    runs = tmp_path / "runs"
    code, _, stderr = isnet(
        "train", phantoms, *TINY_TRAIN, "--variant", "masked", "--segmenter", seg, "--out", runs, "--name", "m"
    )
    assert code == 0, stderr
    run = runs / "m"
    started = model_id(weights)
    assert json.loads((run / "config.json").read_text())["segmenter_id"] == started
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights), metadata=metadata)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    code, _, stderr = isnet("train", "--resume", run, "--epochs", 2)
    assert code == 2
    assert f"{weights}: this segmenter changed since run m started" in stderr
    assert f"(id {started}, now {model_id(weights)}); put the segmenter with id {started} back" in stderr
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    weights.write_bytes(original)
    code, _, stderr = isnet("train", "--resume", run, "--epochs", 2)
    assert code == 0, stderr
    assert [row["epoch"] for row in csv.DictReader((run / "metrics.csv").open())] == ["1", "2"]


def test_exported_segmenter_segments_without_torch(phantoms, segmenter, tmp_path):
    """`isnet export` of a segmenter run, verified on onnxruntime; `isnet segment --model seg.onnx` in a
    process where importing torch fails gives the masks of the checkpoint; --overlay draws the outlines."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from isnet_cli.infer.checkpoint import read_meta
    from tests.test_predict import NO_TORCH
    from tests.test_segment import four_phantoms
    from tests.tiny_models import REPO

    onnx_file = tmp_path / "seg.onnx"
    code, stdout, stderr = isnet("export", "--model", segmenter, "--out", onnx_file, "--json")
    assert code == 0, stderr
    meta = json.loads(stdout)
    assert meta["task"] == "segmentation" and meta["export"]["verified"]["max_abs_diff"] <= 1e-4
    assert meta["postprocess"] == read_meta(segmenter / "best.safetensors")["postprocess"]  # the same closing
    code, _, stderr = isnet("export", "--model", segmenter, "--out", tmp_path / "h.onnx", "--with-heatmap")
    assert code == 2 and "segmenter" in stderr
    manifest = four_phantoms(phantoms, tmp_path)
    code, _, stderr = isnet(
        "segment", manifest, "--model", segmenter, "--out", tmp_path / "torch", "--overlay", tmp_path / "overlays",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    overlays = sorted((tmp_path / "overlays").rglob("*.png"))
    assert len(overlays) == 4
    rgb = np.asarray(Image.open(overlays[0]))
    assert rgb.ndim == 3 and ((rgb[..., 1] == 220) & (rgb[..., 0] == 0)).any()  # a green outline: QC passed
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "segment", str(manifest), "--model", str(onnx_file), "--out",
         str(tmp_path / "onnx"), "--device", "cpu", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "onnxruntime" in run.stdout + run.stderr
    torch_masks = sorted((tmp_path / "torch" / "masks").rglob("*.png"))
    assert len(torch_masks) == 4
    for path in torch_masks:
        a = np.asarray(Image.open(path)) > 127
        b = np.asarray(Image.open(tmp_path / "onnx" / path.relative_to(tmp_path / "torch"))) > 127
        assert (a != b).mean() < 0.01, path


def test_bundled_segmenter_is_the_default_and_flags_a_blank_frame(phantoms, tmp_path):
    """Without --model, `isnet segment` uses models/lung-segmenter; a blank frame gets a QC entry."""
    import numpy as np
    from PIL import Image

    from isnet_cli.segment.model import BUNDLED

    if not BUNDLED.is_file():
        pytest.skip(f"no bundled segmenter at {BUNDLED}")
    image = phantoms.parent / next(csv.DictReader(phantoms.open()))["image"]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(blank)
    code, stdout, stderr = isnet("segment", image, blank, "--out", tmp_path / "o", "--device", "cpu")
    assert code == 0, stderr
    assert "lung-segmenter.safetensors" in stdout + stderr
    qc = {Path(r["image"]).name: r for r in csv.DictReader((tmp_path / "o" / "qc.csv").open())}
    assert qc["blank.png"]["ok"] == "0" and "blank image" in qc["blank.png"]["problems"]


def test_prepare_masks_gives_the_masked_variant_the_default_segmenter(tmp_path, monkeypatch):
    """`isnet train --variant masked` without --segmenter takes the default segmenter ($ISNET_SEGMENTER
    here); a named segmenter is kept, and other variants get none; the given config is not changed."""
    from isnet_cli.segment.auto import prepare_masks
    from isnet_cli.segment.model import BUNDLED
    from isnet_cli.train import TrainConfig

    monkeypatch.setenv("ISNET_SEGMENTER", str(BUNDLED))
    cfg = TrainConfig(data="data.csv", variant="masked", out=str(tmp_path))
    ready = prepare_masks(cfg)
    assert ready.segmenter == str(BUNDLED) and cfg.segmenter is None
    named = TrainConfig(data="data.csv", variant="masked", segmenter="runs/lungs", out=str(tmp_path))
    assert prepare_masks(named).segmenter == "runs/lungs"
    assert prepare_masks(TrainConfig(data="data.csv", variant="selective", out=str(tmp_path))).segmenter is None


def test_bundled_segmenter_reproduces_its_held_out_dice(shared_data, tmp_path):
    """The bundled segmenter on the recipe's held-out split of the shared real radiographs: the Dice of its
    card (>= 0.95, the issue's target) and of its test.json, measured again from the images."""
    import importlib.util
    import shutil

    from isnet_cli.segment.model import BUNDLED

    spec = importlib.util.spec_from_file_location("recipe", BUNDLED.parent / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.split(shared_data.resolve(), tmp_path)
    shutil.copy(BUNDLED, tmp_path / recipe.ENSEMBLE)
    result = recipe.test(tmp_path)
    published = json.loads((BUNDLED.parent / "test.json").read_text())
    assert result["images"] == published["images"] == 35
    assert result["dice_original_geometry"] == pytest.approx(published["dice_original_geometry"], abs=1e-4)
    assert result["dice_original_geometry"] >= 0.95
