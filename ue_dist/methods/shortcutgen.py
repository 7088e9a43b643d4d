"""ShortcutGen: a perturbation generator trained against a fixed, randomly initialised classifier.

Paper: van Vlijmen, Kolmus, Liu, Zhao & Larson, "Generative Poisoning Using Random
Discriminators", arXiv:2211.01086, 2022 (GUE's Table 1 baseline, 24.42 % on CIFAR-10). No
official code could be found; this follows the paper's description and the GUE paper's summary
of it.

Threat model: every protected image gets ``delta = g_w(x)``, ``|delta|_inf <= eps`` (the U-Net
of ``core.unet`` with its ``eps * tanh`` head, the same generator as GUE and DeepConfuse); the
victim trains normally on the protected data. ``perturb`` is one eval-mode generator pass,
``B x C x H x W`` -> same shape, labels unused ("label-free, one forward pass"), so it protects
images ``fit`` never saw.

Fitting is the min-min problem of error-minimising noise (Huang et al. 2021) with the inner
minimisation over the classifier removed: the classifier ``f`` ("discriminator") is randomly
initialised from the run's seed and never trained, and the generator alone minimises

    min_w  E CE(f(t(x + g_w(x))), y)

by Adam, where ``t`` is the dataset's training augmentation (crop + flip) drawn afresh per step
when ``augmentation`` is on (the paper's "simple augmentation strategy" against early stopping;
``none`` is its plain variant). A random network gives a noisy but fixed map from images to
labels; the generator learns whatever small pattern moves each image to its own label under that
map, and a victim trained on the result learns the pattern instead of the image (a shortcut).
``f`` is in eval mode (its BN layers keep their initial statistics), so it is one fixed function
of each image, independent of the batch.

Model selection (``select_every``) is GUE's: a fresh victim trained on the generator's output
scored on a held-out part of the training data; the lowest score is kept.

Defaults (``paper``): the paper's CIFAR-10 setting as far as it is stated -- L-inf 8/255 and a
ResNet-18 discriminator; the generator's width, optimiser and number of epochs are not given in
the text available here, so they are GUE's (width 64, 50 epochs, batch 256) with Adam at 1e-3.
On several workers each worker's gradient comes from its own part of the batch and they are
averaged (one worker: plain Adam).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ue_dist.core.augment import apply_params, resolve_augmentation, sample_params
from ue_dist.core.context import FitContext
from ue_dist.core.defenses import eot_views
from ue_dist.core.models import ARCHITECTURES
from ue_dist.core.precision import PRECISIONS, in_precision, prepare_model, resolve_precision
from ue_dist.core.settings import Setting, choice, count, non_negative, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import register
from ue_dist.methods.gue import (GENERATOR_SPLIT, GeneratorMethod, _mean_across_workers,
                                 _sync_buffers, build_classifier)
from ue_dist.methods.rem import eot_defences_setting

PAPER = ("van Vlijmen et al., Generative Poisoning Using Random Discriminators (ShortcutGen), "
         "arXiv:2211.01086, 2022")


def random_discriminator(arch: str, num_classes: int, channels: int, image_size: int,
                         width: int, seed: int, device: torch.device) -> torch.nn.Module:
    """The fixed classifier: built from ``seed`` alone (a resumed run rebuilds the same one),
    eval mode, no gradients of its own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_classifier(arch, num_classes, channels, image_size, width)
    return net.to(device).eval().requires_grad_(False)


def shortcut_step(gen: torch.nn.Module, disc: torch.nn.Module, opt: torch.optim.Optimizer,
                  x: torch.Tensor, y: torch.Tensor, augmentation: str, precision: str,
                  generator: torch.Generator | None = None,
                  ctx: FitContext | None = None, views: tuple = ()) -> float:
    """One Adam step of the generator on ``CE(disc(t(x + g(x))), y)``; returns the loss.
    ``views``: defence-aware EOT (``core.defenses.eot_views``) inside ``t``."""
    gen.train()
    params = [p for p in gen.parameters() if p.requires_grad]
    x_p = (x + in_precision(gen, x.device, precision)(x)).clamp(0.0, 1.0)
    view = apply_params(x_p, sample_params(augmentation, len(x_p), generator, x.device,
                                           views=views))
    loss = F.cross_entropy(in_precision(disc, x.device, precision)(view), y)
    grads = _mean_across_workers(torch.autograd.grad(loss, params), ctx)
    opt.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    value = float(loss.detach())
    return ctx.all_reduce_mean(value) if ctx is not None and ctx.distributed else value


