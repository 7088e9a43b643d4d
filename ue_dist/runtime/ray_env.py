"""Starting or joining Ray, and handing our one storage configuration to Ray Train/Tune/Data."""
from __future__ import annotations

import os
from typing import Any, Mapping

import ray

from ue_dist.data import storage


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` or start a local one (laptop mode)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def pyarrow_filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(pyarrow filesystem, path)`` for Ray Train/Tune ``storage_path``.

    Wraps the fsspec filesystem (pyarrow's own S3 filesystem ignores ``AWS_ENDPOINT_URL``), so an
    S3-compatible endpoint configured once works for checkpoints too. Local paths stay plain.
    """
    if storage.protocol_of(url) == "file":
        return None, os.path.abspath(url.replace("file://", "", 1))
    import pyarrow.fs as pafs

    fs, path = storage.get_fs(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def default_storage() -> str:
    return os.environ.get("UE_DIST_STORAGE", os.path.abspath("runs"))
