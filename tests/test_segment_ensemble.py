"""`isnet segment ensemble`: two segmenters trained at 32 and 64 px become one checkpoint whose lung
probability is the mean of theirs; it segments, exports to a verified ONNX graph, and serves
`--variant masked`; bad combinations exit 2 with one line and write nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_segment import MIN_DICE, dice, read_png_mask
from tests.tiny_models import isnet

# one xdist worker for the module: its fixtures train two segmenters, once per run rather than per worker
pytestmark = pytest.mark.xdist_group("segment_ensemble")
SMALL, LARGE = 32, 64
MEMBER_ARGS = ("--epochs", 10, "--batch-size", 4, "--channels", "8,16,32", "--lr", 0.01, "--device", "cpu")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("ens-phantoms"), n=48, size=LARGE, seed=0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Other phantoms (another seed) with masks: the ensemble's validation images."""
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("ens-held-out"), n=12, size=LARGE, seed=1)


@pytest.fixture(scope="module")
def members(phantoms, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("ens-members")
    for size in (SMALL, LARGE):
        code, _, stderr = isnet(
            "segment", "train", phantoms, "--img-size", size, *MEMBER_ARGS, "--out", out, "--name", f"m{size}"
        )
        assert code == 0, stderr
    return out / f"m{SMALL}", out / f"m{LARGE}"


@pytest.fixture(scope="module")
def ensemble(members, held_out, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "lungs.safetensors"
    code, stdout, stderr = isnet("segment", "ensemble", *members, "--val", held_out, "--out", out)
    assert code == 0, stderr
    assert f"input {LARGE} px" in stdout + stderr and "closed by a disk" in stdout + stderr
    return out


def _inputs(images: list[Path], contract: dict) -> np.ndarray:
    """The images preprocessed by `contract`, (N, 1, S, S)."""
    from isnet_cli.infer.predict import iter_prepared
    from isnet_cli.io.contract import InputContract
    from isnet_cli.io.manifest import Sample

    batch = next(iter_prepared([Sample(image=p) for p in images], InputContract.from_dict(contract), len(images)))
    return np.stack([prepared.x[:1] for _, prepared in batch])


def test_ensemble_is_the_mean_of_its_members(members, ensemble, held_out):
    """softmax(output) = mean of the 64 px member's probability and the 32 px member's on the input averaged
    over 2 x 2 blocks, resized back; the 32 px member's path inside the ensemble gives the masks of its own
    32 px letterbox; the ensemble records both members and a closing radius."""
    import torch

    from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, read_meta
    from isnet_cli.segment.model import open_segmenter

    net, meta = load_segmenter_checkpoint(ensemble)
    small, _ = load_segmenter_checkpoint(members[0] / "best.safetensors")
    large, _ = load_segmenter_checkpoint(members[1] / "best.safetensors")
    assert [m["input_size"] for m in meta["ensemble"]] == [SMALL, LARGE]
    assert [m["source"] for m in meta["ensemble"]] == [f"m{SMALL}/best.safetensors", f"m{LARGE}/best.safetensors"]
    assert meta["contract"]["size"] == LARGE and "closing" in meta["postprocess"]
    x = torch.rand(3, 1, LARGE, LARGE)
    with torch.no_grad():
        pooled = x.reshape(3, 1, SMALL, 2, SMALL, 2).mean(dim=(3, 5))
        p_small = torch.softmax(small(pooled), dim=1)
        p_small = torch.nn.functional.interpolate(p_small, size=(LARGE, LARGE), mode="bilinear")
        expected = (p_small + torch.softmax(large(x), dim=1)) / 2
        torch.testing.assert_close(torch.softmax(net(x), dim=1), expected, atol=1e-5, rtol=1e-4)
    # the small member inside the ensemble sees what its own letterbox gives it
    own = open_segmenter(members[0], "cpu")
    images = [held_out.parent / r["image"] for r in csv.DictReader(held_out.open())]
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(_inputs(images, meta["contract"])), 2)
        inside = torch.softmax(small(pooled), dim=1)[:, 1].numpy()
    alone = own.lung(_inputs(images, own.meta["contract"]))
    assert ((inside > 0.5) == (alone > 0.5)).mean() > 0.98
    assert read_meta(ensemble)["arch"] == "monai-unet-ensemble"


def test_ensemble_segments_and_exports(members, ensemble, held_out, tmp_path):
    """`isnet segment --model ENSEMBLE` reaches the members' Dice on held-out phantoms; its ONNX export is
    verified and segments (onnxruntime) like the checkpoint."""
    from isnet_cli.io.masks import load_mask

    code, stdout, stderr = isnet(
        "segment", held_out, "--model", ensemble, "--out", tmp_path / "torch", "--device", "cpu"
    )
    assert code == 0, stderr
    assert "ensemble of 2 MONAI U-Nets" in stdout + stderr
    rows = list(csv.DictReader((tmp_path / "torch" / "manifest.csv").open()))
    truth = {Path(r["image"]).name: r["mask"] for r in csv.DictReader(held_out.open())}
    scores = []
    for r in rows:
        pred = read_png_mask(tmp_path / "torch" / r["mask"])
        true = load_mask(held_out.parent / truth[Path(r["image"]).name], pred.shape) > 0.5
        scores.append(dice(pred, true))
    assert len(scores) == 12 and np.mean(scores) >= MIN_DICE, scores
    onnx_file = tmp_path / "lungs.onnx"
    code, stdout, stderr = isnet("export", "--model", ensemble, "--out", onnx_file, "--json")
    assert code == 0, stderr
    meta = json.loads(stdout)
    assert meta["export"]["verified"]["max_abs_diff"] <= 1e-4 and meta["ensemble"]
    code, _, stderr = isnet("segment", held_out, "--model", onnx_file, "--out", tmp_path / "onnx", "--device", "cpu")
    assert code == 0, stderr
    for path in sorted((tmp_path / "torch" / "masks").rglob("*.png")):
        other = tmp_path / "onnx" / path.relative_to(tmp_path / "torch")
        assert (read_png_mask(path) != read_png_mask(other)).mean() < 0.01, path


def test_masked_variant_runs_the_ensemble(phantoms, ensemble, tmp_path):
    """`isnet train --variant masked --segmenter ENSEMBLE`: the checkpoint records the members and rebuilds
    the ensemble; predict runs both stages."""
    from isnet_cli.infer.checkpoint import load_checkpoint, read_meta
    from isnet_cli.pipeline import SegmenterEnsemble

    runs = tmp_path / "runs"
    code, _, stderr = isnet(
        "train", phantoms, "--arch", "tinycnn", "--img-size", LARGE, "--epochs", 1, "--batch-size", 8,
        "--device", "cpu", "--variant", "masked", "--segmenter", ensemble, "--out", runs, "--name", "m",
    )  # fmt: skip
    assert code == 0, stderr
    best = runs / "m" / "best.safetensors"
    assert len(read_meta(best)["segmenter"]["ensemble"]) == 2
    model, _ = load_checkpoint(best)
    assert isinstance(model.segmenter, SegmenterEnsemble)
    image = sorted((phantoms.parent / "images").rglob("*.png"))[0]
    code, _, stderr = isnet("predict", image, "--model", best, "--json", "--device", "cpu")
    assert code == 0, stderr


def _resaved(member: Path, out: Path, **contract: object) -> Path:
    """The member's weights saved with contract fields changed."""
    from isnet_cli.infer.checkpoint import load_segmenter_checkpoint, save_checkpoint

    net, meta = load_segmenter_checkpoint(member / "best.safetensors")
    return save_checkpoint(out, net, {**meta, "contract": {**meta["contract"], **contract}})


def test_bad_combinations_exit_2_and_write_nothing(members, ensemble, tmp_path):
    """One member, contracts that differ beyond the size, sizes that do not divide, an ensemble as a
    member, the output being a member: exit 2, one line naming the file, no output file."""
    out = tmp_path / "e.safetensors"
    cases = [
        ((members[0],), "at least two"),
        ((members[0], _resaved(members[1], tmp_path / "w.safetensors", window="minmax")), "window"),
        ((members[0], _resaved(members[1], tmp_path / "s.safetensors", size=48)), "does not divide"),
        ((members[0], ensemble), "is itself an ensemble"),
    ]
    for models, message in cases:
        code, _, stderr = isnet("segment", "ensemble", *models, "--out", out)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not out.exists()
    target = members[1] / "best.safetensors"
    before = target.read_bytes()
    code, _, stderr = isnet("segment", "ensemble", members[0], target, "--out", target)
    assert code == 2 and "is one of the members" in stderr
    assert target.read_bytes() == before


def test_info_shows_the_members_and_the_clean_up(ensemble):
    """`isnet info ENSEMBLE`: each member's input size and source, and the recorded closing radius."""
    code, stdout, stderr = isnet("info", ensemble)
    assert code == 0, stderr
    assert "ensemble members" in stdout and "Segmenter clean-up" in stdout
    for row in (f"0.input_size │ {SMALL}", f"1.input_size │ {LARGE}", f"1.source │ m{LARGE}/best.safetensors"):
        assert row in " ".join(stdout.split()), row
