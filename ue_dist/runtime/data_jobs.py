"""Dataset conversion as a runtime step (CLI and job specs call this)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ue_dist.data import converters, storage
from ue_dist.data.converters import ConvertError

EXPECTED_PATHS = {"digits": 1, "synthetic": 1, "cifar10": 2, "cifar100": 2, "imagefolder": 2,
                  "numpy": 3}


def _check_options(source: str, image_size: int | None, shard_size: int, seed: int) -> None:
    """Options are checked before any input is read; each message names its option (``--n`` is
    checked by the synthetic converter: at least two samples per class)."""
    if int(shard_size) < 1:
        raise ConvertError(f"convert {source}: --shard-size must be >= 1 (samples per shard), "
                           f"got {shard_size}")
    if image_size is not None and int(image_size) < 1:
        raise ConvertError(f"convert {source}: --image-size must be >= 1 (pixels), got {image_size}")
    if int(seed) < 0:
        raise ConvertError(f"convert {source}: --seed must be >= 0, got {seed}")


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
            native: bool = False, shard_size: int = 1000, seed: int = 0, overwrite: bool = False,
            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if source not in converters.CONVERTERS:
        raise ConvertError(f"unknown converter {source!r}; valid: "
                           f"{', '.join(sorted(converters.CONVERTERS))}")
    expected = EXPECTED_PATHS
    usage = {1: "OUT", 2: "PATH OUT", 3: "X.npy Y.npy OUT"}[expected[source]]
    if len(paths) != expected[source]:
        raise ConvertError(f"convert {source} expects {usage}, got {len(paths)} path(s)")
    _check_options(source, image_size, shard_size, seed)
    _check_inputs(source, paths[:-1])
    _check_output(source, paths[-1], storage_options)
    kw: dict[str, Any] = dict(shard_size=shard_size, storage_options=storage_options,
                              overwrite=overwrite)
    if source == "digits":
        return converters.convert_digits(paths[0], image_size=None if native else (image_size or 32),
                                         seed=seed, **kw)
    if source == "synthetic":
        return converters.convert_synthetic(paths[0], n=n, image_size=image_size or 32, seed=seed, **kw)
    if source in ("cifar10", "cifar100"):
        return converters.convert_cifar(paths[0], paths[1], variant=source, image_size=image_size, **kw)
    if source == "imagefolder":
        return converters.convert_imagefolder(paths[0], paths[1], image_size=image_size, seed=seed, **kw)
    return converters.convert_numpy(paths[0], paths[1], paths[2], seed=seed, image_size=image_size, **kw)
