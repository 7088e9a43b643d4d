"""An in-memory labelled image set: what the data layer hands to core and methods."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class ImageSet:
    """uint8 images ``N x C x H x W`` (torch), int64 labels ``N``, keys and per-sample metadata.

    Float conversion happens per batch (``to_float``), so a CIFAR-size set stays at 150 MB.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be uint8 NxCxHxW, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("ImageSet.labels must have one label per image")
        self.labels = self.labels.long()
        if not self.keys:
            self.keys = [f"{i:08d}" for i in range(len(self))]
        if not self.meta:
            self.meta = [{} for _ in range(len(self))]
        if self.num_classes is None:
            self.num_classes = int(self.labels.max().item()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @staticmethod
    def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float().div_(255.0)

    def float_images(self) -> torch.Tensor:
        return self.to_float(self.images)

    def subset(self, index: Sequence[int] | torch.Tensor | np.ndarray) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], [self.keys[i] for i in idx.tolist()],
                        [self.meta[i] for i in idx.tolist()], self.num_classes)

    @classmethod
    def from_numpy_hwc(cls, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None,
                       meta: list[dict] | None = None, num_classes: int | None = None) -> "ImageSet":
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2)))
        return cls(x, torch.as_tensor(np.asarray(labels), dtype=torch.long), list(keys or []),
                   list(meta or []), num_classes)

    def numpy_hwc(self) -> np.ndarray:
        return self.images.permute(0, 2, 3, 1).contiguous().numpy()
