"""Bayes-error maximisation (``bayes``): "Towards Provably Unlearnable Examples via Bayes Error
Optimisation" (Algorithm 1: local posterior averaging; Algorithm 2: projected gradient ascent;
Eq. (19): similarity in an embedding space, constraint in pixel space; section 3.3: mixed data).

Threat model: the defender perturbs each training image within an L-inf (default) or L2 ball of
radius ``eps`` so that the kernel estimate of the Bayes error of the *embedded* training set,
``beta = 1 - mean_i max_c p(c | m(x_i'))``, is as large as possible; any classifier trained on
the data then faces overlapping classes. Shapes: images ``B x C x H x W`` in [0, 1], labels
``B``; embeddings ``B x d`` from the penultimate layer of a classifier trained on the clean data.

Two modes share one ascent loop (:func:`bayes_pga`):

* streaming (``perturb``): a batch is optimised against a fixed *bank* of clean embeddings of
  the training set stored in the state (the rest of the dataset), one batch at a time, so
  ``ue-dist protect --method bayes`` works shard by shard like every other method;
* joint (:func:`perturb_jointly`): all samples are optimised together (the kernel couples every
  pair); under ``torch.distributed`` each rank owns a slice, embeddings are all-gathered with
  gradients and each rank steps its own samples (``ue_dist.runtime.bayes_joint``).

A ``fixed`` mask keeps some samples clean while they still count in the objective
(Corollary 3.5). Differences from the authors' code: PGA (not AdamW) by default, the embedding
model fixed during the ascent (run in eval mode), a bandwidth from the data (median distance to
the sqrt(n)-th neighbour) instead of a fixed 0.3, a blocked O(block x n) estimator, rounding
(not truncation) to the pixel grid by the shared epsilon contract. The authors' variant
(Adam-style ascent, embedding retrained every k steps) is ``step_rule=adam, retrain_every=k``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ue_dist.core.augment import default_augmentation
from ue_dist.core.bayes_error import (check_embeddings, max_posterior_sum, median_sigma)
from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext, LocalContext
from ue_dist.core.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum,
                                      is_distributed)
from ue_dist.core.models import ARCHITECTURES, build_model
from ue_dist.core.pgd import NORMS, project
from ue_dist.core.settings import Setting, choice, count, non_negative, positive, positive_int
from ue_dist.core.training import (TrainLoop, cosine_schedule, cpu_state_dict, cross_entropy_loss,
                                   uint8_fetch)
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, load_state, register

STEP_RULES = ("sign", "gradient", "adam")


# the embedding: penultimate features of a build_model classifier --------------------------------
def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a ``build_model`` network (normalisation included)."""
    net = model.net if hasattr(model, "net") else model
    h = model[0](x) if hasattr(model, "net") else x
    if hasattr(net, "embed"):
        return net.embed(h)
    if hasattr(net, "layer4") and hasattr(net, "fc"):  # torchvision ResNet without its fc
        h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return torch.flatten(net.avgpool(h), 1)
    raise ValueError(f"no embedding for a {type(net).__name__}; use small-cnn or a resnet")


def _sigma_neighbours(n: int, setting: int) -> int:
    return int(setting) if int(setting) > 0 else max(1, math.ceil(math.sqrt(n)))


