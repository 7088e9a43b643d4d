"""Converters: sources the user has (or that are bundled) into ``OUT/train`` and ``OUT/test`` shards.

Every converter loads and validates its whole input before writing, so bad input leaves nothing
behind (imagefolder streams instead, into a hidden staging folder moved into place at the end);
keys are stable (derived from the source's own order or file names) and unique.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from typing import Any, Callable, Mapping

import numpy as np

from ue_dist.data import photo_io, storage
from ue_dist.data.dataset import DEFAULT_SHARD_SIZE, MANIFEST, write_samples
from ue_dist.data.shards import Sample, ShardError, decode_image, shard_name, write_shard
from ue_dist.data.sources import _resize, digits_arrays
from ue_dist.errors import UserError


class ConvertError(UserError, ValueError):
    """Input a converter cannot use; one line (line breaks, e.g. in file names, become spaces)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(" ".join(part.strip() for part in str(message).splitlines()), *args)


Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _samples(prefix: str, images: np.ndarray, labels: np.ndarray,
             keys: list[str] | None = None) -> list[Sample]:
    keys = keys or [f"{prefix}-{i:06d}" for i in range(len(labels))]
    return [Sample(k, images[i], int(labels[i]), {"protected": False, "version": 1})
            for i, k in enumerate(keys)]


def write_splits(out: str, splits: Mapping[str, tuple[np.ndarray, np.ndarray]], name: str,
                 shard_size: int = DEFAULT_SHARD_SIZE, storage_options=None,
                 overwrite: bool = False, keys: Mapping[str, list[str]] | None = None,
                 num_classes: int | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write each split under ``OUT/<split>``; ``extra`` (e.g. class names) goes into every
    split's manifest and into the returned result."""
    k = num_classes or int(max(int(y.max()) for _, y in splits.values()) + 1)
    result: dict[str, Any] = {"out": out, "source": name, **dict(extra or {})}
    for split, (images, labels) in splits.items():
        url = storage.join(out, split)
        shards = write_samples(url, _samples(f"{name}-{split}", images, labels,
                                             (keys or {}).get(split)),
                               shard_size=shard_size, num_classes=k, storage_options=storage_options,
                               overwrite=overwrite,
                               extra={**dict(extra or {}), "source": name, "split": split})
        result[split] = {"url": url, "samples": int(len(labels)), "shards": len(shards)}
    return result


def balanced_subset(labels: np.ndarray, n: int, seed: int = 0, what: str = "labels") -> np.ndarray:
    """Sorted indices of a seeded, class-balanced subset of ``n`` samples: ``n // K`` per class
    (each class drawn without replacement, in class order, from one generator seeded by
    ``seed``), the remainder -- and the share of any class too small for it -- drawn from the
    samples left. ``n`` above the number of samples is an error naming ``what``."""
    labels = np.asarray(labels)
    if not 1 <= int(n) <= len(labels):
        raise ConvertError(f"{what}: a subset of {n} samples asked for, it holds {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    share = int(n) // len(classes)
    parts = [rng.choice(np.flatnonzero(labels == c), min(share, int((labels == c).sum())),
                        replace=False) for c in classes]
    chosen = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    short = int(n) - len(chosen)
    if short:
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, short, replace=False)])
    return np.sort(chosen)


def _train_subset(splits: Splits, keys: Mapping[str, list[str]] | None, prefix: str,
                  train_images: int | None, seed: int, what: str
                  ) -> tuple[Splits, dict[str, list[str]] | None]:
    """Only ``train_images`` of the training split (``balanced_subset``); each kept image's key
    names its position in the full split, so a subset's keys are a full conversion's."""
    if not train_images:
        return splits, dict(keys) if keys else None
    x, y = splits["train"]
    chosen = balanced_subset(y, int(train_images), seed, what)
    full = (keys or {}).get("train") or [f"{prefix}-train-{i:06d}" for i in range(len(y))]
    test_keys = (keys or {}).get("test") or [f"{prefix}-test-{i:06d}"
                                             for i in range(len(splits["test"][1]))]
    return ({**splits, "train": (x[chosen], y[chosen])},
            {"train": [full[i] for i in chosen], "test": test_keys})


def _maybe_resize(splits: Splits, image_size: int | None) -> Splits:
    if image_size is None:
        return splits
    return {s: (_resize(x, image_size), y) for s, (x, y) in splits.items()}


# digits ----------------------------------------------------------------------------------------
def convert_digits(out: str, image_size: int | None = 32, seed: int = 0, channels: int = 3,
                   **kw: Any) -> dict:
    return write_splits(out, digits_arrays(image_size, channels=channels, seed=seed), "digits", **kw)


