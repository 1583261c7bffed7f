"""`isnet segment train` and `isnet segment`: the MONAI U-Net learns phantom lungs, masks come back at the
input's original geometry, post-processing and QC, a manifest without masks becomes one `isnet train` uses,
bad inputs exit 2 with the file named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isnet_cli.segment.postprocess import clean_mask, quality
from tests.tiny_models import isnet

SIZE = 32
# Measured at 32 px, 10 epochs, lr 0.01, batch 4, widths 8,16,32: best validation Dice 0.961 / 0.959 / 0.953
# for seeds 0 / 1 / 2 (an untrained net scores about 0.4).
MIN_DICE = 0.90
# A stand-in for a radiograph's grey levels (std about 0.29: not a blank frame).
RADIOGRAPH = np.random.default_rng(0).random((40, 40))
TRAIN_ARGS = ("--img-size", SIZE, "--epochs", 10, "--batch-size", 4, "--channels", "8,16,32", "--lr", 0.01)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A ∩ B| / (|A| + |B|)."""
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def read_png_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


def train_run(data: Path, out: Path, seed: int) -> Path:
    code, stdout, stderr = isnet(
        "segment", "train", data, *TRAIN_ARGS, "--seed", seed, "--out", out, "--name", f"seed{seed}", "--device", "cpu"
    )
    assert code == 0, stderr
    assert "run folder:" in stdout
    return out / f"seed{seed}"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("seg-phantoms"), n=48, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def segmenter(phantoms, tmp_path_factory) -> Path:
    return train_run(phantoms, tmp_path_factory.mktemp("seg-runs"), seed=0)


def without_masks(manifest: Path, out: Path) -> Path:
    """The manifest's image, label and marker columns only (paths made absolute)."""
    rows = list(csv.DictReader(manifest.open()))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label", "marker"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"image": str(manifest.parent / r["image"]), "label": r["label"], "marker": r["marker"]})
    return out


def test_segmenter_reaches_dice_on_two_seeds(phantoms, segmenter, tmp_path):
    from isnet_cli.errors import InputError
    from isnet_cli.infer.checkpoint import load_checkpoint, read_meta
    from isnet_cli.segment.closing import CLOSING_GRID

    for run in (segmenter, train_run(phantoms, tmp_path, seed=1)):
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
        best = max(float(r["val_dice"]) for r in rows)
        assert best > MIN_DICE, (run, best)
        assert float(rows[0]["val_dice"]) < best  # it learned: the first epoch is worse than the best
        assert all(0 <= float(r["val_hd95"]) < 3.0 for r in rows if float(r["val_dice"]) == best)
        meta = read_meta(run / "best.safetensors")
        assert meta["task"] == "segmentation" and meta["arch"] == "monai-unet"
        assert meta["contract"]["size"] == SIZE and meta["metrics"]["val_dice"] == pytest.approx(best, abs=1e-5)
        closing = meta["postprocess"]  # chosen on the validation images after the last epoch
        assert closing["closing"] in CLOSING_GRID and closing["validation_images"] > 0
        assert (run / "contours.png").stat().st_size > 1000
        assert json.loads((run / "config.json").read_text())["seed"] in (0, 1)
        with pytest.raises(InputError, match="segmenter"):
            load_checkpoint(run / "best.safetensors")  # classifier commands refuse it


def test_mask_has_the_original_geometry(segmenter, tmp_path):
    """A 48 x 40 (H x W) crop of a 48 px phantom: letterboxed to 32 px for the net, its mask comes back
    48 x 40 and overlaps the true lungs."""
    from isnet_cli.infer.checkpoint import read_meta
    from isnet_cli.synth import make_phantom

    ph = make_phantom(np.random.default_rng([7, 1]), 48, 0, False, 0.22)
    image, truth = ph.image[:, 4:44], ph.mask[:, 4:44]
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "crop.png")
    code, stdout, stderr = isnet("segment", tmp_path / "crop.png", "--model", segmenter, "--out", tmp_path / "out")
    assert code == 0, stderr
    recorded = read_meta(segmenter / "best.safetensors")["postprocess"]["closing"]
    assert f"lungs closed by {recorded:g} x the long side" in stdout + stderr
    code, stdout, stderr = isnet(
        "segment", tmp_path / "crop.png", "--model", segmenter, "--out", tmp_path / "open", "--closing", 0
    )
    assert code == 0 and "lungs closed by 0 x" in stdout + stderr, stderr
    mask = read_png_mask(tmp_path / "out" / "masks" / "crop.png")
    assert (read_png_mask(tmp_path / "open" / "masks" / "crop.png") <= mask).all()  # closing only adds
    assert mask.shape == (48, 40)
    # measured 0.955; 0.819 when the letterbox padding is not undone (the mask then sits off by a few pixels)
    assert dice(mask, truth) > MIN_DICE


