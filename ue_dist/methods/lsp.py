"""LSP: linearly separable synthetic patches (model-free, L2).

Yu, Zhang, Chen, Yin & Liu, "Availability Attacks Create Shortcuts", KDD 2022, Section 5
("synthetic perturbations"); official code github.com/dayu11/Availability-Attacks-Create-Shortcuts
(``synthetic_perturbations/cifar_train.py``), the same code in APBench (``attack/lsp_poisons.py``).

Threat model: L2. Every image of class ``y`` gets the same pattern ``eps * P_y``, ``|P_y|_2 = 1``
over the whole ``C x H x W`` image on the [0, 1] scale (the contract's ``norm = l2`` keeps
``|x' - x|_2 <= eps`` after rounding). No model is involved: the patterns are a linearly
separable shortcut the victim learns instead of the images.

How a pattern is made (as the official code): a point of ``F = ceil(H/p) * ceil(W/p) * C``
features is drawn from its class's Gaussian cluster as scikit-learn's ``make_classification``
does with the code's arguments (``n_informative = F``, ``class_sep = 10``, one cluster per class:
the centroid a vertex of the hypercube ``{-class_sep, +class_sep}^F`` — distinct per class where
``2^F`` allows —, plus ``z @ A``, ``z ~ N(0, I)``, ``A`` uniform in ``[-1, 1]^{F x F}`` per
class); each feature is repeated over a ``p x p`` patch, the image cropped to ``H x W`` and
scaled to L2 norm ``eps``. Defaults from the code: ``p = 8`` (``--patchsize``) and ``eps = sqrt(3072) *
6/255 = 1.3041`` (``--eps 6``: the L2 norm of an L-inf 6/255 change of every CIFAR pixel,
``comput_l2norm_lim``). For another image size set ``eps`` to ``sqrt(C*H*W) * 6/255``.

Differences from the official code: (1) class-wise: the code draws a fresh point of the class's
cluster for every image (sample-wise around class-wise centroids); here one point per class is
drawn at ``fit`` and stored in the state, so every shard of a bucket gets the same pattern and
``perturb`` is a lookup by label. (2) The code adds the float pattern and truncates
(``astype(uint8)``), so its stored change may exceed the L2 radius by the rounding; here the
shared contract rounds to nearest and never exceeds ``eps``. APBench lists LSP under L2 with the
same ``6/255``-per-pixel radius.

``eps`` is protect-time: the state holds unit-norm patterns, scaled by ``eps`` in ``perturb``.
Shapes: patterns ``K x C x H x W`` float32 (unit L2 each); images ``B x C x H x W``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ue_dist.core.context import FitContext
from ue_dist.core.settings import Setting, choice, positive, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register

#: the official CIFAR default: the L2 norm of a 6/255 change of all 32 x 32 x 3 values
CIFAR_EPS = math.sqrt(32 * 32 * 3) * 6 / 255


def check_labels(labels: torch.Tensor, classes: int, name: str) -> None:
    """Refuse labels outside ``[0, classes)`` (a class the state has no pattern for)."""
    if labels.numel() and (int(labels.max()) >= classes or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) >= classes else int(labels.min())
        raise StateError(f"label {bad} has no {name} class pattern (state has {classes} classes)")


def scaled_lookup(patterns: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  eps: float, name: str) -> torch.Tensor:
    """``eps`` times each image's class pattern (unit norm in the state), kept inside [0, 1]:
    the ``perturb`` of the class-wise L2 methods (lsp, ar)."""
    check_labels(labels, patterns.shape[0], name)
    delta = eps * patterns[labels.long()]
    return (images + delta).clamp(0.0, 1.0) - images


def hypercube_vertices(k: int, f: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` vertices of ``{-1, 1}^f``, distinct where ``2^f >= k`` (redrawn until they are)."""
    v = torch.randint(0, 2, (k, f), generator=gen).float() * 2 - 1
    if f < 63 and 2 ** f < k:
        return v
    for _ in range(1000):
        seen: set[bytes] = set()
        dup = []
        for i in range(k):
            key = v[i].numpy().tobytes()
            if key in seen:
                dup.append(i)
            seen.add(key)
        if not dup:
            break
        v[dup] = torch.randint(0, 2, (len(dup), f), generator=gen).float() * 2 - 1
    return v


def patch_patterns(num_classes: int, shape: tuple[int, int, int], patch: int, class_sep: float,
                   gen: torch.Generator) -> torch.Tensor:
    """``K x C x H x W`` unit-L2 patterns: one cluster point per class, patch-upsampled."""
    c, h, w = shape
    nh, nw = math.ceil(h / patch), math.ceil(w / patch)
    f = c * nh * nw
    centroids = hypercube_vertices(num_classes, f, gen) * class_sep
    mix = torch.rand((num_classes, f, f), generator=gen) * 2 - 1  # make_classification's A
    z = torch.randn((num_classes, 1, f), generator=gen)
    points = (z @ mix).squeeze(1) + centroids  # K x F
    grid = points.view(num_classes, c, nh, nw)
    full = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[:, :, :h, :w]
    norms = full.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (full / norms).float().contiguous()


@register
class LinearSeparablePatches(Method):
    name = "lsp"
    kind, year, needs_labels = "model-free", 2022, True
    paper = "Yu et al., Availability Attacks Create Shortcuts (synthetic LSP noise), KDD 2022"
    presets = {
        # the official code's CIFAR-10 defaults (--patchsize 8, --eps 6: L2 sqrt(3072) * 6/255)
        "paper": {"eps": CIFAR_EPS, "norm": "l2", "patch_size": 8, "class_sep": 10.0,
                  "noise_seed": 0},
        # model-free and instant: the same as the paper
        "quick": {"eps": CIFAR_EPS, "norm": "l2", "patch_size": 8, "class_sep": 10.0,
                  "noise_seed": 0},
    }
    needs_fit = True
    declared = {
        "eps": Setting("radius", "L2 radius of the class pattern over the whole image ([0, 1] "
                       "scale; paper: sqrt(3072) * 6/255 for 32x32x3)", protect_time=True),
        "norm": choice("l2", help="the bound is L2 (the contract enforces it after rounding)"),
        "patch_size": positive_int("side of the constant patches of a pattern (paper: 8)"),
        "class_sep": positive("distance of the class centroids (make_classification; paper: 10)"),
        "noise_seed": Setting("seed", "draws the class patterns"),
    }

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(int(self.settings["noise_seed"]))
        k = int(train.num_classes)
        patterns = patch_patterns(k, tuple(train.image_shape), int(self.settings["patch_size"]),
                                  float(self.settings["class_sep"]), gen)
        ctx.log(f"lsp: {k} class patterns of {self.settings['patch_size']}-pixel patches, "
                f"shape {list(train.image_shape)}, L2 eps={self.eps:.4f}")
        return self.new_state(train, patterns=patterns)

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        patterns = state.get("patterns")
        if not isinstance(patterns, torch.Tensor) or patterns.ndim != 4:
            raise StateError("lsp state has no K x C x H x W 'patterns' tensor")
        return patterns.to(device).float()

    def perturb(self, loaded: torch.Tensor, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return scaled_lookup(loaded, images, labels, self.eps, self.name)
