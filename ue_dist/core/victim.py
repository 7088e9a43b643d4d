"""Victim training: how the papers judge a protection (train a classifier on the protected
training set, report its accuracy on the clean test set).

Settings (``VICTIM_PRESETS``, flat, resolved like every other settings dict):

* ``paper``: ResNet-18, SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine annealing, batch
  128, 100 epochs, crop+flip augmentation (the Bayes-error paper's victim; the GUE paper uses
  the same optimiser with lr 0.01 and step decay at epochs 75/90: ``schedule=step``,
  ``milestones=[0.75, 0.9]``, ``lr=0.01``). Adversarial training (Madry et al. 2018; the REM
  paper) runs PGD with ``adv_steps`` = 10 steps of ``adv_step_size`` (None: ``adv_eps / 4``;
  REM uses ``adv_eps / 5`` on CIFAR) inside the L-inf ball of radius ``adv_eps``; ``adv_method
  = trades`` uses the TRADES loss (Zhang et al. 2019) with ``trades_beta`` (6 as in TRADES).
* ``quick``: the small CNN, a few epochs: trains on the digits in well under a minute on one core.

``precision`` (``fp32``, ``bf16``, ``auto``; ``ue_dist.core.precision``) runs every model
forward of training, attacks and evaluation under bf16 autocast with a channels_last model;
losses, PGD deltas and optimiser state stay fp32.

``adv_eps = 0`` is standard training. ``robust_acc`` is PGD accuracy on the test set at
``eval_eps`` (None: the training radius; so None for a standard victim unless ``eval_eps`` is
given), with ``eval_steps`` steps of ``eval_eps / 4`` -- PGD-20 at 8/255 uses 2/255 steps.

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

from ue_dist.core.augment import augment as augment_batch, default_augmentation
from ue_dist.core.config import SettingsError, parse_radius, resolve_settings
from ue_dist.core.context import FitContext, LocalContext
from ue_dist.core.defenses import Defense, batch_augment, parse_defense, preprocess
from ue_dist.core.models import build_model, check_arch
from ue_dist.core.pgd import pgd
from ue_dist.core.precision import (autocast, check_precision, prepare_model, resolve_precision,
                                     upcast)
from ue_dist.data.imageset import ImageSet

_COMMON: dict[str, Any] = {
    "momentum": 0.9, "weight_decay": 5e-4, "milestones": [0.5, 0.75], "augment": True,
    "adv_eps": 0.0, "adv_method": "pgd", "adv_steps": 10, "adv_step_size": None,
    "trades_beta": 6.0, "defense": "none", "seed": 0, "eval_robust": True, "eval_eps": None,
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
}

SCHEDULES = ("cosine", "step", "none")
ADV_METHODS = ("pgd", "trades")
SUBSETS = ("all", "clean", "protected")


# settings ---------------------------------------------------------------------------------------
def resolve_victim_settings(preset: str = "paper",
                            overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Preset + ``key=value`` (or typed mapping) overrides, validated."""
    settings = resolve_settings(VICTIM_PRESETS, preset, overrides, what="victim")
    return validate_victim_settings(settings)


def validate_victim_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    s = dict(settings)
    s.setdefault("precision", "fp32")  # settings written before the option existed
    valid = VICTIM_PRESETS["paper"]
    unknown = sorted(set(s) - set(valid))
    missing = sorted(set(valid) - set(s))
    if unknown:
        raise SettingsError(f"unknown victim setting(s) {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(sorted(valid))}")
    if missing:
        raise SettingsError(f"victim settings lack {', '.join(missing)} "
                            "(start from resolve_victim_settings(preset, overrides))")
    check_arch(s["arch"])
    if s["schedule"] not in SCHEDULES:
        raise SettingsError(f"unknown schedule {s['schedule']!r}; valid: {', '.join(SCHEDULES)}")
    if s["adv_method"] not in ADV_METHODS:
        raise SettingsError(f"unknown adv_method {s['adv_method']!r}; valid: {', '.join(ADV_METHODS)}")
    for key in ("adv_eps", "eval_eps"):
        if s[key] is not None:
            s[key] = parse_radius(s[key], key)
    if s["adv_step_size"] is not None:
        s["adv_step_size"] = parse_radius(s["adv_step_size"], "adv_step_size")
        if s["adv_step_size"] <= 0:
            raise SettingsError("adv_step_size must be > 0 (or None for adv_eps/4)")
    for key in ("epochs", "batch_size", "adv_steps", "eval_steps", "eval_batch_size", "seed"):
        if not isinstance(s[key], int) or isinstance(s[key], bool):
            raise SettingsError(f"victim setting {key} must be an integer, got {s[key]!r}")
    if s["epochs"] < 0 or s["batch_size"] < 1 or s["eval_batch_size"] < 1:
        raise SettingsError("victim settings need epochs >= 0, batch_size >= 1, eval_batch_size >= 1")
    if s["adv_eps"] > 0 and s["adv_steps"] < 1:
        raise SettingsError("adversarial training (adv_eps > 0) needs adv_steps >= 1")
    if not float(s["lr"]) > 0:
        raise SettingsError(f"lr must be > 0, got {s['lr']}")
    ms = s["milestones"]
    if not isinstance(ms, (list, tuple)) or not all(isinstance(m, (int, float)) and 0 < m <= 1
                                                    for m in ms):
        raise SettingsError(f"milestones must be a list of fractions of the epochs in (0, 1], got {ms!r}")
    parse_defense(s["defense"])
    check_precision(s["precision"], "victim setting precision")
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