def test_clean_mask_keeps_two_largest_and_fills_holes():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 4:16] = True  # left lung
    mask[5:30, 24:36] = True  # right lung
    mask[15:18, 8:11] = False  # a hole in the left lung
    mask[37:39, 37:39] = True  # a speck
    clean = clean_mask(mask)
    assert clean[16, 9] and not clean[38, 38]
    assert clean.sum() == 30 * 12 + 25 * 12
    qc = quality(clean, RADIOGRAPH)
    assert qc.ok and qc.components == 2 and qc.balance == pytest.approx(25 / 30, abs=1e-4)


def two_lungs(size: int = 40) -> np.ndarray:
    """Two rectangular lungs, 8 px apart."""
    mask = np.zeros((size, size), bool)
    mask[5:35, 4:16] = True
    mask[5:35, 24:36] = True
    return mask


def bitten(mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """The left lung with a half-disk bitten out of its outer edge (an opacity the segmenter cut out)."""
    y, x = np.ogrid[: mask.shape[0], : mask.shape[1]]
    return mask & ~(((y - 20) ** 2 + (x - 4) ** 2) <= radius**2)


def test_closing_gives_a_bitten_lung_back_and_never_joins_the_lungs():
    """Closing by a disk much wider than the bite restores the lung, and even a disk wider than the gap
    between the lungs keeps two lungs; a disk that fits in the bite leaves it; convex lungs are left exactly
    as they are."""
    from isnet_cli.segment.postprocess import close_lungs

    lungs = two_lungs()
    bite = bitten(lungs)
    assert bite.sum() < lungs.sum()
    # r = 20 px, wider than the 8 px gap; discrete closing leaves the bite's mouth open on the column that the
    # lung's straight edge runs along (a disk outside the lung touches it)
    restored = lungs.copy()
    restored[17:24, 4] = False
    np.testing.assert_array_equal(clean_mask(bite, closing=0.5), restored)
    np.testing.assert_array_equal(clean_mask(bite, closing=0.0), bite)
    assert clean_mask(bite, closing=0.05).sum() < lungs.sum()  # r = 2 px fits in the 7 px wide bite
    np.testing.assert_array_equal(close_lungs(lungs, 0.5), lungs)
    # a radiograph-sized mask (1200 px) is closed at 512 px: the same bite given back, nothing added outside
    block = np.ones((30, 30), bool)
    big_lungs, big_bite = np.kron(lungs, block), np.kron(bite, block)
    big = clean_mask(big_bite, closing=0.5)
    assert not (big & ~big_lungs).any()
    still_open = (lungs & ~restored).sum() * block.size  # the mouth column, at full size
    assert big.sum() > big_bite.sum() and (big_lungs & ~big).sum() <= 1.2 * still_open


def test_closing_radius_is_chosen_by_validation_dice(tmp_path):
    """The rule of `isnet_cli.segment.closing` on a segmenter whose lungs have a 6 px wide notch in the outer
    edge (a disk of radius 3 px, 0.075 of the 40 px side, no longer fits in it): annotations without the
    notch (the segmenter cut an opacity out) -> the largest radius tried; annotations with it (a true
    concavity) -> a radius that leaves it open."""
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.manifest import Sample
    from isnet_cli.segment.closing import CLOSING_GRID, CLOSING_TOLERANCE, choose_closing
    from isnet_cli.segment.model import Segmenter

    lungs = two_lungs()
    notched = lungs.copy()
    notched[17:23, 4:8] = False
    contract = InputContract(size=40, window="minmax")
    segmenter = Segmenter(
        tmp_path / "stub.safetensors", {}, contract, "stub", lambda x: np.repeat(notched[None], len(x), 0) * 1.0
    )
    image = tmp_path / "image.png"
    Image.fromarray((RADIOGRAPH * 255).astype(np.uint8)).save(image)
    chosen = {}
    for name, truth in (("opacity cut out", lungs), ("true concavity", notched)):
        mask = tmp_path / f"{name}.png"
        Image.fromarray(truth.astype(np.uint8) * 255).save(mask)
        choice = choose_closing(segmenter, [Sample(image, mask), Sample(image, mask)])
        assert choice.images == 2 and set(choice.dice) == set(CLOSING_GRID)
        assert choice.dice[choice.closing] >= max(choice.dice.values()) - CLOSING_TOLERANCE
        assert choice.record()["closing"] == choice.closing
        chosen[name] = choice.closing
    assert chosen["opacity cut out"] == max(CLOSING_GRID)
    assert chosen["true concavity"] < 0.075


def test_qc_flags_empty_one_sided_and_blank():
    empty = quality(np.zeros((40, 40), bool), RADIOGRAPH)
    assert not empty.ok and empty.empty and empty.problems == ["empty mask (no lung found)"]
    one_sided = np.zeros((40, 40), bool)
    one_sided[5:35, 4:16] = True
    qc = quality(one_sided, RADIOGRAPH)
    assert not qc.ok and qc.balance == 0.0 and qc.components == 1
    assert any("balance" in p for p in qc.problems) and any("component" in p for p in qc.problems)
    both = one_sided | one_sided[:, ::-1]
    assert quality(both, RADIOGRAPH).ok
    blank = quality(both, np.full((40, 40), 0.5))
    assert blank.problems == ["blank image (grey-level std 0.000 < 0.02)"]
    assert quality(np.ones((40, 40), bool), RADIOGRAPH).problems == [
        "lung area 100.0% outside [5%, 60%]",
        "1 component(s), expected 2",
    ]


def test_manifest_without_masks_to_isnet_train(phantoms, segmenter, tmp_path):
    """segment fills the mask column (other columns kept); the masks match the phantoms' own; `isnet train` runs."""
    source = without_masks(phantoms, tmp_path / "nomask.csv")
    out = tmp_path / "masked"
    code, _, stderr = isnet("segment", source, "--model", segmenter, "--out", out, "--device", "cpu")
    assert code == 0, stderr
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    qc_rows = list(csv.DictReader((out / "qc.csv").open()))
    assert len(qc_rows) == 48
    flagged = {r["image"] for r in qc_rows if r["ok"] == "0"}
    assert len(rows) == 48 - len(flagged) >= 44
    assert list(rows[0]) == ["image", "mask", "label", "marker"]
    truth = {r["image"]: r["mask"] for r in csv.DictReader(phantoms.open())}
    scores = []
    for r in rows:
        image = (out / r["image"]).resolve()
        true_mask = phantoms.parent / truth[str(image.relative_to(phantoms.parent.resolve()))]
        scores.append(dice(read_png_mask(out / r["mask"]), read_png_mask(true_mask)))
    assert np.mean(scores) > MIN_DICE
    code, _, stderr = isnet(
        "train", out / "manifest.csv", "--arch", "tinycnn", "--img-size", SIZE, "--epochs", 1, "--batch-size", 8,
        "--cut", "1,25", "--out", tmp_path / "runs", "--name", "isnet", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    assert len(list(csv.DictReader((tmp_path / "runs" / "isnet" / "metrics.csv").open()))) == 1


def constant_segmenter(run: Path, lung_bias: float, path: Path) -> Path:
    """`run`'s segmenter with its output layer replaced by a constant: lung everywhere (`lung_bias` > 0)
    or nowhere (< 0)."""
    import torch

    from isnet_cli.infer.checkpoint import save_checkpoint
    from isnet_cli.segment.model import load_segmenter

    net, meta, _ = load_segmenter(run)
    last = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, lung_bias]))
    return save_checkpoint(path, net, meta)


