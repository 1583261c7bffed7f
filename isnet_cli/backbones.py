"""Classifier architectures and the input contract they share: (B, in_channels, S, S) in [0, 1].

Every model built here is LRP-ready: no in-place operations, and ImageNet normalisation (when
pretrained weights are used) is folded into the first convolution, so inputs stay in [0, 1] and the
LRP-zB bounds of the first layer stay exact.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv

from isnet_cli.errors import InputError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU stages, global average pool, linear head: for demos and tests at 32-96 px."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A stem and three residual stages (16-32-64 channels): ResNet structure at demo size."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = _BasicBlock(w, w, 1)
        self.layer2 = _BasicBlock(w, 2 * w, 2)
        self.layer3 = _BasicBlock(2 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


# name -> (torchvision constructor, its ImageNet weights enum); None for the project's own small models.
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], object]] = {
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv.resnet50, tv.ResNet50_Weights.IMAGENET1K_V1),
    "densenet121": (tv.densenet121, tv.DenseNet121_Weights.IMAGENET1K_V1),
    "vgg11_bn": (tv.vgg11_bn, tv.VGG11_BN_Weights.IMAGENET1K_V1),
    "vgg16_bn": (tv.vgg16_bn, tv.VGG16_BN_Weights.IMAGENET1K_V1),
    "efficientnet_b0": (tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "mobilenet_v3": (tv.mobilenet_v3_large, tv.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
}
_OWN: dict[str, type[nn.Module]] = {"tinycnn": TinyCNN, "tinyresnet": TinyResNet}
ARCHITECTURES: tuple[str, ...] = tuple(_OWN) + tuple(_TORCHVISION)


def build_model(
    arch: str, num_classes: int, in_channels: int = 1, pretrained: bool = False, pretrained_layout: bool = False
) -> nn.Module:
    """Build `arch` for `num_classes` outputs on `in_channels`-channel inputs in [0, 1], LRP-ready.

    `arch` is a name from `ARCHITECTURES` or `package.module:factory`, a user's function called as
    `factory(num_classes=..., in_channels=...)` that returns an nn.Module. `pretrained_layout` builds
    the layer layout of a `pretrained` model (first conv with the folded-normalisation bias) without
    downloading anything: what loading a checkpoint of a pretrained run needs.
    """
    if ":" in arch:
        model = _user_model(arch, num_classes, in_channels)
    elif arch in _OWN:
        if pretrained:
            raise InputError(None, f"--pretrained: no ImageNet weights exist for '{arch}'", "drop --pretrained")
        model = _OWN[arch](num_classes=num_classes, in_channels=in_channels)
    elif arch in _TORCHVISION:
        model = _torchvision_model(arch, num_classes, in_channels, pretrained, pretrained_layout)
    else:
        raise InputError(
            None, f"unknown architecture '{arch}'", f"use one of {', '.join(ARCHITECTURES)} or module:callable"
        )
    return make_lrp_ready(model)


def default_lds_layers(arch: str, model: nn.Module) -> list[str] | None:
    """Hidden layers for LRP deep supervision, as the reference chooses them, or None (no default).

    ResNets: the outputs of the residual stages; DenseNet-121: each transition's ReLU and the final
    ReLU (the functional `relu` node); VGG and TinyCNN: every max pool. Others need --lds-layers.
    """
    if arch.startswith("resnet") or arch == "tinyresnet":
        return [name for name, _ in model.named_children() if name.startswith("layer")]
    if arch == "densenet121":
        return [f"features.transition{i}.relu" for i in (1, 2, 3)] + ["relu"]
    if arch.startswith("vgg") or arch == "tinycnn":
        return [name for name, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    return None


def make_lrp_ready(model: nn.Module) -> nn.Module:
    """Switch every in-place activation to out-of-place: LRP needs each stored activation intact."""
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def _user_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(
            None, f"cannot import architecture '{spec}' ({exc})", "check the module:callable path"
        ) from exc
    model = factory(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise ModelError(f"architecture '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(
    arch: str, num_classes: int, in_channels: int, pretrained: bool, pretrained_layout: bool
) -> nn.Module:
    constructor, weights = _TORCHVISION[arch]
    if not pretrained:
        model = constructor(num_classes=num_classes)
        replace_first_conv(model, in_channels, fold_imagenet=False, bias=pretrained_layout)
        return model
    try:
        model = constructor(weights=weights)
    except OSError as exc:  # URLError is an OSError: no network, or the hub is unreachable
        raise InputError(
            None,
            f"--pretrained: cannot download the ImageNet weights for '{arch}' ({exc})",
            "connect to the internet once (torchvision caches them in ~/.cache/torch) or train without --pretrained",
        ) from exc
    _replace_head(model, num_classes)
    replace_first_conv(model, in_channels, fold_imagenet=True)
    return model


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, child, module
    raise ModelError("model has no Conv2d layer to adapt to the input channels")


def replace_first_conv(model: nn.Module, in_channels: int, fold_imagenet: bool, bias: bool = False) -> None:
    """Give the first conv `in_channels` inputs; with ImageNet weights, fold the normalisation into it.

    A grey image x repeated to RGB and normalised, (x - m_c) / s_c, gives
    conv(x) = sum_c (W_c / s_c) * x + (b - sum_{c,k} W_c m_c / s_c),
    so the new weights are sum_c W_c / s_c (spread over `in_channels`) and the bias absorbs the means.
    An RGB input (`in_channels` 3) keeps the pretrained filters per channel: W_c / s_c, same bias.
    (At zero-padded borders the folded conv sees 0 instead of the normalised mean: a one-pixel rim differs.)
    """
    parent, child, conv = _first_conv(model)
    bias = bias or fold_imagenet or conv.bias is not None
    if conv.in_channels == in_channels and bias == (conv.bias is not None) and not fold_imagenet:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=1,
        bias=bias,
    )
    if fold_imagenet:
        with torch.no_grad():
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            scaled = conv.weight / std
            if in_channels == 3:
                new.weight.copy_(scaled)
            else:
                new.weight.copy_(scaled.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
            old_bias = conv.bias.clone() if conv.bias is not None else torch.zeros(conv.out_channels)
            new.bias.copy_(old_bias - (scaled * mean).sum((1, 2, 3)))
    setattr(parent, child, new)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer of a pretrained model for one with `num_classes` outputs."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise ModelError("pretrained model has no Linear classifier head to replace")
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes))
