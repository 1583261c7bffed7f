"""Checkpoints: round trip, metadata without torch, model resolution, bad files, permissions, pretrained layout."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from isnet_cli.backbones import build_model
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import load_checkpoint, read_meta, resolve_model, save_checkpoint


def test_checkpoint_round_trip_and_metadata_without_torch_weights(tmp_path) -> None:
    model = build_model("tinyresnet", 2).eval()
    path = save_checkpoint(
        tmp_path / "run" / "best.safetensors",
        model,
        {"arch": "tinyresnet", "num_classes": 2, "classes": ["normal", "opacity"]},
    )
    loaded, meta = load_checkpoint(path)
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta["classes"] == ["normal", "opacity"] and read_meta(path)["versions"]["torch"] == torch.__version__
    assert not list(path.parent.glob("*.tmp")), "atomic write leaves no temp file"
    assert resolve_model(path.parent) == path
    assert resolve_model(None, runs_dir=tmp_path) == path


def test_bad_model_files_are_one_line_input_errors(tmp_path) -> None:
    not_ckpt = tmp_path / "x.safetensors"
    not_ckpt.write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(InputError, match="not an isnet checkpoint"):
        read_meta(not_ckpt)
    with pytest.raises(InputError, match="model not found"):
        resolve_model(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="no trained model found"):
        resolve_model(None, runs_dir=tmp_path / "runs")
    wrong = tmp_path / "w.safetensors"
    save_checkpoint(wrong, build_model("tinycnn", 2), {"arch": "tinycnn", "num_classes": 2, "classes": ["a", "b"]})
    raw = wrong.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["isnet"])
    meta["arch"] = "tinyresnet"
    header["__metadata__"]["isnet"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    wrong.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(InputError, match="weights do not match architecture 'tinyresnet'"):
        load_checkpoint(wrong)


def test_checkpoint_file_is_readable_by_others(tmp_path) -> None:
    path = save_checkpoint(
        tmp_path / "best.safetensors",
        build_model("tinycnn", 2),
        {"arch": "tinycnn", "num_classes": 2, "classes": ["a", "b"]},
    )
    assert path.stat().st_mode & 0o044 == 0o044, "mkstemp's 0600 must not leak into written files"


def test_checkpoint_of_a_pretrained_run_reloads_without_download(tmp_path) -> None:
    # a pretrained run's first conv carries the folded ImageNet bias; a plain build has none
    model = build_model("resnet18", 2, pretrained_layout=True).eval()
    assert model.conv1.bias is not None and build_model("resnet18", 2).conv1.bias is None
    meta = {"arch": "resnet18", "num_classes": 2, "classes": ["a", "b"], "pretrained": True}
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "best.safetensors", model, meta))
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_newest_run_is_chosen_per_task(tmp_path) -> None:
    """A segmenter trained after a classifier is not what `isnet predict` picks up, and vice versa."""
    import os

    from isnet_cli.infer.checkpoint import TASK_CLASSIFICATION, TASK_SEGMENTATION

    runs = tmp_path / "runs"
    meta = {"arch": "tinycnn", "num_classes": 2, "classes": ["a", "b"]}
    for n, (name, task) in enumerate((("classifier", None), ("segmenter", TASK_SEGMENTATION))):
        (runs / name).mkdir(parents=True)
        path = save_checkpoint(runs / name / "best.safetensors", build_model("tinycnn", 2), {**meta, "task": task})
        os.utime(path, (1_000_000 + n, 1_000_000 + n))  # the segmenter is the newer run
    (runs / "broken").mkdir()
    (runs / "broken" / "best.safetensors").write_bytes(b"not a checkpoint")
    os.utime(runs / "broken" / "best.safetensors", (900_000, 900_000))
    assert resolve_model(None, runs_dir=runs, task=TASK_CLASSIFICATION) == runs / "classifier" / "best.safetensors"
    assert resolve_model(None, runs_dir=runs, task=TASK_SEGMENTATION) == runs / "segmenter" / "best.safetensors"
    with pytest.raises(InputError, match="no trained segmenter found"):
        resolve_model(None, runs_dir=runs / "classifier", task=TASK_SEGMENTATION)
