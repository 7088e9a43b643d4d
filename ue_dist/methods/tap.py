"""TAP: targeted adversarial poisoning (Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein,
"Adversarial Examples Make Strong Poisons", NeurIPS 2021), the REM paper's baseline (App. A.3.2).

Threat model: the data owner adds ``delta`` with ``|delta|_inf <= eps`` to every image. ``fit``
trains a classifier ``f0`` on the clean data (with the dataset's training augmentation);
``perturb`` solves ``argmin_{|delta| <= eps} CE(f0(t(x + delta)), g(y))`` by signed PGD, i.e. a
targeted attack toward the permuted label ``g(y)``, with differentiable augmentation ``t`` drawn
afresh at every step (Geiping et al. 2021), ``eot_samples`` views per step as one batch.
``target = "shift"``: ``g(y) = (y + 1) mod K``; ``"permutation"``: a seeded derangement of the
``K`` classes, stored in the state. Shapes: images ``B x C x H x W`` in [0, 1], labels ``B``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ue_dist.core.augment import apply_params, sample_params
from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext
from ue_dist.core.pgd import pgd
from ue_dist.core.precision import autocast, resolve_precision, upcast
from ue_dist.core.settings import Setting, choice, positive, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import StateError, register
from ue_dist.methods.rem import (_AUGMENTATION, _SOURCE_MODEL, LoadedModel, SourceModelMethod,
                                 _schedule, batch_generator, train_source_model)

TARGETS = ("shift", "permutation")


def label_permutation(num_classes: int, target: str, seed: int) -> torch.Tensor:
    """``g`` as a lookup table: ``g[y]`` is the target class of ``y`` (never ``y`` itself)."""
    if num_classes < 2:
        raise SettingsError(f"TAP needs at least 2 classes to pick a wrong target, got {num_classes}")
    if target == "shift":
        return (torch.arange(num_classes) + 1) % num_classes
    gen = torch.Generator().manual_seed(int(seed))
    while True:  # rejection-sample a derangement (about e tries on average)
        perm = torch.randperm(num_classes, generator=gen)
        if not (perm == torch.arange(num_classes)).any():
            return perm


@register
class TAP(SourceModelMethod):
    """Targeted adversarial poisoning (Fowl et al., NeurIPS 2021); see the module docstring."""

    name = "tap"
    kind, year, needs_labels = "error-maximising", 2021, True
    paper = "Fowl et al., Adversarial Examples Make Strong Poisons, NeurIPS 2021"
    presets = {
        # REM paper, Table 5 (CIFAR): 250 steps of rho_u/125. The clean model is the REM
        # authors' scripts/cifar10/train_clr.sh (gen_tap.sh resumes its train-fin-model.pkl):
        # ResNet-18, 40,000 steps, batch 128, SGD 0.1 / 0.9 / 5e-4, lr x0.1 every 16,000 --
        # their App. A.4 victim protocol at radius 0, not the 5,000-step source-model schedule.
        "paper": {"eps": 8 / 255, **_schedule("resnet18", 40000, 128, 16000), "steps": 250,
                  "step_frac": 1 / 125, "eot_samples": 1, "augmentation": "auto",
                  "target": "shift", "seed": 0, "log_every": 50, "checkpoint_every": 500,
                  "precision": "fp32"},
        "quick": {"eps": 8 / 255, **_schedule("small-cnn", 300, 32, 200), "steps": 20,
                  "step_frac": 0.1, "eot_samples": 1, "augmentation": "auto",
                  "target": "shift", "seed": 0, "log_every": 25, "checkpoint_every": 100,
                  "precision": "fp32"},
    }

    # the clean model never sees the noise, so its radius is protect-time too (one clean model
    # serves every eps, as in the REM paper's TAP baseline); target is fixed: the permutation
    # is in the state
    declared = {**_SOURCE_MODEL,
                "eps": Setting("radius", "L-inf radius of the noise on the [0, 1] scale", high=1,
                               protect_time=True),
                "steps": positive_int("PGD steps towards the target class", protect_time=True),
                "step_frac": positive("step size as a fraction of eps", protect_time=True),
                "eot_samples": positive_int("EOT views per step", protect_time=True),
                "augmentation": _AUGMENTATION,
                "target": choice(*TARGETS, help="the wrong class: y+1 mod K, or a derangement")}

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        perm = label_permutation(int(train.num_classes), self.settings["target"],
                                 int(self.settings["seed"]))
        return train_source_model(self, train, ctx, None,
                                  augmentation=self._augmentation(train.image_shape[1]),
                                  extra_state={"permutation": perm})

    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        perm = state.get("permutation")
        if not isinstance(perm, torch.Tensor) or perm.shape != (int(state["num_classes"]),):
            raise StateError(f"{source} has no valid label permutation for TAP")

    def perturb(self, loaded: LoadedModel, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        x, y = self._inputs(loaded, images, labels)
        if len(x) == 0:
            return torch.zeros_like(images, dtype=torch.float32)
        s = self.settings
        target = loaded.extra["permutation"].to(y.device)[y]
        gen = batch_generator(int(s["seed"]), x, y)
        kind = self._augmentation(loaded.image_shape[1])
        views = int(s["eot_samples"])
        model = loaded.model
        # bf16 covers the forward only; delta and its projection stay fp32 inside pgd
        precision = resolve_precision(s.get("precision", "fp32"), x.device)

        def loss(z: torch.Tensor) -> torch.Tensor:
            params = sample_params(kind, views * len(z), gen, z.device)
            with autocast(x.device, precision):
                out = upcast(model(apply_params(z.repeat(views, 1, 1, 1), params)))
            return F.cross_entropy(out, target.repeat(views), reduction="sum")

        with torch.enable_grad():
            delta = pgd(loss, x, eps=self.eps, step_size=self.eps * float(s["step_frac"]),
                        steps=int(s["steps"]), maximize=False, random_start=True, generator=gen)
        return delta.to(images.device)
