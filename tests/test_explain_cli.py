"""`isnet explain`: PNG of the expected size, raw round trip, mask shares, folders, clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from isnet_cli.report.render import figure_shape
from tests.tiny_models import isnet, shared_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def _first(tiny):
    with open(tiny.manifest, newline="") as f:
        row = next(csv.DictReader(f))
    return tiny.manifest.parent / row["image"], tiny.manifest.parent / row["mask"]


def test_single_file_png_raw_and_mask_shares(tiny, tmp_path) -> None:
    image, mask = _first(tiny)
    out, raw = tmp_path / "h.png", tmp_path / "h.npy"
    code, stdout, stderr = isnet(
        "explain", image, "--model", tiny.checkpoint, "--mask", mask, "--out", out, "--raw", raw, "--json"
    )
    assert code == 0, stderr
    record = json.loads(stdout.strip().splitlines()[-1])
    h, w = np.asarray(Image.open(image)).shape[:2]
    png = Image.open(out)
    assert png.format == "PNG"
    assert png.size[::-1] == figure_shape(h, w)
    relevance = np.load(raw)
    assert relevance.shape == (h, w) and np.isfinite(relevance).all() and np.abs(relevance).sum() > 0
    for key in ("positive_share_in_mask", "abs_share_in_mask"):
        assert 0.0 <= record[key] <= 1.0
    assert record["target"] == record["predicted"]
    assert "in mask" in stderr
    # the raw map matches the engine on the preprocessed input, mapped back by unletterbox
    from isnet_cli.report.explain import explain_file
    from isnet_cli.report.explainer import load_explainer

    exp = explain_file(load_explainer(str(tiny.checkpoint), device="cpu"), image, "predicted")
    assert np.allclose(exp.relevance, relevance, atol=1e-6)


def test_nifti_raw_side_by_side_and_class_target(tiny, tmp_path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    image, _ = _first(tiny)
    out, raw = tmp_path / "s.png", tmp_path / "s.nii.gz"
    code, _, stderr = isnet(
        "explain", image, "--model", tiny.checkpoint, "--out", out, "--raw", raw, "--side-by-side", "--target", "1"
    )
    assert code == 0, stderr
    h, w = np.asarray(Image.open(image)).shape[:2]
    assert Image.open(out).size[::-1] == figure_shape(h, w, side_by_side=True)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(raw)))
    assert back.shape == (h, w) and np.abs(back).sum() > 0


def test_manifest_gives_folder_and_summary(tiny, tmp_path) -> None:
    with open(tiny.manifest, newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    root = tiny.manifest.parent
    small = tmp_path / "small.csv"
    with open(small, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "image": str(root / r["image"]), "mask": str(root / r["mask"])})
    out = tmp_path / "maps"
    code, _, stderr = isnet("explain", small, "--model", tiny.checkpoint, "--out", out, "--no-progress")
    assert code == 0, stderr
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3
    assert len(list(out.glob("*.png"))) == 3
    for row in summary:
        assert 0.0 <= float(row["abs_share_in_mask"]) <= 1.0


def test_bad_target_and_untraceable_model_are_one_line_errors(tiny, tmp_path, monkeypatch) -> None:
    image, _ = _first(tiny)
    code, _, stderr = isnet(
        "explain", image, "--model", tiny.checkpoint, "--out", tmp_path / "a.png", "--target", "cat"
    )
    assert code == 2 and "--target 'cat'" in stderr
    import torch
    from torch import nn

    (tmp_path / "branchy_arch.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self, num_classes, in_channels):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(in_channels, 4, 3)\n"
        "        self.fc = nn.Linear(4, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0.5:\n"
        "            x = 1 - x\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n\n"
        "def build(num_classes, in_channels):\n"
        "    return Branchy(num_classes, in_channels)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from branchy_arch import build

    weights = tmp_path / "w.pt"
    torch.save(build(num_classes=2, in_channels=1).state_dict(), weights)
    assert isinstance(build(2, 1), nn.Module)
    code, _, stderr = isnet(
        "explain", image, "--arch", "branchy_arch:build", "--weights", weights, "--out", tmp_path / "b.png"
    )
    assert code == 2
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot trace Branchy" in lines[0]


def test_plain_torchvision_state_dict(tiny, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    image, _ = _first(tiny)
    weights = tmp_path / "r18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    out = tmp_path / "r.png"
    code, stdout, stderr = isnet("explain", image, "--arch", "resnet18", "--weights", weights, "--out", out, "--json")
    assert code == 0, stderr
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["target"] in ("0", "1") and record["preprocessing"]["size"] == 224
    assert Image.open(out).format == "PNG"
