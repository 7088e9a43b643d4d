"""Applying a fitted method to images: batches, the epsilon contract, and which samples to protect.

The per-batch primitives that ``ue_dist.pipeline`` composes for every protection path (Ray Data
actors, sweeps, the joint Bayes mode), so that every path writes exactly the same bytes for the
same inputs, state and seed; methods may use ``protect_uint8`` during a fit (GUE).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from ue_dist.core.quantize import apply_perturbation
from ue_dist.methods.base import Method

META_VERSION = 1


def selected_for_protection(keys: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded choice of the ``fraction`` of samples to protect, decided per key.

    A key's fate depends only on (key, seed), not on shard order or batch, so a bucket protected
    shard by shard, or a dataset protected all at once, marks the same samples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--fraction must lie in [0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.ones(len(keys), dtype=bool)
    if fraction <= 0.0:
        return np.zeros(len(keys), dtype=bool)
    out = np.empty(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64 < fraction
    return out


def sample_meta(protected: bool, method: str | None, eps: float | None, source_shard: str | None,
                **extra: Any) -> dict[str, Any]:
    return {"protected": bool(protected), "method": method if protected else None,
            "eps": float(eps) if protected and eps is not None else None,
            "source_shard": source_shard, "version": META_VERSION, **extra}


@torch.no_grad()
def _to_device_float(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images_uint8.to(device).float().div_(255.0)


def protect_uint8(method: Method, loaded: Any, images_nchw: torch.Tensor, labels: torch.Tensor,
                  device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Perturb uint8 ``N x C x H x W`` images in batches; returns uint8 images within the method's
    bound (``method.bound()``: eps in its norm)."""
    device = torch.device(device)
    out = []
    for start in range(0, len(images_nchw), batch_size):
        x8 = images_nchw[start:start + batch_size]
        y = labels[start:start + batch_size].to(device)
        delta = method.perturb(loaded, _to_device_float(x8, device), y)
        if delta.shape != x8.shape:
            raise RuntimeError(f"method {method.name!r} returned delta of shape "
                               f"{tuple(delta.shape)} for images of shape {tuple(x8.shape)}")
        out.append(torch.from_numpy(apply_perturbation(x8.cpu(), delta.cpu(), **method.bound())))
    return torch.cat(out) if out else images_nchw.clone()
