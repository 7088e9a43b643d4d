"""Fixed-size training views of images of any size (``ue-dist fit --image-size N --views``).

A photo bucket holds images of many sizes; a method fits one model at one input size. Each
image becomes one ``N x N`` view:

* ``crop`` (the default): one seeded random ``N x N`` crop of the image at its own scale. Protect
  perturbs originals at native size by tiles of the fitted size, so the model should learn on
  what those tiles look like: native-scale patches, not whole photos shrunk. An image smaller
  than ``N`` in a side is first scaled up so that its smaller side is ``N``.
* ``resize``: the smaller side scaled to ``N`` (antialiased bilinear, Pillow), then the centre
  ``N x N`` crop: whole-scene views, as ImageNet-style training sees them.

Channels: alpha is not content and is dropped; the view set has 3 channels if any image has
colour (3 channels, or 4 with alpha), else 1; grey images in a colour set are replicated to 3.
The crop of each image is drawn from ``(seed, key)``, so the same seed gives the same views
whatever the shard order or the number of workers. Ray-free.
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

VIEWS = ("crop", "resize")


def view_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one sample's view: a function of the seed and the sample key only."""
    digest = hashlib.blake2b(f"{int(seed)}:{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def content(image: np.ndarray) -> np.ndarray:
    """``H x W x C`` uint8 without alpha: 1 (grey) or 3 (colour) channels."""
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image must be H x W x C with C in 1..4, got shape {image.shape}")
    return image[..., :1] if image.shape[2] == 2 else image[..., :3]


def scale_smaller_side(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (``H x W x C`` uint8, C in 1/3) resized so that its smaller side is ``size``
    (antialiased bilinear; the aspect ratio kept, the longer side rounded)."""
    h, w, c = image.shape
    if min(h, w) == size:
        return image
    if h <= w:
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((nw, nh), Image.BILINEAR, reducing_gap=None), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def make_view(image: np.ndarray, size: int, views: str = "crop", *,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """One ``size x size`` view of ``image`` (``H x W x C`` uint8), alpha dropped; see the module
    docstring. ``rng`` draws the crop's corner (``crop`` only; default: seed 0)."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}")
    if int(size) < 1:
        raise ValueError(f"the view size must be >= 1, got {size}")
    x = content(np.asarray(image, dtype=np.uint8))
    h, w = x.shape[:2]
    if views == "resize" or min(h, w) < size:
        x = scale_smaller_side(x, size)
        h, w = x.shape[:2]
    if views == "resize":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return np.ascontiguousarray(x[top:top + size, left:left + size])


def as_channels(views: np.ndarray, channels: int) -> np.ndarray:
    """``n x N x N x C`` views with ``channels`` channels (grey replicated to 3)."""
    if views.shape[-1] == channels:
        return views
    return np.repeat(views, channels, axis=-1)
