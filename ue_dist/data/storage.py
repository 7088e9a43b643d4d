"""One place for storage settings: a URL plus fsspec ``storage_options`` give one filesystem.

Plain paths and ``file://`` are local; ``s3://`` goes through s3fs, which reads the standard AWS
variables (``AWS_ENDPOINT_URL``, keys, profiles, roles) or ``storage_options``
(``--storage-option key=value`` on the CLI). The same filesystem object is what Ray Data, Ray
Train and Tune receive, so an endpoint configured once works everywhere.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import fsspec
from fsspec.core import url_to_fs

from ue_dist.errors import UserError


class StorageError(UserError, RuntimeError):
    """A URL that cannot be used: missing bucket, unreachable endpoint, output inside input."""


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
        options["endpoint_url"] = endpoint
    return options


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` from the CLI into a dict; ``a.b=v`` nests (``client_kwargs.region_name``)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise StorageError(f"--storage-option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        typed: Any = value
        if value.lower() in ("true", "false"):
            typed = value.lower() == "true"
        target = out
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = typed
    return out


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """Return ``(filesystem, path)`` for a URL; plain paths are made absolute."""
    options = dict(storage_options or {})
    if url.startswith("s3://") or url.startswith("s3a://"):
        options = _s3_defaults(options)
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = url_to_fs(url, **options)
    return fs, path


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def to_url(fs, path: str) -> str:
    """Inverse of ``get_fs``: a URL with the filesystem's protocol."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}" if "://" not in path else path


def absolute(url: str) -> str:
    """Plain local paths made absolute: Ray workers do not share the driver's working directory."""
    return url if "://" in url else os.path.abspath(url)


def join(url: str, *parts: str) -> str:
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def normalise(url: str) -> str:
    """Comparable form of a URL: scheme + absolute path without trailing slash."""
    if "://" not in url:
        return "file://" + os.path.abspath(url).rstrip("/")
    proto, rest = url.split("://", 1)
    if proto == "file":
        return "file://" + os.path.abspath("/" + rest.lstrip("/")).rstrip("/")
    return f"{proto}://" + rest.strip("/")


def resolved(url: str) -> str:
    """``normalise(url)`` with local symbolic links resolved: where the bytes really live."""
    out = normalise(url)
    if out.startswith("file://"):
        return "file://" + os.path.realpath(out[len("file://"):]).rstrip("/")
    return out


def refuse_inside(output_url: str, input_url: str, what: str = "output",
                  refuse_containing: bool = False) -> None:
    """Source data are never modified: the output may not be the input or lie inside it.

    Local paths are compared as written and with symbolic links resolved, so a DST that is (or
    passes through) a link into SRC is refused too. With ``refuse_containing``, an output that
    contains the input is refused as well (a run that may delete outputs must never reach SRC).
    """
    for out, src in ((normalise(output_url), normalise(input_url)),
                     (resolved(output_url), resolved(input_url))):
        if out == src or out.startswith(src + "/"):
            raise StorageError(f"{what} {output_url!r} lies inside the input {input_url!r}"
                               f"{' (through a symbolic link)' if out != normalise(output_url) else ''}"
                               "; write to a different prefix (source data are never modified)")
        if refuse_containing and src.startswith(out + "/"):
            raise StorageError(f"{what} {output_url!r} contains the input {input_url!r}; "
                               "write to a prefix outside it (source data are never modified)")


def check_writable_root(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail early, with the bucket named, when an S3 bucket does not exist."""
    fs, path = get_fs(url, storage_options)
    if protocol_of(url) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        try:
            exists = fs.exists(bucket)
        except Exception as exc:  # endpoint down, credentials refused, ...
            raise StorageError(f"cannot reach bucket {bucket!r} for {url!r}: {exc}") from exc
        if not exists:
            raise StorageError(f"bucket {bucket!r} does not exist (from {url!r})")


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


@contextmanager
def atomic_write(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Open ``url`` for binary writing so that it appears whole or not at all.

    Local and other rename-capable filesystems: write ``.NAME.tmp-<uuid>`` then move it into place.
    Object stores (S3): the object becomes visible only when its upload completes, and an
    exception aborts the upload, so writing directly is already atomic.
    """
    fs, path = get_fs(url, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if protocol_of(url) in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        with fs.open(path, "wb") as f:
            yield f
        return
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        if protocol_of(url) == "file":
            # os.replace swaps the directory entry: a symbolic link planted at ``path`` is
            # replaced, never followed, so a link into the source cannot make us write there.
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            raise


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    with atomic_write(url, storage_options) as f:
        f.write(data)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


__all__ = ["StorageError", "get_fs", "join", "normalise", "resolved", "refuse_inside", "atomic_write",
           "read_bytes", "write_bytes", "exists", "parse_storage_options", "check_writable_root",
           "fsspec", "protocol_of", "to_url"]
