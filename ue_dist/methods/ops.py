"""OPS: One-Pixel Shortcut (model-free, L0).

Wu, Chen, Xie & Huang, "One-Pixel Shortcut: on the Learning Preference of Deep Neural
Networks", ICLR 2023; official code github.com/cychomatica/One-Pixel-Shotcut (``perturb.py``:
``pixel_search``; the same search in APBench, ``attack/ops_poisons.py``).

Threat model: L0. Every image of class ``y`` has ``pixels`` (paper: 1) pixel locations set to
a class-wise colour at class-wise positions; each such pixel may change by the full range
(``eps = 1``: ``floor(255 eps) = 255`` levels per channel), no other pixel changes. The shared
contract's ``norm = l0`` enforces at most ``pixels`` changed ``(h, w)`` locations per image (a
location counts when any of its channels changes).

The search (``fit``), per class in label order, as the official code: for every location ``p``
and every boundary colour ``v in {0, 1}^C`` (``2^C`` colours; channel 0 the most significant
bit), the score is ``mean / std`` of ``|v - x[p]|`` over the class's images and channels (the
change the colour makes: large and consistent across the class); the ``(p, v)`` pairs taken by
earlier classes score 0; the class takes its ``pixels`` best pairs. ``perturb`` sets those
pixels of each image to the colour (``delta = v - x[p]``), a lookup by label.

Differences from the official code: (1) a zero ``std`` (a colour that changes every image of the
class by the same amount) scores ``+inf`` when the change is positive and 0 when there is none;
the code divides by zero (``inf`` or ``nan``, and numpy's sort puts a ``nan``, a colour that
changes nothing, at the top). (2) Ties (common on synthetic or near-binary images, rare on
CIFAR) go to the location nearest the image centre, then to the lowest index, where the code
takes numpy's unspecified sort order; a central location survives random crops more often.
(3) With ``pixels > 1`` the class's best pairs at distinct locations are taken (the code may pick
one location twice, the later colour winning). (4) Any number of classes and channels (the code:
10 classes, 3 channels).

Shapes: positions ``K x pixels x 2`` int64 (row, column), colours ``K x pixels x C`` float32 in
{0, 1}; images ``B x C x H x W``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext
from ue_dist.core.settings import Setting, choice, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register
from ue_dist.methods.lsp import check_labels


def boundary_colours(channels: int) -> torch.Tensor:
    """The ``2^C x C`` colours with every channel 0 or 1, channel 0 the most significant bit."""
    codes = torch.arange(2 ** channels)
    bits = [(codes >> (channels - 1 - c)) & 1 for c in range(channels)]
    return torch.stack(bits, dim=1).float()


def scores(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """``(H*W) x 2^C`` search scores of one class's ``n x C x H x W`` images in [0, 1]:
    ``mean / std`` of ``|v - x[p]|`` over images and channels (population std, as numpy)."""
    n, c, h, w = images.shape
    x = images.double().permute(2, 3, 0, 1).reshape(h * w, n * c)  # HW x (n C)
    out = torch.empty((h * w, len(colours)), dtype=torch.float64)
    for i, v in enumerate(colours.double()):
        diff = (v.repeat(n)[None, :] - x).abs()  # HW x (n C), channel order matches x
        mean, std = diff.mean(dim=1), diff.std(dim=1, unbiased=False)
        ratio = mean / std.clamp_min(1e-300)
        out[:, i] = torch.where(std > 1e-12, ratio,
                                torch.where(mean > 1e-12, torch.inf, torch.zeros_like(mean)))
    return out


def pixel_search(images: torch.Tensor, labels: torch.Tensor, num_classes: int, pixels: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official greedy search: per class ``pixels`` (location, colour) pairs; returns
    positions ``K x pixels x 2`` and colours ``K x pixels x C``."""
    _, c, h, w = images.shape
    colours = boundary_colours(c)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = ((rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2).flatten()  # HW
    taken = torch.zeros((h * w, len(colours)), dtype=torch.bool)
    positions = torch.zeros((num_classes, pixels, 2), dtype=torch.long)
    chosen = torch.zeros((num_classes, pixels, c))
    for k in range(num_classes):
        mine = images[labels == k]
        if len(mine) == 0:
            raise SettingsError(f"ops: class {k} has no training image to search its pixel on")
        score = scores(mine, colours).masked_fill(taken, 0.0)
        # best score first; ties to the location nearest the centre, then the lowest index
        flat = score.flatten().numpy()
        dist = centre.repeat_interleave(len(colours)).numpy()
        order = np.lexsort((np.arange(flat.size), dist, -flat))  # last key first
        used: set[int] = set()
        for i in order.tolist():
            point, value = divmod(i, len(colours))
            if point in used:
                continue
            j = len(used)
            used.add(point)
            taken[point, value] = True
            positions[k, j] = torch.tensor(divmod(point, w))
            chosen[k, j] = colours[value]
            if len(used) == pixels:
                break
    return positions, chosen


@register
class OnePixelShortcut(Method):
    name = "ops"
    kind, year, needs_labels = "model-free", 2023, True
    paper = ("Wu et al., One-Pixel Shortcut: on the Learning Preference of Deep Neural Networks, "
             "ICLR 2023")
    presets = {
        # the official code's default (--sparsity 1): one pixel, the full range
        "paper": {"eps": 1.0, "norm": "l0", "pixels": 1},
        # model-free: the search is one pass over the training set
        "quick": {"eps": 1.0, "norm": "l0", "pixels": 1},
    }
    needs_fit = True
    declared = {
        "eps": Setting("radius", "largest change of a chosen pixel's channel ([0, 1] scale; "
                       "paper: 1, the full range)", protect_time=True),
        "norm": choice("l0", help="the bound is L0: at most `pixels` changed locations/image"),
        "pixels": positive_int("pixel locations changed per image (paper: 1; the code's "
                               "--sparsity)"),
    }

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        k, pixels = int(train.num_classes), int(self.settings["pixels"])
        c, h, w = train.image_shape
        if pixels > h * w:
            raise SettingsError(f"ops: pixels={pixels} exceeds the {h} x {w} image")
        positions, colours = pixel_search(train.images.float() / 255.0, train.labels.long(), k,
                                          pixels)
        ctx.log(f"ops: {k} classes, {pixels} pixel(s) each, first class at "
                f"{positions[0, 0].tolist()} colour {colours[0, 0].tolist()}")
        return self.new_state(train, positions=positions, colours=colours)

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        positions, colours = state.get("positions"), state.get("colours")
        if not isinstance(positions, torch.Tensor) or positions.ndim != 3 or \
                not isinstance(colours, torch.Tensor) or colours.ndim != 3:
            raise StateError("ops state has no K x pixels x 2 'positions' and K x pixels x C "
                             "'colours' tensors")
        c, h, w = (int(v) for v in state["image_shape"])
        if positions.shape[:2] != colours.shape[:2] or colours.shape[2] != c or \
                int(positions[..., 0].max()) >= h or int(positions[..., 1].max()) >= w or \
                int(positions.min()) < 0:
            raise StateError("ops state's positions/colours do not fit its image shape")
        return positions.to(device).long(), colours.to(device).float()

    def perturb(self, loaded: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        positions, colours = loaded
        check_labels(labels, positions.shape[0], self.name)
        y = labels.long().to(positions.device)
        out = images.clone()
        batch = torch.arange(len(images), device=images.device)
        for j in range(positions.shape[1]):
            rows, cols = positions[y, j, 0], positions[y, j, 1]
            out[batch, :, rows, cols] = colours[y, j].to(images.dtype)
        return out - images
