"""Architectures build for 1-channel inputs, ImageNet folding is exact, user factories are LRP-ready."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tv

from isnet_cli.backbones import IMAGENET_MEAN, IMAGENET_STD, build_model, replace_first_conv
from isnet_cli.errors import InputError
from isnet_cli.lrp import LRP


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
    replace_first_conv(grey, in_channels=1, fold_imagenet=True)

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
    """`module:callable` builds the user's model for the run's classes and channels, made ready for LRP."""
    model = build_model("tests.test_backbones:small_factory", num_classes=4, in_channels=2).eval()
    assert isinstance(model[0], nn.Conv2d) and model[0].in_channels == 2
    assert not any(getattr(m, "inplace", False) for m in model.modules()), "in-place ReLU would corrupt LRP"
    x = torch.rand(3, 2, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 4)
    lrp = LRP(model)
    with torch.no_grad():
        relevance = lrp(x, "predicted")
    assert relevance.shape == x.shape and torch.equal(lrp.logits, logits)


def small_factory(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(num_classes))
