"""Projected gradient descent/ascent in an L-inf or L2 ball, shared by every method and by
adversarial training. No ``.item()`` or other host synchronisation inside the loop."""
from __future__ import annotations

from typing import Callable

import torch

from ue_dist.core.transfer import to_device

NORMS = ("linf", "l2")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project(delta: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def random_init(x: torch.Tensor, eps: float, norm: str = "linf",
                generator: torch.Generator | None = None) -> torch.Tensor:
    # draw where the generator lives (a CPU generator also serves CUDA batches), then move
    gen_device = generator.device if generator is not None else x.device
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=generator,
                            device=gen_device, dtype=x.dtype) * eps
        delta = direction / _per_sample_norm(direction) * radius
    delta = to_device(delta, x.device)
    return (x + delta).clamp(0, 1) - x


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, eps: float,
        step_size: float, steps: int, norm: str = "linf", maximize: bool = True,
        random_start: bool = True, init: torch.Tensor | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``delta`` (detached) that maximises (or minimises) ``loss_fn(x + delta)``.

    ``loss_fn`` maps a perturbed batch to a scalar (sum or mean over the batch; per-sample
    gradients are independent either way; a non-scalar result is summed). ``loss_fn`` may itself
    run an inner ``pgd`` (REM's min-max): the inner call works on a detached copy. L-inf steps are signed; L2 steps are normalised per
    sample. ``x + delta`` stays in [0, 1] and ``delta`` in the ball.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if eps < 0 or step_size <= 0 or steps < 0:
        raise ValueError(f"PGD needs eps >= 0, step_size > 0, steps >= 0 "
                         f"(got eps={eps}, step_size={step_size}, steps={steps})")
    x = x.detach()
    if init is not None:
        delta = project(init.detach(), eps, norm)
    elif random_start and eps > 0:
        delta = random_init(x, eps, norm, generator)
    else:
        delta = torch.zeros_like(x)
    sign = 1.0 if maximize else -1.0
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        if loss.ndim:
            loss = loss.sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _per_sample_norm(grad)
            delta = project(delta + sign * step_size * step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()
