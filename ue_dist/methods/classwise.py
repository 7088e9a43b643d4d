"""Class-wise random noise: the simplest unlearnable-examples baseline.

Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable" (ICLR 2021), compare
their error-minimising noise with random noise applied sample-wise or class-wise (one fixed
pattern per class). This is that random class-wise baseline.

Threat model: L-inf, ``|delta|_inf <= eps`` (paper: 8/255) on the [0, 1] scale. ``fit`` draws
one pattern per class, uniform in ``[-eps, eps]``, from a seeded generator (no learning, but the
patterns must be the same for every shard of a bucket, so they live in the state). ``perturb``
looks the pattern up by label: cheap and deterministic, which makes it the reference method for
pipeline tests and benchmarks.

It is a WEAK protection, not one to rely on: an i.i.d. per-pixel pattern is shifted by the
victim's random-crop augmentation and stops being a usable shortcut. Measured here (job spec run
of tests/test_jobs.py, digits, quick small-CNN victim, 4 epochs): 83.3% test accuracy trained on
clean data, 83.6% trained on class-wise-noise data. Use ``em``/``rem``/``bayes``/``gue`` to protect.

Shapes: patterns ``K x C x H x W`` float32 for ``K`` classes; images ``B x C x H x W``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ue_dist.core.context import FitContext
from ue_dist.core.settings import Setting
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register


@register
class ClasswiseNoise(Method):
    name = "classwise"
    kind, year, needs_labels = "model-free", 2021, True
    paper = "Huang et al. 2021, Unlearnable Examples (class-wise random noise baseline)"
    presets = {
        "paper": {"eps": 8 / 255, "noise_seed": 0},
        "quick": {"eps": 8 / 255, "noise_seed": 0},
    }
    needs_fit = True

    declared = {"eps": Setting("radius", "L-inf radius of the class patterns"),
                "noise_seed": Setting("seed", "draws the class patterns")}

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(int(self.settings["noise_seed"]))
        k = int(train.num_classes)
        shape = (k, *train.image_shape)
        patterns = (torch.rand(shape, generator=gen) * 2.0 - 1.0) * self.eps
        ctx.log(f"classwise: {k} class patterns of shape {list(train.image_shape)}, eps={self.eps:.5f}")
        return self.new_state(train, patterns=patterns.float())

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        patterns = state.get("patterns")
        if not isinstance(patterns, torch.Tensor) or patterns.ndim != 4:
            raise StateError("classwise state has no K x C x H x W 'patterns' tensor")
        # protect uses the fitted eps (it refuses another); a method built by hand with a smaller
        # eps clips the patterns to it, never exceeds it
        return patterns.to(device).clamp(-self.eps, self.eps)

    def perturb(self, loaded: torch.Tensor, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if labels.numel() and int(labels.max()) >= loaded.shape[0]:
            raise StateError(f"label {int(labels.max())} has no class pattern "
                             f"(state has {loaded.shape[0]} classes)")
        delta = loaded[labels.long()]
        # Keep x + delta inside [0, 1] (the contract clips again on the integer grid).
        return (images + delta).clamp(0.0, 1.0) - images
