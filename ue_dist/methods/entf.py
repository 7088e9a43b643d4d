"""EntF: entangled features against an adversarially trained reference model (push and pull).

Paper: Wen, Zhao, Liu, Backes, Wang & Zhang, "Is Adversarial Training Really a Silver Bullet for
Mitigating Data Poisoning?", ICLR 2023 (official code WenRuiUSTC/EntF; GUE's "INF" baseline and
the Bayes paper's second baseline). This follows the official code: ``train_reference_model.py``,
``get_centroid.py``, ``village/shop/forgemaster_push.py`` / ``forgemaster_pull.py``.

Threat model: ``|delta|_inf <= eps`` on every image; the victim may train normally or
adversarially (the paper's point: EntF still hurts PGD-AT victims with ``eps_adv = eps_poi``).

``fit`` trains the reference model ``f`` with PGD adversarial training at ``ref_eps`` (the
official default 4/255, ``ref_steps`` = 10 steps of 2/255, crop + flip) and stores the class
centroids ``mu_k``: the mean penultimate embedding ``phi(x)`` of each class's clean training
images, ``f`` in eval mode. ``perturb`` runs signed PGD on each image, ``f`` in eval mode, under
a fresh crop + flip view at every step (the official code augments the poison batch):

* ``entf-push``: ``max_delta  MSE(phi(t(x + delta)), mu_y)`` -- away from its own class centre;
* ``entf-pull``: ``min_delta  MSE(phi(t(x + delta)), mu_k)``, ``k`` the centre nearest to the
  current embedding among the other classes, chosen again at every step -- toward another class.

Either way the poisoned features of different classes overlap ("entangle"), so what a model
learns from them separates the classes badly, robust features included.

Shapes: images ``B x C x H x W`` in [0, 1], labels ``B``; the embedding is the penultimate layer
of the project's classifiers (small CNN, ResNets). Each image's noise is independent of the
rest of its batch (eval mode), seeded by the batch's content.

Defaults (``paper``): ResNet-18 reference, 100 epochs of batch 128, SGD 0.1 / 0.9 / 5e-4, lr
x0.1 at epoch 75 (the official MultiStepLR also decays at 90; one ``lr_decay_every`` cannot say
both, so that second decay is left out, as for HYPO); poison L-inf 8/255, 300 signed steps of
``0.05 * eps`` (the official ``--attackiter 300 --tau 0.05``: one step per image per pass over
the data, here all steps of an image at once, the same thing for a fixed model), start
``N(0, eps^2)`` clipped to the ball (``--init randn``). Where this differs from the official
code: the views are the project's crop (pad 4) + flip instead of a bilinear grid shift of up to
8/31 of the width; ``entf-pull`` excludes the image's own class from the nearest-centre search
(the official code gives it distance 1, so it may pick the own class when every other centre is
farther than 1); the reference model starts PGD-AT from a random point (as theirs).
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
from ue_dist.methods.bayes import embed
from ue_dist.methods.rem import (LoadedModel, SourceModelMethod, _schedule, batch_generator,
                                 source_model, train_source_model)
from ue_dist.methods.tap import _CLEAN_MODEL_PGD

PAPER = ("Wen et al., Is Adversarial Training Really a Silver Bullet for Mitigating Data "
         "Poisoning? (EntF), ICLR 2023")


@torch.no_grad()
def class_centroids(model: torch.nn.Module, train: ImageSet, device: torch.device,
                    batch: int = 256) -> torch.Tensor:
    """``K x d``: the mean eval-mode embedding of each class's clean images (a class without
    images is refused: its centre would be undefined)."""
    model.eval()
    sums: torch.Tensor | None = None
    counts = torch.zeros(int(train.num_classes), dtype=torch.float64)
    for start in range(0, len(train), batch):
        x = ImageSet.to_float(train.images[start:start + batch]).to(device)
        y = train.labels[start:start + batch].long()
        e = embed(model, x).double().cpu()
        if sums is None:
            sums = torch.zeros(int(train.num_classes), e.shape[1], dtype=torch.float64)
        sums.index_add_(0, y, e)
        counts += torch.bincount(y, minlength=int(train.num_classes)).double()
    empty = (counts == 0).nonzero().flatten().tolist()
    if sums is None or empty:
        raise SettingsError(f"EntF needs training images of every class for its centroids; "
                            f"class(es) {empty} have none")
    return (sums / counts[:, None]).float()


def pull_targets(emb: torch.Tensor, centroids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each embedding, the centre nearest to it (mean squared distance) among the classes
    other than its own label."""
    dist = ((emb[:, None, :] - centroids[None]) ** 2).mean(-1)
    dist = dist.masked_fill(F.one_hot(y, centroids.shape[0]).bool(), float("inf"))
    return centroids[dist.argmin(1)]


