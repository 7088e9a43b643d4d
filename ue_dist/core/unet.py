"""The GUE poison generator: a small U-Net whose output is ``eps * tanh(.)``.

Architecture as in the GUE authors' generator (Liu et al., "Game-Theoretic Unlearnable Example
Attacks", AAAI 2024): four encoder stages of (3x3 conv + BN + ReLU) x 2 at widths w, 2w, 4w, 8w
with 2x2 average pooling between them, three decoder stages that upsample bilinearly and
concatenate the skip connection, and a 1x1 conv + BN + tanh head. At ``width=64`` and three
input channels this has 7.79 M parameters (the paper's size).

Input: images ``B x C x H x W`` in [0, 1] (any H, W >= 1: the decoder upsamples to each skip's
exact size). Output: the perturbation ``delta`` of the same shape with ``|delta| <= eps`` by
construction (tanh; computed in fp32 even under bf16 autocast). ``perturbed(x)`` also clamps
``x + delta`` to the image range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ue_dist.core.precision import upcast


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetGenerator(nn.Module):
    def __init__(self, channels: int = 3, eps: float = 8 / 255, width: int = 64) -> None:
        super().__init__()
        if channels < 1 or width < 1:
            raise ValueError(f"UNetGenerator needs channels >= 1 and width >= 1, "
                             f"got channels={channels}, width={width}")
        if not eps > 0:
            raise ValueError(f"UNetGenerator needs eps > 0, got {eps}")
        self.channels, self.width, self.eps = int(channels), int(width), float(eps)
        w = self.width
        self.down1 = double_conv(channels, w)
        self.down2 = double_conv(w, 2 * w)
        self.down3 = double_conv(2 * w, 4 * w)
        self.bottom = double_conv(4 * w, 8 * w)
        self.up3 = double_conv(8 * w + 4 * w, 4 * w)
        self.up2 = double_conv(4 * w + 2 * w, 2 * w)
        self.up1 = double_conv(2 * w + w, w)
        self.head = nn.Sequential(nn.Conv2d(w, channels, 1), nn.BatchNorm2d(channels))
        # ceil_mode: odd sizes keep at least one pixel; identical to plain 2x2 pooling on even sizes
        self.pool = nn.AvgPool2d(2, ceil_mode=True)

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # upsample to the skip's exact size, so odd image sizes work too
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([x, skip], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The perturbation ``delta`` (``|delta| <= eps``), not the perturbed image."""
        s1 = self.down1(x)
        s2 = self.down2(self.pool(s1))
        s3 = self.down3(self.pool(s2))
        h = self.bottom(self.pool(s3))
        h = self.up3(self._up(h, s3))
        h = self.up2(self._up(h, s2))
        h = self.up1(self._up(h, s1))
        # the head's output in fp32 (a no-op in fp32): under bf16 autocast, eps * tanh rounded to
        # bf16 could exceed eps by up to 2^-9 relative; in fp32 the bound holds as before
        return self.eps * torch.tanh(upcast(self.head(h)))

    def perturbed(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self(x)).clamp(0.0, 1.0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
