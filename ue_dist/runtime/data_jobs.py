"""Dataset conversion as a runtime step (CLI and job specs call this)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ue_dist.data import converters, storage
from ue_dist.data.converters import ConvertError
from ue_dist.options import CONVERT, check_value, default, option

EXPECTED_PATHS = {"digits": 1, "synthetic": 1, "cifar10": 2, "cifar100": 2, "imagefolder": 2,
                  "numpy": 3, "fashion-mnist": (1, 2), "idx": (3, 5)}
USAGE = {"digits": "OUT", "synthetic": "OUT", "cifar10": "PATH OUT", "cifar100": "PATH OUT",
         "imagefolder": "PATH OUT", "numpy": "X.npy Y.npy OUT", "fashion-mnist": "[DIR] OUT",
         "idx": "IMAGES LABELS [TEST_IMAGES TEST_LABELS] OUT"}
#: Sources with grayscale originals: 32x32x3 by default (CIFAR-shaped, so every victim and
#: method applies), ``--native`` keeps the original size, ``--channels`` picks 1 or 3.
GRAYSCALE_SOURCES = ("digits", "fashion-mnist", "idx")


def _check_options(source: str, image_size: int | None, shard_size: int, seed: int,
                   native: bool = False, channels: int | None = None) -> None:
    """Options are checked before any input is read; each message names its option (``--n`` is
    checked by the synthetic converter: at least two samples per class)."""
    if int(shard_size) < 1:
        raise ConvertError(f"convert {source}: --shard-size must be >= 1 (samples per shard), "
                           f"got {shard_size}")
    if image_size is not None and int(image_size) < 1:
        raise ConvertError(f"convert {source}: --image-size must be >= 1 (pixels), got {image_size}")
    if int(seed) < 0:
        raise ConvertError(f"convert {source}: --seed must be >= 0, got {seed}")
    if channels is not None:
        if source not in GRAYSCALE_SOURCES:
            raise ConvertError(f"convert {source}: --channels applies to "
                               f"{', '.join(GRAYSCALE_SOURCES)} only (grayscale sources)")
        if int(channels) not in (1, 3):
            raise ConvertError(f"convert {source}: --channels must be 1 or 3, got {channels}")
    if native and image_size is not None and source in GRAYSCALE_SOURCES:
        raise ConvertError(f"convert {source}: --native keeps the original size; it excludes "
                           f"--image-size {image_size}")


def _check_photo_options(source: str, labels: str, test_fraction: float,
                         resize_mode: str | None) -> None:
    """imagefolder's own options: refused for other sources rather than silently ignored."""
    given = [flag for flag, value, unset in (
        ("--labels", labels, default(CONVERT, "labels")),
        ("--test-fraction", test_fraction, default(CONVERT, "test_fraction")),
        ("--resize-mode", resize_mode, default(CONVERT, "resize_mode"))) if value != unset]
    if given and source != "imagefolder":
        raise ConvertError(f"convert {source}: {', '.join(given)} appl"
                           f"{'ies' if len(given) == 1 else 'y'} to imagefolder only")
    check_value(labels, option(CONVERT.options, "labels"), "--labels", ConvertError)
    check_value(resize_mode, option(CONVERT.options, "resize_mode"), "--resize-mode", ConvertError)
    if not 0 <= float(test_fraction) < 1:
        raise ConvertError(f"convert {source}: --test-fraction must lie in [0, 1), got "
                           f"{test_fraction}")


def _check_inputs(source: str, inputs: Sequence[str]) -> None:
    """Local input paths: present, and a folder or a file as the converter expects."""
    for path in inputs:
        if "://" in path:
            continue
        if not os.path.exists(path):
            raise ConvertError(f"convert {source}: input {path!r} does not exist")
        if source == "imagefolder" and not os.path.isdir(path):
            raise ConvertError(f"convert imagefolder: input {path!r} is a file, not a folder "
                               "(expected PATH/<class>/<image> or PATH/train|test/<class>/<image>)")
        if source == "numpy" and os.path.isdir(path):
            raise ConvertError(f"convert numpy: input {path!r} is a folder, not a .npy file")
        if source == "idx" and os.path.isdir(path):
            raise ConvertError(f"convert idx: input {path!r} is a folder, not an IDX file "
                               "(e.g. train-images-idx3-ubyte.gz)")


