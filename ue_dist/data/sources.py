"""Built-in sources of labelled images: scikit-learn's bundled digits (real data) and a
generated, learnable 32x32x3 ten-class dataset. No downloads."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ue_dist.data.imageset import ImageSet


def _resize(images_hwc: np.ndarray, size: int) -> np.ndarray:
    if images_hwc.shape[1] == size and images_hwc.shape[2] == size:
        return images_hwc
    out = np.empty((len(images_hwc), size, size, images_hwc.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images_hwc):
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        res = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out[i] = res[..., None] if res.ndim == 2 else res
    return out


def digits_arrays(image_size: int | None = 32, channels: int = 3, test_fraction: float = 0.2,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1,797 handwritten 8x8 digits, split with a fixed-seed stratified split.

    Pixels 0..16 are scaled to 0..255; by default resized to 32x32 and repeated to 3 channels so
    that every CIFAR-variant victim applies (``image_size=None`` keeps the native 8x8).
    Returns ``{"train": (images N x H x W x C uint8, labels), "test": (...)}``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    if image_size is not None:
        images = _resize(images, image_size)
    if channels == 3:
        images = np.repeat(images, 3, axis=3)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=labels)
    return {"train": (images[idx_train], labels[idx_train]),
            "test": (images[idx_test], labels[idx_test])}


def digits_imageset(split: str = "train", image_size: int | None = 32, seed: int = 0) -> ImageSet:
    images, labels = digits_arrays(image_size, seed=seed)[split]
    keys = [f"digits-{split}-{i:05d}" for i in range(len(labels))]
    return ImageSet.from_numpy_hwc(images, labels, keys, num_classes=10)


def sample_photos() -> dict[str, bytes]:
    """The two real JPEG photographs scikit-learn ships (``china.jpg``, ``flower.jpg``, 427x640
    RGB, CC-BY; no download): the file bytes by name, for real-photo tests and benchmarks."""
    import os

    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    out = {}
    for name in ("china.jpg", "flower.jpg"):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out
