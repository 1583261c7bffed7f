"""The shipped demonstration model (models/demo-tinyresnet): loads without training and is right on the examples."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.tiny_models import isnet

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-tinyresnet" / "model.safetensors"
EXAMPLES = ROOT / "examples" / "dicom"


def test_demo_model_classifies_every_example_dicom_correctly(tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    code, _, stderr = isnet("predict", EXAMPLES, "--model", MODEL, "--out", out)
    assert code == 0, stderr
    with (EXAMPLES / "manifest.csv").open(newline="") as f:
        truth = {(EXAMPLES / r["image"]).resolve(): r["label"] for r in csv.DictReader(f)}
    with out.open(newline="") as f:
        predicted = {Path(r["file"]).resolve(): r["predicted"] for r in csv.DictReader(f)}
    assert len(truth) == 6 and predicted == truth


def test_demo_model_explains_an_example_dicom_inside_its_lungs(tmp_path: Path) -> None:
    image = EXAMPLES / "mono1_16bit" / "images" / "00001_opacity.dcm"
    mask = EXAMPLES / "mono1_16bit" / "masks" / "00001_opacity.png"
    out = tmp_path / "h.png"
    code, stdout, stderr = isnet("explain", image, "--mask", mask, "--model", MODEL, "--out", out, "--json")
    assert code == 0, stderr
    record = json.loads(stdout.strip().splitlines()[-1])
    assert out.is_file()
    assert record["predicted"] == "opacity"
    assert record["abs_share_in_mask"] > 0.5