# Algorithm 2 -------------------------------------------------------------------------------------
def _embed_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def bayes_objective_grad(embed_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         labels: torch.Tensor, *, sigma: float, num_classes: int,
                         bank: torch.Tensor | None = None, bank_labels: torch.Tensor | None = None,
                         need_grad: torch.Tensor | None = None, chunk: int = 256,
                         block_size: int | None = None) -> tuple[float, torch.Tensor]:
    """``(beta, d beta / d x)`` for this rank's images ``x`` (all images when single-process).

    Keys are every rank's embeddings (all-gathered with gradients) plus the fixed ``bank``;
    each query excludes itself. Memory: images are embedded in chunks without a graph, the
    estimator gives ``d beta / d E`` block by block, then each chunk is re-embedded with a graph
    and back-propagated (the chain rule, chunk by chunk). ``need_grad`` (bool per sample) skips
    the backward for chunks of fixed samples.
    """
    one_pass = x.shape[0] <= chunk and (need_grad is None or bool(need_grad.any()))
    if one_pass:  # everything fits in one chunk: keep its graph instead of re-embedding
        xg = x.detach().requires_grad_(True)
        emb_graph = embed_fn(xg)
        emb = emb_graph.detach().requires_grad_(True)
    else:
        emb = _embed_chunks(embed_fn, x, chunk).requires_grad_(True)
    keys = all_gather_with_grad(emb)
    key_labels = all_gather_no_grad(labels)
    offset = 0
    if is_distributed():
        counts = all_gather_no_grad(torch.tensor([x.shape[0]], device=x.device))
        offset = int(counts[: torch.distributed.get_rank()].sum())
    n_total = keys.shape[0]
    if bank is not None and bank.shape[0]:
        keys = torch.cat([keys, bank.to(emb)])
        key_labels = torch.cat([key_labels, bank_labels.to(key_labels.device)])
    idx = torch.arange(x.shape[0], device=x.device) + offset
    total, _ = max_posterior_sum(emb, keys, key_labels, sigma, num_classes, idx,
                                 block_size=block_size)
    (g_emb,) = torch.autograd.grad(-total / n_total, emb)
    beta = 1.0 - float(all_reduce_sum(total.detach())) / n_total
    if one_pass:
        (grad,) = torch.autograd.grad(emb_graph, xg, grad_outputs=g_emb)
        return beta, grad
    grad = torch.zeros_like(x)
    for i in range(0, x.shape[0], chunk):
        if need_grad is not None and not bool(need_grad[i:i + chunk].any()):
            continue
        xc = x[i:i + chunk].detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(embed_fn(xc), xc, grad_outputs=g_emb[i:i + chunk])
        grad[i:i + chunk] = gx
    return beta, grad


def bayes_pga(embed_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              labels: torch.Tensor, *, eps: float, step_size: float, steps: int,
              sigma: float, num_classes: int, norm: str = "linf", step_rule: str = "sign",
              fixed: torch.Tensor | None = None, bank: torch.Tensor | None = None,
              bank_labels: torch.Tensor | None = None, chunk: int = 256,
              block_size: int | None = None, init: torch.Tensor | None = None,
              on_step: Callable[[int, float, torch.Tensor], Any] | None = None,
              retrain: Callable[[int, torch.Tensor], None] | None = None,
              retrain_every: int = 0,
              box: tuple[float, float] | None = (0.0, 1.0)) -> tuple[torch.Tensor, list[float]]:
    """Algorithm 2: projected gradient *ascent* on the Bayes-error estimate; returns
    ``(delta, history)`` where ``history[t]`` is beta before step t and ``history[-1]`` after
    the last step.

    ``step_rule``: ``gradient`` is Algorithm 2 verbatim (``delta += eta * grad``, then project;
    monotone for small ``eta``, Theorem 3.4); ``sign`` takes signed (L-inf) or per-sample
    normalised (L2) steps like PGD, which is scale-free for images; ``adam`` is the authors'
    Adam-style variant. ``fixed`` samples keep ``delta = 0`` but stay in the objective.
    ``box``: the valid range of ``x + delta`` (pixels: [0, 1]; None for points in R^d).
    """
    if norm not in NORMS:
        raise SettingsError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if step_rule not in STEP_RULES:
        raise SettingsError(f"step_rule must be one of {', '.join(STEP_RULES)}, got {step_rule!r}")
    if not eps > 0:
        raise SettingsError(f"eps must be > 0, got {eps}")
    if not step_size > 0:
        raise SettingsError(f"step_size must be > 0, got {step_size}")
    x = x.detach()
    free = None if fixed is None else (~fixed.to(torch.bool)).to(x.device)
    shape = (-1,) + (1,) * (x.ndim - 1)
    delta = torch.zeros_like(x) if init is None else project(init.detach().clone(), eps, norm)
    if free is not None:
        delta = delta * free.view(shape).to(x.dtype)
    m1 = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    history: list[float] = []
    kwargs = dict(sigma=sigma, num_classes=num_classes, bank=bank, bank_labels=bank_labels,
                  need_grad=free, chunk=chunk, block_size=block_size)
    for t in range(steps):
        if retrain is not None and retrain_every > 0 and t > 0 and t % retrain_every == 0:
            retrain(t, (x + delta).detach())
        beta, g = bayes_objective_grad(embed_fn, x + delta, labels, **kwargs)
        history.append(beta)
        if on_step is not None:
            on_step(t, beta, delta)
        with torch.no_grad():
            if step_rule == "gradient":
                step = g
            elif step_rule == "adam":
                m1.mul_(0.9).add_(g, alpha=0.1)
                m2.mul_(0.999).addcmul_(g, g, value=0.001)
                step = (m1 / (1 - 0.9 ** (t + 1))) / ((m2 / (1 - 0.999 ** (t + 1))).sqrt() + 1e-12)
            elif norm == "linf":
                step = g.sign()
            else:
                step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            delta = project(delta + step_size * step, eps, norm)
            if box is not None:
                delta = (x + delta).clamp(*box) - x
            if free is not None:
                delta = delta * free.view(shape).to(x.dtype)
    beta, _ = bayes_objective_grad(embed_fn, x + delta, labels, **{**kwargs, "need_grad":
                                                                 torch.zeros(x.shape[0], dtype=torch.bool)})
    history.append(beta)
    return delta.detach(), history


