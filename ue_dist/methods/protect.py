"""Applying a fitted method to images: batches, the epsilon contract, and which samples to protect.

The per-batch primitives that ``ue_dist.pipeline`` composes for every protection path (Ray Data
actors, sweeps, the joint Bayes mode), so that every path writes exactly the same bytes for the
same inputs, state and seed; methods may use ``protect_uint8`` during a fit (GUE).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

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


def _perturb_batch(method: Method, loaded: Any, x8: torch.Tensor, y: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """The method's float delta (on the CPU) for one uint8 batch, its shape checked."""
    delta = method.perturb(loaded, _to_device_float(x8, device), y.to(device))
    if delta.shape != x8.shape:
        raise RuntimeError(f"method {method.name!r} returned delta of shape "
                           f"{tuple(delta.shape)} for images of shape {tuple(x8.shape)}")
    return delta.detach().cpu()


def protect_uint8(method: Method, loaded: Any, images_nchw: torch.Tensor, labels: torch.Tensor,
                  device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Perturb uint8 ``N x C x H x W`` images in batches; returns uint8 images within the method's
    bound (``method.bound()``: eps in its norm)."""
    device = torch.device(device)
    out = []
    for start in range(0, len(images_nchw), batch_size):
        x8 = images_nchw[start:start + batch_size]
        delta = _perturb_batch(method, loaded, x8, labels[start:start + batch_size], device)
        out.append(torch.from_numpy(apply_perturbation(x8.cpu(), delta, **method.bound())))
    return torch.cat(out) if out else images_nchw.clone()


# native resolution ----------------------------------------------------------------------------
#: A batch of whole images of their own size (a method without a fitted size) holds at most this
#: many pixels: 2**22 (4.2 Mpx, 50 MB as float32 RGB); a larger photo is a batch of its own.
MAX_BATCH_PIXELS = 1 << 22


def fitted_shape(state: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the state was fitted on; None for a method that learns no image size."""
    shape = state.get("image_shape") if state is not None else None
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        return None
    return int(shape[0]), int(shape[1]), int(shape[2])


def native_problem(method: Method, state: Mapping[str, Any] | None,
                   shape_chw: Sequence[int]) -> str | None:
    """Why ``state`` cannot protect an image of shape ``(C, H, W)`` at its own size; None if it
    can. Any size is tiled by the fitted size (``protect_native``); the channel rule: an alpha
    channel is kept unperturbed, a grey image is perturbed as RGB by a colour state, a colour
    image is refused by a grey state; an L2 or L0 bound is a bound on a whole image of the
    fitted size, so those methods protect that size only."""
    fitted = fitted_shape(state)
    if fitted is None:
        return None
    c, h, w = (int(v) for v in shape_chw)
    colour = 3 if c in (3, 4) else c
    fc, fh, fw = fitted
    if fc == 1 and colour == 3:
        return (f"the state was fitted on grey images (1 channel) and this image has colour "
                f"({c} channels): fit on colour images to protect colour photos")
    if colour not in (1, 3) or fc not in (1, 3):
        return f"images of {c} channels cannot be protected by a state fitted on {fc}"
    if method.norm != "linf" and (h, w) != (fh, fw):
        return (f"method {method.name!r} bounds the {method.norm.upper()} norm of a whole image "
                f"of the fitted size {fh}x{fw}, so it protects that size only, not {h}x{w}: "
                "resize the images to it (convert --image-size) or use an L-inf method")
    return None


def tile_origins(size: int, tile: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size``: a regular grid whose last tile is
    aligned to the far edge (it overlaps its neighbour instead of running past the image)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile)) + [size - tile]


