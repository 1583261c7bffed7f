"""`isnet segment train`'s conventions of `isnet train`: `--resume` continues an interrupted run to the
same result as an uninterrupted one, `--amp` trains and writes checkpoints, `--devices 2` runs two gloo
processes, and a bad `--resume` exits 2 with one line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from isnet_cli.segment import fit
from isnet_cli.segment.config import SegmentConfig
from tests.tiny_models import isnet

SIZE = 32
TINY = dict(img_size=SIZE, channels=(8, 16), batch_size=4, lr=0.01, device="cpu", no_progress=True, contours=0)


class _Killed(Exception):
    """Stands for a run killed after an epoch's files were written."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from isnet_cli.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("seg-train-phantoms"), n=16, size=SIZE, seed=0)


def _metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time column (the only one that may differ between equal runs)."""
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_resumed_run_equals_an_uninterrupted_one(phantoms: Path, tmp_path: Path, monkeypatch) -> None:
    """Killed after epoch 2 of 4 and resumed with `--resume`: the same metrics rows, the same last and best
    weights as the run that was never interrupted."""
    cfg = SegmentConfig(data=str(phantoms), epochs=4, out=str(tmp_path), **TINY)
    whole = fit.train_segmenter(SegmentConfig(**{**cfg.__dict__, "name": "whole"}))
    end_epoch = fit._end_epoch

    def killed_after_two(run, row) -> None:
        end_epoch(run, row)
        if row["epoch"] == 2:
            raise _Killed

    monkeypatch.setattr(fit, "_end_epoch", killed_after_two)
    with pytest.raises(_Killed):
        fit.train_segmenter(SegmentConfig(**{**cfg.__dict__, "name": "killed"}))
    monkeypatch.setattr(fit, "_end_epoch", end_epoch)
    assert len(_metrics(tmp_path / "killed")) == 2
    code, stdout, stderr = isnet("segment", "train", "--resume", tmp_path / "killed", "--no-progress")
    assert code == 0, stderr
    assert "at epoch 3 of 4" in stdout + stderr
    assert _metrics(tmp_path / "killed") == _metrics(whole.run_dir)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(whole.run_dir / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_amp_trains_and_writes_checkpoints(phantoms: Path, tmp_path: Path) -> None:
    """`--amp` on CPU (bf16 autocast): a finite loss, checkpoints and a resume state written."""
    code, _, stderr = isnet(
        "segment", "train", phantoms, "--img-size", SIZE, "--channels", "8,16", "--batch-size", 4, "--epochs", 1,
        "--device", "cpu", "--amp", "--contours", 0, "--out", tmp_path, "--name", "amp", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    run = tmp_path / "amp"
    assert {"best.safetensors", "last.safetensors", "last.state.pt"} <= {p.name for p in run.iterdir()}
    (row,) = _metrics(run)
    assert np.isfinite(float(row["train_loss"])) and 0.0 <= float(row["val_dice"]) <= 1.0
    assert all(v.dtype == torch.float32 for v in load_file(str(run / "best.safetensors")).values())


@pytest.mark.parametrize("where", ["missing", "not-a-run"])
def test_bad_resume_exits_2_with_one_line(tmp_path: Path, where: str) -> None:
    """A --resume path that does not exist or holds no resume state: exit 2, one line naming it and the fix."""
    target = tmp_path / where
    if where == "not-a-run":
        target.mkdir()
    code, _, stderr = isnet("segment", "train", "--resume", target)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert str(target) in lines[0] and "isnet segment train" in lines[0]


def test_devices_2_spawns_two_processes(phantoms: Path, tmp_path: Path) -> None:
    """`--devices 2` on CPU: two gloo processes, one run folder written by rank 0, a resumable state, and the
    closing radius chosen by rank 0 alone (with MONAI's `DiceMetric` it waited for rank 1: a deadlock)."""
    from isnet_cli.infer.checkpoint import read_meta

    result = fit.train_segmenter(SegmentConfig(data=str(phantoms), epochs=1, devices=2, out=str(tmp_path), **TINY))
    assert result.run_dir == tmp_path / "run-001"
    assert result.model is None and result.last["epoch"] == 1
    assert np.isfinite(result.last["train_loss"])
    assert {"best.safetensors", "last.safetensors", "last.state.pt", "config.json"} <= {
        p.name for p in result.run_dir.iterdir()
    }
    assert read_meta(result.run_dir / "best.safetensors")["postprocess"]["validation_images"] > 0


def test_export_form_is_the_same_unet_without_prelu_and_transposed_convolutions(tmp_path: Path) -> None:
    """`isnet export`'s form of a segmenter U-Net: identical outputs (float rounding), and its ONNX graph has
    LeakyRelu / Conv + DepthToSpace where the U-Net had PRelu / ConvTranspose."""
    import onnx

    from isnet_cli.pipeline import build_unet, export_form

    torch.manual_seed(0)
    net = build_unet({"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # PReLU slopes away from their 0.25 start
        x = torch.rand(2, 1, 48, 48)
        assert torch.allclose(export_form(net)(x), net(x), atol=1e-5)
    path = tmp_path / "u.onnx"
    torch.onnx.export(export_form(net), (x,), str(path), opset_version=17, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"LeakyRelu", "DepthToSpace"} <= ops and not {"PRelu", "ConvTranspose"} & ops