# synthetic -------------------------------------------------------------------------------------
def synthetic_arrays(n: int, image_size: int = 32, num_classes: int = 10, seed: int = 0,
                     test_fraction: float = 0.2) -> Splits:
    """A learnable 10-class 32x32x3 dataset of textured shapes on cluttered backgrounds.

    Each class is a shape (a set of oriented strokes) with a class texture; every sample draws its
    own position, scale, rotation, colours, background clutter and noise, so a small CNN needs
    several epochs and the classes are not separable by mean colour.
    """
    if n < 2 * num_classes:
        raise ConvertError(f"--n must be at least {2 * num_classes}, got {n}")
    rng = np.random.default_rng(seed)
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    # class-specific stroke sets: angles and offsets of 2-3 bars, and a texture frequency
    class_bars = [rng.uniform(0, np.pi, size=rng.integers(2, 4)) for _ in range(num_classes)]
    class_offsets = [rng.uniform(-0.18, 0.18, size=len(a)) for a in class_bars]
    class_freq = rng.uniform(6, 16, size=num_classes)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        rot = rng.normal(0, 0.35)
        scale = rng.uniform(0.75, 1.25)
        cx, cy = rng.uniform(-0.15, 0.15, size=2)
        x, y = (xx - cx) / scale, (yy - cy) / scale
        mask = np.zeros((s, s), np.float32)
        for angle, off in zip(class_bars[c] + rot, class_offsets[c]):
            d = x * np.cos(angle) + y * np.sin(angle) - off
            along = -x * np.sin(angle) + y * np.cos(angle)
            mask = np.maximum(mask, np.exp(-(d / 0.045) ** 2) * (np.abs(along) < 0.32))
        texture = 0.5 + 0.5 * np.sin(class_freq[c] * (x * np.cos(rot) + y * np.sin(rot)) * np.pi
                                     + rng.uniform(0, 2 * np.pi))
        fg = rng.uniform(0.3, 1.0, size=3)
        bg = rng.uniform(0.0, 0.7, size=3)
        clutter = np.zeros((s, s), np.float32)
        for _ in range(3):  # random distractor strokes from no class in particular
            a, o = rng.uniform(0, np.pi), rng.uniform(-0.4, 0.4)
            d = xx * np.cos(a) + yy * np.sin(a) - o
            clutter = np.maximum(clutter, 0.6 * np.exp(-(d / 0.03) ** 2))
        img = bg[None, None] * (1 - 0.5 * clutter[..., None])
        shape_alpha = (mask * (0.6 + 0.4 * texture))[..., None]
        img = img * (1 - shape_alpha) + fg[None, None] * shape_alpha
        img += rng.normal(0, 0.06, size=img.shape)
        images[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    n_test = max(num_classes, int(round(n * test_fraction)))
    return {"train": (images[n_test:], labels[n_test:]), "test": (images[:n_test], labels[:n_test])}


def convert_synthetic(out: str, n: int = 5000, image_size: int = 32, seed: int = 0, **kw: Any) -> dict:
    return write_splits(out, synthetic_arrays(n, image_size, seed=seed), "synthetic", **kw)


# CIFAR -----------------------------------------------------------------------------------------
_CIFAR = {"cifar10": ("data_batch_", "test_batch", b"labels"),
          "cifar100": ("train", "test", b"fine_labels")}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, qualified: str):
        super().__init__(qualified)
        self.qualified = qualified


def _latin1_bytes(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle of ``bytes`` (Python 3): latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_global(module: str, name: str) -> Any:
    import importlib
    try:  # numpy 2 moved numpy.core to numpy._core; old pickles (CIFAR's own) name numpy.core
        return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.", 1)),
                       name)
    except ImportError:
        return getattr(importlib.import_module(module.replace("numpy._core.", "numpy.core.", 1)),
                       name)


