"""Victim training: how the papers judge a protection (train a classifier on the protected
training set, report its accuracy on the clean test set).

Settings (``VICTIM_PRESETS``, flat, resolved like every other settings dict):

* ``paper``: ResNet-18, SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine annealing, batch
  128, 100 epochs, crop+flip augmentation. Adversarial training (Madry et al. 2018) runs PGD
  with ``adv_steps`` = 10 steps of ``adv_step_size`` (None: ``adv_eps * adv_step_frac``, 1/4)
  inside the ``adv_norm`` ball (``linf``, or ``l2`` as in REM App. E) of radius ``adv_eps``;
  ``adv_method = trades`` uses the TRADES loss (Zhang et al. 2019) with ``trades_beta`` (6 as
  in TRADES).
* ``quick``: the small CNN, a few epochs: trains on the digits in well under a minute on one core.
* each paper's own protocol: ``bayes`` (the same as ``paper``), ``rem`` (App. A.4: 40,000
  iterations, ``iterations`` instead of epochs, lr x0.1 every 16,000, PGD steps of rho_a / 5)
  and ``gue`` (lr 0.01, 0.1 under adversarial training via ``adv_lr``, x0.1 at epochs 75 and
  90); the figures and their sources are at ``VICTIM_PRESETS``.

``iterations`` > 0 counts optimiser steps instead of epochs (the REM victims; exact for any
dataset size, where converting to epochs would round the decay points): the schedule steps per
iteration, milestones are fractions of the iterations, and a record is made after every pass
over the data and after the last step.

``precision`` (``fp32``, ``bf16``, ``auto``; ``ue_dist.core.precision``) runs every model
forward of training, attacks and evaluation under bf16 autocast with a channels_last model;
losses, PGD deltas and optimiser state stay fp32.

``defense`` (``core/defenses.py``, ``ue-dist defences``): a ``pre`` defence transforms the stored
training images once, a ``batch`` defence augments every batch after crop/flip, a ``loss``
defence (UEraser) computes the step's loss from the crop/flip-augmented batch and the completed
epochs (``victim_loss``); a loss defence cannot be combined with ``adv_eps > 0``.

``adv_eps = 0`` is standard training. ``robust_acc`` is PGD accuracy on the test set at
``eval_eps`` (None: the training radius; so None for a standard victim unless ``eval_eps`` is
given) in the ``adv_norm`` ball, with ``eval_steps`` steps of ``eval_eps / 4`` -- PGD-20 at
8/255 uses 2/255 steps.

Distributed: the same loop runs in every Ray Train worker. ``ctx.prepare_model`` wraps the
model in DDP, each worker trains on its ``ctx.shard_indices`` slice of a seeded permutation
shared by all workers (global batch ``batch_size`` split over the workers), and evaluation
is sharded and summed. Deterministic for a seed on CPU.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ue_dist.core.adversarial import (AT_METHODS as ADV_METHODS, adversarial_examples,
                                      adversarial_loss, evaluating, robust_accuracy)
from ue_dist.core.augment import augment as augment_batch, default_augmentation
from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext, LocalContext
from ue_dist.core.defenses import (Defense, batch_augment, defense_loss, parse_defense,
                                   preprocess)
from ue_dist.core.fold import folded_views
from ue_dist.core.models import build_model, check_arch
from ue_dist.core.pgd import NORMS
from ue_dist.core.precision import PRECISIONS, upcast
from ue_dist.core.settings import (Setting, check_declared, choice, count, non_negative, positive,
                                   positive_int, resolve_declared)
from ue_dist.core.training import (Loss, Schedule, TrainLoop, constant_schedule, cosine_schedule,
                                   step_schedule, uint8_fetch, unwrap)
from ue_dist.data.imageset import ImageSet

_COMMON: dict[str, Any] = {
    "momentum": 0.9, "weight_decay": 5e-4, "milestones": [0.5, 0.75], "augment": True,
    "adv_eps": 0.0, "adv_method": "pgd", "adv_norm": "linf", "adv_steps": 10,
    "adv_step_size": None, "adv_step_frac": 0.25, "adv_lr": None, "trades_beta": 6.0,
    "iterations": 0, "defense": "none", "seed": 0, "eval_robust": True, "eval_eps": None,
    "eval_steps": 20, "eval_batch_size": 500,
    # bf16 where the hardware runs it natively: ~2x faster victims, accuracy within the seed
    # spread of fp32 (tests/test_precision.py); a victim's output is a figure, not bytes
    "precision": "auto",
}

VICTIM_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {**_COMMON, "arch": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1,
              "schedule": "cosine"},
    "quick": {**_COMMON, "arch": "small-cnn", "epochs": 8, "batch_size": 64, "lr": 0.05,
              "schedule": "cosine", "adv_steps": 5, "eval_steps": 10},
    # the papers' own victims, by paper --------------------------------------------------------
    # Bayes-error paper, "Experimental settings": 100 epochs, SGD lr 0.1, momentum 0.9, wd 5e-4,
    # cosine annealing (the same as `paper`; the batch size is not stated, 128 as the others)
    "bayes": {**_COMMON, "arch": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1,
              "schedule": "cosine"},
    # REM App. A.4 = the authors' scripts/cifar10/train_rem.sh (train.py): 40,000 iterations of
    # batch 128, SGD 0.1 / 0.9 / 5e-4, lr x0.1 every 16,000 (milestones 0.4 and 0.8 of the run,
    # stepped per iteration); PGD-AT 10 steps of rho_a / 5 (--pgd-step-size 0.8 at --pgd-radius
    # 4, in 1/255). Their loader drops the last partial batch; ours keeps it, so about one step
    # in 390 has 80 images instead of 128.
    "rem": {**_COMMON, "arch": "resnet18", "epochs": 0, "iterations": 40000, "batch_size": 128,
            "lr": 0.1, "schedule": "step", "milestones": [0.4, 0.8], "adv_step_frac": 0.2},
    # GUE paper, "Experimental settings" and "Adversarial Training": 100 epochs, SGD lr 0.01
    # (0.1 when adversarially trained), momentum 0.9, wd 5e-4, x0.1 at epochs 75 and 90; the
    # attack 10 PGD steps of eps_a / 4, TRADES lambda = 1 (its trade-off loss). The authors'
    # evaluation.py (hong-xian/gue) agrees (epochs 100, milestones 75/90, wd 5e-4, 10 steps of
    # eps_at / 4) and gives the batch the paper leaves out: 256.
    "gue": {**_COMMON, "arch": "resnet18", "epochs": 100, "batch_size": 256, "lr": 0.01,
            "adv_lr": 0.1, "schedule": "step", "milestones": [0.75, 0.9], "trades_beta": 1.0},
}
# settings a stored victim may predate, with the values that reproduce how it then trained
_ADDED_LATER: dict[str, Any] = {"precision": "fp32", "adv_norm": "linf", "adv_step_frac": 0.25,
                                "adv_lr": None, "iterations": 0}

SCHEDULES = ("cosine", "step", "none")
SUBSETS = ("all", "clean", "protected")


# settings ---------------------------------------------------------------------------------------
def resolve_victim_settings(preset: str = "paper",
                            overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Preset + ``key=value`` (or typed mapping) overrides, validated."""
    settings = resolve_declared(VICTIM_SETTINGS, VICTIM_PRESETS, preset, overrides, "victim")
    return validate_victim_settings(settings)


