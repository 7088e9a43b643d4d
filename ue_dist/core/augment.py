"""Per-sample, differentiable training augmentation: random crop with padding + horizontal flip.

Used as the EOT distribution of REM (every sample gets its own crop offset and flip, gradients
flow back to the input) and as the standard augmentation of victim training. Implemented with
integer index gathers, so a crop is an exact pixel shift (no interpolation) and a batch of
``J x B`` views costs one gather.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip_params(batch: int, pad: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", flip: bool = True):
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device="cpu").to(device)
    flips = (torch.rand(batch, generator=generator, device="cpu") < 0.5).to(device) if flip else \
        torch.zeros(batch, dtype=torch.bool, device=device)
    return offsets, flips


def apply_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                    pad: int) -> torch.Tensor:
    """Crop ``x`` (B,C,H,W) at per-sample ``offsets`` of its zero-padded version, then flip."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        # gather rows then columns: two cheap index_selects per sample, fully differentiable
        xp = torch.gather(xp, 2, rows.expand(b, c, h, w + 2 * pad))
        x = torch.gather(xp, 3, cols.expand(b, c, h, w))
    return torch.where(flips.view(b, 1, 1, 1), x.flip(-1), x)


def random_crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    offsets, flips = crop_flip_params(x.shape[0], pad, generator, x.device, flip)
    return apply_crop_flip(x, offsets, flips, pad)


AUGMENTATIONS = ("crop-flip", "flip", "none")


def augment(x: torch.Tensor, kind: str = "crop-flip", generator: torch.Generator | None = None,
            pad: int = 4) -> torch.Tensor:
    if kind == "crop-flip":
        return random_crop_flip(x, pad, True, generator)
    if kind == "flip":
        return random_crop_flip(x, 0, True, generator)
    if kind == "none":
        return x
    raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")


def default_augmentation(image_size: int) -> str:
    """The dataset's training augmentation: crop(pad 4)+flip for 32x32-like images."""
    return "crop-flip" if image_size >= 16 else "flip"
