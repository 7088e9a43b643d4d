"""The EM paper's other noises: class-wise error-minimising noise, and sample-wise random noise.

Huang, Ma, Erfani, Bailey & Wang, "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021, compare their sample-wise error-minimising noise (``em``) with a class-wise version
of it and with random noise, sample-wise and class-wise (``classwise``). Both here follow the
authors' code (HanxunH/Unlearnable-Examples, ``perturbation.py`` and ``toolbox.py``).

``em-classwise`` -- threat model L-inf, ``|delta|_inf <= eps``; one pattern per class
(``K x C x H x W``), so it protects images ``fit`` never saw as long as their labels are known.
``fit`` alternates, in rounds, (a) ``train_steps`` SGD steps of a classifier on ``x + delta_y``
and (b) one pass over a seeded ``subset_fraction`` of the training set in batches: each sample
takes ``steps`` signed descent steps of size ``eps * step_frac`` on CE from its class pattern
(``x + delta_y`` clipped to [0, 1]), and each class pattern becomes the mean of its samples'
results, clipped to the ball; it stops once the classifier's error on the noisy subset is below
``stop_error`` (the authors' ``--universal_stop_error 0.1``) or after ``max_rounds`` rounds
(the authors' loop has no limit). ``perturb`` looks the pattern up by label, as ``classwise``.
Differences from the authors' code: the batches of the pattern pass come from this project's
seeded order (theirs: a shuffled loader over a random 20 % split); no gradient clipping in the
classifier's SGD (theirs clips at 5); one worker only (the class means would need an all-reduce
of whole patterns, which ``FitContext`` does not offer).

``random-samplewise`` -- the paper's random-noise baseline: each image its own uniform noise in
``[-eps, eps]``, drawn from a generator seeded by ``noise_seed`` and the image's own bytes (so
the same image gets the same noise in any batch, on any actor), nothing learned. Like
``classwise`` it is not a protection: the paper reports it leaves test accuracy as it was.

Shapes: images ``B x C x H x W`` float in [0, 1], labels ``B``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext
from ue_dist.core.models import ARCHITECTURES, build_model
from ue_dist.core.pgd import pgd
from ue_dist.core.settings import (Setting, choice, fraction, non_negative, positive,
                                   positive_int)
from ue_dist.core.training import TrainLoop, cross_entropy_loss
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, register
from ue_dist.methods.classwise import ClasswiseNoise


@register
class ClasswiseEM(ClasswiseNoise):
    """Class-wise error-minimising noise (Huang et al., ICLR 2021); see the module docstring."""

    name = "em-classwise"
    kind, year, needs_labels = "error-minimising", 2021, True
    paper = ("Huang et al., Unlearnable Examples: Making Personal Data Unexploitable, ICLR 2021 "
             "(class-wise error-minimising noise)")
    presets = {
        # the authors' README command for class-wise noise on CIFAR-10: --num_steps 1
        # --step_size 0.8 (of 8) --universal_stop_error 0.1 --use_subset (train_portion 0.2),
        # train_step 10, batch 512; configs/cifar10/resnet18.yaml: SGD 0.1 / 0.9 / 5e-4,
        # constant during the search (the scheduler is not stepped)
        "paper": {"eps": 8 / 255, "arch": "resnet18", "batch_size": 512, "lr": 0.1,
                  "momentum": 0.9, "weight_decay": 5e-4, "train_steps": 10, "steps": 1,
                  "step_frac": 0.1, "subset_fraction": 0.2, "stop_error": 0.1,
                  "max_rounds": 200, "noise_seed": 0},
        # digits-sized: a small CNN, batches of 64, half the set per pattern pass
        "quick": {"eps": 8 / 255, "arch": "small-cnn", "batch_size": 64, "lr": 0.1,
                  "momentum": 0.9, "weight_decay": 5e-4, "train_steps": 10, "steps": 1,
                  "step_frac": 0.1, "subset_fraction": 0.5, "stop_error": 0.1,
                  "max_rounds": 60, "noise_seed": 0},
    }
    declared = {
        "eps": Setting("radius", "L-inf radius of the class patterns"),
        "arch": choice(*sorted(ARCHITECTURES), help="the classifier the patterns fool"),
        "batch_size": positive_int("batch of the classifier's steps and of the pattern pass"),
        "lr": positive("the classifier's learning rate (constant)"),
        "momentum": non_negative(), "weight_decay": non_negative(),
        "train_steps": positive_int("classifier steps per round"),
        "steps": positive_int("descent steps per sample in the pattern pass"),
        "step_frac": positive("descent step as a fraction of eps"),
        "subset_fraction": fraction("share of the training set the pattern pass runs over"),
        "stop_error": fraction("stop once the error on the noisy subset is below it (0: run "
                               "max_rounds)", above=None),
        "max_rounds": positive_int("rounds at most"),
        "noise_seed": Setting("seed", "initial patterns, weights, batch order"),
    }

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        if ctx.distributed:
            raise SettingsError("method 'em-classwise' fits on one worker (--workers 1): its "
                                "class means are not all-reduced across workers")
        if len(train) < 2:
            raise SettingsError("method 'em-classwise': the training set needs two images or more")
        seed, k, eps = int(s["noise_seed"]), int(train.num_classes), self.eps
        gen = torch.Generator().manual_seed(seed)
        # the authors' start: uniform in [-eps, eps] (toolbox.random_noise)
        patterns = ((torch.rand((k, *train.image_shape), generator=gen) * 2 - 1) * eps).to(ctx.device)
        n_sub = max(2, round(float(s["subset_fraction"]) * len(train)))
        subset = torch.randperm(len(train), generator=gen)[:n_sub].sort().values
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(s["arch"], k, train.image_shape[0], train.image_shape[1])
        loop = TrainLoop(model, ctx, n=len(train), batch_size=int(s["batch_size"]), seed=seed,
                         lr=float(s["lr"]), momentum=float(s["momentum"]),
                         weight_decay=float(s["weight_decay"]))
        images, labels = train.images, train.labels

        def noisy(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = images[idx].to(ctx.device).float().div_(255.0)
            y = labels[idx].to(ctx.device)
            return (x + patterns[y]).clamp_(0, 1), y

        step = eps * float(s["step_frac"])
        batch = int(s["batch_size"])
        rounds, error = 0, 1.0
        bar = ctx.progress(f"[{self.name}] rounds (stop at error < {float(s['stop_error']):g})",
                           int(s["max_rounds"]))
        while rounds < int(s["max_rounds"]):
            for _ in range(int(s["train_steps"])):
                loop.train_step(noisy, cross_entropy_loss())
            net = loop.model.eval()
            order = subset[torch.randperm(len(subset), generator=gen)]
            for start in range(0, len(order), batch):
                x, y = noisy(order[start:start + batch])
                clean = images[order[start:start + batch]].to(ctx.device).float().div_(255.0)
                with torch.enable_grad():
                    delta = pgd(lambda z: F.cross_entropy(net(z), y), clean, eps=eps,
                                step_size=step, steps=int(s["steps"]), maximize=False,
                                init=x - clean)
                for c in torch.unique(y).tolist():
                    patterns[c] = delta[y == c].mean(0).clamp(-eps, eps)
            rounds += 1
            error = self._error(net, noisy, subset, batch)
            bar.update(rounds, f"error on the noisy subset {error:.3f}")
            ctx.report({"round": rounds, "noisy_error": error})
            if error < float(s["stop_error"]):
                break
        ctx.log(f"{self.name}: {rounds} round(s), error on the noisy subset {error:.4f}")
        return self.new_state(train, patterns=patterns.float().cpu(), rounds=rounds,
                              noisy_error=float(error))

    @staticmethod
    @torch.no_grad()
    def _error(net: torch.nn.Module, noisy, subset: torch.Tensor, batch: int) -> float:
        wrong = 0
        for start in range(0, len(subset), batch):
            x, y = noisy(subset[start:start + batch])
            wrong += int((net(x).argmax(1) != y).sum())
        return wrong / max(1, len(subset))


@register
class SamplewiseRandomNoise(Method):
    """Sample-wise uniform random noise (Huang et al.'s baseline); see the module docstring."""

    name = "random-samplewise"
    kind, year, needs_labels = "model-free", 2021, False
    paper = ("Huang et al., Unlearnable Examples: Making Personal Data Unexploitable, ICLR 2021 "
             "(sample-wise random noise baseline)")
    presets = {"paper": {"eps": 8 / 255, "noise_seed": 0},
               "quick": {"eps": 8 / 255, "noise_seed": 0}}
    # nothing is fitted: protect may take another radius
    declared = {"eps": Setting("radius", "L-inf radius of the noise", protect_time=True),
                "noise_seed": Setting("seed", "with each image's bytes, seeds its noise")}
    needs_fit = False

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        return self.new_state(train)

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        return None

    def perturb(self, loaded: None, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seed = str(int(self.settings["noise_seed"])).encode()
        # the stored uint8 value of each pixel: the same image gives the same bytes wherever
        # it is read, whatever batch it is in
        pixels = (images.detach().cpu() * 255).round().to(torch.uint8)
        noise = torch.empty(images.shape, dtype=torch.float32)
        for i in range(len(images)):
            digest = hashlib.blake2b(seed + pixels[i].numpy().tobytes(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "big") % (2**63))
            noise[i] = (torch.rand(images.shape[1:], generator=gen) * 2 - 1) * self.eps
        noise = noise.to(images.device)
        return (images + noise).clamp(0.0, 1.0) - images
