"""Dataset conversion as a runtime step (CLI and job specs call this)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ue_dist.data import converters
from ue_dist.data.converters import ConvertError


def convert(source: str, paths: Sequence[str], *, n: int = 5000, image_size: int | None = None,
            native: bool = False, shard_size: int = 1000, seed: int = 0, overwrite: bool = False,
            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if source not in converters.CONVERTERS:
        raise ConvertError(f"unknown converter {source!r}; valid: "
                           f"{', '.join(sorted(converters.CONVERTERS))}")
    expected = {"digits": 1, "synthetic": 1, "cifar10": 2, "cifar100": 2, "imagefolder": 2, "numpy": 3}
    usage = {1: "OUT", 2: "PATH OUT", 3: "X.npy Y.npy OUT"}[expected[source]]
    if len(paths) != expected[source]:
        raise ConvertError(f"convert {source} expects {usage}, got {len(paths)} path(s)")
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