def _colour_and_alpha(x8: torch.Tensor, channels: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(colour, alpha)`` of a uint8 ``C x H x W`` image: alpha split off (never perturbed),
    a grey image repeated to ``channels`` = 3."""
    alpha = x8[3:4] if x8.shape[0] == 4 else None
    colour = x8[:3] if alpha is not None else x8
    if channels == 3 and colour.shape[0] == 1:
        colour = colour.expand(3, -1, -1)
    return colour.contiguous(), alpha


def protect_native(method: Method, loaded: Any, images: Sequence[torch.Tensor],
                   labels: torch.Tensor, state: Mapping[str, Any] | None,
                   device: torch.device | str = "cpu", batch_size: int = 256
                   ) -> list[torch.Tensor]:
    """Perturb uint8 ``C x H x W`` images of any sizes; returns them within the method's bound.

    With a fitted size ``h x w`` (``state["image_shape"]``) every image is cut into tiles of that
    size (``tile_origins``; an image smaller than a tile is edge-padded to it and cropped back),
    the tiles of consecutive images fill batches of ``batch_size`` and each tile's delta goes back
    to its place: the source model or generator sees what it was fitted on, memory is
    ``batch_size`` tiles plus the float delta of the images in flight, whatever the photo's size.
    An image of the fitted size is one tile, so a set of such images is perturbed in exactly the
    batches of ``protect_uint8``. Without a fitted size (a method that learns nothing), images
    are grouped by size and a batch holds at most ``MAX_BATCH_PIXELS``.
    Channels: ``native_problem``'s rule (the caller checks it first)."""
    device = torch.device(device)
    fitted = fitted_shape(state)
    out: list[torch.Tensor | None] = [None] * len(images)
    bound = method.bound()

    def finish(i: int, colour: torch.Tensor, alpha: torch.Tensor | None,
               delta: torch.Tensor) -> None:
        # L-inf is a bound per entry: applied in bands of rows, so a 12 Mpx photo never has a
        # float64 copy of itself in memory; L2/L0 bound the whole (fitted-size) image
        rows = max(1, MAX_BATCH_PIXELS // (4 * colour.shape[2])) if bound["norm"] == "linf" \
            else colour.shape[1]
        done = torch.empty_like(colour)
        for top in range(0, colour.shape[1], rows):
            band = slice(top, top + rows)
            done[:, band] = torch.from_numpy(apply_perturbation(
                colour[None, :, band], delta[None, :, band].contiguous(), **bound))[0]
        out[i] = torch.cat([done, alpha]) if alpha is not None else done

    if fitted is None:
        buckets: dict[tuple[int, ...], list[int]] = {}
        parts = [_colour_and_alpha(x, None) for x in images]
        for i, (colour, _) in enumerate(parts):
            buckets.setdefault(tuple(colour.shape), []).append(i)
        for shape, idx in buckets.items():
            per = max(1, min(int(batch_size), MAX_BATCH_PIXELS // (shape[1] * shape[2])))
            for start in range(0, len(idx), per):
                chunk = idx[start:start + per]
                x8 = torch.stack([parts[i][0] for i in chunk])
                delta = _perturb_batch(method, loaded, x8, labels[chunk], device)
                for j, i in enumerate(chunk):
                    finish(i, parts[i][0], parts[i][1], delta[j])
        return out  # type: ignore[return-value]

    channels, th, tw = fitted
    pending: list[tuple[int, int, int]] = []  # (image, top, left) of the tiles in the batch
    flight: dict[int, list[Any]] = {}  # image -> [colour, alpha, padded delta, tiles left]

    def run_batch() -> None:
        tiles = torch.stack([flight[i][4][:, t:t + th, l:l + tw] for i, t, l in pending])
        delta = _perturb_batch(method, loaded, tiles, labels[[i for i, _, _ in pending]], device)
        for (i, t, l), d in zip(pending, delta):
            entry = flight[i]
            entry[2][:, t:t + th, l:l + tw] = d
            entry[3] -= 1
            if entry[3] == 0:
                colour, alpha, full = entry[0], entry[1], entry[2]
                finish(i, colour, alpha, full[:, :colour.shape[1], :colour.shape[2]].contiguous())
                del flight[i]
        pending.clear()

    for i, x in enumerate(images):
        colour, alpha = _colour_and_alpha(x, channels)
        h, w = colour.shape[1:]
        padded = colour
        if h < th or w < tw:  # edge-padded to one tile, cropped back in finish
            import torch.nn.functional as F
            padded = F.pad(colour[None].float(), (0, max(0, tw - w), 0, max(0, th - h)),
                           mode="replicate")[0].round().to(torch.uint8)
        ph, pw = padded.shape[1:]
        origins = [(t, l) for t in tile_origins(ph, th) for l in tile_origins(pw, tw)]
        flight[i] = [colour, alpha, torch.zeros(padded.shape, dtype=torch.float32),
                     len(origins), padded]
        for t, l in origins:
            pending.append((i, t, l))
            if len(pending) == int(batch_size):
                run_batch()
    if pending:
        run_batch()
    return out  # type: ignore[return-value]
