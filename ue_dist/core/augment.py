"""Per-sample, differentiable training augmentation: random crop with padding + horizontal flip.

Used as the EOT distribution of REM (every sample gets its own crop offset and flip, gradients
flow back to the input) and as the standard augmentation of victim training. Implemented with
integer index gathers, so a crop is an exact pixel shift (no interpolation) and a batch of
``J x B`` views costs one gather.

Two levels of API:

* ``augment(x, kind)`` / ``random_crop_flip(x)``: sample and apply in one call.
* ``sample_params(kind, n)`` + ``apply_params(x, params)``: the parameters as plain tensors, so a
  caller can draw them once and apply them to a batch of ``J x B`` views in one go, or view by
  view (tests compare the two), or replay them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ue_dist.core.transfer import to_device

AUGMENTATIONS = ("crop-flip", "flip", "none")


def _check_kind(kind: str) -> None:
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")


def crop_flip_params(batch: int, pad: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", flip: bool = True):
    # drawn on the CPU (where a CPU generator lives), then moved: same numbers on any device
    offsets = to_device(torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator,
                                       device="cpu"), device)
    flips = (to_device(torch.rand(batch, generator=generator, device="cpu") < 0.5, device)
             if flip else torch.zeros(batch, dtype=torch.bool, device=device))
    return offsets, flips


def apply_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                    pad: int) -> torch.Tensor:
    """Crop ``x`` (B,C,H,W) at per-sample ``offsets`` of its zero-padded version, then flip."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        # gather rows then columns: two cheap gathers for the whole batch, fully differentiable
        xp = torch.gather(xp, 2, rows.expand(b, c, h, w + 2 * pad))
        x = torch.gather(xp, 3, cols.expand(b, c, h, w))
    return torch.where(flips.view(b, 1, 1, 1), x.flip(-1), x)


def random_crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    offsets, flips = crop_flip_params(x.shape[0], pad, generator, x.device, flip)
    return apply_crop_flip(x, offsets, flips, pad)


@dataclass
class AugParams:
    """Per-sample parameters of one augmentation draw (``offsets`` N x 2, ``flips`` N) and,
    for defence-aware EOT, the view of each sample: ``choice`` N, 0 = the image itself,
    ``i`` = ``views[i - 1]`` (differentiable defences, ``core.defenses.eot_view``), applied
    before the crop and flip as a victim pre-processes its data before augmenting it."""

    kind: str
    pad: int
    offsets: torch.Tensor | None = None
    flips: torch.Tensor | None = None
    views: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    choice: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.flips is not None:
            return int(self.flips.shape[0])
        return 0 if self.choice is None else int(self.choice.shape[0])

    def slice(self, start: int, stop: int) -> "AugParams":
        choice = None if self.choice is None else self.choice[start:stop]
        if self.kind == "none":
            return AugParams(self.kind, self.pad, views=self.views, choice=choice)
        return AugParams(self.kind, self.pad, self.offsets[start:stop], self.flips[start:stop],
                         self.views, choice)


def sample_params(kind: str, n: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", pad: int = 4,
                  views: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()) -> AugParams:
    """Independent parameters for ``n`` samples of augmentation ``kind``; with ``views``, each
    sample also draws one of the image itself and the views, uniformly (drawn after the crops,
    so without views the draws are what they always were)."""
    _check_kind(kind)
    if kind == "none":
        params = AugParams(kind, 0)
    else:
        crop_pad = pad if kind == "crop-flip" else 0
        offsets, flips = crop_flip_params(n, crop_pad, generator, device, True)
        params = AugParams(kind, crop_pad, offsets, flips)
    if views:
        params.views = tuple(views)
        params.choice = to_device(torch.randint(0, len(views) + 1, (n,), generator=generator,
                                                device="cpu"), device)
    return params


def apply_views(x: torch.Tensor, views: tuple[Callable[[torch.Tensor], torch.Tensor], ...],
                choice: torch.Tensor) -> torch.Tensor:
    """Each sample through its chosen view (0: unchanged), differentiably."""
    out = x
    for i, view in enumerate(views, start=1):
        idx = (choice == i).nonzero().flatten()
        if len(idx):
            out = out.index_put((idx,), view(x[idx]).to(x.dtype))
    return out


def defended(x: torch.Tensor, views: tuple, generator: torch.Generator | None) -> torch.Tensor:
    """Each image through the image itself or one of ``views`` (defence-aware EOT,
    ``core.defenses.eot_views``), drawn per sample as a defending victim's pipeline would
    apply them; ``x`` unchanged (and no draw made) without views."""
    if not views:
        return x
    return apply_params(x, sample_params("none", len(x), generator, x.device, views=views))


def apply_params(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    if len(params) and len(params) != x.shape[0]:
        raise ValueError(f"augmentation parameters for {len(params)} samples, batch has {x.shape[0]}")
    if params.views:
        x = apply_views(x, params.views, params.choice)
    if params.kind == "none":
        return x
    return apply_crop_flip(x, params.offsets, params.flips, params.pad)


def augment(x: torch.Tensor, kind: str = "crop-flip", generator: torch.Generator | None = None,
            pad: int = 4) -> torch.Tensor:
    _check_kind(kind)
    if kind == "none":
        return x
    return apply_params(x, sample_params(kind, x.shape[0], generator, x.device, pad))


def default_augmentation(image_size: int) -> str:
    """The dataset's training augmentation: crop(pad 4)+flip for 32x32-like images."""
    return "crop-flip" if image_size >= 16 else "flip"


def resolve_augmentation(kind: str, image_size: int) -> str:
    """``auto`` -> the dataset's training augmentation; anything else must be a known kind."""
    if kind == "auto":
        return default_augmentation(image_size)
    _check_kind(kind)
    return kind