def _preset(**kw: Any) -> dict[str, Any]:
    out = {"eps": 8 / 255, "width": 64, "arch": "resnet18", "cls_width": 0, "epochs": 50,
           "batch_size": 256, "gen_lr": 1e-3, "augmentation": "auto", "train_fraction": 1.0,
           "val_fraction": 0.1, "split_seed": 0, "select_every": 5, "select_epochs": 20,
           "select_arch": "resnet18", "log_every": 50, "precision": "fp32", "eot_defences": []}
    out.update(kw)
    return out


@register
class ShortcutGen(GeneratorMethod):
    """ShortcutGen (van Vlijmen et al. 2022): a U-Net generator minimising a random, fixed
    classifier's loss; ``eps`` L-inf; one forward pass per image (unseen images too)."""

    name = "shortcutgen"
    kind, year, needs_labels = "generator", 2022, False
    paper = PAPER
    # the discriminator is rebuilt from the seed: only the generator and its Adam are saved
    resumed_players = (("gen", "generator"), ("gen_opt", "gen_opt"))
    presets = {
        "paper": _preset(),
        # digits on one CPU core in about a minute: narrow U-Net and small-CNN discriminator
        "quick": _preset(width=8, arch="small-cnn", cls_width=16, epochs=10, batch_size=32,
                         val_fraction=0.0, select_every=0, select_epochs=2,
                         select_arch="small-cnn", log_every=10),
    }
    declared: dict[str, Setting] = {
        "eps": Setting("radius", "L-inf radius of the generator's output"),
        "width": positive_int("U-Net base width"),
        "arch": choice(*sorted(ARCHITECTURES), help="the random discriminator's architecture"),
        "cls_width": count("small-CNN discriminator width (0: the arch's default)"),
        "epochs": count(), "batch_size": positive_int("global batch, split over the workers"),
        "gen_lr": non_negative("generator Adam rate"),
        "augmentation": choice("auto", "crop-flip", "flip", "none",
                               help="views of x + g(x) the discriminator sees (auto: the "
                                    "dataset's training augmentation)"),
        **GENERATOR_SPLIT,
        "log_every": positive_int("steps between per-step metric reports"),
        "precision": choice(*PRECISIONS, protect_time=True),
        "eot_defences": eot_defences_setting(protect_time=False),
    }

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        split = self._split(train)
        fit_idx = split["fit"]
        c, h, _ = train.image_shape
        device = ctx.device
        precision = resolve_precision(s["precision"], device)
        aug = resolve_augmentation(str(s["augmentation"]), h)
        views = eot_views(s["eot_defences"])
        disc = prepare_model(random_discriminator(s["arch"], int(train.num_classes), c, h,
                                                  int(s["cls_width"]), ctx.seed * 7919 + 1,
                                                  device), device, precision)
        run = self._adam_generator(train, split, ctx, precision)
        gen, players, start, step, best = run.gen, run.players, run.start, run.step, run.best
        local_idx, steps_per_epoch = run.local_idx, run.steps_per_epoch
        ctx.log(f"[{self.name}] fitting on {len(fit_idx)} images ({len(split['val'])} held out "
                f"for selection) against a random {s['arch']}, {steps_per_epoch} steps per epoch")
        bar = ctx.progress(f"[{self.name}] epochs", int(s["epochs"]))
        bar.start(start)
        for epoch in range(start, int(s["epochs"])):
            # batch order and augmentation draws seeded by (run, epoch, worker): resumable
            rng = torch.Generator().manual_seed((ctx.seed * 1000003 + epoch) * 997 + ctx.rank)
            order = local_idx[torch.randperm(len(local_idx), generator=rng)]
            total = 0.0
            for i in range(steps_per_epoch):
                idx = run.batch(order, i)
                loss = shortcut_step(gen, disc, players["gen_opt"],
                                     ImageSet.to_float(train.images[idx]).to(device),
                                     train.labels[idx].to(device), aug, precision, rng, ctx,
                                     views)
                step += 1
                total += loss
                if step % int(s["log_every"]) == 0:
                    ctx.report({"step": step, "epoch": epoch + 1, "poison_loss": loss})
            _sync_buffers(gen, ctx)
            record = {"epoch": epoch + 1, "step": step, "poison_loss": total / steps_per_epoch}
            best = self._end_epoch(players, train, split, best, record, epoch, step, bar, ctx)
        return self._state(train, gen, best, split)