VICTIM_SETTINGS: dict[str, Setting] = {
    "arch": Setting("str", "victim architecture (core/models.py)"),
    "epochs": count(), "batch_size": positive_int("global batch, split over the workers"),
    "iterations": count("optimiser steps instead of epochs (0: train `epochs` epochs); the "
                        "schedule then steps per iteration"),
    "lr": positive(), "momentum": non_negative(), "weight_decay": non_negative(),
    "adv_lr": Setting("float", "learning rate when adv_eps > 0 (none: lr)", above=0,
                      optional=True),
    "schedule": choice(*SCHEDULES), "milestones": Setting("list", "step schedule: fractions of "
                                                                    "the run in (0, 1]"),
    "augment": Setting("bool", "crop+flip (or flip) augmentation"),
    "adv_eps": Setting("radius", "PGD-AT / TRADES radius (0: standard training)"),
    "adv_method": choice(*ADV_METHODS), "adv_steps": count(),
    "adv_norm": choice(*NORMS, help="ball of adversarial training and robust evaluation"),
    "adv_step_size": Setting("radius", "none: adv_eps * adv_step_frac", optional=True),
    "adv_step_frac": positive("PGD-AT step as a fraction of adv_eps"),
    "trades_beta": non_negative(), "defense": Setting("str", "NAME[:k=v,...] (core/defenses.py)"),
    "seed": Setting("seed"), "eval_robust": Setting("bool", "PGD accuracy after training"),
    "eval_eps": Setting("radius", "none: the training radius", optional=True),
    "eval_steps": count(), "eval_batch_size": positive_int(),
    "precision": choice(*PRECISIONS),
}


