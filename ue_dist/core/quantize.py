"""The epsilon contract: one function every method's output goes through before it is written."""
from __future__ import annotations

import math

import numpy as np
import torch


def pixel_budget(eps: float) -> int:
    """Largest integer change per pixel allowed by an L-inf radius ``eps`` on the [0, 1] scale.

    ``floor(255 * eps)``, with a small tolerance so 8/255 (7.999999... in floating point) gives 8.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return int(math.floor(255.0 * eps + 1e-6))


def apply_perturbation(images: np.ndarray | torch.Tensor, delta: np.ndarray | torch.Tensor,
                       eps: float) -> np.ndarray:
    """Return uint8 images ``x'`` with ``|x' - x| <= floor(255 eps)`` and ``0 <= x' <= 255``.

    ``images`` are uint8 (any layout), ``delta`` a float perturbation on the [0, 1] scale with the
    same shape. The delta is rounded to the nearest integer step (not truncated), clipped to the
    integer budget and the result clipped to the pixel range, so the bound holds exactly after
    lossless (PNG) encoding.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    d = delta.detach().float().cpu().numpy() if isinstance(delta, torch.Tensor) else np.asarray(
        delta, dtype=np.float64)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    if x.shape != d.shape:
        raise ValueError(f"images {x.shape} and delta {d.shape} have different shapes")
    if not np.all(np.isfinite(d)):
        raise ValueError("delta contains NaN or infinite values")
    budget = pixel_budget(eps)
    steps = np.clip(np.rint(d.astype(np.float64) * 255.0), -budget, budget).astype(np.int16)
    return np.clip(x.astype(np.int16) + steps, 0, 255).astype(np.uint8)