def _preset(**kw: Any) -> dict[str, Any]:
    out = {"eps": 8 / 255, **_schedule("resnet18", 39100, 128, 29325), "ref_eps": 4 / 255,
           "ref_steps": 10, "ref_step_frac": 0.5, "steps": 300, "step_frac": 0.05,
           "augmentation": "auto", "seed": 0, "log_every": 50, "checkpoint_every": 500,
           "precision": "fp32", "eot_defences": []}
    out.update(kw)
    return out


class EntF(SourceModelMethod):
    """Shared parts of EntF-push and EntF-pull; see the module docstring."""

    recipe = ""
    kind, year, needs_labels = "error-maximising", 2023, True
    paper = PAPER
    state_extras = ("centroids",)
    presets = {
        # 100 epochs of the 50,000 CIFAR-10 images (391 steps each), x0.1 at epoch 75
        "paper": _preset(),
        # digits-sized: small CNN, 300 steps of 32 with 5-step PGD-AT, 40 poison steps
        "quick": _preset(**_schedule("small-cnn", 300, 32, 200), ref_steps=5, steps=40,
                         step_frac=0.1, log_every=25, checkpoint_every=100),
    }
    declared = {
        **_CLEAN_MODEL_PGD,
        "ref_eps": Setting("radius", "PGD-AT radius of the reference model"),
        "ref_steps": positive_int("PGD steps of the reference model's adversarial training"),
        "ref_step_frac": positive("its step size as a fraction of ref_eps"),
        "augmentation": choice("auto", "crop-flip", "flip", "none",
                               help="the reference model's training views and the poison's EOT "
                                    "views"),
    }
    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        ref_eps = float(s["ref_eps"])
        state = train_source_model(self, train, ctx, None, rho_a=ref_eps,
                                   step_a=ref_eps * float(s["ref_step_frac"]),
                                   steps_a=int(s["ref_steps"]) if ref_eps > 0 else 0,
                                   augmentation=self._augmentation(train.image_shape[1]))
        if "centroids" not in state:
            state["centroids"] = class_centroids(source_model(state, ctx.device), train,
                                                 torch.device(ctx.device))
        return state

    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        cen = state.get("centroids")
        if not isinstance(cen, torch.Tensor) or cen.ndim != 2 or \
                cen.shape[0] != int(state["num_classes"]):
            raise StateError(f"{source} has no valid class centroids for EntF (K x d)")

    def perturb(self, loaded: LoadedModel, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        x, y = self._inputs(loaded, images, labels)
        if len(x) == 0:
            return torch.zeros_like(images, dtype=torch.float32)
        s = self.settings
        centroids = loaded.extra["centroids"].to(x.device, torch.float32)
        gen = batch_generator(int(s["seed"]), x, y)
        kind = self._augmentation(loaded.image_shape[1])
        defences = eot_views(s.get("eot_defences", ()))
        model = loaded.model
        precision = resolve_precision(s.get("precision", "fp32"), x.device)
        own = centroids[y]

        def loss(z: torch.Tensor) -> torch.Tensor:
            view = apply_params(z, sample_params(kind, len(z), gen, z.device, views=defences))
            with autocast(x.device, precision):
                emb = upcast(embed(model, view))
            if self.recipe == "push":
                return F.mse_loss(emb, own, reduction="sum")
            return F.mse_loss(emb, pull_targets(emb.detach(), centroids, y), reduction="sum")

        # the official start: N(0, eps^2) per pixel, clipped to the ball
        init = (torch.randn(x.shape, generator=gen) * self.eps).to(x.device)
        with torch.enable_grad():
            delta = pgd(loss, x, eps=self.eps, step_size=self.eps * float(s["step_frac"]),
                        steps=int(s["steps"]), maximize=self.recipe == "push", init=init)
        return delta.to(images.device)


@register
class EntFPush(EntF):
    """EntF-push (Wen et al., ICLR 2023): features pushed away from their own class centre."""

    name = "entf-push"
    recipe = "push"


@register
class EntFPull(EntF):
    """EntF-pull (Wen et al., ICLR 2023): features pulled toward the nearest other class centre."""

    name = "entf-pull"
    recipe = "pull"