def four_phantoms(phantoms: Path, tmp_path: Path, extra: tuple[Path, ...] = ()) -> Path:
    """A manifest (image, label) of the first four phantoms and `extra` images, paths absolute."""
    images = [phantoms.parent / r["image"] for r in csv.DictReader(phantoms.open())][:4] + list(extra)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\n" + "".join(f"{p},normal\n" for p in images))
    return manifest


def manifest_names(out: Path) -> set[str]:
    return {Path(r["image"]).name for r in csv.DictReader((out / "manifest.csv").open())}


def test_qc_exclude_keep_and_empty_masks(phantoms, segmenter, tmp_path):
    """Masks flagged by QC (here: lung everywhere) are left out of the manifest with --qc exclude and kept
    with --qc keep; empty masks are reported per file, written, in qc.csv and never in the manifest."""
    manifest = four_phantoms(phantoms, tmp_path)
    good = {Path(r["image"]).name for r in csv.DictReader(manifest.open())}
    everywhere = constant_segmenter(segmenter, 50.0, tmp_path / "everywhere.safetensors")
    nowhere = constant_segmenter(segmenter, -50.0, tmp_path / "nowhere.safetensors")
    for model, mode, expected in (
        (segmenter, "exclude", good),
        (everywhere, "exclude", set()),
        (everywhere, "keep", good),
        (nowhere, "keep", set()),
    ):
        out = tmp_path / f"{model.stem}-{mode}"
        code, _, stderr = isnet("segment", manifest, "--model", model, "--out", out, "--qc", mode)
        assert code == 0, stderr
        assert manifest_names(out) == expected
        assert len(list((out / "masks").rglob("*.png"))) == 4
        qc = list(csv.DictReader((out / "qc.csv").open()))
        if model == segmenter:
            assert [r["ok"] for r in qc] == ["1"] * 4
        elif model == everywhere:
            assert all(r["ok"] == "0" and r["area_fraction"] == "1.0" for r in qc)
            assert stderr.count("lung area 100.0%") == 4
        else:
            assert all(r["problems"] == "empty mask (no lung found)" for r in qc)
            assert stderr.count("empty mask (no lung found)") == 4 and "left out of the manifest" in stderr
            assert not any(read_png_mask(p).any() for p in (out / "masks").rglob("*.png"))


