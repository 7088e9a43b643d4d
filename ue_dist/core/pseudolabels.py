"""Pseudo-labels for images without class labels: k-means clusters of pooled pixels.

A photo owner rarely has class labels, and most methods perturb each image toward or away from
its label. Unlearnable Clusters (Zhang et al., CVPR 2023) showed that the classes need not be the
victim's: perturbations that make *clusters* of the data unlearnable still protect it against a
victim trained on the true labels. They cluster the features of a pretrained surrogate model;
ue_dist cannot ship pretrained weights, so the features here are the images themselves, pooled
to ``size x size`` (adaptive average pooling: any image size gives the same feature length),
centred and projected on their first ``dims`` principal components, then clustered by k-means
(scikit-learn's ``KMeans``, seeded). These clusters group images by colour and layout, not by
meaning; whether a method protects under them is measured, not assumed (docs/results.md).

The labeller is a plain dict of tensors (it travels inside a method's state):
``{"kind": "pixel-kmeans", "size", "clusters", "channels", "mean", "components", "centroids"}``;
``assign`` gives any image, of any size, the label of its nearest centroid, so a bucket
protected shard by shard gets the same labels as the fit.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

KIND = "pixel-kmeans"


def as_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float ``B x C x H x W`` images as ``channels`` channels of content: alpha dropped, grey
    replicated for a colour model, colour averaged for a grey one."""
    if x.shape[1] == 4:
        x = x[:, :3]  # alpha is not content
    if x.shape[1] == channels:
        return x
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)


def _features(images: Sequence[torch.Tensor] | torch.Tensor, size: int, channels: int,
              chunk: int = 1024) -> torch.Tensor:
    """``N x (channels * size * size)`` float64 features of uint8 ``C x H x W`` images (a
    batch, or a sequence of images of any sizes): pooled to ``size x size``, grey replicated to
    ``channels`` (``as_channels``)."""
    out = []
    if isinstance(images, torch.Tensor):
        groups = [images[i:i + chunk] for i in range(0, len(images), chunk)]
    else:
        groups = [im[None] for im in images]
    for x in groups:
        x = as_channels(x.float().div(255.0), channels)
        out.append(F.adaptive_avg_pool2d(x, size).flatten(1).double())
    return torch.cat(out) if out else torch.zeros(0, channels * size * size, dtype=torch.float64)


def fit_labeller(images: torch.Tensor, clusters: int, seed: int = 0, size: int = 16,
                 dims: int = 64) -> dict[str, Any]:
    """The labeller of uint8 ``N x C x H x W`` ``images``: ``clusters`` k-means clusters of
    their pooled pixels' first ``dims`` principal components."""
    from sklearn.cluster import KMeans

    n, c = int(images.shape[0]), int(images.shape[1])
    channels = 3 if c == 4 else c
    if clusters < 2:
        raise ValueError(f"--clusters must be at least 2, got {clusters}")
    if n < clusters:
        raise ValueError(f"{n} images cannot form {clusters} clusters (--clusters)")
    feats = _features(images, size, channels)
    mean = feats.mean(0)
    centred = feats - mean
    dims = int(min(dims, centred.shape[1], n))
    # principal axes from the covariance (features are at most 3*16*16 = 768 long)
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / max(1, n - 1))
    components = eigvecs[:, torch.argsort(eigvals, descending=True)[:dims]].T.contiguous()
    # a fixed sign per axis: eigh's sign is arbitrary, a stored labeller should not depend on it
    components *= torch.sign(components[torch.arange(dims), components.abs().argmax(1)])[:, None]
    projected = (centred @ components.T).numpy()
    km = KMeans(n_clusters=int(clusters), n_init=10, random_state=int(seed)).fit(projected)
    return {"kind": KIND, "size": int(size), "clusters": int(clusters), "channels": channels,
            "mean": mean.float(), "components": components.float(),
            "centroids": torch.from_numpy(km.cluster_centers_).float()}


def labeller_problem(labeller: Any) -> str | None:
    """What makes a stored labeller unusable (None: nothing): checked with the state, so a
    broken one is named before any worker starts."""
    if not isinstance(labeller, Mapping) or labeller.get("kind") != KIND:
        return f"its 'labeller' is not a {KIND} labeller"
    missing = [k for k in ("mean", "components", "centroids")
               if not isinstance(labeller.get(k), torch.Tensor)]
    if missing or not all(isinstance(labeller.get(k), int) for k in ("size", "channels")):
        return f"its labeller is incomplete (lacks {missing or ['size', 'channels']})"
    return None


def assign(labeller: Mapping[str, Any], images: Sequence[torch.Tensor] | torch.Tensor
           ) -> torch.Tensor:
    """The cluster (int64 label) of each uint8 ``C x H x W`` image, any size: the nearest
    centroid in the labeller's principal components."""
    feats = _features(images, int(labeller["size"]), int(labeller["channels"]))
    projected = (feats - labeller["mean"].double()) @ labeller["components"].double().T
    return torch.cdist(projected, labeller["centroids"].double()).argmin(1).long()


def cluster_agreement(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Purity: the fraction of images whose cluster's majority label is their own label (how
    far the clusters follow the classes; 1/classes for clusters that ignore them)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    agree = 0
    for c in np.unique(clusters):
        agree += np.bincount(labels[clusters == c]).max()
    return float(agree) / max(1, len(labels))


__all__ = ["as_channels", "assign", "cluster_agreement", "fit_labeller",
           "labeller_problem"]