def _check_output(source: str, out: str, storage_options: Mapping[str, Any] | None) -> None:
    """OUT gets OUT/train and OUT/test: it may not be an existing file, nor lie under one."""
    fs, path = storage.get_fs(out, storage_options)
    if fs.isfile(path):
        raise ConvertError(f"convert {source}: output {out!r} is an existing file; OUT must be a "
                           "folder or prefix (it receives OUT/train and OUT/test)")
    if storage.protocol_of(out) == "file":
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConvertError(f"convert {source}: output {out!r} lies under {parent!r}, which is "
                               "a file, not a folder")


def convert(source: str, paths: Sequence[str], *, n: int = 5000, image_size: int | None = None,
            native: bool = False, channels: int | None = None, shard_size: int = 1000,
            seed: int = 0, overwrite: bool = False,
            labels: str = default(CONVERT, "labels"),
            test_fraction: float = default(CONVERT, "test_fraction"),
            resize_mode: str | None = default(CONVERT, "resize_mode"),
            train_images: int | None = None,
            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert ``source`` (inputs ``paths[:-1]``) into ``OUT/train`` and ``OUT/test``, ``OUT =
    paths[-1]``. Grayscale sources (digits, fashion-mnist, idx) become 32x32x3 by default, the
    shape of the CIFAR victims and methods; ``native`` keeps the original size (digits 8x8 with
    3 channels as before; fashion-mnist and idx 28x28 with 1 channel, their stored format) and
    ``channels`` (1 or 3) overrides the channel count. ``labels``, ``test_fraction`` and
    ``resize_mode`` are imagefolder's (``converters.convert_imagefolder``: streaming, keys from
    the relative paths, native sizes unless resized, no OUT/test unless asked for)."""
    if source not in converters.CONVERTERS:
        raise ConvertError(f"unknown converter {source!r}; valid: "
                           f"{', '.join(sorted(converters.CONVERTERS))}")
    counts = EXPECTED_PATHS[source]
    counts = counts if isinstance(counts, tuple) else (counts,)
    if len(paths) not in counts:
        raise ConvertError(f"convert {source} expects {USAGE[source]}, got {len(paths)} path(s)")
    _check_options(source, image_size, shard_size, seed, native, channels)
    _check_photo_options(source, labels, test_fraction, resize_mode)
    if train_images is not None:
        if source not in ("fashion-mnist", "idx"):
            raise ConvertError(f"convert {source}: --train-images applies to fashion-mnist and "
                               "idx only")
        if int(train_images) < 1:
            raise ConvertError(f"convert {source}: --train-images must be >= 1, got {train_images}")
    if source == "fashion-mnist" and len(paths) == 2 and "://" not in paths[0] \
            and os.path.isfile(paths[0]):
        raise ConvertError(f"convert fashion-mnist: input {paths[0]!r} is a file, not the folder "
                           "holding the four IDX files")
    _check_inputs(source, paths[:-1] if source != "fashion-mnist" else ())
    _check_output(source, paths[-1], storage_options)
    kw: dict[str, Any] = dict(shard_size=shard_size, storage_options=storage_options,
                              overwrite=overwrite)
    if source == "digits":
        return converters.convert_digits(paths[0], image_size=None if native else (image_size or 32),
                                         channels=3 if channels is None else int(channels),
                                         seed=seed, **kw)
    if source in ("fashion-mnist", "idx"):
        size = None if native else (image_size or 32)
        chans = int(channels) if channels is not None else 1 if native else 3
        if source == "idx":
            return converters.convert_idx(list(paths[:-1]), paths[-1], image_size=size,
                                          channels=chans, seed=seed, train_images=train_images,
                                          **kw)
        return converters.convert_fashion_mnist(paths[-1], paths[0] if len(paths) == 2 else None,
                                                image_size=size, channels=chans, seed=seed,
                                                train_images=train_images, **kw)
    if source == "synthetic":
        return converters.convert_synthetic(paths[0], n=n, image_size=image_size or 32, seed=seed, **kw)
    if source in ("cifar10", "cifar100"):
        return converters.convert_cifar(paths[0], paths[1], variant=source, image_size=image_size, **kw)
    if source == "imagefolder":
        return converters.convert_imagefolder(paths[0], paths[1], image_size=image_size, seed=seed,
                                              labels=labels, test_fraction=test_fraction,
                                              resize_mode=resize_mode, **kw)
    return converters.convert_numpy(paths[0], paths[1], paths[2], seed=seed, image_size=image_size, **kw)