# losses -----------------------------------------------------------------------------------------
def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # targets are class probabilities; fp32 logits (a no-op unless the forward ran in bf16)
    return F.cross_entropy(upcast(logits), targets)


def _adversarial(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, s: Mapping[str, Any],
                 generator: torch.Generator | None) -> torch.Tensor:
    """The PGD (Madry) or TRADES adversarial batch for ``x`` at radius ``adv_eps``."""
    eps = float(s["adv_eps"])
    step = float(s["adv_step_size"]) if s["adv_step_size"] is not None else eps / 4
    was_training = model.training
    model.eval()  # attack with running BN statistics, so the adversarial batch does not pollute them
    if s["adv_method"] == "pgd":
        delta = pgd(lambda z: _soft_ce(model(z), targets), x, eps=eps, step_size=step,
                    steps=int(s["adv_steps"]), maximize=True, random_start=True, generator=generator)
    else:  # TRADES: maximise KL(f(x) || f(x')) from a tiny Gaussian start
        with torch.no_grad():
            p_clean = F.softmax(upcast(model(x)), dim=1)
        init = 0.001 * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        delta = pgd(lambda z: F.kl_div(F.log_softmax(upcast(model(z)), dim=1), p_clean,
                                       reduction="sum"),
                    x, eps=eps, step_size=step, steps=int(s["adv_steps"]), maximize=True,
                    init=init)
    model.train(was_training)
    return (x + delta).detach()


# evaluation -------------------------------------------------------------------------------------
def _eval_slices(n: int, ctx: FitContext) -> torch.Tensor:
    return ctx.shard_indices(n) if ctx.distributed else torch.arange(n)


def evaluate_accuracy(model: torch.nn.Module, test: ImageSet, ctx: FitContext, batch_size: int = 500,
                      eps: float = 0.0, steps: int = 20, seed: int = 0,
                      precision: str = "fp32") -> float:
    """Clean (``eps`` = 0) or PGD-``steps`` L-inf accuracy on ``test``, summed over workers;
    model forwards under ``precision`` (the attack's delta stays fp32)."""
    precision = resolve_precision(precision, ctx.device)
    net = getattr(model, "module", model)  # no DDP hooks for evaluation / attacks
    net.eval()
    idx = _eval_slices(len(test), ctx)
    generator = torch.Generator().manual_seed(seed + 7919) if ctx.device.type == "cpu" else None
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        x = ImageSet.to_float(test.images[b]).to(ctx.device)
        y = test.labels[b].to(ctx.device)
        with autocast(ctx.device, precision):
            if eps > 0:
                x = x + pgd(lambda z: F.cross_entropy(upcast(net(z)), y, reduction="sum"), x,
                            eps=eps, step_size=eps / 4, steps=steps, generator=generator)
            with torch.no_grad():
                correct += (net(x).argmax(1) == y).sum()
    total = ctx.all_reduce_mean(float(correct)) * ctx.world_size
    return total / len(test)