# the method ------------------------------------------------------------------------------------
@dataclass
class LoadedBayes:
    model: nn.Module
    bank: torch.Tensor
    bank_labels: torch.Tensor
    sigma: float
    num_classes: int
    image_shape: tuple[int, int, int]
    device: torch.device

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.model, x)


_PAPER: dict[str, Any] = {
    "eps": 8 / 255, "norm": "linf", "step_rule": "sign", "steps": 100, "step_size": 1 / 255,
    "arch": "resnet18", "embed_epochs": 100, "embed_batch_size": 128, "embed_lr": 0.1,
    "embed_momentum": 0.9, "embed_weight_decay": 5e-4, "embed_augment": True,
    "embedding_state": "", "sigma": None, "sigma_neighbours": 0, "bank_size": 10000,
    "chunk": 256, "block_size": 0, "retrain_every": 0, "retrain_epochs": 1, "seed": 0,
}


# the embedding model and its bank ------------------------------------------------------------
def embedding_weights(url: str, train: ImageSet, arch: str) -> dict[str, torch.Tensor]:
    """The weights of a fitted bayes state's embedding model, checked against the data."""
    state = load_state(url)
    weights = state.get("model_state")
    if not isinstance(weights, dict):
        raise StateError(f"embedding state {url!r} has no 'model_state' (fit one with "
                         "`ue-dist fit --method bayes`)")
    if list(state.get("image_shape", [])) != list(train.image_shape):
        raise StateError(f"embedding state {url!r} was trained on images of shape "
                         f"{state.get('image_shape')} (C,H,W), but the data have shape "
                         f"{list(train.image_shape)}")
    if state.get("arch", arch) != arch or \
            int(state.get("num_classes", train.num_classes)) != int(train.num_classes):
        raise StateError(f"embedding state {url!r} is a {state.get('arch')!r} with "
                         f"{state.get('num_classes')} classes; settings ask for "
                         f"{arch!r} with {train.num_classes}")
    return weights


def train_embedding(settings: Mapping[str, Any], model: nn.Module, train: ImageSet,
                    ctx: FitContext) -> nn.Module:
    """The clean classifier whose penultimate layer is the embedding (the shared loop)."""
    s = settings
    epochs = int(s["embed_epochs"])
    loop = TrainLoop(model, ctx, n=len(train), batch_size=int(s["embed_batch_size"]),
                     seed=int(s["seed"]), lr=float(s["embed_lr"]),
                     momentum=float(s["embed_momentum"]),
                     weight_decay=float(s["embed_weight_decay"]),
                     schedule=cosine_schedule(epochs))
    resumed = ctx.resume()
    if resumed and "loop" in resumed:
        loop.load_state_dict(resumed["loop"])
    kind = default_augmentation(train.image_shape[1]) if s["embed_augment"] else "none"
    fetch = uint8_fetch(train.images, train.labels, ctx.device)
    bar = ctx.progress("[bayes] embedding epochs", epochs)
    bar.start(loop.epoch)
    for epoch in range(loop.epoch, epochs):
        loop.train_epoch(fetch, cross_entropy_loss(kind))
        metrics = {"embed_epoch": epoch, **loop.take_metrics()}
        ctx.report(metrics, {"embed_epoch": epoch, "loop": loop.state_dict()})
        bar.update(epoch + 1, f"loss {metrics['train_loss']:.4f} · acc {metrics['train_acc']:.3f}")
    return loop.model