# The globals a CIFAR python batch can hold: numpy arrays (ndarray reconstruction, written by
# numpy 1 or 2, any protocol), numpy scalars (labels as numpy ints) and, in protocol-2 pickles
# written by Python 3, bytes as _codecs.encode(str, "latin1"). dict/list/bytes/str/int need none.
_CIFAR_GLOBALS = {(m, n) for p in ("numpy.core", "numpy._core")
                  for m, n in ((f"{p}.multiarray", "_reconstruct"), (f"{p}.multiarray", "scalar"),
                               (f"{p}.numeric", "_frombuffer"))} | {("numpy", "ndarray"),
                                                                    ("numpy", "dtype")}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds; any other global (``posix.system``,
    ``builtins.eval``, ...) raises ``_RefusedGlobal`` before it is imported, so nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _CIFAR_GLOBALS:
            return _numpy_global(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def load_cifar_batch(blob: bytes, member: str, path: str, variant: str = "cifar10") -> dict:
    """One CIFAR python batch (a pickled dict), unpickled without running any code."""
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise ConvertError(f"{variant}: {member} in {path} refers to {exc.qualified}, which a "
                           "CIFAR batch never holds; refusing to unpickle it") from None
    except Exception as exc:
        raise ConvertError(f"{variant}: {member} in {path} is not a CIFAR pickle batch "
                           f"({type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise ConvertError(f"{variant}: {member} in {path} is not a CIFAR pickle batch "
                           f"(holds a {type(batch).__name__}, not a dict)")
    label_key = _CIFAR[variant][2]
    missing = [k.decode() for k in (b"data", label_key) if k not in batch]
    if missing:
        raise ConvertError(f"{variant}: {member} in {path} is not a CIFAR pickle batch "
                           f"(no {' or '.join(missing)} entry)")
    return batch


def _cifar_batches(path: str, variant: str, storage_options: Mapping[str, Any] | None = None
                   ) -> dict[str, list[tuple[str, dict]]]:
    """``{"train": [(member, batch), ...], "test": [...]}``, batches in file-name order.

    ``path`` is a local archive or extracted folder, or the URL of an archive (``s3://...``,
    read whole through fsspec: the CIFAR archives are 163 and 161 MB)."""
    train_prefix, test_name, _ = _CIFAR[variant]
    found: dict[str, list[tuple[str, str, dict]]] = {"train": [], "test": []}
    seen: dict[str, str] = {}

    def take(name: str, blob: bytes) -> None:
        base = os.path.basename(name)
        split = "test" if base == test_name else "train" if base.startswith(train_prefix) else None
        if split is None:
            return
        if base in seen:
            raise ConvertError(f"{variant}: {path} holds two batches named {base} "
                               f"({seen[base]} and {name})")
        seen[base] = name
        found[split].append((base, name, load_cifar_batch(blob, name, path, variant)))

    def read_tar(source: Any) -> None:
        try:
            with tarfile.open(**source) as tar:
                for m in tar:
                    if m.isfile():
                        base = os.path.basename(m.name)
                        if base == test_name or base.startswith(train_prefix):
                            take(m.name, tar.extractfile(m).read())  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConvertError(f"{variant}: {path} is a truncated or corrupt archive ({reason})") \
                from None

    if "://" in path:
        blob = _read_input(path, variant, storage_options)
        if not tarfile.is_tarfile(io.BytesIO(blob)):
            raise ConvertError(f"{variant}: {path!r} is not the python-pickle archive "
                               "(cifar-10-python.tar.gz); a URL must name the archive, not a folder")
        read_tar({"fileobj": io.BytesIO(blob)})
    elif not os.path.exists(path):
        raise ConvertError(f"{variant}: {path!r} does not exist")
    elif os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in sorted(files):
                if os.path.basename(f) == test_name or f.startswith(train_prefix):
                    with open(os.path.join(root, f), "rb") as fh:
                        take(os.path.relpath(os.path.join(root, f), path), fh.read())
    elif tarfile.is_tarfile(path):
        read_tar({"name": path})
    else:
        raise ConvertError(f"{variant}: {path!r} is neither the python-pickle archive "
                           "(cifar-10-python.tar.gz) nor its extracted folder")
    for split in ("train", "test"):
        if not found[split]:
            raise ConvertError(f"{variant}: no {split} batch found in {path!r}")
    return {s: [(name, b) for _, name, b in sorted(v, key=lambda t: t[0])]
            for s, v in found.items()}


def cifar_arrays(path: str, variant: str = "cifar10",
                 storage_options: Mapping[str, Any] | None = None) -> Splits:
    _, _, label_key = _CIFAR[variant]
    num_classes = 10 if variant == "cifar10" else 100
    out: Splits = {}
    for split, batches in _cifar_batches(path, variant, storage_options).items():
        xs, ys = [], []
        for member, b in batches:
            where = f"{variant}: {member} in {path}"
            data = np.asarray(b[b"data"])
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ConvertError(f"{where} has data of shape {data.shape}, expected N x 3072")
            if data.dtype != np.uint8:
                if not np.issubdtype(data.dtype, np.integer) or (data.size and (
                        data.min() < 0 or data.max() > 255)):
                    raise ConvertError(f"{where} has data of dtype {data.dtype} outside 0..255, "
                                       "expected uint8 pixels")
                data = data.astype(np.uint8)
            try:
                labels = np.asarray(b[label_key], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise ConvertError(f"{where} has labels that are not integers") from None
            if labels.shape != (len(data),):
                raise ConvertError(f"{where} has {labels.size} label(s) for {len(data)} images")
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ConvertError(f"{where} has labels outside 0..{num_classes - 1}")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def convert_cifar(path: str, out: str, variant: str = "cifar10", image_size: int | None = None,
                  **kw: Any) -> dict:
    storage.refuse_inside(out, path)
    k = 10 if variant == "cifar10" else 100
    arrays = cifar_arrays(path, variant, kw.get("storage_options"))
    return write_splits(out, _maybe_resize(arrays, image_size), variant, num_classes=k, **kw)


# image folder ----------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
#: --labels: folders = the first-level subfolder is the class; none = every image, no label
LABEL_MODES = ("folders", "none")


def _image_files(folder: str, base: str) -> list[str]:
    """Relative ('/'-separated, from ``base``) paths of the images under ``folder``, at any
    depth, sorted; hidden files and folders (leading '.') are skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(found)


def imagefolder_plan(path: str, labels: str = "folders", test_fraction: float = 0.0,
                     seed: int = 0) -> tuple[dict[str, list[tuple[str, int | None]]], list[str]]:
    """Which file goes to which split with which label, without reading any image:
    ``({split: [(relative path, label), ...] sorted by path}, classes)``.

    ``PATH/<class>/...`` (``labels="folders"``: the first-level subfolder is the class, images
    at any depth below it) or any images under ``PATH`` (``labels="none"``: label None); either
    also as ``PATH/train`` + ``PATH/test``, the given split. Otherwise everything is ``train``
    unless ``test_fraction > 0``: then a seeded split, stratified by class where it can be."""
    if not os.path.exists(path):
        raise ConvertError(f"imagefolder: {path!r} does not exist")
    if not os.path.isdir(path):
        raise ConvertError(f"imagefolder: {path!r} is a file, not a folder")
    if labels not in LABEL_MODES:
        raise ConvertError(f"imagefolder: --labels must be one of {', '.join(LABEL_MODES)}, "
                           f"got {labels!r}")
    has_splits = all(os.path.isdir(os.path.join(path, s)) for s in ("train", "test"))
    if has_splits and test_fraction:
        raise ConvertError(f"imagefolder: {path!r} holds train/ and test/ (the split is given); "
                           f"--test-fraction {test_fraction} applies to a folder without them")
    roots = {"train": os.path.join(path, "train"), "test": os.path.join(path, "test")} \
        if has_splits else {"all": path}
    classes: list[str] = []
    if labels == "folders":
        classes = sorted({d for r in roots.values() for d in os.listdir(r)
                          if os.path.isdir(os.path.join(r, d)) and not d.startswith(".")})
        if not classes:
            raise ConvertError(f"imagefolder: no class folders under {path!r} (expected "
                               "PATH/<class>/<image>); pass --labels none for photos without "
                               "classes")
    plan: dict[str, list[tuple[str, int | None]]] = {}
    for split, root in roots.items():
        items: list[tuple[str, int | None]] = []
        if labels == "none":
            items = [(rel, None) for rel in _image_files(root, path)]
        else:
            for c, cls in enumerate(classes):
                if os.path.isdir(os.path.join(root, cls)):
                    items += [(rel, c) for rel in _image_files(os.path.join(root, cls), path)]
        if items:
            plan[split] = sorted(items)
    if not plan:
        raise ConvertError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) under {path!r}")
    if has_splits:
        return plan, classes
    items = plan.pop("all")
    if not test_fraction:
        return {"train": items}, classes
    from sklearn.model_selection import train_test_split
    index = np.arange(len(items))
    y = np.array([-1 if lab is None else lab for _, lab in items])
    strat = y if labels == "folders" and np.unique(y, return_counts=True)[1].min() >= 2 else None
    try:
        try:
            tr, te = train_test_split(index, test_size=test_fraction, random_state=seed,
                                      stratify=strat)
        except ValueError:  # fewer test samples than classes: no stratified split exists
            tr, te = train_test_split(index, test_size=test_fraction, random_state=seed)
    except ValueError as exc:
        raise ConvertError(f"imagefolder: --test-fraction {test_fraction} cannot split "
                           f"{len(items)} image(s) ({_reason(exc)})") from None
    return {"train": [items[i] for i in sorted(tr)], "test": [items[i] for i in sorted(te)]}, \
        classes


def load_photo(file: str, resize_mode: str = "no", image_size: int | None = None) -> np.ndarray:
    """One image file as H x W x C uint8 by the shards' own decoding rule (``decode_image``:
    EXIF orientation applied, grey 1 channel, colour RGB, transparency RGBA, more than 8 bits
    refused), then resized (``photo_io.resize_image``). Errors name the file."""
    try:
        with open(file, "rb") as fh:
            blob = fh.read()
    except OSError as exc:
        raise ConvertError(f"imagefolder: cannot read {file} ({_reason(exc)})") from None
    try:
        image = decode_image(blob)
    except ShardError as exc:  # e.g. 16-bit: "... is a 16-bit image (mode I;16) ..."
        raise ConvertError(f"imagefolder: {file} is a {exc}") from None
    except Exception as exc:
        raise ConvertError(f"imagefolder: {file} is not a decodable image "
                           f"({type(exc).__name__})") from None
    return photo_io.resize_image(image, resize_mode, image_size)


class _SplitWriter:
    """Samples of one split, written as shards of ``shard_size`` into the staging folder as
    they fill (so memory holds one shard), with the counts the manifest needs."""

    def __init__(self, stage: str, split: str, shard_size: int,
                 storage_options: Mapping[str, Any] | None):
        self.url, self.shard_size, self.so = storage.join(stage, split), int(shard_size), \
            storage_options
        self.buffer: list[Sample] = []
        self.shards: list[str] = []
        self.keys: dict[str, str] = {}
        self.shapes: Counter = Counter()
        self.labels: Counter = Counter()

    def add(self, sample: Sample, rel: str) -> None:
        if sample.key in self.keys:
            raise ConvertError(f"imagefolder: {rel} and {self.keys[sample.key]} map to the same "
                               f"sample key {sample.key!r} (same path but the extension); "
                               "rename one of them")
        self.keys[sample.key] = rel
        self.shapes["x".join(map(str, sample.image.shape))] += 1
        if sample.label is not None:
            self.labels[int(sample.label)] += 1
        self.buffer.append(sample)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            name = shard_name(len(self.shards))
            write_shard(storage.join(self.url, name), self.buffer, self.so)
            self.shards.append(name)
            self.buffer = []


def _existing_shards(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    fs, path = storage.get_fs(url, storage_options)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        raise storage.StorageError(f"{url!r} is an existing file, not a folder for shards")
    return [posixpath.basename(str(e).rstrip("/")) for e in fs.ls(path, detail=False)
            if str(e).endswith(".tar")]


def convert_imagefolder(path: str, out: str, image_size: int | None = None, seed: int = 0,
                        labels: str = "folders", test_fraction: float = 0.0,
                        resize_mode: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                        storage_options: Mapping[str, Any] | None = None,
                        overwrite: bool = False) -> dict:
    """A folder of photos into ``OUT/train`` (and ``OUT/test`` when the input has one or
    ``test_fraction > 0``), streaming: files are read in sorted order and written as shards as
    they fill, into a hidden staging folder ``OUT/_ue-convert-tmp-<random>``; the shards are
    moved into place only when every image converted, the manifests last, so a bad file
    leaves no shard behind. Keys come from the relative path (``photo_io.path_key``), which
    every sample's json also keeps as ``source_path``. ``resize_mode`` (img2dataset's names)
    defaults to ``no`` (native sizes, which may differ) and to ``border`` with ``image_size``."""
    storage.refuse_inside(out, path)
    mode = resize_mode or ("border" if image_size is not None else "no")
    if mode not in photo_io.RESIZE_MODES:
        raise ConvertError(f"imagefolder: --resize-mode must be one of "
                           f"{', '.join(photo_io.RESIZE_MODES)}, got {mode!r}")
    if mode != "no" and image_size is None:
        raise ConvertError(f"imagefolder: --resize-mode {mode} needs --image-size N")
    if mode == "no" and image_size is not None:
        raise ConvertError(f"imagefolder: --resize-mode no keeps the native size; it excludes "
                           f"--image-size {image_size}")
    if not 0 <= float(test_fraction) < 1:
        raise ConvertError(f"imagefolder: --test-fraction must lie in [0, 1), got {test_fraction}")
    if int(shard_size) < 1:
        raise ConvertError(f"imagefolder: --shard-size must be >= 1, got {shard_size}")
    plan, classes = imagefolder_plan(path, labels, float(test_fraction), seed)
    storage.check_writable_root(out, storage_options)
    for split in plan:
        existing = _existing_shards(storage.join(out, split), storage_options)
        if existing and not overwrite:
            raise storage.StorageError(f"{storage.join(out, split)!r} already holds "
                                       f"{len(existing)} shard(s); choose an empty output or "
                                       "pass --overwrite")
    for split in {"train", "test"} - set(plan):
        existing = _existing_shards(storage.join(out, split), storage_options)
        if existing:  # an earlier conversion's split would be read with this one's
            raise storage.StorageError(f"{storage.join(out, split)!r} holds {len(existing)} "
                                       "shard(s) of an earlier conversion and this one writes no "
                                       f"{split} split; remove it or choose another OUT")
    stage = photo_io.staging_url(out, "_ue-convert-tmp-")
    writers: dict[str, _SplitWriter] = {}
    try:
        for split, items in plan.items():
            writer = writers[split] = _SplitWriter(stage, split, shard_size, storage_options)
            for rel, label in items:
                image = load_photo(os.path.join(path, *rel.split("/")), mode, image_size)
                writer.add(Sample(photo_io.path_key(rel), image, label,
                                  {"protected": False, "version": 1, "source_path": rel}), rel)
            writer.flush()
        result: dict[str, Any] = {"out": out, "source": "imagefolder", "classes": classes,
                                  "labels": labels, "resize_mode": mode, "image_size": image_size}
        for split, writer in writers.items():
            url = storage.join(out, split)
            stale = set(_existing_shards(url, storage_options)) - set(writer.shards)
            for name in writer.shards:
                photo_io.move(storage.join(writer.url, name), storage.join(url, name),
                              storage_options)
            fs = storage.get_fs(url, storage_options)[0]
            for name in sorted(stale):  # --overwrite: shards of an earlier, larger conversion
                fs.rm(storage.get_fs(storage.join(url, name), storage_options)[1])
            shapes = dict(sorted(writer.shapes.items()))
            manifest = {"samples": len(writer.keys), "shards": len(writer.shards),
                        "image_shape": [int(v) for v in next(iter(shapes)).split("x")]
                        if len(shapes) == 1 else None,
                        "image_shapes": shapes,
                        "num_classes": len(classes) if labels == "folders" else None,
                        "label_histogram": {str(k): v for k, v in sorted(writer.labels.items())},
                        "classes": classes, "labels": labels, "resize_mode": mode,
                        "image_size": image_size, "source": "imagefolder", "split": split}
            storage.write_bytes(storage.join(url, MANIFEST),
                                json.dumps(manifest, indent=1).encode(), storage_options)
            result[split] = {"url": url, "samples": len(writer.keys),
                             "shards": len(writer.shards), "image_shapes": shapes}
    finally:
        photo_io.remove_tree(stage, storage_options)
    return result


# numpy -----------------------------------------------------------------------------------------
def numpy_arrays(x_path: str, y_path: str, test_fraction: float = 0.2, seed: int = 0,
                 image_size: int | None = None) -> Splits:
    try:
        x = np.load(x_path, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConvertError(f"numpy: cannot load {x_path!r} / {y_path!r}: {reason}") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3, 4):
        raise ConvertError(f"numpy: {x_path} has shape {x.shape}; expected N x H x W [x C] "
                           "with C in 1/3/4 (channels last)")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and np.nanmax(x) <= 1.0 and np.nanmin(x) >= 0.0:
            x = np.rint(x * 255).astype(np.uint8)
        else:
            raise ConvertError(f"numpy: {x_path} has dtype {x.dtype}; expected uint8 or floats in [0, 1]")
    if y.ndim != 1 or len(y) != len(x):
        raise ConvertError(f"numpy: {y_path} has shape {y.shape}; expected ({len(x)},) labels")
    if not np.issubdtype(y.dtype, np.integer):
        if np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ConvertError(f"numpy: {y_path} holds non-integer labels")
    if (y < 0).any():
        raise ConvertError(f"numpy: {y_path} holds negative labels")
    from sklearn.model_selection import train_test_split
    strat = y if np.bincount(y).min() >= 2 else None
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                              stratify=strat)
    return _maybe_resize({"train": (x[tr], y[tr]), "test": (x[te], y[te])}, image_size)


def convert_numpy(x_path: str, y_path: str, out: str, seed: int = 0, image_size: int | None = None,
                  **kw: Any) -> dict:
    return write_splits(out, numpy_arrays(x_path, y_path, seed=seed, image_size=image_size),
                        "numpy", **kw)


# IDX (MNIST format): Fashion-MNIST, MNIST, KMNIST, EMNIST ---------------------------------------
#: IDX type byte -> element type; ``idx_array`` reads only 0x08 (what image and label files use).
IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32",
             0x0D: "float32", 0x0E: "float64"}


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_input(url: str, what: str, storage_options: Mapping[str, Any] | None) -> bytes:
    """A converter's whole input file, by path or URL; a missing or unreadable one is a
    one-line ``ConvertError`` naming it."""
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ConvertError(f"{what}: {url} does not exist") from None
    except (storage.StorageError, OSError) as exc:
        raise ConvertError(f"{what}: cannot read {url} ({_reason(exc)})") from None


def idx_array(url: str, storage_options: Mapping[str, Any] | None = None, *,
              ndim: int | None = None, what: str = "idx") -> np.ndarray:
    """One IDX file (the MNIST format) as a uint8 array of the shape its header gives.

    The format: two zero bytes, a type byte (only 0x08 = unsigned byte is accepted), the number of
    dimensions, then one big-endian int32 size per dimension and the data in C order. The file is
    read through fsspec (any URL ``storage.read_bytes`` takes); gzip is detected by its magic bytes
    (1f 8b), not by the name. A wrong magic number, another type, a truncated or overlong body,
    a gzip that does not decompress or (with ``ndim``) another number of dimensions raise a
    one-line ``ConvertError`` naming the file.
    """
    blob = _read_input(url, what, storage_options)
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConvertError(f"{what}: {url} is gzip-compressed but does not decompress "
                               f"({_reason(exc)})") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[3] == 0:
        raise ConvertError(f"{what}: {url} is not an IDX file (magic number "
                           f"0x{blob[:4].hex() or 'empty'}, expected 0x0000 then type and "
                           "number of dimensions, e.g. 0x00000803 for images)")
    type_code, nd = blob[2], blob[3]
    if type_code != 0x08:
        kind = IDX_TYPES.get(type_code, "an unknown type")
        raise ConvertError(f"{what}: {url} holds IDX type 0x{type_code:02x} ({kind}); only 0x08 "
                           "(unsigned byte) images and labels are supported")
    if ndim is not None and nd != ndim:
        expected = "labels: one dimension (N)" if ndim == 1 else \
            "images: three dimensions (N x rows x columns)" if ndim == 3 else f"{ndim} dimensions"
        raise ConvertError(f"{what}: {url} has {nd} dimension(s); expected {expected}")
    header = 4 + 4 * nd
    if len(blob) < header:
        raise ConvertError(f"{what}: {url} is truncated: {len(blob)} bytes, shorter than its "
                           f"{header}-byte header")
    dims = struct.unpack(f">{nd}I", blob[4:header])
    size = 1
    for d in dims:
        size *= d
    body = len(blob) - header
    shape = " x ".join(map(str, dims))
    if body < size:
        raise ConvertError(f"{what}: {url} is truncated: the header says {shape} = {size} bytes "
                           f"of data, the file holds {body}")
    if body > size:
        raise ConvertError(f"{what}: {url} has {body - size} bytes after the {shape} = {size} "
                           "bytes of data its header describes")
    return np.frombuffer(blob, np.uint8, size, header).reshape(dims).copy()


def idx_pair(images_url: str, labels_url: str, storage_options: Mapping[str, Any] | None = None,
             what: str = "idx") -> tuple[np.ndarray, np.ndarray]:
    """An images file (N x rows x columns) and its labels file (N): ``(N x H x W x 1, int64 N)``."""
    images = idx_array(images_url, storage_options, ndim=3, what=what)
    labels = idx_array(labels_url, storage_options, ndim=1, what=what)
    if len(images) != len(labels):
        raise ConvertError(f"{what}: {images_url} holds {len(images)} images but {labels_url} "
                           f"holds {len(labels)} labels")
    if not len(images):
        raise ConvertError(f"{what}: {images_url} holds no images")
    return images[..., None], labels.astype(np.int64)


def _image_format(images: np.ndarray, image_size: int | None, channels: int) -> np.ndarray:
    """Grayscale N x H x W x 1 resized as digits are (``sources._resize``, bilinear) and, with
    ``channels=3``, repeated to three channels."""
    if image_size is not None:
        images = _resize(images, image_size)
    return np.repeat(images, 3, axis=3) if channels == 3 else images


FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
#: Where ``convert fashion-mnist OUT`` looks, in order: Debian/Ubuntu's ``dataset-fashion-mnist``
#: package installs the four .gz files into the first; the others are common download places.
FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist",
                      "~/.keras/datasets/fashion-mnist", "~/data/fashion-mnist"]
FASHION_MNIST_HOWTO = ("get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
                       "into /usr/share/datasets/fashion-mnist) or download the four files from "
                       "the dataset's page, github.com/zalandoresearch/fashion-mnist, into a "
                       "folder and pass it: ue-dist convert fashion-mnist DIR OUT")


def _find_idx(folder: str, stem: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """``folder/stem.gz`` or ``folder/stem`` (also the ``train-images.idx3-ubyte`` spelling of
    some mirrors); whether it is compressed is decided later by its bytes, not by its name."""
    dotted = stem.replace("-idx", ".idx", 1)
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        url = storage.join(folder, name)
        try:
            if storage.exists(url, storage_options):
                return url
        except storage.StorageError as exc:
            raise ConvertError(f"fashion-mnist: cannot look into {folder} ({_reason(exc)})") \
                from None
    return None


def fashion_mnist_files(folder: str | None = None,
                        storage_options: Mapping[str, Any] | None = None
                        ) -> tuple[str, dict[str, tuple[str, str]]]:
    """``(folder, {"train": (images, labels), "test": (...)})``: the four files in ``folder`` (a
    path or fsspec URL) or, without one, in the first of ``FASHION_MNIST_DIRS`` holding all four."""
    names = ", ".join(f"{s}[.gz]" for pair in FASHION_MNIST_FILES.values() for s in pair)
    if folder is None:
        searched = []
        for candidate in FASHION_MNIST_DIRS:
            path = os.path.expanduser(candidate)
            if os.path.isdir(path):
                found = {split: tuple(_find_idx(path, s, storage_options) for s in stems)
                         for split, stems in FASHION_MNIST_FILES.items()}
                if all(u for pair in found.values() for u in pair):
                    return path, found  # type: ignore[return-value]
            searched.append(path)
        raise ConvertError(f"fashion-mnist: the four IDX files ({names}) are not in any of "
                           f"{', '.join(searched)}; {FASHION_MNIST_HOWTO}")
    if "://" not in folder:
        if not os.path.exists(folder):
            raise ConvertError(f"fashion-mnist: folder {folder!r} does not exist; "
                               f"{FASHION_MNIST_HOWTO}")
        if not os.path.isdir(folder):
            raise ConvertError(f"fashion-mnist: {folder!r} is a file, not the folder holding "
                               f"the four IDX files ({names})")
    found = {split: tuple(_find_idx(folder, s, storage_options) for s in stems)
             for split, stems in FASHION_MNIST_FILES.items()}
    missing = [f"{s}[.gz]" for split, stems in FASHION_MNIST_FILES.items()
               for s, u in zip(stems, found[split]) if u is None]
    if missing:
        raise ConvertError(f"fashion-mnist: folder {folder} lacks {', '.join(missing)}; "
                           f"{FASHION_MNIST_HOWTO}")
    return folder, found  # type: ignore[return-value]


def fashion_mnist_arrays(folder: str | None = None, image_size: int | None = 32,
                         channels: int = 3, storage_options: Mapping[str, Any] | None = None
                         ) -> tuple[Splits, str, dict[str, tuple[str, str]]]:
    """Fashion-MNIST's official split (60,000 train / 10,000 test, 28x28 grayscale, 10 classes)
    in file order; ``(splits, folder, files)``. By default resized to 32x32 and repeated to 3
    channels, like digits, so that every CIFAR-shaped victim and method applies;
    ``image_size=None, channels=1`` keeps the native 28x28x1."""
    folder, files = fashion_mnist_files(folder, storage_options)
    raw = {split: idx_pair(*files[split], storage_options, what="fashion-mnist")
           for split in ("train", "test")}
    for split, (x, y) in raw.items():
        if y.max() >= len(FASHION_MNIST_CLASSES):
            raise ConvertError(f"fashion-mnist: {files[split][1]} holds label {int(y.max())}; "
                               f"Fashion-MNIST has labels 0..{len(FASHION_MNIST_CLASSES) - 1}")
    if raw["train"][0].shape[1:] != raw["test"][0].shape[1:]:
        raise ConvertError(f"fashion-mnist: {files['train'][0]} holds "
                           f"{'x'.join(map(str, raw['train'][0].shape[1:3]))} images, "
                           f"{files['test'][0]} {'x'.join(map(str, raw['test'][0].shape[1:3]))}")
    splits = {s: (_image_format(x, image_size, channels), y) for s, (x, y) in raw.items()}
    return splits, folder, files


def convert_fashion_mnist(out: str, folder: str | None = None, image_size: int | None = 32,
                          channels: int = 3, train_images: int | None = None, seed: int = 0,
                          **kw: Any) -> dict:
    """``OUT/train`` (60,000) and ``OUT/test`` (10,000), keys ``fashion-mnist-train-000000`` ...
    in file order; the class names go into the result and both manifests (``classes``).
    ``train_images``: only a seeded (``seed``), class-balanced subset of the training set
    (``balanced_subset``; keys keep the images' positions), the test set whole."""
    splits, folder, files = fashion_mnist_arrays(folder, image_size, channels,
                                                 kw.get("storage_options"))
    storage.refuse_inside(out, folder)
    extra: dict[str, Any] = {"classes": FASHION_MNIST_CLASSES}
    if train_images:
        extra["train_subset"] = {"images": int(train_images), "seed": int(seed),
                                 "of": int(len(splits["train"][1]))}
    splits, keys = _train_subset(splits, None, "fashion-mnist", train_images, seed,
                                 f"fashion-mnist: --train-images ({files['train'][0]})")
    result = write_splits(out, splits, "fashion-mnist", num_classes=len(FASHION_MNIST_CLASSES),
                          keys=keys, extra=extra, **kw)
    result["inputs"] = {split: list(pair) for split, pair in files.items()}
    return result


def idx_arrays(paths: list[str] | tuple[str, ...], test_fraction: float = 0.2, seed: int = 0,
               image_size: int | None = 32, channels: int = 3,
               storage_options: Mapping[str, Any] | None = None
               ) -> tuple[Splits, dict[str, list[str]] | None]:
    """Any MNIST-format data: ``[IMAGES, LABELS]`` (split into train/test like ``numpy``: seeded,
    stratified where every class has two samples) or ``[IMAGES, LABELS, TEST_IMAGES,
    TEST_LABELS]`` (the given split). Returns ``(splits, keys)``; with one pair the keys name
    each sample's position in the file (``idx-000123``), with two pairs keys are the default
    ``idx-train-000000`` ... (``None``)."""
    if len(paths) not in (2, 4):
        raise ConvertError(f"idx: expects IMAGES LABELS [TEST_IMAGES TEST_LABELS], got "
                           f"{len(paths)} input(s)")
    pairs = [idx_pair(paths[i], paths[i + 1], storage_options) for i in range(0, len(paths), 2)]
    if len(pairs) == 2:
        (x, y), (xt, yt) = pairs
        if x.shape[1:] != xt.shape[1:]:
            raise ConvertError(f"idx: {paths[0]} holds {x.shape[1]}x{x.shape[2]} images, "
                               f"{paths[2]} {xt.shape[1]}x{xt.shape[2]}")
        return {"train": (_image_format(x, image_size, channels), y),
                "test": (_image_format(xt, image_size, channels), yt)}, None
    x, y = pairs[0]
    if len(y) < 2:
        raise ConvertError(f"idx: {paths[0]} holds {len(y)} image; at least 2 are needed to "
                           "split train/test (or pass TEST_IMAGES TEST_LABELS)")
    from sklearn.model_selection import train_test_split
    index = np.arange(len(y))
    strat = y if np.unique(y, return_counts=True)[1].min() >= 2 else None
    try:
        tr, te = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=strat)
    except ValueError:  # fewer test samples than classes: no stratified split exists
        tr, te = train_test_split(index, test_size=test_fraction, random_state=seed)
    x = _image_format(x, image_size, channels)
    return ({"train": (x[tr], y[tr]), "test": (x[te], y[te])},
            {"train": [f"idx-{i:06d}" for i in tr], "test": [f"idx-{i:06d}" for i in te]})


def convert_idx(paths: list[str] | tuple[str, ...], out: str, image_size: int | None = 32,
                channels: int = 3, seed: int = 0, train_images: int | None = None,
                **kw: Any) -> dict:
    for path in paths:
        storage.refuse_inside(out, path)
    splits, keys = idx_arrays(paths, seed=seed, image_size=image_size, channels=channels,
                              storage_options=kw.get("storage_options"))
    splits, keys = _train_subset(splits, keys, "idx", train_images, seed,
                                 f"idx: --train-images ({paths[0]})")
    result = write_splits(out, splits, "idx", keys=keys, **kw)
    result["inputs"] = list(paths)
    return result


CONVERTERS: dict[str, Callable[..., dict]] = {
    "digits": convert_digits, "synthetic": convert_synthetic, "cifar10": convert_cifar,
    "cifar100": convert_cifar, "imagefolder": convert_imagefolder, "numpy": convert_numpy,
    "fashion-mnist": convert_fashion_mnist, "idx": convert_idx,
}
