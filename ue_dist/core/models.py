"""Classifier architectures (victims, source models, embedding models).

All take float images in [0, 1] (normalisation is the model's first layer) and return logits.
``build_model(arch, num_classes, in_channels, image_size)`` is the one entry point; the CIFAR
variants use a 3x3 stride-1 stem and no max-pool, as the papers' victims do.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import ue_dist  # noqa: F401  (torchvision import fix runs on package import)
import torchvision


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


ARCHITECTURES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small-cnn": lambda k, c, s: SmallCNN(k, c),
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
}


class WithNormalize(nn.Sequential):
    """``Normalize`` then the network; ``.net`` is the bare network (for ``embed``)."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__(Normalize(channels), net)

    @property
    def net(self) -> nn.Module:
        return self[1]


def build_model(arch: str, num_classes: int, in_channels: int = 3,
                image_size: int = 32) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    return WithNormalize(ARCHITECTURES[arch](num_classes, in_channels, image_size), in_channels)