# training ---------------------------------------------------------------------------------------
def _scheduler(optimizer: torch.optim.Optimizer, s: Mapping[str, Any]):
    epochs = max(1, int(s["epochs"]))
    if s["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if s["schedule"] == "step":
        marks = sorted({max(1, int(round(m * epochs))) for m in s["milestones"]})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=marks, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


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
    device = ctx.device
    seed = int(s["seed"])
    num_classes = int(max(train.num_classes or 0, int(train.labels.max()) + 1,
                          int(test.labels.max()) + 1))
    channels, height, width = train.image_shape

    images = preprocess(defense, train.images)  # pre-processing defences act on the stored data
    labels = train.labels
    aug_kind = default_augmentation(min(height, width)) if s["augment"] else "none"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(s["arch"], num_classes, channels, min(height, width))
    precision = resolve_precision(s["precision"], device)
    # channels_last before DDP wraps it (bf16 / CUDA only; fp32 on CPU stays NCHW)
    model = ctx.prepare_model(prepare_model(model.to(device), device, precision))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(s["lr"]),
                                momentum=float(s["momentum"]),
                                weight_decay=float(s["weight_decay"]))
    scheduler = _scheduler(optimizer, s)
    # one generator for order (identical on every worker), one for this worker's randomness
    order_gen = torch.Generator().manual_seed(seed)
    local_gen = torch.Generator().manual_seed(seed * 1000 + 1 + ctx.rank)
    # PGD's random start draws on the data's device; a CPU generator only works on CPU
    attack_gen = local_gen if device.type == "cpu" else None

    per_epoch: list[dict[str, Any]] = []
    start_epoch = 0
    # a checkpoint resumes only the same victim (settings and data), never another one
    fingerprint = _fingerprint(s, train, test)
    resumed = ctx.resume()
    if resumed is not None and resumed.get("kind") == "victim" and \
            resumed.get("fingerprint") == fingerprint:
        getattr(model, "module", model).load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        order_gen.set_state(resumed["order_gen"])
        local_gen.set_state(resumed["local_gen"])
        per_epoch = list(resumed["per_epoch"])
        start_epoch = int(resumed["epoch"])
        ctx.log(f"victim: resumed at epoch {start_epoch}")

    n = len(labels)
    per_worker_batch = max(1, int(s["batch_size"]) // ctx.world_size)
    mine = ctx.shard_indices(n) if ctx.distributed else None
    seen, train_seconds = 0, 0.0
    for epoch in range(start_epoch, int(s["epochs"])):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        if mine is not None:
            # every worker takes the same number of steps (DDP all-reduces each one): the
            # shorter shards wrap around to the start of the shared permutation
            per = math.ceil(n / ctx.world_size)
            perm = torch.cat([perm[mine], perm[:per - len(mine)]])
        # running sums stay on the device: one host synchronisation per epoch, not per step
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        count = 0
        for bstart in range(0, len(perm), per_worker_batch):
            b = perm[bstart:bstart + per_worker_batch]
            if len(b) < 2 and len(perm) >= 2:
                continue  # a batch of one breaks batch norm; the sample returns next epoch
            # uint8 to the device first; augmentation parameters come from the CPU generator
            x = ImageSet.to_float(images[b].to(device))
            y = labels[b].to(device)
            x = augment_batch(x, aug_kind, generator=local_gen)
            targets = F.one_hot(y, num_classes).float()
            x, targets = batch_augment(defense, x, targets, generator=local_gen)
            with autocast(device, precision):
                if float(s["adv_eps"]) > 0:
                    x_adv = _adversarial(getattr(model, "module", model), x, targets, s,
                                         attack_gen)
                if float(s["adv_eps"]) > 0 and s["adv_method"] == "trades":
                    # one forward over [x; x_adv] (DDP allows one forward per backward)
                    both = upcast(model(torch.cat([x, x_adv])))
                    logits, logits_adv = both[:len(x)], both[len(x):]
                    loss = _soft_ce(logits, targets) + float(s["trades_beta"]) * F.kl_div(
                        F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
                else:
                    if float(s["adv_eps"]) > 0:
                        x = x_adv
                    logits = upcast(model(x))
                    loss = _soft_ce(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(b)
            correct += (logits.detach().argmax(1) == y).sum()
            count += len(b)
        seen += count
        train_seconds += time.perf_counter() - t0  # images/s counts training, not evaluation
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        test_acc = evaluate_accuracy(model, test, ctx, int(s["eval_batch_size"]),
                                     precision=precision)
        record = {"epoch": epoch + 1, "test_acc": test_acc,
                  "train_loss": ctx.all_reduce_mean(float(loss_sum) / max(count, 1)),
                  "train_acc": ctx.all_reduce_mean(int(correct) / max(count, 1)), "lr": lr,
                  "seconds": time.perf_counter() - t0}
        per_epoch.append(record)
        ctx.log(f"victim epoch {epoch + 1}/{s['epochs']}: loss {record['train_loss']:.4f} "
                f"train acc {record['train_acc']:.4f} test acc {test_acc:.4f}")
        state = {"kind": "victim", "fingerprint": fingerprint, "epoch": epoch + 1, "per_epoch": copy.deepcopy(per_epoch),
                 "model": {k: v.detach().contiguous().clone() for k, v in
                           getattr(model, "module", model).state_dict().items()},
                 "optimizer": copy.deepcopy(optimizer.state_dict()),
                 "scheduler": scheduler.state_dict(),
                 "order_gen": order_gen.get_state(), "local_gen": local_gen.get_state()}
        ctx.report(dict(record), state)
        if on_epoch is not None:
            on_epoch(dict(record))

    robust_eps = s["eval_eps"] if s["eval_eps"] is not None else float(s["adv_eps"])
    robust_acc = None
    if s["eval_robust"] and robust_eps > 0:
        robust_acc = evaluate_accuracy(model, test, ctx, int(s["eval_batch_size"]), eps=robust_eps,
                                       steps=int(s["eval_steps"]), seed=seed, precision=precision)
    final = per_epoch[-1]["test_acc"] if per_epoch else evaluate_accuracy(
        model, test, ctx, int(s["eval_batch_size"]), precision=precision)
    result = {"test_acc": final, "per_epoch": per_epoch, "robust_acc": robust_acc,
              "robust_eps": robust_eps if robust_acc is not None else None,
              "settings": dict(s), "train_size": n, "test_size": len(test),
              "images_per_s": (seen * ctx.world_size) / train_seconds if train_seconds > 0 and seen
              else math.nan}
    if return_model:
        result["model"] = getattr(model, "module", model)
    return result
