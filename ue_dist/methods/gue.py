"""Game Unlearnable Example (GUE) and its adversarial-training variant (GUE-AT).

Paper: Liu, Yang, Chen, Li, Wang, Zhang, "Game-Theoretic Unlearnable Example Attacks"
(AAAI 2024; the "Game Unlearnable Example" GUE).

Threat model: the protector (game leader) perturbs every training image by
``delta = g_w(x)``, ``|delta|_inf <= eps`` (a U-Net with ``eps * tanh`` output,
``ue_dist.core.unet``); the victim (follower) trains a classifier ``f_theta`` on the perturbed
images, with standard training (``gue``: follower loss CE) or adversarial training (``gue-at``:
TRADES with beta=1, or the PGD adversarial loss, at radius ``at_eps``).

The Stackelberg game is solved with BOME (Algorithm 1): per mini-batch,
* ``theta^T``: ``inner_steps`` Adam steps on a copy of ``theta`` minimising the follower loss
  ``J_c(w, .)`` on the perturbed batch (``w`` fixed);
* ``q(w, theta) = J_c(w, theta) - J_c(w, theta^T)`` (``theta^T`` held constant);
* the leader objective ``l(theta) = J_a = -E[L_a(x, y; theta)]`` on the *clean* batch with the
  surrogate ``L_sur = -max_{k != y} CE(x, k)`` (Eq. 3) or, for the ablation, ``L_a = CE``;
* the dynamic barrier ``lambda = max((eta ||grad q||^2 - <grad l, grad q>) / ||grad q||^2, 0)``;
* ``theta <- theta - cls_lr (grad_theta l + lambda grad_theta q)``,
  ``w <- w - gen_lr lambda grad_w q`` (``l`` does not depend on ``w``).

Shapes: images ``B x C x H x W`` float in [0, 1]; ``perturb`` is one generator forward pass in
eval mode (batch-independent), so it streams over shards and protects data that arrive after
fitting. Model selection keeps the generator whose protected fit images leave a fresh victim
(``select_epochs``, ``select_arch``; for GUE-AT trained with PGD-AT at ``select_adv_eps``, as in
the authors' ``gue_adv.py``) least accurate on a held-out part of the *training* data
(``val_fraction``) -- never a test set, where the authors' code measures on CIFAR's test set; ``train_fraction`` fits on a seeded subset and never looks at the rest.

``precision`` (``fp32``/``bf16``/``auto``) runs the generator and classifier forwards of BOME
and of ``perturb`` under bf16 autocast (channels_last models); the generator's ``eps * tanh``
head, the losses, the barrier's inner products and all optimiser state stay fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ue_dist.core.adversarial import adversarial_examples, adversarial_loss
from ue_dist.core.augment import defended
from ue_dist.core.config import SettingsError, parse_radius
from ue_dist.core.context import FitContext, format_metrics
from ue_dist.core.defenses import eot_views
from ue_dist.core.models import ARCHITECTURES, SmallCNN, WithNormalize, build_model
from ue_dist.core.precision import PRECISIONS, in_precision, prepare_model, resolve_precision
from ue_dist.core.settings import (Setting, choice, count, fraction, non_negative, positive,
                                   positive_int)
from ue_dist.core.unet import UNetGenerator
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register
from ue_dist.methods.rem import eot_defences_setting

PAPER = ("Liu et al., Game-Theoretic Unlearnable Example Attacks (GUE), AAAI 2024, "
         "arXiv:2401.17523")
LEADER_LOSSES = ("surrogate", "ce")
FOLLOWER_LOSSES = ("ce", "trades", "pgd")

Model = Callable[[torch.Tensor], torch.Tensor]


# losses -----------------------------------------------------------------------------------------
def surrogate_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-E[L_sur] = E[max_{k != y} CE(x, k)]``: what the leader minimises (>= log(K-1))."""
    logp = F.log_softmax(logits, dim=1)
    # CE(x, k) = -log p_k; the max over k != y is -min_{k != y} log p_k
    masked = logp.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("inf"))
    return (-masked.min(dim=1).values).mean()


