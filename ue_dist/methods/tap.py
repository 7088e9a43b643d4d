"""Attacks against a classifier trained on clean data: TAP and HYPO (``HYPO`` at the end).

TAP: targeted adversarial poisoning (Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein,
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
from ue_dist.core.defenses import eot_views
from ue_dist.core.pgd import pgd
from ue_dist.core.precision import autocast, resolve_precision, upcast
from ue_dist.core.settings import Setting, choice, positive, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import StateError, register
from ue_dist.methods.rem import (_AUGMENTATION, _SOURCE_MODEL, LoadedModel, SourceModelMethod,
                                 _schedule, batch_generator, eot_defences_setting,
                                 train_source_model)

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


class CleanModelAttack(SourceModelMethod):
    """Shared parts of the attacks that craft noise against a classifier trained on clean data
    (TAP, HYPO): ``fit`` trains the clean model with the dataset's training augmentation,
    ``perturb`` runs signed PGD that minimises ``CE(f0(t(x + delta)), target(y))``.

    Subclasses say which target (``_targets``), whether PGD starts at a random point of the
    ball (``random_start``) and whether the views are augmented (``eot_augmented``)."""

    random_start: bool = True
    eot_augmented: bool = True
    state_extras = ("permutation",)

    def _extra_state(self, train: ImageSet) -> dict[str, Any]:
        return {}

    def _targets(self, loaded: LoadedModel, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        return train_source_model(self, train, ctx, None,
                                  augmentation=self._augmentation(train.image_shape[1]),
                                  extra_state=self._extra_state(train))

    def perturb(self, loaded: LoadedModel, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        x, y = self._inputs(loaded, images, labels)
        if len(x) == 0:
            return torch.zeros_like(images, dtype=torch.float32)
        s = self.settings
        target = self._targets(loaded, y)
        gen = batch_generator(int(s["seed"]), x, y)
        kind = self._augmentation(loaded.image_shape[1]) if self.eot_augmented else "none"
        views = int(s.get("eot_samples", 1))
        defences = eot_views(s.get("eot_defences", ()))
        model = loaded.folded  # eval-mode passes only: batch norms folded (core.fold)
        # bf16 covers the forward only; delta and its projection stay fp32 inside pgd
        precision = resolve_precision(s.get("precision", "fp32"), x.device)

        def loss(z: torch.Tensor) -> torch.Tensor:
            params = sample_params(kind, views * len(z), gen, z.device, views=defences)
            with autocast(x.device, precision):
                out = upcast(model(apply_params(z.repeat(views, 1, 1, 1), params)))
            return F.cross_entropy(out, target.repeat(views), reduction="sum")

        with torch.enable_grad():
            delta = pgd(loss, x, eps=self.eps, step_size=self.eps * float(s["step_frac"]),
                        steps=int(s["steps"]), maximize=False, random_start=self.random_start,
                        generator=gen)
        return delta.to(images.device)


# the clean model never sees the noise, so its radius is protect-time too (one clean model
# serves every eps, as in the REM paper's TAP baseline)
_CLEAN_MODEL_PGD: dict[str, Setting] = {
    **_SOURCE_MODEL,
    "eps": Setting("radius", "L-inf radius of the noise on the [0, 1] scale", high=1,
                   protect_time=True),
    "steps": positive_int("PGD steps of the noise", protect_time=True),
    "step_frac": positive("step size as a fraction of eps", protect_time=True),
    "eot_defences": eot_defences_setting(protect_time=True),
}


@register
class TAP(CleanModelAttack):
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
                  "precision": "fp32", "eot_defences": []},
        "quick": {"eps": 8 / 255, **_schedule("small-cnn", 300, 32, 200), "steps": 20,
                  "step_frac": 0.1, "eot_samples": 1, "augmentation": "auto",
                  "target": "shift", "seed": 0, "log_every": 25, "checkpoint_every": 100,
                  "precision": "fp32", "eot_defences": []},
    }

    # target is fixed by the fit: the permutation is in the state
    declared = {**_CLEAN_MODEL_PGD,
                "eot_samples": positive_int("EOT views per step", protect_time=True),
                "augmentation": _AUGMENTATION,
                "target": choice(*TARGETS, help="the wrong class: y+1 mod K, or a derangement")}

    def _extra_state(self, train: ImageSet) -> dict[str, Any]:
        return {"permutation": label_permutation(int(train.num_classes), self.settings["target"],
                                                 int(self.settings["seed"]))}

    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        perm = state.get("permutation")
        if not isinstance(perm, torch.Tensor) or perm.shape != (int(state["num_classes"]),):
            raise StateError(f"{source} has no valid label permutation for TAP")

    def _targets(self, loaded: LoadedModel, y: torch.Tensor) -> torch.Tensor:
        return loaded.extra["permutation"].to(y.device)[y]


@register
class HYPO(CleanModelAttack):
    """Hypocritical perturbations (Tao, Feng, Yi, Huang & Chen, "Better Safe Than Sorry:
    Preventing Delusive Adversaries with Adversarial Training", NeurIPS 2021; their attack P2).

    Threat model: ``|delta|_inf <= eps`` on every image. ``fit`` trains a classifier ``f0`` on
    the clean data, as TAP does; ``perturb`` makes each image *easier* for it:
    ``argmin_{|delta| <= eps} CE(f0(x + delta), y)`` by signed PGD from ``delta = 0`` on the
    un-augmented images (error-minimising like EM, but against a fixed, already-trained model,
    so the noise mimics features the model already uses instead of creating a shortcut).
    Shapes: images ``B x C x H x W`` in [0, 1], labels ``B``.

    ``paper`` follows APBench's CIFAR-10 setting (lafeat/apbench ``attack/hypo_poisons.py``):
    L-inf 8/255, 100 steps of 0.8/255, no random start, the model in eval mode. The paper's own
    code (TLMichael/Delusive-Adversary ``poison.py``, P2) uses the same 100 steps of eps/5 at an
    L2 radius of 0.5 against a VGG-16; its clean model is 150 epochs of SGD (0.1, ×0.1 at 100
    and 125), which is the clean-model schedule here (ResNet-18 as APBench, 58,650 steps of 128
    = 150 epochs of 50,000 images, lr ×0.1 at step 39,100 = epoch 100; the paper's second decay
    at epoch 125 cannot be said with one ``lr_decay_every`` and is left out). The field reports
    HYPO as a weak protection under standard training (paper Table 1: 74.2 % test accuracy at
    L2 0.5; APBench's leaderboard: 70.4 % against 94.7 % clean).
    """

    name = "hypo"
    kind, year, needs_labels = "error-minimising", 2021, True
    paper = ("Tao et al., Better Safe Than Sorry: Preventing Delusive Adversaries with "
             "Adversarial Training, NeurIPS 2021")
    random_start = False
    eot_augmented = False
    presets = {
        "paper": {"eps": 8 / 255, **_schedule("resnet18", 58650, 128, 39100), "steps": 100,
                  "step_frac": 0.1, "augmentation": "auto", "seed": 0, "log_every": 50,
                  "checkpoint_every": 500, "precision": "fp32", "eot_defences": []},
        "quick": {"eps": 8 / 255, **_schedule("small-cnn", 300, 32, 200), "steps": 20,
                  "step_frac": 0.1, "augmentation": "auto", "seed": 0, "log_every": 25,
                  "checkpoint_every": 100, "precision": "fp32", "eot_defences": []},
    }
    declared = {**_CLEAN_MODEL_PGD,
                "augmentation": choice("auto", "crop-flip", "flip", "none",
                                       help="the clean model's training augmentation")}

    def _targets(self, loaded: LoadedModel, y: torch.Tensor) -> torch.Tensor:
        return y
