"""Adversarial training and robust evaluation, once for every trainer in ue_dist.

* PGD-AT (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
  2018): train on ``argmax_{|d| <= eps} CE(f(x + d), y)``, found by PGD from a uniform random
  start in the ball.

Both run in the L-inf ball (signed steps) or, with ``norm="l2"``, the L2 ball (REM App. E):
steps of ``step_size`` along the per-sample normalised gradient, projected back onto the ball,
as in the REM authors' ``attacks/pgd_attacker.py`` (core/pgd). The L2 random start is
``core.pgd.random_init``'s (uniform radius, random direction); the REM code starts from a box
of side ``2 eps / steps`` instead.
* TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
  ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximising the KL, found by
  PGD from ``x + 0.001 * N(0, 1)`` (the start of the authors' code, TRADES/trades.py).

Used by victims (``core/victim``, the REM paper's and the field's adversarially trained victims)
and by GUE-AT's follower (``methods/gue``). Shapes: ``x`` ``B x C x H x W`` in [0, 1];
``targets`` class indices ``B`` or class probabilities ``B x K`` (mixup, cutmix). The model is
called as given: a caller that wants the attack to use running batch-norm statistics runs it
inside :func:`evaluating`. Every loss and logit is fp32 (``upcast``) whatever autocast is active.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ue_dist.core.fold import fold_batchnorm
from ue_dist.core.pgd import pgd
from ue_dist.core.precision import autocast, resolve_precision, upcast
from ue_dist.core.transfer import to_device

Model = Callable[[torch.Tensor], torch.Tensor]
AT_METHODS = ("pgd", "trades")


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its previous mode restored after (an attack with
    running statistics does not pollute them with adversarial batches)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    return upcast(model(x))


def adversarial_examples(model: Model, x: torch.Tensor, targets: torch.Tensor, *, method: str,
                         eps: float, step_size: float, steps: int,
                         generator: torch.Generator | None = None,
                         norm: str = "linf") -> torch.Tensor:
    """``x + d``: the PGD-AT or TRADES adversarial batch at ``norm`` radius ``eps``.

    ``d`` is found on a detached copy of ``x`` and is itself detached, so when ``x`` carries a
    graph (GUE's generator output) the result still does, through ``x``.
    """
    if method == "pgd":
        delta = pgd(lambda z: F.cross_entropy(_logits(model, z), targets, reduction="sum"), x,
                    eps=eps, step_size=step_size, steps=steps, norm=norm, maximize=True,
                    random_start=True, generator=generator)
    elif method == "trades":
        with torch.no_grad():
            p_clean = F.softmax(_logits(model, x.detach()), dim=1)
        # drawn where the generator lives (a CPU generator gives the same start on any device)
        where = generator.device if generator is not None else x.device
        init = 0.001 * to_device(torch.randn(x.shape, generator=generator, device=where), x.device)
        delta = pgd(lambda z: F.kl_div(F.log_softmax(_logits(model, z), dim=1), p_clean,
                                       reduction="sum"),
                    x, eps=eps, step_size=step_size, steps=steps, norm=norm, maximize=True,
                    init=init)
    else:
        raise ValueError(f"unknown adversarial training method {method!r}; valid: "
                         f"{', '.join(AT_METHODS)}")
    return x + delta


def adversarial_loss(model: Model, x: torch.Tensor, x_adv: torch.Tensor, targets: torch.Tensor, *,
                     method: str, beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss at the adversarial batch and the logits its accuracy is read from.

    ``pgd``: ``CE(f(x_adv), targets)`` (logits of ``x_adv``). ``trades``: ``CE(f(x), targets) +
    beta * KL(f(x) || f(x_adv))`` with one forward over ``[x; x_adv]`` (DDP allows one forward
    per backward; logits of ``x``).
    """
    if method == "pgd":
        logits = _logits(model, x_adv)
        return F.cross_entropy(logits, targets), logits
    if method == "trades":
        both = _logits(model, torch.cat([x, x_adv]))
        logits, logits_adv = both[:len(x)], both[len(x):]
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits, targets) + float(beta) * robust, logits
    raise ValueError(f"unknown adversarial training method {method!r}; valid: "
                     f"{', '.join(AT_METHODS)}")


def attack_accuracy_batch(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                          steps: int, generator: torch.Generator | None = None,
                          norm: str = "linf") -> torch.Tensor:
    """Correct predictions (a count) on ``x`` under PGD-``steps`` at ``norm`` radius ``eps``
    with steps of ``eps / 4`` (PGD-20 at 8/255 steps 2/255); clean accuracy at ``eps = 0``."""
    if eps > 0:
        x = x + pgd(lambda z: F.cross_entropy(_logits(model, z), y, reduction="sum"), x, eps=eps,
                    step_size=eps / 4, steps=steps, norm=norm, generator=generator)
    with torch.no_grad():
        return (model(x).argmax(1) == y).sum()


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    indices: torch.Tensor, *, device: torch.device, batch_size: int = 500,
                    eps: float = 0.0, steps: int = 20, seed: int = 0,
                    precision: str = "fp32", norm: str = "linf") -> int:
    """Correct predictions over ``images[indices]`` (uint8) in batches, clean or under PGD;
    the model in eval mode, forwards under ``precision`` (the attack's delta stays fp32)."""
    precision = resolve_precision(precision, device)
    model.eval()
    if eps > 0:  # the attack's passes without batch norm (core.fold; the same function)
        model = fold_batchnorm(model)
    generator = torch.Generator().manual_seed(seed + 7919) if device.type == "cpu" else None
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(indices), batch_size):
        b = indices[start:start + batch_size]
        x = images[b].to(device).float().div_(255.0)
        y = labels[b].to(device)
        with autocast(device, precision):
            correct += attack_accuracy_batch(model, x, y, eps=eps, steps=steps,
                                             generator=generator, norm=norm)
    return int(correct)
