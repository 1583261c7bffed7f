"""Architectures build for 1-channel inputs, ImageNet folding is exact, checkpoints round-trip safely."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn
from torchvision import models as tv

from isnet_cli.backbones import IMAGENET_MEAN, IMAGENET_STD, _replace_first_conv, build_model
from isnet_cli.errors import InputError
from isnet_cli.infer.checkpoint import load_checkpoint, read_meta, resolve_model, save_checkpoint


@pytest.mark.parametrize("arch", ["tinycnn", "tinyresnet", "resnet18", "vgg11_bn", "mobilenet_v3_small"])
def test_build_gives_one_channel_logits_and_no_inplace(arch: str) -> None:
    model = build_model(arch, num_classes=3).eval()
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_imagenet_normalisation_folded_into_first_conv_is_exact_away_from_the_border() -> None:
    torch.manual_seed(0)
    rgb = tv.resnet18(num_classes=2)
    reference_conv = rgb.conv1
    grey = tv.resnet18(num_classes=2)
    grey.conv1.load_state_dict(reference_conv.state_dict())
    _replace_first_conv(grey, in_channels=1, fold_imagenet=True)

    x = torch.rand(2, 1, 48, 48)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = reference_conv((x.repeat(1, 3, 1, 1) - mean) / std)
    got = grey.conv1(x)
    # 7x7 kernel, padding 3, stride 2: outputs 2..-2 never touch the zero padding
    torch.testing.assert_close(got[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-4, rtol=1e-4)


def test_unknown_architecture_and_bad_factory_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown architecture 'resnet9'"):
        build_model("resnet9", 2)
    with pytest.raises(InputError, match="cannot import architecture"):
        build_model("no_such_module_xyz:make", 2)


def test_user_factory_architecture() -> None:
    model = build_model("tests.test_backbones:small_factory", num_classes=4, in_channels=1)
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 4)


def small_factory(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(num_classes))


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