def leader_objective(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """``J_a(theta) = -E[L_a]`` on clean data; the leader minimises it."""
    if kind == "surrogate":
        return surrogate_objective(logits, y)
    if kind == "ce":
        return -F.cross_entropy(logits, y)
    raise SettingsError(f"leader_loss must be one of {', '.join(LEADER_LOSSES)}, got {kind!r}")


def follower_objective(model: Model, x: torch.Tensor, y: torch.Tensor, settings: Mapping[str, Any],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``J_c``: the victim's training loss on perturbed images ``x`` (gradients flow into ``x``).

    ``ce``: standard training. ``trades`` / ``pgd``: the shared adversarial training of
    ``core.adversarial`` (TRADES with ``at_beta``, or CE at the PGD example) at radius
    ``at_eps``; the adversary works on a detached copy of ``x``, so ``x + d`` still carries the
    generator's gradient through ``x``.
    """
    kind = settings["follower_loss"]
    if kind == "ce":
        return F.cross_entropy(model(x), y)
    if kind not in FOLLOWER_LOSSES:
        raise SettingsError(f"follower_loss must be one of {', '.join(FOLLOWER_LOSSES)}, "
                            f"got {kind!r}")
    x_adv = adversarial_examples(model, x, y, method=kind, eps=float(settings["at_eps"]),
                                 step_size=at_step_size(settings),
                                 steps=int(settings["at_steps"]), generator=generator)
    loss, _ = adversarial_loss(model, x, x_adv, y, method=kind, beta=float(settings["at_beta"]))
    return loss


def at_step_size(settings: Mapping[str, Any]) -> float:
    raw = settings.get("at_step_size")
    if raw is None or raw == "" or raw == "auto":
        return float(settings["at_eps"]) / 4  # the paper: 10 steps of eps_a / 4
    return parse_radius(raw, "at_step_size")


# the dynamic barrier ----------------------------------------------------------------------------
def barrier_lambda(dot_lq: torch.Tensor | float, norm_q_sq: torch.Tensor | float,
                   eta: float) -> torch.Tensor:
    """``max((phi - <grad l, grad q>) / ||grad q||^2, 0)`` with ``phi = eta ||grad q||^2``."""
    dot_lq = torch.as_tensor(dot_lq, dtype=torch.float64)
    norm_q_sq = torch.as_tensor(norm_q_sq, dtype=torch.float64)
    return torch.clamp((eta * norm_q_sq - dot_lq) / (norm_q_sq + 1e-12), min=0.0)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * z.double()).sum() for x, z in zip(a, b))


def _sq(a: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() ** 2).sum() for x in a)


# distribution helpers ---------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _mean_across_workers(tensors: Sequence[torch.Tensor], ctx: FitContext | None) -> list[torch.Tensor]:
    """Average gradients over workers: BOME needs several separate gradients and their inner
    products in one step, which DDP's single backward hook cannot give, so reduce explicitly."""
    tensors = list(tensors)
    if ctx is None or not ctx.distributed or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _sync_buffers(module: nn.Module, ctx: FitContext | None) -> None:
    """Average BN running statistics over workers (each saw its own batches)."""
    if ctx is None or not ctx.distributed:
        return
    floats = [b for b in module.buffers() if b.is_floating_point()]
    for b, m in zip(floats, _mean_across_workers(floats, ctx)):
        b.copy_(m)


# one BOME iteration -----------------------------------------------------------------------------
def bome_step(gen: nn.Module, cls: nn.Module, gen_opt: torch.optim.Optimizer,
              cls_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              settings: Mapping[str, Any], ctx: FitContext | None = None,
              generator: torch.Generator | None = None, views: tuple = (),
              view_generator: torch.Generator | None = None) -> dict[str, float]:
    """One iteration of Algorithm 1 on the batch ``(x, y)``; updates ``gen`` and ``cls`` in place.
    ``views``: the follower trains on defended views of the perturbed batch (one draw per
    sample and step, the same in ``J_c(theta)``, ``J_c(theta^T)`` and the inner steps).

    ``gen`` / ``cls`` are the bare modules (not DDP wrappers); gradients are averaged over
    workers explicitly. Returns the step's metrics (plain floats).
    """
    gen.train()
    cls.train()
    precision = resolve_precision(settings["precision"], x.device)
    gen_fn = in_precision(gen, x.device, precision)
    cls_fn = in_precision(cls, x.device, precision)
    w_params = [p for p in gen.parameters() if p.requires_grad]
    names = [n for n, p in cls.named_parameters() if p.requires_grad]
    theta = [p for p in cls.parameters() if p.requires_grad]

    # the perturbed batch carries the graph back to w
    x_p = defended((x + gen_fn(x)).clamp(0.0, 1.0), views, view_generator)

    # theta^T: T Adam steps on a copy of theta, w fixed (x_p detached)
    theta_t = {n: p.detach().clone().requires_grad_(True) for n, p in zip(names, theta)}
    buffers_t = {n: b.detach().clone() for n, b in cls.named_buffers()}
    inner_opt = torch.optim.Adam(list(theta_t.values()), lr=float(settings["inner_lr"]))

    f_t = in_precision(lambda z: functional_call(cls, (theta_t, buffers_t), (z,)), x.device,
                       precision)

    x_d = x_p.detach()
    for _ in range(int(settings["inner_steps"])):
        loss = follower_objective(f_t, x_d, y, settings, generator)
        grads = torch.autograd.grad(loss, list(theta_t.values()))
        for p, g in zip(theta_t.values(), _mean_across_workers(grads, ctx)):
            p.grad = g
        inner_opt.step()
    for p in theta_t.values():
        p.requires_grad_(False)  # theta^T is a constant in q

    # leader: gradient of J_a on the clean batch (w does not enter it)
    j_a = leader_objective(cls_fn(x), y, str(settings["leader_loss"]))
    g_l = _mean_across_workers(torch.autograd.grad(j_a, theta), ctx)
    leader_norm = math.sqrt(float(_sq(g_l)))
    clip = float(settings["leader_grad_clip"])
    if clip > 0 and leader_norm > clip:  # the "CE(clip)" ablation of Figure 5
        g_l = [g * (clip / leader_norm) for g in g_l]

    # q(w, theta) = J_c(w, theta) - J_c(w, theta^T); gradients w.r.t. (w, theta)
    j_c = follower_objective(cls_fn, x_p, y, settings, generator)
    j_c_t = follower_objective(f_t, x_p, y, settings, generator)
    q = j_c - j_c_t
    grads = _mean_across_workers(torch.autograd.grad(q, w_params + theta), ctx)
    g_qw, g_qt = grads[:len(w_params)], grads[len(w_params):]

    norm_q_sq = _sq(g_qw) + _sq(g_qt)
    dot = _dot(g_l, g_qt)  # grad_w l = 0
    lam = barrier_lambda(dot, norm_q_sq, float(settings["eta"]))
    lam_f = float(lam)

    gen_opt.zero_grad(set_to_none=True)
    for p, g in zip(w_params, g_qw):
        p.grad = lam_f * g
    gen_opt.step()
    cls_opt.zero_grad(set_to_none=True)
    for p, gl, gq in zip(theta, g_l, g_qt):
        p.grad = gl + lam_f * gq
    cls_opt.step()

    stats = torch.stack([j_a.detach(), j_c.detach(), j_c_t.detach(), q.detach()]).tolist()
    if ctx is not None and ctx.distributed:
        stats = [ctx.all_reduce_mean(v) for v in stats]
    return {"leader_obj": stats[0], "poison_loss": stats[1], "poison_loss_T": stats[2],
            "q": stats[3], "lambda": lam_f, "leader_grad_norm": leader_norm,
            "grad_q_norm": math.sqrt(float(norm_q_sq)), "grad_q_w_norm": math.sqrt(float(_sq(g_qw)))}


def build_classifier(arch: str, num_classes: int, channels: int, image_size: int,
                     width: int = 0) -> nn.Module:
    """The follower's classifier; ``width`` > 0 narrows the small CNN (quick runs)."""
    if arch == "small-cnn" and width > 0:
        return WithNormalize(SmallCNN(num_classes, channels, width), channels)
    return build_model(arch, num_classes, channels, image_size)


# data split -------------------------------------------------------------------------------------
def split_indices(n: int, train_fraction: float, val_fraction: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """Seeded split of ``range(n)``: ``seen`` = the ``train_fraction`` subset the generator may
    look at, divided into ``fit`` (BOME batches) and ``val`` (model selection only); ``unseen`` =
    the rest, never touched by ``fit``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_seen = int(round(train_fraction * n))
    n_val = int(round(val_fraction * n_seen)) if val_fraction > 0 else 0
    seen = perm[:n_seen]
    return {"fit": seen[n_val:].sort().values, "val": seen[:n_val].sort().values,
            "unseen": perm[n_seen:].sort().values}


# fitting: the players, one epoch of BOME, model selection ------------------------------------
def build_players(settings: Mapping[str, Any], eps: float, train: ImageSet,
                  ctx: FitContext) -> dict[str, Any]:
    """The leader (U-Net generator) and the follower (classifier), bare, with their SGD."""
    s = settings
    c, h, _ = train.image_shape
    device = ctx.device
    torch.manual_seed(ctx.seed)  # same init on every worker (DDP also broadcasts rank 0's)
    precision = resolve_precision(s["precision"], device)
    # channels_last (bf16 / CUDA) before DDP wraps the modules
    gen = _unwrap(ctx.prepare_model(prepare_model(
        UNetGenerator(c, eps, int(s["width"])).to(device), device, precision)))
    cls = _unwrap(ctx.prepare_model(prepare_model(
        build_classifier(s["arch"], int(train.num_classes), c, h, int(s["cls_width"]))
        .to(device), device, precision)))
    return {"gen": gen, "cls": cls,
            "gen_opt": torch.optim.SGD(gen.parameters(), lr=float(s["gen_lr"]),
                                       momentum=float(s["gen_momentum"]),
                                       weight_decay=float(s["gen_weight_decay"])),
            "cls_opt": torch.optim.SGD(cls.parameters(), lr=float(s["cls_lr"]))}


def set_learning_rates(players: Mapping[str, Any], settings: Mapping[str, Any], epoch: int) -> None:
    """Both players' learning rates for (0-based) ``epoch``: the base rates times ``lr_decay``
    per milestone passed, as the authors' MultiStepLR stepped once per epoch (a resumed run
    gets the same rates from the epoch alone)."""
    factor = float(settings["lr_decay"]) ** sum(
        1 for m in settings["lr_milestones"] if epoch >= int(m))
    for opt, key in ((players["gen_opt"], "gen_lr"), (players["cls_opt"], "cls_lr")):
        for group in opt.param_groups:
            group["lr"] = float(settings[key]) * factor


def bome_epoch(players: dict[str, Any], train: ImageSet, local_idx: torch.Tensor, epoch: int,
               step: int, steps_per_epoch: int, settings: Mapping[str, Any],
               ctx: FitContext, views: tuple = ()) -> tuple[dict[str, Any], int]:
    """One epoch of BOME steps over this worker's images; (the epoch's record, step)."""
    s = settings
    local_batch = max(1, math.ceil(int(s["batch_size"]) / ctx.world_size))
    # reseeded per epoch, so a run resumed from a checkpoint replays the same batches
    rng = torch.Generator().manual_seed(ctx.seed * 1000003 + ctx.rank * 7919 + epoch)
    pgd_gen = torch.Generator(device=ctx.device).manual_seed(
        ctx.seed * 1000033 + ctx.rank * 7919 + epoch + 1)
    order = local_idx[torch.randperm(len(local_idx), generator=rng)]
    if len(order) == 0:
        order = local_idx  # pragma: no cover - more workers than images
    sums: dict[str, float] = {}
    for i in range(steps_per_epoch):
        idx = order[(torch.arange(local_batch) + i * local_batch) % max(1, len(order))]
        x = ImageSet.to_float(train.images[idx]).to(ctx.device)
        y = train.labels[idx].to(ctx.device)
        m = bome_step(players["gen"], players["cls"], players["gen_opt"], players["cls_opt"],
                      x, y, s, ctx, pgd_gen, views, rng)
        step += 1
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + v / steps_per_epoch
        if step % int(s["log_every"]) == 0:
            ctx.report({"step": step, "epoch": epoch + 1, **m})
    return {"epoch": epoch + 1, "step": step, **{f"epoch_{k}": v for k, v in sums.items()}}, step


def selection_score(method: Method, gen: nn.Module, train: ImageSet,
                    split: Mapping[str, torch.Tensor], ctx: FitContext) -> float:
    """Accuracy on the held-out *training* images of a fresh victim trained on the
    protected fit images (lower = better protection). Never uses a test set."""
    from ue_dist.core.context import LocalContext
    from ue_dist.core.victim import resolve_victim_settings, train_victim
    from ue_dist.methods.protect import protect_uint8

    fit_set = train.subset(split["fit"])
    val_set = train.subset(split["val"])
    was_training = gen.training
    gen.eval()
    protected = protect_uint8(method, {"generator": gen, "eps": method.eps}, fit_set.images,
                              fit_set.labels, ctx.device)
    gen.train(was_training)
    poisoned = ImageSet(protected, fit_set.labels.clone(), fit_set.keys, fit_set.meta,
                        train.num_classes)
    s = method.settings
    adv_eps = float(s.get("select_adv_eps", 0.0))  # GUE-AT's; 0 for the others
    # GUE-AT keeps the generator that is strongest against the defence it exists for: its
    # selection victim trains with PGD-AT (the authors' gue_adv.py: 4/255, 10 steps of eps/4)
    victim_settings = resolve_victim_settings("quick", {
        "arch": s["select_arch"], "epochs": int(s["select_epochs"]), "seed": int(ctx.seed),
        "eval_robust": False, "precision": str(s["precision"]), "adv_eps": adv_eps,
        "adv_method": "pgd", "adv_steps": int(s.get("select_adv_steps", 10)),
        "adv_step_size": adv_eps / 4 if adv_eps > 0 else None})
    # every worker scores the same (synchronised) generator the same way: no broadcast needed
    quiet = LocalContext(device=ctx.device, seed=int(ctx.seed), log=lambda _msg: None)
    result = train_victim(poisoned, val_set, victim_settings, ctx=quiet)
    return float(result["test_acc"])


# the generator in a state ------------------------------------------------------------------------
def generator_spec(state: Mapping[str, Any], source: str) -> tuple[int, int, float]:
    try:
        return int(state["channels"]), int(state["width"]), float(state["eps"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{source} lacks the generator's channels/width/eps") from None

def check_generator_weights(state: Mapping[str, Any], source: str) -> None:
    """Compare names and shapes with the recorded architecture, on the meta device (no
    memory, no second build of the weights)."""
    channels, width, eps = generator_spec(state, source)
    with torch.device("meta"):
        expected = UNetGenerator(channels, eps, width).state_dict()
    got = state["generator"]
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise StateError(f"{source}: generator weights do not match a width-{width} U-Net "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in expected.items():
        t = got[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
            raise StateError(f"{source}: generator weight {key!r} has shape "
                             f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise StateError(f"{source}: generator weight {key!r} is not finite")


# the method -------------------------------------------------------------------------------------
_COMMON = {
    "eps": 8 / 255,
    "follower_loss": "ce",
    "leader_loss": "surrogate",   # "ce": the Figure 5 ablation (L_a = CE)
    "leader_grad_clip": 0.0,      # > 0: clip ||grad_theta J_a|| (the "CE(clip)" ablation)
    "at_eps": 0.0, "at_steps": 10, "at_step_size": None, "at_beta": 1.0,
    "eta": 1.5,
    "inner_steps": 10,
    "inner_lr": 1e-3,             # paper text; the authors' code uses 1e-4
    "gen_lr": 0.1, "gen_momentum": 0.0, "gen_weight_decay": 0.0,
    "cls_lr": 0.01,
    "train_fraction": 1.0,        # fit on a seeded subset; the rest is never seen
    "val_fraction": 0.1,          # held out of the seen data for model selection
    "split_seed": 0,
    "select_every": 5,            # epochs between selection checks; 0 = keep the last generator
    "select_epochs": 5,           # victim epochs per selection check (authors: 5)
    "select_arch": "resnet18",
    "select_adv_eps": 0.0,        # > 0: the selection victim trains with PGD-AT at this radius
    "select_adv_steps": 10,       # ... with this many steps of select_adv_eps / 4 (authors)
    "lr_milestones": [],          # epochs after which both players' learning rates decay
    "lr_decay": 0.1,
    "cls_width": 0,               # > 0: width of the small CNN follower (0: the arch's default)
    "log_every": 1,               # steps between per-step metric reports
    "precision": "fp32",          # fp32 | bf16 | auto: autocast for generator/classifier forwards
    "eot_defences": [],           # defence-aware EOT views of the follower's data
}


#: what every generator method declares about its data: the seeded split and model selection
GENERATOR_SPLIT: dict[str, Setting] = {
    "train_fraction": fraction("seeded subset the generator sees"),
    "val_fraction": Setting("float", "held out of the seen data for selection", low=0, below=1),
    "split_seed": count("seeds the train/val/unseen split (the fit's own seed is the run's)"),
    "select_every": count("epochs (rounds) between selection checks (0: keep the last)"),
    "select_epochs": count(), "select_arch": choice(*sorted(ARCHITECTURES)),
}

_DECLARED: dict[str, Setting] = {
    "eps": Setting("radius", "L-inf radius of the generator's output"),
    "width": positive_int("U-Net base width"), "arch": choice(*sorted(ARCHITECTURES)),
    "epochs": count(), "batch_size": positive_int("global batch, split over the workers"),
    "follower_loss": choice(*FOLLOWER_LOSSES, help="ce (GUE), trades or pgd (GUE-AT)"),
    "leader_loss": choice(*LEADER_LOSSES), "leader_grad_clip": non_negative("0: off"),
    "at_eps": Setting("radius", "the follower's adversarial radius"), "at_steps": count(),
    "at_step_size": Setting("any", "none/auto: at_eps / 4, or a radius"),
    "at_beta": non_negative("TRADES beta"), "eta": non_negative("BOME barrier eta"),
    "inner_steps": count("Adam steps to theta^T"), "inner_lr": non_negative(),
    "gen_lr": non_negative(), "gen_momentum": non_negative(), "gen_weight_decay": non_negative(),
    "cls_lr": non_negative(),
    **GENERATOR_SPLIT,
    "select_adv_eps": Setting("radius", "PGD-AT radius of the selection victim (0: standard)"),
    "select_adv_steps": positive_int("PGD steps of the selection victim's adversarial training"),
    "lr_milestones": Setting("list", "epochs after which both learning rates are multiplied by "
                                     "lr_decay (MultiStepLR)"),
    "lr_decay": positive(),
    "cls_width": count("small-CNN follower width (0: the arch's default)"),
    "log_every": positive_int(),
    # the only setting perturb reads besides eps, which the generator's eps * tanh fixes
    "precision": choice(*PRECISIONS, protect_time=True),
    "eot_defences": eot_defences_setting(protect_time=False),
}


def _preset(**kw: Any) -> dict[str, Any]:
    out = dict(_COMMON)
    out.update(kw)
    return out


@dataclass
class AdamRun:
    """A generator fit's starting point (``GeneratorMethod._adam_generator``)."""

    gen: nn.Module
    players: dict[str, Any]
    start: int
    step: int
    best: dict[str, Any]
    local_idx: torch.Tensor  # this worker's fit images
    local_batch: int
    steps_per_epoch: int

    def batch(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """Step ``i``'s indices from this worker's shuffled ``order`` (wrapping around)."""
        return order[(torch.arange(self.local_batch) + i * self.local_batch) % max(1, len(order))]


class GeneratorMethod(Method):
    """What every generator method shares (GUE, GUE-AT, DeepConfuse): a U-Net ``g_w`` with an
    ``eps * tanh`` head, fitted on a seeded split of the training data, kept in the state with
    the epoch model selection chose; ``perturb`` is one eval-mode forward pass (labels unused)."""

    #: (player, its key in the checkpoint's "training" dict) restored on resume
    resumed_players: ClassVar[tuple[tuple[str, str], ...]] = (
        ("gen", "generator"), ("cls", "classifier"), ("gen_opt", "gen_opt"),
        ("cls_opt", "cls_opt"))

    def validate_settings(self) -> None:
        super().validate_settings()
        eot_views(self.settings.get("eot_defences", ()))  # unknown or unusable names: by name

    def _split(self, train: ImageSet) -> dict[str, torch.Tensor]:
        """The seeded fit / val / unseen split (``split_indices``), refusing one with nothing
        to fit on or fewer than 2 classes."""
        s = self.settings
        if int(train.num_classes) < 2:
            raise SettingsError(f"method {self.name!r} needs at least 2 classes, got "
                                f"{int(train.num_classes)}")
        split = split_indices(len(train), float(s["train_fraction"]), float(s["val_fraction"]),
                              int(s["split_seed"]))
        if len(split["fit"]) == 0:
            raise SettingsError(f"train_fraction={s['train_fraction']} and val_fraction="
                                f"{s['val_fraction']} leave no images to fit on ({len(train)} given)")
        return split

    def _adam_generator(self, train: ImageSet, split: Mapping[str, torch.Tensor],
                        ctx: FitContext, precision: str) -> "AdamRun":
        """The U-Net (the same initial weights on every worker) with its Adam at ``gen_lr``,
        resumed from the context's checkpoint, and this worker's share of the fit images:
        what DeepConfuse and ShortcutGen start from."""
        s = self.settings
        c = int(train.image_shape[0])
        torch.manual_seed(ctx.seed)  # the same generator on every worker
        gen = prepare_model(UNetGenerator(c, self.eps, int(s["width"])).to(ctx.device),
                            ctx.device, precision)
        players: dict[str, Any] = {"gen": gen, "gen_opt": torch.optim.Adam(
            gen.parameters(), lr=float(s["gen_lr"]))}
        start, step, best = self._resume(players, train, ctx)
        fit_idx = split["fit"]
        return AdamRun(gen, players, start, step, best, fit_idx[ctx.shard_indices(len(fit_idx))],
                       max(1, math.ceil(int(s["batch_size"]) / ctx.world_size)),
                       max(1, math.ceil(len(fit_idx) / int(s["batch_size"]))))

    def _resume(self, players: dict[str, Any], train: ImageSet,
                ctx: FitContext) -> tuple[int, int, dict[str, Any]]:
        """(start epoch, step, best generator so far) from the context's checkpoint."""
        resumed = ctx.resume()
        if resumed is None or not resumed.get("training"):
            return 0, 0, {"score": None, "epoch": None, "generator": None}
        self.check_state(resumed, train.image_shape, source="resumed checkpoint")
        tr = resumed["training"]
        for key, saved in self.resumed_players:
            players[key].load_state_dict(tr[saved])
        ctx.log(f"[{self.name}] resumed at epoch {int(tr['epoch'])}")
        return int(tr["epoch"]), int(tr["step"]), {
            "score": tr.get("best_score"), "epoch": tr.get("best_epoch"),
            "generator": tr.get("best_generator")}

    def _end_epoch(self, players: Mapping[str, Any], train: ImageSet,
                   split: Mapping[str, torch.Tensor], best: dict[str, Any], record: dict[str, Any],
                   epoch: int, step: int, bar: Any, ctx: FitContext) -> dict[str, Any]:
        """After (0-based) ``epoch``: model selection every ``select_every`` epochs and at the
        last (the lowest held-out score wins), the progress line, the resumable checkpoint;
        returns the best generator so far."""
        gen, epochs = players["gen"], int(self.settings["epochs"])
        every = int(self.settings["select_every"])
        if every > 0 and len(split["val"]) > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            score = selection_score(self, gen, train, split, ctx)
            record["val_acc"] = score
            if best["score"] is None or score <= best["score"]:
                best = {"score": score, "epoch": epoch + 1, "generator": _cpu_state(gen)}
        bar.update(epoch + 1, format_metrics({k: v for k, v in record.items()
                                              if k not in ("epoch", "step")}))
        saved = {name: _cpu_state(players[key]) if isinstance(players[key], nn.Module)
                 else players[key].state_dict() for key, name in self.resumed_players}
        checkpoint = self._state(train, gen, best, split) | {"training": {
            **saved, "epoch": epoch + 1, "step": step, "best_score": best["score"],
            "best_epoch": best["epoch"], "best_generator": best["generator"]}}
        ctx.report(record, state=checkpoint)
        return best

    def _state(self, train: ImageSet, gen: nn.Module, best: Mapping[str, Any],
               split: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        chosen = best["generator"] if best.get("generator") is not None else _cpu_state(gen)
        return self.new_state(
            train, generator=chosen, channels=int(train.image_shape[0]), eps=float(self.eps),
            width=int(self.settings["width"]),
            selected_epoch=best.get("epoch"), selection_val_acc=best.get("score"),
            fit_count=int(len(split["fit"])), val_count=int(len(split["val"])),
            unseen_count=int(len(split["unseen"])))

    # state --------------------------------------------------------------------------------------
    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        gen_state = state.get("generator")
        if not isinstance(gen_state, Mapping) or not gen_state:
            raise StateError(f"{source} has no generator weights; is it a {self.name!r} state?")
        fitted_eps = state.get("eps")
        if fitted_eps is None or abs(float(fitted_eps) - self.eps) > 1e-9:
            raise StateError(f"{source} holds a generator trained for eps={fitted_eps}, but "
                             f"eps={self.eps} was asked; fit a new generator for this eps")
        channels = state.get("channels")
        if image_shape is not None and channels is not None and int(channels) != int(image_shape[0]):
            raise StateError(f"{source} holds a generator for {channels}-channel images, but the "
                             f"data have {image_shape[0]} channels")
        check_generator_weights(state, source)

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> Any:
        self.check_state(state)
        channels, width, eps = generator_spec(state, "state")
        gen = UNetGenerator(channels, eps, width)
        gen.load_state_dict(state["generator"])
        gen = gen.to(device).eval()
        for p in gen.parameters():
            p.requires_grad_(False)
        prepare_model(gen, device, str(self.settings["precision"]))
        return {"generator": gen, "eps": float(state["eps"])}

    @torch.no_grad()
    def perturb(self, loaded: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gen: nn.Module = loaded["generator"]
        if images.shape[1] != getattr(gen, "channels", images.shape[1]):
            raise StateError(f"generator expects {gen.channels}-channel images, "
                             f"got {images.shape[1]}")
        device = next(gen.parameters()).device
        images = images.to(device)
        precision = resolve_precision(self.settings["precision"], device)
        # eps * tanh is computed in fp32 in any precision: |delta| <= eps holds
        delta = in_precision(gen, device, precision)(images)
        # labels are not used: the generator maps images to perturbations (works on new data)
        return (images + delta).clamp(0.0, 1.0) - images


@register
class Gue(GeneratorMethod):
    """GUE: BOME on the unlearnable-example Stackelberg game, U-Net generator, L_sur leader loss.

    Threat model: L-inf perturbations of radius ``eps`` on every protected image; the victim
    trains normally. ``perturb``: one eval-mode generator pass, ``B x C x H x W`` -> same shape.
    """

    name = "gue"
    # labels train the generator; perturb is g_w(x) alone
    kind, year, needs_labels = "generator", 2024, False
    paper = PAPER
    presets = {
        "paper": _preset(width=64, arch="resnet18", epochs=50, batch_size=256),
        # digits on one CPU core in about two minutes: narrow U-Net and follower, more steps
        # (batch 32), faster players (generator SGD lr 1 with momentum, classifier lr 0.05)
        "quick": _preset(width=8, arch="small-cnn", cls_width=16, epochs=12, batch_size=32,
                         inner_steps=3, gen_lr=1.0, gen_momentum=0.9, cls_lr=0.05,
                         val_fraction=0.0, select_every=0, select_epochs=2,
                         select_arch="small-cnn"),
    }

    declared = _DECLARED

    def validate_settings(self) -> None:
        super().validate_settings()
        s = self.settings
        ms = s["lr_milestones"]
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
            raise SettingsError(f"lr_milestones must be a list of epochs >= 1, got {ms!r}")
        if s["follower_loss"] != "ce":
            if not float(s["at_eps"]) > 0:
                raise SettingsError(f"at_eps must be > 0 when follower_loss={s['follower_loss']!r}")
            at_step_size(s)

    # fit ----------------------------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        split = self._split(train)
        fit_idx = split["fit"]
        players = build_players(s, self.eps, train, ctx)
        views = eot_views(s["eot_defences"])
        start_epoch, step, best = self._resume(players, train, ctx)
        gen = players["gen"]
        steps_per_epoch = max(1, math.ceil(len(fit_idx) / int(s["batch_size"])))  # same on every worker
        ctx.log(f"[{self.name}] fitting on {len(fit_idx)} images ({len(split['val'])} held out for "
                f"selection, {len(split['unseen'])} never seen), {steps_per_epoch} steps/epoch")
        epochs = int(s["epochs"])
        bar = ctx.progress(f"[{self.name}] epochs", epochs)
        bar.start(start_epoch)
        for epoch in range(start_epoch, epochs):
            set_learning_rates(players, s, epoch)
            record, step = bome_epoch(players, train, fit_idx[ctx.shard_indices(len(fit_idx))],
                                      epoch, step, steps_per_epoch, s, ctx, views)
            _sync_buffers(gen, ctx)
            best = self._end_epoch(players, train, split, best, record, epoch, step, bar, ctx)
        return self._state(train, gen, best, split)


@register
class GueAT(Gue):
    """GUE-AT: the same game with an adversarially training follower (TRADES beta=1, or the PGD
    adversarial loss with ``follower_loss=pgd``) at radius ``at_eps``, 10 PGD steps of eps_a/4.

    Threat model: L-inf perturbations of radius ``eps``; the victim may train adversarially with
    a radius up to about ``at_eps``. Model selection trains its victim with PGD-AT at
    ``select_adv_eps`` (paper: 4/255, 10 steps of 1/255), so the kept generator is the one
    strongest against adversarial training, not against standard training.
    """

    name = "gue-at"
    presets = {
        # the authors' gue_adv.py: generator SGD momentum 0.9 and weight decay 5e-4, both
        # learning rates x0.1 after epochs 120 and 140, and a PGD-AT selection victim
        "paper": _preset(width=64, arch="resnet18", epochs=150, batch_size=256,
                         follower_loss="trades", at_eps=4 / 255, gen_momentum=0.9,
                         gen_weight_decay=5e-4, lr_milestones=[120, 140],
                         select_adv_eps=4 / 255),
        # digits on one CPU core in about 14 minutes (measured 824 s). Against PGD-AT (2/255)
        # victims trained 24 epochs it needs the wider U-Net and the epochs: width 8 left them at
        # 93.3-98.3 % (12-36 epochs); width 16, 24 epochs: 80.0 / 85.8 / 80.6 % (victim seeds
        # 0-2), where GUE with the same generator and epochs leaves 99.2 % (clean 99.4 %)
        "quick": _preset(width=16, arch="small-cnn", cls_width=16, epochs=24, batch_size=32,
                         inner_steps=3, gen_lr=1.0, gen_momentum=0.9, cls_lr=0.05,
                         follower_loss="trades", at_eps=4 / 255, at_steps=5,
                         val_fraction=0.0, select_every=0, select_epochs=2,
                         select_arch="small-cnn", select_adv_eps=4 / 255, select_adv_steps=5),
    }

    def validate_settings(self) -> None:
        super().validate_settings()
        if self.settings["follower_loss"] == "ce":
            raise SettingsError("method 'gue-at' needs follower_loss=trades or pgd "
                                "(follower_loss=ce is method 'gue')")


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous: channels_last (bf16) training saves the same NCHW tensors as fp32 training
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def plot_leader_gradients(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                          keys: Sequence[str] = ("leader_grad_norm", "poison_loss")) -> str:
    """Figure 5 of the paper: per-step ``||grad_theta J_a||`` (and the poisoned loss ``J_c``) for
    several runs (e.g. ``{"Sur": ctx.history, "CE": ...}``), log10 scale, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, history in histories.items():
            rows = [h for h in history if key in h and "step" in h]
            if rows:
                ax.plot([h["step"] for h in rows], [max(abs(float(h[key])), 1e-12) for h in rows],
                        label=label)
        ax.set_yscale("log")
        ax.set_xlabel("BOME step (batch)")
        ax.set_title({"leader_grad_norm": "||grad_theta J_a||_2",
                      "poison_loss": "poisoned loss J_c(w, theta)"}.get(key, key))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