def test_blank_frame_and_unreadable_file(phantoms, segmenter, tmp_path):
    """A blank frame: flagged whatever the segmenter outputs, left out; an unreadable file: exit 2 with the
    file named, everything else written (masks, qc.csv, manifest without it)."""
    Image.fromarray(np.full((SIZE, SIZE), 200, np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = four_phantoms(phantoms, tmp_path, (tmp_path / "blank.png", tmp_path / "broken.png"))
    out = tmp_path / "out"
    code, _, stderr = isnet("segment", manifest, "--model", segmenter, "--out", out)
    assert code == 2
    assert "broken.png" in stderr and "1 input(s) could not be segmented" in stderr
    assert "blank.png: blank image" in stderr
    assert len(list((out / "masks").rglob("*.png"))) == 5
    qc = {Path(r["image"]).name: r for r in csv.DictReader((out / "qc.csv").open())}
    assert len(qc) == 6 and qc["broken.png"]["ok"] == "0" and qc["blank.png"]["ok"] == "0"
    assert manifest_names(out) == {Path(r["image"]).name for r in csv.DictReader(manifest.open())} - {
        "blank.png",
        "broken.png",
    }


def test_segment_refuses_a_classifier_and_an_existing_output(segmenter, tmp_path):
    from isnet_cli.backbones import build_model
    from isnet_cli.infer.checkpoint import save_checkpoint

    classifier = save_checkpoint(
        tmp_path / "c.safetensors",
        build_model("tinycnn", 2),
        {"arch": "tinycnn", "num_classes": 2, "classes": ["a", "b"]},
    )
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "x.png")
    code, _, stderr = isnet("segment", tmp_path / "x.png", "--model", classifier, "--out", tmp_path / "o")
    assert code == 2 and "not a segmenter" in stderr
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "qc.csv").write_text("")
    code, _, stderr = isnet("segment", tmp_path / "x.png", "--model", segmenter, "--out", tmp_path / "o2")
    assert code == 2 and "--overwrite" in stderr
