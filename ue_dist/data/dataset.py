"""Whole datasets as folders of shards: load into an ``ImageSet``, write one, describe one."""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from ue_dist.data import storage
from ue_dist.data.imageset import ImageSet
from ue_dist.data.shards import (Sample, ShardError, list_shards, read_shard, shard_name,
                                 validate_key, write_shard)

DEFAULT_SHARD_SIZE = 1000
MANIFEST = "_dataset.json"


def read_all_shards(url: str, storage_options: Mapping[str, Any] | None = None
                    ) -> list[tuple[str, list]]:
    shards = list_shards(url, storage_options)
    if not shards:
        raise storage.StorageError(f"no shards (*.tar) found under {url!r}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        contents = list(pool.map(lambda u: read_shard(u, storage_options), shards))
    return list(zip(shards, contents))


class MixedSizesError(ShardError):
    """Images of different shapes in a set that is used as one tensor (``fit --image-size``
    turns such a set into fixed-size views)."""


def _shapes(shard_samples: list[tuple[str, list]]) -> tuple[Counter, tuple | None]:
    """``(Counter of image shapes, (shard, key, shape) of the first sample whose shape differs
    from the first one's, or None)``; refuses a key that appears twice and an empty dataset."""
    shapes: Counter = Counter()
    first = differs = None
    seen: dict[str, str] = {}
    for shard, samples in shard_samples:
        for s in samples:
            if first is None:
                first = (shard, s.key, s.image.shape)
            elif differs is None and s.image.shape != first[2]:
                differs = (shard, s.key, s.image.shape)
            shapes[s.image.shape] += 1
            if s.key in seen:
                raise ShardError(f"shard {shard}, sample {s.key!r}: key also appears in shard "
                                 f"{seen[s.key]} (keys must be unique)")
            seen[s.key] = shard
    if first is None:
        raise ShardError("the dataset has no samples")
    return shapes, None if differs is None else (first, differs)


def _check_consistent(shard_samples: list[tuple[str, list]]) -> tuple[int, ...]:
    """The one image shape of a dataset that is loaded as one tensor (training, fitting)."""
    shapes, mixed = _shapes(shard_samples)
    if mixed is not None:
        (shard0, key0, shape0), (shard, key, shape) = mixed
        raise MixedSizesError(
            f"shard {shard}, sample {key!r}: image shape {shape} differs from {shape0} (shard "
            f"{shard0}, sample {key0!r}): mixed image shapes in one dataset ({len(shapes)} sizes); "
            "a set loaded whole needs one size: convert with --image-size N (--resize-mode "
            "center_crop or border)")
    return next(iter(shapes))


def _unlabelled(shard: str, key: str) -> ShardError:
    return ShardError(f"shard {shard}, sample {key!r}: no label ({key}.cls); a labelled set is "
                      "needed here")


def load_imageset(url: str, storage_options: Mapping[str, Any] | None = None, *,
                  require_labels: bool = True, image_size: int | None = None,
                  views: str = "crop", seed: int = 0) -> ImageSet:
    """Every shard under ``url`` (one split, e.g. ``OUT/train``) as one ``ImageSet``;
    ``require_labels=False``: a sample without a label gets -1 (pseudo-labels replace them).

    ``image_size=N``: one ``N x N`` view of every image instead (``data/views.py``: ``views`` is
    ``crop`` or ``resize``, the crops drawn from ``seed`` and each key), so a set of mixed sizes
    loads; shards are read one at a time, so memory holds the views and one shard of originals.
    Without it, mixed sizes are refused (``MixedSizesError``)."""
    if image_size is not None:
        return _load_views(url, storage_options, require_labels=require_labels,
                           image_size=int(image_size), views=views, seed=seed)
    shard_samples = read_all_shards(url, storage_options)
    _check_consistent(shard_samples)
    samples = [(shard, s) for shard, ss in shard_samples for s in ss]
    unlabelled = next(((shard, s.key) for shard, s in samples if s.label is None), None)
    if unlabelled is not None and require_labels:
        raise _unlabelled(*unlabelled)
    images = np.stack([s.image for _, s in samples])
    labels = np.array([-1 if s.label is None else s.label for _, s in samples], dtype=np.int64)
    meta = [dict(s.meta, source_shard=s.meta.get("source_shard") or shard) for shard, s in samples]
    return ImageSet.from_numpy_hwc(images, labels, [s.key for _, s in samples], meta,
                                   _num_classes(url, storage_options, labels))


def _num_classes(url: str, storage_options: Mapping[str, Any] | None, labels: np.ndarray) -> int:
    manifest = _read_manifest(url, storage_options)
    num_classes = manifest.get("num_classes") if manifest else None
    return max(int(num_classes or 0), int(labels.max()) + 1)


def _load_views(url: str, storage_options: Mapping[str, Any] | None, *, require_labels: bool,
                image_size: int, views: str, seed: int) -> ImageSet:
    """``load_imageset`` with ``image_size``: shard by shard, each image replaced by its view."""
    from ue_dist.data.views import VIEWS, as_channels, make_view, view_rng

    if views not in VIEWS:
        raise ShardError(f"--views must be one of {', '.join(VIEWS)}, got {views!r}")
    if image_size < 1:
        raise ShardError(f"--image-size must be >= 1, got {image_size}")
    shards = list_shards(url, storage_options)
    if not shards:
        raise storage.StorageError(f"no shards (*.tar) found under {url!r}")
    blocks: list[np.ndarray] = []  # one n_shard x N x N x C block per shard (C = 1 or 3)
    keys: list[str] = []
    labels: list[int] = []
    meta: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for shard in shards:
        samples = read_shard(shard, storage_options)  # the originals live for one shard only
        out = []
        for s in samples:
            if s.key in seen:
                raise ShardError(f"shard {shard}, sample {s.key!r}: key also appears in shard "
                                 f"{seen[s.key]} (keys must be unique)")
            seen[s.key] = shard
            if s.label is None and require_labels:
                raise _unlabelled(shard, s.key)
            out.append(make_view(s.image, image_size, views, rng=view_rng(seed, s.key)))
            keys.append(s.key)
            labels.append(-1 if s.label is None else int(s.label))
            meta.append(dict(s.meta, source_shard=s.meta.get("source_shard") or shard))
        if out:
            channels = max(v.shape[2] for v in out)
            blocks.append(np.stack([as_channels(v, channels) for v in out]))
        del samples
    if not blocks:
        raise ShardError("the dataset has no samples")
    channels = max(b.shape[3] for b in blocks)  # colour if any image has colour
    images = np.concatenate([as_channels(b, channels) for b in blocks])
    label_array = np.asarray(labels, dtype=np.int64)
    return ImageSet.from_numpy_hwc(images, label_array, keys, meta,
                                   _num_classes(url, storage_options, label_array))


def _read_manifest(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(storage.join(url, MANIFEST), storage_options))
    except (FileNotFoundError, ValueError):
        return None


def imageset_samples(imageset: ImageSet) -> list[Sample]:
    hwc = imageset.numpy_hwc()
    return [Sample(k, hwc[i], int(imageset.labels[i]), dict(imageset.meta[i]))
            for i, k in enumerate(imageset.keys)]


def write_samples(url: str, samples: list[Sample], *, shard_size: int = DEFAULT_SHARD_SIZE,
                  num_classes: int | None = None, extra: Mapping[str, Any] | None = None,
                  storage_options: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> list[str]:
    """Write ``samples`` as ``shard-000000.tar ...`` under ``url`` plus a manifest written last.

    Everything is validated before the first byte is written; if a write fails, the shards this
    call wrote are removed again, so a dataset appears whole or not at all.
    """
    if int(shard_size) < 1:
        raise ShardError(f"--shard-size must be >= 1 (samples per shard), got {shard_size}")
    if not samples:
        raise ShardError(f"nothing to write to {url!r}: no samples")
    seen: set[str] = set()
    shape = samples[0].image.shape
    for s in samples:
        validate_key(s.key)
        if s.key in seen:
            raise ShardError(f"duplicate sample key {s.key!r}")
        seen.add(s.key)
        if s.image.shape != shape:
            raise ShardError(f"sample {s.key!r}: image shape {s.image.shape} differs from {shape} "
                             "(mixed image shapes)")
    storage.check_writable_root(url, storage_options)
    fs, path = storage.get_fs(url, storage_options)
    if fs.isfile(path):
        raise storage.StorageError(f"{url!r} is an existing file, not a folder for shards")
    if fs.exists(path) and not overwrite:
        existing = [e for e in fs.ls(path, detail=False) if str(e).endswith(".tar")]
        if existing:
            raise storage.StorageError(f"{url!r} already holds {len(existing)} shard(s); "
                                       "choose an empty output or pass --overwrite")
    written: list[str] = []
    try:
        for index, start in enumerate(range(0, len(samples), shard_size)):
            target = storage.join(url, shard_name(index))
            write_shard(target, samples[start:start + shard_size], storage_options)
            written.append(target)
        labels = Counter(int(s.label) for s in samples if s.label is not None)
        classes = num_classes or (max(labels) + 1 if labels else None)  # None: no labels
        manifest = {"samples": len(samples), "shards": len(written), "image_shape": list(shape),
                    "num_classes": None if classes is None else int(classes),
                    "label_histogram": {str(k): v for k, v in sorted(labels.items())},
                    **dict(extra or {})}
        storage.write_bytes(storage.join(url, MANIFEST), json.dumps(manifest, indent=1).encode(),
                            storage_options)
    except BaseException:
        for target in written:
            try:
                fs.rm(storage.get_fs(target, storage_options)[1])
            except Exception:
                pass
        raise
    return written


def write_imageset(url: str, imageset: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE,
                   storage_options: Mapping[str, Any] | None = None,
                   overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> list[str]:
    return write_samples(url, imageset_samples(imageset), shard_size=shard_size,
                         num_classes=imageset.num_classes, storage_options=storage_options,
                         overwrite=overwrite, extra=extra)


def dataset_info(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Shards, samples, image shape (H, W, C; None when sizes differ, ``image_shapes`` counts
    each), label histogram (of the labelled samples; ``unlabelled`` counts the others), how
    many samples are protected."""
    shard_samples = read_all_shards(url, storage_options)
    shapes, mixed = _shapes(shard_samples)
    labels: Counter = Counter()
    protected = unlabelled = 0
    methods: Counter = Counter()
    for _, samples in shard_samples:
        for s in samples:
            if s.label is None:
                unlabelled += 1
            else:
                labels[int(s.label)] += 1
            if s.meta.get("protected"):
                protected += 1
                methods[str(s.meta.get("method"))] += 1
    total = sum(shapes.values())
    return {"url": url, "shards": len(shard_samples), "samples": total,
            "image_shape": list(next(iter(shapes))) if mixed is None else None,
            "image_shapes": {"x".join(map(str, k)): v for k, v in
                             sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))},
            "num_classes": max(labels) + 1 if labels else 0,
            "label_histogram": {str(k): v for k, v in sorted(labels.items())},
            "unlabelled": unlabelled,
            "protected": protected, "protected_by_method": dict(methods)}
