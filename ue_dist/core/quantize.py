"""The epsilon contract: one function every method's output goes through before it is written.

A method states its bound by ``eps`` and ``norm`` (``Method.bound()``):

* ``linf`` (default): every channel of every pixel changes by at most ``floor(255 eps)`` levels;
* ``l2``: the whole change of one image, ``|x' - x|_2`` on the [0, 1] scale, is at most ``eps``
  (LSP, AR, Bayes with ``norm=l2``);
* ``l0``: at most ``pixels`` pixel locations (an ``(h, w)`` position, counted changed when any of
  its channels changes) differ per image, each channel by at most ``floor(255 eps)`` levels
  (OPS: one pixel, ``eps = 1``).

The bound holds on the integer grid, i.e. in the PNG files, not only on the float delta.
"""
from __future__ import annotations

import math

import numpy as np
import torch

NORMS = ("linf", "l2", "l0")
_L2_BISECTIONS = 40


def pixel_budget(eps: float) -> int:
    """Largest integer change per pixel allowed by an L-inf radius ``eps`` on the [0, 1] scale.

    ``floor(255 * eps)``, with a small tolerance so 8/255 (7.999999... in floating point) gives 8.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return int(math.floor(255.0 * eps + 1e-6))


def apply_perturbation(images: np.ndarray | torch.Tensor, delta: np.ndarray | torch.Tensor,
                       eps: float, norm: str = "linf", pixels: int | None = None) -> np.ndarray:
    """Return uint8 images ``x'`` within the bound ``(eps, norm, pixels)`` and ``0 <= x' <= 255``.

    ``images`` are uint8, ``delta`` a float perturbation on the [0, 1] scale with the same shape.
    The delta is rounded to the nearest integer step (not truncated), limited to the bound and the
    result clipped to the pixel range, so the bound holds exactly after lossless (PNG) encoding.

    * ``linf``: any layout; ``|x' - x| <= floor(255 eps)`` per entry.
    * ``l2``: samples along the first axis; per sample ``|x' - x|_2 <= 255 eps`` (in levels).
      The delta is projected onto the ball, then, where rounding pushed it out again, scaled down
      by bisection until its rounded form lies inside (never above the bound).
    * ``l0``: ``N x C x H x W``; per image at most ``pixels`` of the ``H x W`` locations change
      (the ``pixels`` largest changes are kept, ties to the lowest index), each channel by at most
      ``floor(255 eps)`` levels.
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
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    levels = d.astype(np.float64) * 255.0
    if norm == "l2":
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
        steps = _l2_steps(levels, 255.0 * eps)
    else:
        budget = pixel_budget(eps)
        steps = np.clip(np.rint(levels), -budget, budget)
    out = np.clip(x.astype(np.int16) + steps.astype(np.int16), 0, 255)
    if norm == "l0":
        out = _keep_pixels(x.astype(np.int16), out, pixels)
    return out.astype(np.uint8)


def _l2_steps(levels: np.ndarray, bound: float) -> np.ndarray:
    """Integer steps per sample (first axis) with ``|steps|_2 <= bound``: ``levels`` projected on
    the ball and rounded; a sample whose rounded steps lie outside is scaled down by bisection
    (the scale 0 is always inside, so the result never exceeds the bound)."""
    if levels.ndim == 0 or levels.shape[0] == 0:
        return np.rint(levels)
    flat = levels.reshape(levels.shape[0], -1)
    limit = bound * bound + 1e-9  # squared norms of integer steps are exact in float64

    def rounded(scale: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(flat * scale[:, None]), -255, 255)

    def inside(steps: np.ndarray) -> np.ndarray:
        return (steps * steps).sum(axis=1) <= limit

    norms = np.linalg.norm(flat, axis=1)
    hi = np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)
    steps = rounded(hi)
    bad = ~inside(steps)
    if bad.any():
        lo, hi_bad = np.zeros(int(bad.sum())), hi[bad]
        part = flat[bad]
        for _ in range(_L2_BISECTIONS):
            mid = (lo + hi_bad) / 2
            ok = ((np.clip(np.rint(part * mid[:, None]), -255, 255) ** 2).sum(axis=1) <= limit)
            lo, hi_bad = np.where(ok, mid, lo), np.where(ok, hi_bad, mid)
        steps[bad] = np.clip(np.rint(part * lo[:, None]), -255, 255)
    return steps.reshape(levels.shape)


def _keep_pixels(x: np.ndarray, out: np.ndarray, pixels: int | None) -> np.ndarray:
    """``out`` with at most ``pixels`` changed ``(h, w)`` locations per ``N x C x H x W`` image:
    the largest changes (max over channels) are kept, ties to the lowest location index."""
    if pixels is None or isinstance(pixels, bool) or int(pixels) != pixels or pixels < 0:
        raise ValueError(f"an l0 bound needs pixels, a non-negative integer; got {pixels!r}")
    if out.ndim != 4:
        raise ValueError(f"an l0 bound needs N x C x H x W images, got shape {out.shape}")
    n, _, h, w = out.shape
    size = np.abs(out - x).max(axis=1).reshape(n, h * w)  # N x HW, changed where > 0
    if int((size > 0).sum(axis=1).max(initial=0)) <= pixels:
        return out
    order = np.argsort(-size, axis=1, kind="stable")[:, :int(pixels)]
    keep = np.zeros((n, h * w), dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    keep = keep.reshape(n, 1, h, w)
    return np.where(keep, out, x)


def changed_pixels(before: np.ndarray | torch.Tensor, after: np.ndarray | torch.Tensor
                   ) -> np.ndarray:
    """Per ``N x C x H x W`` image, the number of ``(h, w)`` locations where any channel differs."""
    a = before.numpy() if isinstance(before, torch.Tensor) else np.asarray(before)
    b = after.numpy() if isinstance(after, torch.Tensor) else np.asarray(after)
    return (a.astype(np.int16) != b.astype(np.int16)).any(axis=1).reshape(len(a), -1).sum(axis=1)
