"""DeepConfuse: an auto-encoder that learns to confuse the classifier trained on its output.

Paper: Feng, Cai & Zhou, "Learning to Confuse: Generating Training Time Adversarial Data with
Auto-Encoder", NeurIPS 2019 (official code kingfengji/DeepConfuse; this follows its
``CIFAR/train.py``).

Threat model: every protected image gets ``delta = g_w(x)``, ``|delta|_inf <= eps`` (the
U-Net of ``core.unet`` with its ``eps * tanh`` head -- the authors' auto-encoder is the same
U-Net: four average-pooled stages, bilinear decoder, 1x1 conv + BN + tanh); the victim trains
normally on the protected data. ``perturb`` is one eval-mode generator pass,
``B x C x H x W`` -> same shape, labels unused, so it protects images it has never seen.

Fitting, per round (the authors' outer ``--epochs``): a fresh classifier ``f_theta`` trains
``cls_epochs`` epochs by SGD on the images perturbed by the generator frozen at the round's start
(``g_atk``); before each of its steps the trained generator ``g_w`` takes one Adam step on the
*pseudo-update* objective

    max_w  CE(f_{theta'}(x), y),   theta' = theta - cls_lr * grad_theta CE(f_theta(x + g_w(x)), y)

i.e. the clean loss of the classifier after one step on ``g_w``'s data, differentiated through
that step (second order). At the round's end ``g_atk <- g_w`` and, every ``select_every`` rounds,
a fresh victim trained ``select_epochs`` epochs on ``g_atk``'s data is scored; the lowest score
is kept. Where this differs from the authors' code: the score is accuracy on a held-out part of
the *training* data (``val_fraction``; the authors score on CIFAR's test set) and its victim is
the project's quick victim (crop + flip) where theirs trains plain SGD without augmentation;
on several workers each worker's pseudo-update uses its own part of the batch and the
generator's and classifier's gradients are averaged (one worker: the authors' algorithm).
The label-specific (targeted) variant of the paper is not implemented.

Defaults (``paper``): the code's CIFAR-10 settings -- eps 0.032, VGG-11 classifier at SGD lr
0.01 (the script's ``--momentum`` is never passed to the optimiser: plain SGD), 20 classifier
epochs per round, batch 256, generator Adam lr 1e-4, 1,000 rounds, a score after every round.
The README's "5-7 days on one GPU" is this preset.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ue_dist.core.augment import defended
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

PAPER = ("Feng, Cai & Zhou, Learning to Confuse: Generating Training Time Adversarial Data "
         "with Auto-Encoder (DeepConfuse), NeurIPS 2019")


def pseudo_update_objective(gen: nn.Module, cls: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            lr: float, precision: str = "fp32", views: tuple = (),
                            generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of ``cls`` on ``x + gen(x)``, CE on the clean ``x`` of ``cls`` after one SGD step of
    rate ``lr`` on the former); the second is differentiable in ``gen``'s weights through the
    step. ``cls``'s parameters and running statistics are left as they were. ``views``: the
    pseudo-update learns from defended views of ``x + gen(x)`` (``augment.defended``)."""
    device = x.device
    names = [n for n, p in cls.named_parameters() if p.requires_grad]
    theta = [p for p in cls.parameters() if p.requires_grad]
    x_g = defended((x + in_precision(gen, device, precision)(x)).clamp(0.0, 1.0), views,
                   generator)
    pseudo_loss = F.cross_entropy(in_precision(cls, device, precision)(x_g), y)
    grads = torch.autograd.grad(pseudo_loss, theta, create_graph=True)
    updated = {n: p - lr * g for n, p, g in zip(names, theta, grads)}
    # BN in train mode normalises by the batch; the copies keep cls's running statistics clean
    buffers = {n: b.detach().clone() for n, b in cls.named_buffers()}
    after = in_precision(lambda z: functional_call(cls, (updated, buffers), (z,)), device,
                         precision)
    return pseudo_loss, F.cross_entropy(after(x), y)


def confuse_step(players: Mapping[str, Any], x: torch.Tensor, y: torch.Tensor,
                 settings: Mapping[str, Any], ctx: FitContext | None = None, views: tuple = (),
                 generator: torch.Generator | None = None) -> dict[str, float]:
    """One batch: the generator's Adam step through the classifier's pseudo-update (ascending
    the clean loss after it), then the classifier's SGD step on the frozen generator's data,
    both through ``views`` (defence-aware EOT) when given.
    Updates ``players`` (gen, atk, cls and their optimisers) in place."""
    gen, atk, cls = players["gen"], players["atk"], players["cls"]
    gen.train()
    cls.train()
    precision = resolve_precision(settings["precision"], x.device)
    theta = [p for p in cls.parameters() if p.requires_grad]
    w_params = [p for p in gen.parameters() if p.requires_grad]
    pseudo_loss, clean_loss_after = pseudo_update_objective(
        gen, cls, x, y, float(players["cls_opt"].param_groups[0]["lr"]), precision, views,
        generator)
    g_w = _mean_across_workers(torch.autograd.grad(-clean_loss_after, w_params), ctx)
    players["gen_opt"].zero_grad(set_to_none=True)
    for p, g in zip(w_params, g_w):
        p.grad = g
    players["gen_opt"].step()

    # the classifier learns from the generator as it was at the round's start
    with torch.no_grad():
        x_atk = defended((x + in_precision(atk, x.device, precision)(x)).clamp(0.0, 1.0),
                         views, generator)
    poison_loss = F.cross_entropy(in_precision(cls, x.device, precision)(x_atk), y)
    g_c = _mean_across_workers(torch.autograd.grad(poison_loss, theta), ctx)
    players["cls_opt"].zero_grad(set_to_none=True)
    for p, g in zip(theta, g_c):
        p.grad = g
    players["cls_opt"].step()
    stats = [float(pseudo_loss.detach()), float(clean_loss_after.detach()), float(poison_loss.detach())]
    if ctx is not None and ctx.distributed:
        stats = [ctx.all_reduce_mean(v) for v in stats]
    return {"pseudo_loss": stats[0], "clean_loss_after": stats[1], "poison_loss": stats[2]}


