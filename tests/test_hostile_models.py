"""Hostile model files: pickles that would run code are refused unexecuted; a stray ONNX sidecar is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from isnet_cli.infer.onnx_runtime import sidecar_path
from tests.tiny_models import isnet, shared_tiny_run


class _Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A torch file whose unpickling creates `marker`; the payload is proven live, then the marker removed."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # an unsafe loader runs it
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()
    return path, marker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def test_pickled_model_is_refused_without_running_it(evil, tiny, tmp_path: Path) -> None:
    path, marker = evil
    image = sorted(tiny.images.iterdir())[0]
    code, _, err = isnet("predict", image, "--model", path)
    assert code == 2 and "evil.pt: pickled torch files are refused: unpickling can run any code" in err
    # the same bytes under a checkpoint's name, in a run folder
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "best.safetensors")
    code, _, err = isnet("predict", image, "--model", run)
    assert code == 2 and "best.safetensors: not an isnet checkpoint" in err
    code, _, err = isnet("explain", image, "--model", run / "best.safetensors", "--out", tmp_path / "heat.png")
    assert code == 2 and "not an isnet checkpoint" in err
    # explain --arch --weights takes plain state dicts: weights-only loading refuses the payload
    code, _, err = isnet("explain", image, "--arch", "tinycnn", "--weights", path, "--out", tmp_path / "heat2.png")
    assert code == 2 and "evil.pt: cannot load a state dict" in err
    assert not marker.exists()


def test_crafted_resume_state_is_refused_without_running_it(evil, tiny, tmp_path: Path) -> None:
    path, marker = evil
    run = tmp_path / "runs" / "r"
    code, _, err = isnet(
        "train", tiny.manifest, "--arch", "tinycnn", "--img-size", "32", "--batch-size", "8", "--epochs", "1",
        "--out", tmp_path / "runs", "--name", "r", "--no-progress", "--heatmaps", "0", "--cut", "1,25",
    )  # fmt: skip
    assert code == 0, err
    shutil.copy(path, run / "last.state.pt")
    code, _, err = isnet("train", "--resume", run, "--epochs", "2", "--no-progress")
    assert code == 2, err
    assert "last.state.pt: refused: not a weights-only training state" in err and "could run code" in err
    assert not marker.exists()


def test_onnx_with_a_mismatched_sidecar_is_refused(tiny, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    code, _, err = isnet("export", "--model", tiny.checkpoint, "--out", out)
    assert code == 0, err
    image = sorted(tiny.images.iterdir())[0]
    assert isnet("predict", image, "--model", out)[0] == 0
    side = sidecar_path(out)
    meta = json.loads(side.read_text())
    meta["classes"] = list(reversed(meta["classes"]))  # a sidecar that would swap every label
    side.write_text(json.dumps(meta))
    code, _, err = isnet("predict", image, "--model", out)
    assert code == 2 and "model.onnx.json does not match the model (different classes)" in err
    # a sidecar from a 3-class export: refused even where the ONNX file carries no metadata of its own
    side.write_text(json.dumps({**meta, "classes": ["a", "b", "c"], "num_classes": 3}))
    code, _, err = isnet("predict", image, "--model", out)
    assert code == 2 and "does not match the model" in err