@torch.no_grad()
def clean_bank(settings: Mapping[str, Any], model: nn.Module, train: ImageSet,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean embeddings of (a seeded sample of at most ``bank_size``) training images."""
    n, cap = len(train), int(settings["bank_size"])
    if n > cap:  # seeded, stratification-free sample of the training set
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(settings["seed"])))[:cap]
        idx = idx.sort().values
    else:
        idx = torch.arange(n)
    chunk = int(settings["chunk"])
    feats = [embed(model, ImageSet.to_float(train.images[idx[i:i + chunk]]).to(device))
             for i in range(0, len(idx), chunk)]
    return torch.cat(feats).float(), train.labels[idx].clone()


def check_images(loaded: LoadedBayes, images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != loaded.image_shape:
        raise StateError(f"the state's embedding model was fitted on images of shape "
                         f"{list(loaded.image_shape)} (C,H,W), got {list(images.shape[1:])}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"need one label per image, got {tuple(labels.shape)} labels for "
                         f"{images.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= loaded.num_classes):
        raise ValueError(f"labels must lie in [0, {loaded.num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def retrainer(settings: Mapping[str, Any], model: nn.Module,
              labels: torch.Tensor) -> Callable[[int, torch.Tensor], None]:
    """The authors' variant: fine-tune the embedding model on the current images (SGD at a
    tenth of ``embed_lr``, momentum 0.9, ``retrain_epochs`` epochs of the shared loop)."""
    s = settings

    def retrain(step: int, x_now: torch.Tensor) -> None:
        model.requires_grad_(True)
        y = labels.to(x_now.device)
        loop = TrainLoop(model, LocalContext(device=x_now.device, log=lambda _m: None),
                         n=x_now.shape[0], batch_size=int(s["embed_batch_size"]),
                         seed=int(s["seed"]) + step, lr=float(s["embed_lr"]) * 0.1)
        for _ in range(int(s["retrain_epochs"])):
            loop.train_epoch(lambda idx: (x_now[idx], y[idx]), cross_entropy_loss())
        model.eval().requires_grad_(False)

    return retrain


# The fit (embedding, clean bank, bandwidth) never sees a perturbation, so the ascent's settings
# -- radius and norm included -- are protect-time: one embedding serves every eps.
_DECLARED: dict[str, Setting] = {
    "eps": Setting("radius", "radius of the perturbation (L-inf, or L2 with norm=l2)",
                   protect_time=True),
    "norm": choice(*NORMS, protect_time=True),
    "step_rule": choice(*STEP_RULES, help="sign (PGA), gradient, adam", protect_time=True),
    "steps": count("ascent steps", protect_time=True),
    "step_size": positive("ascent step size", protect_time=True),
    "arch": choice(*sorted(ARCHITECTURES), help="the embedding model"),
    "embed_epochs": count(), "embed_batch_size": positive_int(), "embed_lr": positive(),
    "embed_momentum": non_negative(), "embed_weight_decay": non_negative(),
    "embed_augment": Setting("bool", "crop+flip while training the embedding"),
    "embedding_state": Setting("str", "a fitted bayes state whose embedding to reuse"),
    "sigma": Setting("float", "kernel bandwidth (none: from the data)", above=0,
                     optional=True),
    "sigma_neighbours": count("neighbour rank of the data bandwidth (0: sqrt(n))"),
    "bank_size": positive_int("clean embeddings kept for the streaming mode"),
    "chunk": positive_int("images embedded at once", protect_time=True),
    "block_size": count("kernel block rows (0: automatic)", protect_time=True),
    "retrain_every": count("authors' variant: retrain the embedding every k steps (0: off)",
                           protect_time=True),
    "retrain_epochs": count(protect_time=True), "seed": Setting("seed"),
}


@register
class BayesErrorMaximisation(Method):
    """Bayes-error maximising unlearnable examples (Algorithms 1-2, Eq. (19), Corollary 3.5)."""

    name = "bayes"
    kind, year, needs_labels = "bayes-error", 2025, True
    paper = "Towards Provably Unlearnable Examples via Bayes Error Optimisation"
    # paper: eps 8/255 L-inf, ResNet-18 embedding trained 100 epochs with SGD 0.1 / 0.9 / 5e-4,
    # cosine. The number of ascent steps is not given in the paper: 100 signed steps of 1/255.
    # quick: measured on 32x32x3 digits at eps 8/255 (tests/test_bayes.py, slow tests): 10 signed
    # steps of 2/255 against a small CNN trained 8 epochs drop quick victims (small CNN,
    # crop+flip, 8 epochs; mean of 3 seeds) from 0.962 to 0.317 test accuracy. Ascend at the data's own size:
    # on native 8x8 digits even eps 32/255 only reached 0.886, the embedding has too few pixels.
    presets = {
        "paper": dict(_PAPER),
        "quick": {**_PAPER, "arch": "small-cnn", "embed_epochs": 8, "embed_batch_size": 64,
                  "embed_lr": 0.05, "steps": 10, "step_size": 2 / 255, "bank_size": 4000,
                  "chunk": 2048},
    }

    declared = _DECLARED

    # fit -----------------------------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        if len(train) < 2 or int(torch.unique(train.labels).numel()) < 2:
            raise SettingsError(f"the bayes method needs at least 2 samples of 2 classes, got "
                                f"{len(train)} samples of {int(torch.unique(train.labels).numel())} "
                                "classes")
        c, h, _ = train.image_shape
        torch.manual_seed(int(s["seed"]))
        model = build_model(s["arch"], int(train.num_classes), c, h)
        if s["embedding_state"]:
            model.load_state_dict(embedding_weights(s["embedding_state"], train, s["arch"]))
            model = model.to(ctx.device)
        else:
            model = train_embedding(s, model, train, ctx)
        model.eval()
        bank, bank_labels = clean_bank(s, model, train, ctx.device)
        sigma = float(s["sigma"]) if s["sigma"] is not None else median_sigma(
            bank, nearest=_sigma_neighbours(bank.shape[0], s["sigma_neighbours"]))
        ctx.log(f"[bayes] bank {tuple(bank.shape)}, sigma {sigma:.4g}")
        return self.new_state(train, arch=s["arch"], model_state=cpu_state_dict(model),
                              bank=bank.cpu(), bank_labels=bank_labels.cpu(), sigma=sigma)

    # load / perturb ------------------------------------------------------------------------------
    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        for key in ("model_state", "bank", "bank_labels", "sigma", "arch"):
            if key not in state:
                raise StateError(f"{source} lacks {key!r}; is it a bayes state?")

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> LoadedBayes:
        self.check_state(state)
        device = torch.device(device)
        c, h, w = (int(v) for v in state["image_shape"])
        model = build_model(state["arch"], int(state["num_classes"]), c, h)
        try:
            model.load_state_dict(state["model_state"])
        except RuntimeError as exc:
            raise StateError(f"state weights do not fit a {state['arch']!r}: {exc}") from None
        model.to(device).eval().requires_grad_(False)
        bank = state["bank"].to(device).float()
        check_embeddings(bank, "state bank")
        return LoadedBayes(model, bank, state["bank_labels"].to(device).long(), float(state["sigma"]),
                           int(state["num_classes"]), (c, h, w), device)

    def _sigma(self, loaded: LoadedBayes) -> float:
        return float(self.settings["sigma"]) if self.settings["sigma"] is not None else loaded.sigma

    def perturb(self, loaded: LoadedBayes, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Streaming mode: the batch ascends against the fixed clean bank of the state."""
        check_images(loaded, images, labels)
        if images.shape[0] == 0:
            return torch.zeros_like(images)
        x = images.to(loaded.device).float()
        y = labels.to(loaded.device).long()
        sigma = self._sigma(loaded)
        # the bank may hold these very images (clean): such a copy would sit at distance ~0 and
        # pin the posterior, so bank rows that coincide with a batch image are left out
        with torch.no_grad():
            e = _embed_chunks(loaded.embed, x, int(self.settings["chunk"]))
            d2 = torch.cdist(e, loaded.bank).pow_(2)
            keep = ~(d2 <= 1e-4 * sigma * sigma).any(dim=0)
        s = self.settings
        delta, _ = bayes_pga(loaded.embed, x, y, eps=self.eps, step_size=float(s["step_size"]),
                             steps=int(s["steps"]), sigma=sigma, num_classes=loaded.num_classes,
                             norm=s["norm"], step_rule=s["step_rule"], bank=loaded.bank[keep],
                             bank_labels=loaded.bank_labels[keep], chunk=int(s["chunk"]),
                             block_size=int(s["block_size"]) or None)
        return delta.to(images.device, images.dtype)

    def perturb_jointly(self, loaded: LoadedBayes, images: torch.Tensor, labels: torch.Tensor,
                        fixed: torch.Tensor | None = None, bank: bool = False,
                        on_step: Callable[[int, float, torch.Tensor], Any] | None = None,
                        init: torch.Tensor | None = None, start_step: int = 0,
                        ) -> tuple[torch.Tensor, list[float]]:
        """Full-strength (set-wise) mode: all samples ascend together; returns (delta, beta history).

        Under ``torch.distributed`` pass this rank's slice (ranks in order of the samples); every
        rank must call it. ``fixed`` keeps samples clean while they stay in the objective.
        ``bank=True`` adds the state's bank as extra fixed keys (off by default: the samples
        themselves are the dataset). ``retrain_every=k`` (authors' variant) fine-tunes the
        embedding model on the current protected images every k steps (single process only).
        Resuming: ``init`` is the delta after ``start_step`` steps (a checkpoint); the remaining
        steps run and ``on_step`` gets the global step numbers. For the sign and gradient rules
        this equals the uninterrupted run (the ascent keeps no other state); ``adam``'s moments
        restart.
        """
        check_images(loaded, images, labels)
        s = self.settings
        if fixed is not None and fixed.shape != (images.shape[0],):
            raise ValueError(f"fixed must be a bool mask with one entry per image, got "
                             f"{tuple(fixed.shape)}")
        retrain, embed_fn = None, loaded.embed
        if int(s["retrain_every"]) > 0:
            if is_distributed():
                raise SettingsError("retrain_every > 0 (the authors' variant) runs single-process only")
            model = copy.deepcopy(loaded.model)  # the loaded state stays as fitted

            def embed_fn(t: torch.Tensor) -> torch.Tensor:
                return embed(model, t)

            retrain = retrainer(s, model, labels)
        x = images.to(loaded.device).float()
        start = int(start_step)
        if not 0 <= start <= int(s["steps"]):
            raise ValueError(f"start_step must lie in [0, {int(s['steps'])}], got {start}")
        if start and retrain is not None:
            raise SettingsError("retrain_every > 0 (the authors' variant) cannot resume")
        step_hook = on_step
        if on_step is not None and start:
            def step_hook(t: int, beta: float, delta: torch.Tensor) -> Any:
                return on_step(t + start, beta, delta)
        return bayes_pga(embed_fn, x, labels.to(loaded.device).long(), eps=self.eps,
                         step_size=float(s["step_size"]), steps=int(s["steps"]) - start,
                         init=init.to(x.device) if init is not None else None,
                         sigma=self._sigma(loaded), num_classes=loaded.num_classes, norm=s["norm"],
                         step_rule=s["step_rule"], fixed=fixed,
                         bank=loaded.bank if bank else None,
                         bank_labels=loaded.bank_labels if bank else None, chunk=int(s["chunk"]),
                         block_size=int(s["block_size"]) or None, on_step=step_hook,
                         retrain=retrain, retrain_every=int(s["retrain_every"]))
