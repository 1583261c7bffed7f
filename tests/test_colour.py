"""Colour and natural images: RGB kept through every command, colour DICOM, --roi-name, face phantoms,
the colour shortcut experiment; and grey behaviour unchanged (1 channel, "lungs")."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isnet_cli.infer.checkpoint import read_meta
from isnet_cli.io.contract import InputContract
from isnet_cli.io.images import detect_channels, load_image
from isnet_cli.io.preprocess import preprocess_file
from isnet_cli.synth import synthesize
from tests.shortcut import score
from tests.tiny_models import REPO, isnet

SIZE = 32
NO_TORCH = (
    "import sys; sys.modules['torch'] = None\n"
    "from isnet_cli.cli import main; sys.argv = ['isnet'] + sys.argv[1:]; main()"
)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 face phantoms at 32 px with the red background marker on every `smiling` image."""
    return synthesize(tmp_path_factory.mktemp("faces"), n=40, size=SIZE, bias=1.0, seed=5, kind="faces")


@pytest.fixture(scope="module")
def colour_run(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch tinycnn ISNet trained through the CLI on the face phantoms, channels left on auto."""
    out = tmp_path_factory.mktemp("runs")
    code, _, err = isnet(
        "train", faces, "--arch", "tinycnn", "--img-size", SIZE, "--batch-size", 8, "--epochs", 2,
        "--no-progress", "--heatmaps", 2, "--roi-name", "face", "--out", out, "--name", "colour",
    )  # fmt: skip
    assert code == 0, err
    return out / "colour"


def rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- reading


def test_colour_png_stays_rgb_with_3_channels_and_grey_is_repeated(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0], rgb[5:15, 10:20, 2] = 200, 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    colour = load_image(tmp_path / "c.png", channels=3)
    assert colour.image.shape == (20, 30, 3) and colour.record["colour"] == "RGB kept"
    np.testing.assert_allclose(colour.image, rgb / 255.0, atol=1e-6)
    assert load_image(tmp_path / "c.png").image.shape == (20, 30)  # grey contract: luma, as before
    contract = InputContract(size=16, channels=3)
    x = preprocess_file(tmp_path / "c.png", contract).x
    assert x.shape == (3, 16, 16) and x[0].max() > 0.7 and x[1].max() == 0.0 and x[2].max() > 0.9
    g = preprocess_file(tmp_path / "g.png", contract).x
    assert np.array_equal(g[0], g[1]) and np.array_equal(g[0], g[2])


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_dicom_is_converted_to_rgb_by_pydicom(tmp_path: Path, photometric: str) -> None:
    from isnet_cli.errors import InputError
    from isnet_cli.io.colour import write_colour_dicom

    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, (12, 16, 3)).astype(np.float32)
    path = write_colour_dicom(tmp_path / "c.dcm", rgb, photometric=photometric)
    decoded = load_image(path, channels=3)
    assert decoded.image.shape == (12, 16, 3) and decoded.record["photometric"] == photometric
    # YBR_FULL round trip: 8-bit colour-space conversion, within 2 grey levels
    assert np.abs(decoded.image - np.round(rgb * 255) / 255).max() <= 2.5 / 255
    with pytest.raises(InputError, match="--channels 3"):  # a grey model still refuses colour DICOM
        load_image(path)


def test_channels_detected_from_the_data(faces: Path, tmp_path: Path) -> None:
    images = [faces.parent / r["image"] for r in rows(faces)]
    assert detect_channels(images) == 3
    grey = synthesize(tmp_path / "grey", n=4, size=SIZE, seed=1)
    assert detect_channels([grey.parent / r["image"] for r in rows(grey)]) == 1
    # an RGB file holding a grey picture stays grey
    g = np.asarray(Image.open(grey.parent / rows(grey)[0]["image"]))
    Image.fromarray(np.stack([g] * 3, axis=-1)).save(tmp_path / "rgb_of_grey.png")
    assert detect_channels([tmp_path / "rgb_of_grey.png"]) == 1


def test_face_phantoms_mask_the_face_and_keep_the_marker_outside(faces: Path) -> None:
    by_label: dict[str, list[np.ndarray]] = {}
    for r in rows(faces):
        img = np.asarray(Image.open(faces.parent / r["image"])).astype(np.float32) / 255
        mask = np.asarray(Image.open(faces.parent / r["mask"])) > 0
        assert img.shape == (SIZE, SIZE, 3) and 0.15 < mask.mean() < 0.5
        red = (img[..., 0] > 0.8) & (img[..., 1] < 0.25) & (img[..., 2] < 0.25)
        assert bool(red[~mask].any()) == (r["marker"] == "1") and not red[mask].any()
        by_label.setdefault(r["label"], []).append(img)
    assert set(by_label) == {"neutral", "smiling"} and int(rows(faces)[0]["marker"]) in (0, 1)


# ---------------------------------------------------------------------------------------------- model parts


def test_pretrained_rgb_first_conv_keeps_filters_with_imagenet_normalisation_folded() -> None:
    from torchvision import models as tv

    from isnet_cli.backbones import IMAGENET_MEAN, IMAGENET_STD, replace_first_conv

    torch.manual_seed(0)
    reference = tv.resnet18(num_classes=2).conv1
    model = tv.resnet18(num_classes=2)
    model.conv1.load_state_dict(reference.state_dict())
    replace_first_conv(model, in_channels=3, fold_imagenet=True)
    x = torch.rand(2, 3, 48, 48)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = reference((x - mean) / std)
    torch.testing.assert_close(model.conv1(x)[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-4, rtol=1e-4)


def test_background_swap_and_audit_fill_with_the_mean_colour_per_channel() -> None:
    from isnet_cli.objective.swap import swap_backgrounds
    from isnet_cli.report.counterfactuals import channel_fills, perturb

    x = torch.zeros(2, 3, 4, 4)
    x[:, 0], x[:, 1], x[:, 2] = 0.9, 0.5, 0.1  # background colour (0.9, 0.5, 0.1) everywhere ...
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1:3, 1:3] = 1.0
    x[:, :, 1:3, 1:3] = 0.3  # ... and a grey region of interest
    swapped = swap_backgrounds(x, m, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(swapped, x)  # same background colour: the swap fills with that colour
    fills = channel_fills(x.numpy(), m.numpy())
    np.testing.assert_allclose(fills["background"], [0.9, 0.5, 0.1], atol=1e-6)
    np.testing.assert_allclose(fills["lungs"], [0.3, 0.3, 0.3], atol=1e-6)
    hidden = perturb("lungs_hidden", x.numpy(), m.numpy(), fills, 1.0)
    np.testing.assert_allclose(hidden[0, :, 2, 2], [0.3, 0.3, 0.3], atol=1e-6)
    mean_bg = perturb("background_mean", x.numpy(), m.numpy(), {"background": [0.0, 0.0, 1.0], "lungs": 0.0}, 1.0)
    np.testing.assert_allclose(mean_bg[0, :, 0, 0], [0.0, 0.0, 1.0])


def test_grey_contract_and_wording_stay_as_they_were() -> None:
    from isnet_cli.report.audit import verdict
    from isnet_cli.train.config import TrainConfig

    contract = TrainConfig(data="x").contract()
    assert contract.channels == 1 and contract.roi_name == "lung" and contract.roi_label == "lungs"
    assert InputContract.from_dict({"size": 32}).roi_name == "lung"  # checkpoints from before roi_name
    assert verdict(0.9, 0.0).startswith("looks at the lungs")
    assert verdict(0.9, 0.0, "region of interest (face)").startswith("looks at the region of interest (face)")


# ---------------------------------------------------------------------------------------------- commands


def test_data_synth_faces_and_data_check(tmp_path: Path) -> None:
    code, out, err = isnet("data", "synth", tmp_path / "f", "--kind", "faces", "--n", 6, "--size", 32, "--no-progress")
    assert code == 0, err
    manifest = tmp_path / "f" / "manifest.csv"
    assert {r["label"] for r in rows(manifest)} == {"neutral", "smiling"}
    code, out, err = isnet("data", "check", manifest, "--json")
    assert code == 0, err
    assert not json.loads(out)["bad"]
    code, _, err = isnet("data", "synth", tmp_path / "d", "--kind", "faces", "--n", 2, "--format", "dcm")
    assert code == 0, err
    assert load_image(next((tmp_path / "d" / "images").iterdir()), channels=3).image.shape == (64, 64, 3)


def test_train_detects_colour_and_records_channels_and_roi(colour_run: Path) -> None:
    meta = read_meta(colour_run / "best.safetensors")
    assert meta["contract"]["channels"] == 3 and meta["contract"]["roi_name"] == "face"
    assert meta["in_channels"] == 3
    config = (colour_run / "config.yaml").read_text()
    assert "channels: 3" in config and "roi_name: face" in config
    assert (colour_run / "heatmaps" / "epoch_2.png").is_file()
    assert "region of interest: face" in (colour_run / "card.md").read_text()


def test_channels_1_on_colour_data_trains_a_grey_model(faces: Path, tmp_path: Path) -> None:
    code, _, err = isnet(
        "train", faces, "--arch", "tinycnn", "--img-size", SIZE, "--batch-size", 8, "--epochs", 1,
        "--variant", "none", "--channels", 1, "--no-progress", "--heatmaps", 0, "--out", tmp_path, "--name", "g",
    )  # fmt: skip
    assert code == 0, err
    assert read_meta(tmp_path / "g" / "best.safetensors")["contract"]["channels"] == 1
    code, _, err = isnet("train", faces, "--channels", 2, "--out", tmp_path)
    assert code == 2 and "1, 3 or auto" in err


def test_predict_explain_evaluate_audit_on_colour_data(colour_run: Path, faces: Path, tmp_path: Path) -> None:
    ckpt = colour_run / "best.safetensors"
    code, out, err = isnet("predict", faces, "--model", ckpt, "--json", "--no-progress")
    assert code == 0, err
    assert len(json_lines(out)) == 40

    first = rows(faces)[0]
    png = tmp_path / "face.png"
    code, out, err = isnet(
        "explain", faces.parent / first["image"], "--model", ckpt, "--mask", faces.parent / first["mask"],
        "--out", png, "--json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    figure = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # the face is drawn in colour: skin pixels have red well above blue (a grey X-ray panel has none)
    assert ((figure[..., 0] - figure[..., 2]) > 60).mean() > 0.02

    code, out, err = isnet("evaluate", faces, "--model", ckpt, "--out", tmp_path / "eval", "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["roi"] == "region of interest (face)" and report["inside_mask_share"] is not None

    code, out, err = isnet("audit", faces, "--model", ckpt, "--out", tmp_path / "audit", "--json", "--no-progress")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["roi"] == "region of interest (face)" and "region of interest (face)" in summary["verdict"]
    assert len(summary["fill_values"]["background"]) == 3 and summary["flip_rate"]["background_blur"] is not None
    assert (tmp_path / "audit" / "audit_worst.png").is_file()


def test_onnx_export_and_torch_free_predict_with_3_channels(colour_run: Path, faces: Path, tmp_path: Path) -> None:
    onnx_file = tmp_path / "colour.onnx"
    ckpt = colour_run / "best.safetensors"
    code, out, err = isnet("export", "--model", ckpt, "--out", onnx_file, "--with-heatmap", "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert meta["export"]["input"]["shape"][1] == 3 and meta["export"]["verified"]["max_abs_diff"] <= 1e-4
    code, out, err = isnet("predict", faces, "--model", ckpt, "--json", "--no-progress")
    torch_rows = json_lines(out)
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "predict", str(faces), "--model", str(onnx_file), "--json", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    onnx_rows = json_lines(proc.stdout)
    p_torch = np.array([list(r["probabilities"].values()) for r in torch_rows])
    p_onnx = np.array([list(r["probabilities"].values()) for r in onnx_rows])
    assert p_onnx.shape == p_torch.shape and np.abs(p_torch - p_onnx).max() < 1e-4
    code, out, err = isnet("audit", faces, "--model", onnx_file, "--out", tmp_path / "onnx-audit", "--json")
    assert code == 0, err
    assert json.loads(out)["inside_mask_share"] is not None  # the heatmap model gives relevance


# ---------------------------------------------------------------------------------------------- mission


@pytest.mark.slow
def test_colour_isnet_ignores_the_background_shortcut_that_the_baseline_learns(colour_shortcut_runs) -> None:
    """The X-ray mission on colour faces, same recipe (ResNet-18, defaults): the standard classifier reads
    the red marker, the ISNet the mouth."""
    r = colour_shortcut_runs
    sets = ("test_biased", "test_clean", "test_flipped")
    base = {name: score(r.baseline, getattr(r, name)) for name in sets}
    assert base["test_biased"].accuracy >= 0.95
    assert base["test_flipped"].accuracy <= 0.30
    for run in r.isnets:
        isnet_scores = {name: score(run, getattr(r, name)) for name in sets}
        acc = {name: s.accuracy for name, s in isnet_scores.items()}
        assert acc["test_flipped"] >= 0.85, (run.name, acc)
        assert abs(acc["test_clean"] - acc["test_flipped"]) <= 0.05, (run.name, acc)
        assert acc["test_biased"] >= 0.85, (run.name, acc)
        assert isnet_scores["test_flipped"].share_inside >= 0.6, run.name
        assert isnet_scores["test_flipped"].share_inside >= base["test_flipped"].share_inside + 0.35, run.name