def _preset(**kw: Any) -> dict[str, Any]:
    out = {"eps": 0.032, "width": 64, "arch": "vgg11", "cls_width": 0, "epochs": 1000,
           "cls_epochs": 20, "batch_size": 256, "cls_lr": 0.01, "gen_lr": 1e-4,
           "train_fraction": 1.0, "val_fraction": 0.1, "split_seed": 0, "select_every": 1,
           "select_epochs": 20, "select_arch": "vgg11", "log_every": 50, "precision": "fp32",
           "eot_defences": []}
    out.update(kw)
    return out


@register
class DeepConfuse(GeneratorMethod):
    """DeepConfuse (Feng et al., NeurIPS 2019): a U-Net generator trained by the classifier
    pseudo-update; ``eps`` L-inf; one forward pass per image (unseen images too)."""

    name = "deepconfuse"
    kind, year, needs_labels = "generator", 2019, False
    paper = PAPER
    # resuming restores the generator and its Adam state; a round's classifier is rebuilt
    resumed_players = (("gen", "generator"), ("gen_opt", "gen_opt"))
    presets = {
        "paper": _preset(),
        # digits on one CPU core in a few minutes: narrow U-Net and small-CNN classifier,
        # batch 32, a faster generator (Adam 1e-3) and classifier (0.05), 6 rounds of 5 epochs
        "quick": _preset(eps=8 / 255, width=8, arch="small-cnn", cls_width=16, epochs=6,
                         cls_epochs=5, batch_size=32, cls_lr=0.05, gen_lr=1e-3,
                         val_fraction=0.0, select_every=0, select_epochs=2,
                         select_arch="small-cnn", log_every=10),
    }
    declared: dict[str, Setting] = {
        "eps": Setting("radius", "L-inf radius of the generator's output"),
        "width": positive_int("U-Net base width"), "arch": choice(*sorted(ARCHITECTURES)),
        "cls_width": count("small-CNN classifier width (0: the arch's default)"),
        "epochs": count("rounds (the authors' --epochs): each trains a fresh classifier"),
        "cls_epochs": positive_int("classifier epochs per round (the authors' --clsepochs)"),
        "batch_size": positive_int("global batch, split over the workers"),
        "cls_lr": non_negative("classifier SGD rate, also the pseudo-update's step"),
        "gen_lr": non_negative("generator Adam rate"),
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
        views = eot_views(s["eot_defences"])
        run = self._adam_generator(train, split, ctx, precision)
        gen, players, start, step, best = run.gen, run.players, run.start, run.step, run.best
        local_idx, steps_per_epoch = run.local_idx, run.steps_per_epoch
        ctx.log(f"[{self.name}] fitting on {len(fit_idx)} images ({len(split['val'])} held out "
                f"for selection), {int(s['cls_epochs'])} x {steps_per_epoch} steps per round")
        bar = ctx.progress(f"[{self.name}] rounds", int(s["epochs"]))
        bar.start(start)
        for epoch in range(start, int(s["epochs"])):
            players["atk"] = copy.deepcopy(gen).eval().requires_grad_(False)
            # a fresh classifier each round, seeded by the round: a resumed run rebuilds it
            torch.manual_seed(ctx.seed * 1000003 + epoch)
            cls = prepare_model(build_classifier(s["arch"], int(train.num_classes), c, h,
                                                 int(s["cls_width"])).to(device),
                                device, precision)
            players["cls"] = cls
            players["cls_opt"] = torch.optim.SGD(cls.parameters(), lr=float(s["cls_lr"]))
            sums: dict[str, float] = {}
            for cls_epoch in range(int(s["cls_epochs"])):
                rng = torch.Generator().manual_seed(
                    (ctx.seed * 1000003 + epoch) * 997 + ctx.rank * 7919 + cls_epoch)
                order = local_idx[torch.randperm(len(local_idx), generator=rng)]
                for i in range(steps_per_epoch):
                    idx = run.batch(order, i)
                    m = confuse_step(players, ImageSet.to_float(train.images[idx]).to(device),
                                     train.labels[idx].to(device), s, ctx, views, rng)
                    step += 1
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + v
                    if step % int(s["log_every"]) == 0:
                        ctx.report({"step": step, "epoch": epoch + 1, **m})
            _sync_buffers(gen, ctx)
            total = steps_per_epoch * int(s["cls_epochs"])
            record = {"epoch": epoch + 1, "step": step,
                      **{f"round_{k}": v / total for k, v in sums.items()}}
            del players["atk"], players["cls"], players["cls_opt"]
            best = self._end_epoch(players, train, split, best, record, epoch, step, bar, ctx)
        return self._state(train, gen, best, split)

