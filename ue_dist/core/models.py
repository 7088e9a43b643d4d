"""Classifier architectures (victims, source models, embedding models).

All take float images in [0, 1] (normalisation is the model's first layer) and return logits.
``build_model(arch, num_classes, in_channels, image_size)`` is the one entry point. For small
inputs (<= 64 px) every network uses its CIFAR variant, as the papers' victims do: a 3x3
stride-1 stem and no max-pool (ResNet, DenseNet), stride 1 in the first stages (MobileNetV2),
a linear head on the pooled 512 features (VGG). torchvision supplies ResNet, VGG, DenseNet and
MobileNetV2; the WideResNet (Zagoruyko & Komodakis, 2016; WRN-34-10 in the REM paper,
WRN-28-10 in the GUE paper) is written here because torchvision's ``wide_resnet`` is the
ImageNet bottleneck design, not the CIFAR one.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

import ue_dist  # noqa: F401  (torchvision import fix runs on package import)
import torchvision

from ue_dist.core.config import SettingsError


class Normalize(nn.Module):
    def __init__(self, channels: int, mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), mean))
        self.register_buffer("std", torch.full((1, channels, 1, 1), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Four conv layers + linear head: quick runs and tests (~0.3 M parameters at 32x32)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width), block(width, width), nn.MaxPool2d(2),
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding_dim = 4 * width
        self.fc = nn.Linear(4 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ResNet (torchvision) ---------------------------------------------------------------------------
def _cifar_stem(model: nn.Module, in_channels: int, small_input: bool) -> nn.Module:
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        ctor = getattr(torchvision.models, f"resnet{depth}")
        return _cifar_stem(ctor(num_classes=num_classes), in_channels, image_size <= 64)
    return build


# VGG (torchvision layers, CIFAR head) -------------------------------------------------------------
class VGG(nn.Module):
    """VGG with batch norm; CIFAR variant: conv stack -> global pool -> one linear layer (512->k)."""

    def __init__(self, cfg: str, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs[cfg], batch_norm=True)
        if in_channels != 3:
            features[0] = nn.Conv2d(in_channels, features[0].out_channels, 3, padding=1)
        # a max-pool that would shrink the map below 1x1 (tiny inputs, e.g. 8x8 digits) is dropped
        size = image_size
        for i, layer in enumerate(features):
            if isinstance(layer, nn.MaxPool2d):
                if size < 2:
                    features[i] = nn.Identity()
                else:
                    size //= 2
        self.features = features
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(512, num_classes)
        if image_size > 64:  # ImageNet-size input: the original 3-layer head
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten())
            self.classifier = nn.Sequential(
                nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _vgg(cfg: str) -> Callable[..., nn.Module]:
    return lambda k, c, s: VGG(cfg, k, c, s)


# DenseNet-121 (torchvision) --------------------------------------------------------------------
def _densenet121(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = torchvision.models.densenet121(num_classes=num_classes)
    init = model.features.conv0.out_channels
    if image_size <= 64:
        model.features.conv0 = nn.Conv2d(in_channels, init, 3, 1, 1, bias=False)
        model.features.pool0 = nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, init, 7, 2, 3, bias=False)
    return model


# MobileNetV2 (torchvision) ---------------------------------------------------------------------
# t (expansion), c (channels), n (repeats), s (stride); CIFAR variant: stride 1 in the stem and
# in the 24-channel stage, so a 32x32 input ends at 4x4 as in the common CIFAR implementations.
_MOBILENET_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _mobilenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    small = image_size <= 64
    model = torchvision.models.MobileNetV2(
        num_classes=num_classes, inverted_residual_setting=_MOBILENET_CIFAR if small else None)
    stem = model.features[0][0]
    if small or in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3,
                                         1 if small else 2, 1, bias=False)
    return model


# WideResNet (CIFAR design, written here) --------------------------------------------------------
class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ 1x1 shortcut on change)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if (cin == cout and stride == 1) else \
            nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(torch.relu(self.bn2(o))))
        return o + skip


class WideResNet(nn.Module):
    """WRN-depth-k: three groups of (depth-4)/6 blocks with widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10 or widen < 1:
            raise ValueError(f"WideResNet depth must be 6n+4 (>= 10) and width >= 1, "
                             f"got depth={depth}, width={widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                         stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(o, 1), 1))


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    return lambda k, c, s: WideResNet(depth, widen, k, c)


_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")

ARCHITECTURES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small-cnn": lambda k, c, s: SmallCNN(k, c),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "vgg11": _vgg("A"),  # DeepConfuse's classifier
    "vgg16": _vgg("D"),
    "vgg19": _vgg("E"),
    "densenet121": _densenet121,
    "mobilenetv2": _mobilenet_v2,
    "wrn-28-10": _wrn(28, 10),
    "wrn-34-10": _wrn(34, 10),
    "wrn-16-2": _wrn(16, 2),  # small WideResNet for quick runs
}


class WithNormalize(nn.Sequential):
    """``Normalize`` then the network; ``.net`` is the bare network (for ``embed``)."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__(Normalize(channels), net)

    @property
    def net(self) -> nn.Module:
        return self[1]


def architecture_names() -> list[str]:
    return sorted(ARCHITECTURES)


def check_arch(arch: str) -> None:
    """Raise ``SettingsError`` (a ``ValueError``) listing the valid names for an unknown one."""
    if arch in ARCHITECTURES:
        return
    m = _WRN_NAME.match(str(arch))
    if m and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10 and int(m.group(2)) >= 1:
        return
    raise SettingsError(f"unknown architecture {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))} "
                     "(or any wrn-DEPTH-WIDTH with DEPTH = 6n+4)")


def build_model(arch: str, num_classes: int, in_channels: int = 3,
                image_size: int = 32) -> nn.Module:
    check_arch(arch)
    if arch in ARCHITECTURES:
        net = ARCHITECTURES[arch](num_classes, in_channels, image_size)
    else:
        m = _WRN_NAME.match(arch)
        net = WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
    return WithNormalize(net, in_channels)