def validate_victim_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` checked against ``VICTIM_SETTINGS``, plus what involves several of them."""
    s = {**_ADDED_LATER, **settings}
    s = check_declared(VICTIM_SETTINGS, s, "victim")
    check_arch(s["arch"])
    if s["adv_step_size"] is not None and not s["adv_step_size"] > 0:
        raise SettingsError("adv_step_size must be > 0 (or None for adv_eps * adv_step_frac)")
    if s["iterations"] > 0 and s["epochs"] > 0:
        raise SettingsError(f"victim: give one run length: iterations={s['iterations']} and "
                            f"epochs={s['epochs']} (set iterations=0 to train by epochs, or "
                            "epochs=0 to train by iterations)")
    if s["adv_eps"] > 0 and s["adv_steps"] < 1:
        raise SettingsError("adversarial training (adv_eps > 0) needs adv_steps >= 1")
    ms = s["milestones"]
    if not all(isinstance(m, (int, float)) and 0 < m <= 1 for m in ms):
        raise SettingsError(f"milestones must be a list of fractions of the run in (0, 1], got {ms!r}")
    if parse_defense(s["defense"]).kind == "loss" and s["adv_eps"] > 0:
        raise SettingsError(f"defense {s['defense']!r} owns the training loss and cannot be "
                            f"combined with adversarial training (adv_eps={s['adv_eps']}); "
                            "use one or the other")
    return s


# data -------------------------------------------------------------------------------------------
def select_subset(imageset: ImageSet, subset: str) -> ImageSet:
    """``all`` (mixed data), ``clean`` (samples not flagged ``meta['protected']``) or ``protected``."""
    if subset not in SUBSETS:
        raise SettingsError(f"unknown subset {subset!r}; valid: {', '.join(SUBSETS)}")
    if subset == "all":
        return imageset
    flags = [bool((m or {}).get("protected", False)) for m in imageset.meta]
    want = subset == "protected"
    return imageset.subset([i for i, f in enumerate(flags) if f == want])


def check_compatible(train: ImageSet, test: ImageSet) -> None:
    """The test set must share the training images' shape and use only labels seen in training."""
    if len(train) == 0:
        raise SettingsError("the training set is empty (e.g. subset 'clean' of a fully protected "
                            "set); nothing to train a victim on")
    if len(test) == 0:
        raise SettingsError("the test set is empty")
    if train.image_shape != test.image_shape:
        raise SettingsError(f"test images have shape {list(test.image_shape)} (C,H,W) but training "
                            f"images have shape {list(train.image_shape)}")
    seen = set(train.labels.unique().tolist())
    extra = sorted(set(test.labels.unique().tolist()) - seen)
    if extra:
        raise SettingsError(f"the test set has label(s) {extra} that the training set lacks "
                            f"(training labels: {sorted(seen)})")


# the victim's loss ------------------------------------------------------------------------------
def victim_loss(s: Mapping[str, Any], defense: Defense, aug_kind: str, num_classes: int,
                device: torch.device, epoch: Callable[[], int] = lambda: 0) -> Loss:
    """Augmentation, the batch defence, then CE on the batch or PGD-AT / TRADES at ``adv_eps``.
    A ``loss`` defence (UEraser) owns the loss: it gets the augmented batch and ``epoch()``,
    the completed epochs of the run (its schedule of views depends on it)."""
    if defense.kind == "loss":
        owner = defense_loss(defense)

        def owned(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return owner(net, augment_batch(x, aug_kind, generator=generator), y, generator,
                         epoch())

        return owned
    eps = float(s["adv_eps"])
    step = float(s["adv_step_size"]) if s["adv_step_size"] is not None else \
        eps * float(s["adv_step_frac"])

    # the attack runs the model in eval mode: its batch norms folded (core.fold), same function
    attack_view = folded_views()

    def loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment_batch(x, aug_kind, generator=generator)
        targets = F.one_hot(y, num_classes).float()
        x, targets = batch_augment(defense, x, targets, generator=generator)
        if eps <= 0:
            logits = upcast(net(x))
            return F.cross_entropy(logits, targets), logits
        bare = unwrap(net)  # no DDP hooks for the attack's forwards
        # PGD's random start draws on the data's device; a CPU generator only works on CPU
        with evaluating(bare):
            x_adv = adversarial_examples(attack_view(bare), x, targets, method=s["adv_method"],
                                         eps=eps, step_size=step, steps=int(s["adv_steps"]),
                                         generator=generator if device.type == "cpu" else None,
                                         norm=s["adv_norm"])
        return adversarial_loss(net, x, x_adv.detach(), targets, method=s["adv_method"],
                                beta=float(s["trades_beta"]))

    return loss


# evaluation -------------------------------------------------------------------------------------
def evaluate_accuracy(model: torch.nn.Module, test: ImageSet, ctx: FitContext, batch_size: int = 500,
                      eps: float = 0.0, steps: int = 20, seed: int = 0,
                      precision: str = "fp32", norm: str = "linf") -> float:
    """Clean (``eps`` = 0) or PGD-``steps`` accuracy in the ``norm`` ball on ``test``, summed
    over workers."""
    idx = ctx.shard_indices(len(test)) if ctx.distributed else torch.arange(len(test))
    correct = robust_accuracy(unwrap(model), test.images, test.labels, idx, device=ctx.device,
                              batch_size=batch_size, eps=eps, steps=steps, seed=seed,
                              precision=precision, norm=norm)
    return ctx.all_reduce_mean(float(correct)) * ctx.world_size / len(test)


# training ---------------------------------------------------------------------------------------
def _schedule(s: Mapping[str, Any]) -> Schedule:
    # over the run's scheduler steps: iterations (stepped per step) or epochs
    periods = int(s["iterations"]) or max(1, int(s["epochs"]))
    if s["schedule"] == "cosine":
        return cosine_schedule(periods)
    if s["schedule"] == "step":
        return step_schedule(sorted({max(1, int(round(m * periods))) for m in s["milestones"]}))
    return constant_schedule()


def _lr(s: Mapping[str, Any]) -> float:
    """``adv_lr`` for an adversarially trained victim where the preset has one (GUE), else lr."""
    return float(s["adv_lr"]) if s["adv_eps"] > 0 and s["adv_lr"] is not None else float(s["lr"])


def _finished(loop: TrainLoop, s: Mapping[str, Any]) -> bool:
    return loop.step >= int(s["iterations"]) if s["iterations"] else loop.epoch >= int(s["epochs"])


def _passes(loop: TrainLoop, s: Mapping[str, Any]) -> int:
    """Epoch records the run makes: ``epochs``, or the passes its ``iterations`` take."""
    if not s["iterations"]:
        return int(s["epochs"])
    return math.ceil(int(s["iterations"]) / max(1, loop.order.batches_per_epoch()))


def _fingerprint(s: Mapping[str, Any], train: ImageSet, test: ImageSet) -> str:
    import hashlib
    import json

    # the pixels too: protected and clean versions of a dataset share keys and labels, and a
    # checkpoint of a victim trained on one must never be resumed for the other
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([dict(s), len(train), train.keys[:4], train.keys[-4:], len(test)],
                        sort_keys=True, default=str).encode())
    for part in (train.labels, train.images, test.labels, test.images):
        h.update(part.detach().cpu().contiguous().numpy())  # buffer protocol: no copy
    return h.hexdigest()


def train_victim(train: ImageSet, test: ImageSet, settings: Mapping[str, Any],
                 ctx: FitContext | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 return_model: bool = False) -> dict[str, Any]:
    """Train one victim on ``train`` and measure it on ``test`` after every epoch.

    Returns ``{"test_acc", "per_epoch": [{"epoch", "test_acc", "train_loss", "train_acc",
    "lr", "seconds"}], "robust_acc", "robust_eps", "settings", "train_size", "test_size",
    "images_per_s"}`` (plus ``"model"`` with ``return_model``). ``on_epoch(record)`` is called
    after each epoch (Tune reports from it); ``ctx.report`` receives the same record and a
    checkpoint state, and ``ctx.resume()`` continues from the last one.
    """
    s = validate_victim_settings(settings)
    check_compatible(train, test)
    ctx = ctx or LocalContext(seed=int(s["seed"]))
    defense: Defense = parse_defense(s["defense"])
    seed = int(s["seed"])
    num_classes = int(max(train.num_classes or 0, int(train.labels.max()) + 1,
                          int(test.labels.max()) + 1))
    channels, height, width = train.image_shape
    images = preprocess(defense, train.images)  # pre-processing defences act on the stored data
    aug_kind = default_augmentation(min(height, width)) if s["augment"] else "none"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(s["arch"], num_classes, channels, min(height, width))
    loop = TrainLoop(model, ctx, n=len(train), batch_size=int(s["batch_size"]), seed=seed,
                     lr=_lr(s), momentum=float(s["momentum"]),
                     weight_decay=float(s["weight_decay"]), precision=s["precision"],
                     schedule=_schedule(s), schedule_per="step" if s["iterations"] else "epoch")
    fingerprint = _fingerprint(s, train, test)
    per_epoch = _resume(loop, ctx, fingerprint)
    fetch = uint8_fetch(images, train.labels, ctx.device)
    loss = victim_loss(s, defense, aug_kind, num_classes, ctx.device, lambda: loop.epoch)
    seen, train_seconds = 0, 0.0
    bar = ctx.progress("victim epochs", _passes(loop, s), lines=4)
    bar.start(loop.epoch)
    while not _finished(loop, s):
        t0 = time.perf_counter()
        lr = loop.train_epoch(fetch, loss, stop_at=int(s["iterations"]) or None)
        seen += loop.samples_seen
        train_seconds += time.perf_counter() - t0  # images/s counts training, not evaluation
        metrics = loop.take_metrics()
        test_acc = evaluate_accuracy(loop.model, test, ctx, int(s["eval_batch_size"]),
                                     precision=loop.precision)
        record = {"epoch": loop.epoch, "test_acc": test_acc, **metrics, "lr": lr,
                  "seconds": time.perf_counter() - t0}
        if s["iterations"]:
            record["step"] = loop.step
        per_epoch.append(record)
        bar.update(loop.epoch, f"loss {record['train_loss']:.4f} · train acc "
                   f"{record['train_acc']:.4f} · test acc {test_acc:.4f}")
        ctx.report(dict(record), {"kind": "victim", "fingerprint": fingerprint,
                                  "per_epoch": copy.deepcopy(per_epoch), "loop": loop.state_dict()})
        if on_epoch is not None:
            on_epoch(dict(record))
    result = _final_result(loop, s, test, ctx, per_epoch)
    result.update(train_size=len(train), test_size=len(test),
                  images_per_s=(seen * ctx.world_size) / train_seconds
                  if train_seconds > 0 and seen else math.nan)
    if return_model:
        result["model"] = loop.model
    return result


def _resume(loop: TrainLoop, ctx: FitContext, fingerprint: str) -> list[dict[str, Any]]:
    """The per-epoch records so far; a checkpoint resumes only the same victim (settings and
    data), never another one."""
    resumed = ctx.resume()
    if resumed is None or resumed.get("kind") != "victim" or "loop" not in resumed or \
            resumed.get("fingerprint") != fingerprint:
        return []
    loop.load_state_dict(resumed["loop"])
    ctx.log(f"victim: resumed at epoch {loop.epoch}")
    return list(resumed["per_epoch"])


def _final_result(loop: TrainLoop, s: Mapping[str, Any], test: ImageSet, ctx: FitContext,
                  per_epoch: list[dict[str, Any]]) -> dict[str, Any]:
    robust_eps = s["eval_eps"] if s["eval_eps"] is not None else float(s["adv_eps"])
    robust_acc = None
    if s["eval_robust"] and robust_eps > 0:
        robust_acc = evaluate_accuracy(loop.model, test, ctx, int(s["eval_batch_size"]),
                                       eps=robust_eps, steps=int(s["eval_steps"]),
                                       seed=int(s["seed"]), precision=loop.precision,
                                       norm=s["adv_norm"])
    final = per_epoch[-1]["test_acc"] if per_epoch else evaluate_accuracy(
        loop.model, test, ctx, int(s["eval_batch_size"]), precision=loop.precision)
    return {"test_acc": final, "per_epoch": per_epoch, "robust_acc": robust_acc,
            "robust_eps": robust_eps if robust_acc is not None else None, "settings": dict(s)}
