"""WebDataset tar shards, read and written through fsspec.

A sample is ``KEY.png`` (uint8 image, lossless), ``KEY.cls`` (decimal label) and ``KEY.json``
(metadata: protected or not, by which method and eps, source shard). Members of one sample are
consecutive, as WebDataset expects; keys contain no dots (WebDataset splits the extension at the
first dot). We own the tar I/O (rather than Ray's row-level webdataset reader/writer) so that a
shard is read and committed whole, output shards keep their input's name, and the bytes written
are a deterministic function of the samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from ue_dist.data import storage
from ue_dist.errors import UserError

SHARD_SUFFIX = ".tar"
IMAGE_EXTS = ("png",)
READ_ONLY_EXTS = ("jpg", "jpeg")  # accepted on input (e.g. third-party shards), never written


class ShardError(UserError, ValueError):
    """A shard or sample that cannot be used; the message names the shard and the sample."""


@dataclass
class Sample:
    key: str
    image: np.ndarray  # H x W x C uint8
    label: int
    meta: dict[str, Any] = field(default_factory=dict)


def validate_key(key: str) -> str:
    if not key or "." in posixpath.basename(key) or key.startswith("/") or ".." in key.split("/"):
        raise ShardError(f"sample key {key!r} is not usable in a WebDataset shard "
                         "(no dots, not empty, relative)")
    return key


def encode_png(image: np.ndarray) -> bytes:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ShardError(f"image must be uint8 HxWxC with C in 1/3/4, got {img.dtype} {img.shape}")
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)  # fixed level: identical bytes for identical pixels
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        if pil.mode not in ("L", "RGB", "RGBA"):
            pil = pil.convert("RGB")
        arr = np.asarray(pil, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "ue_dist"
    return info


def shard_bytes(samples: Iterable[Sample]) -> bytes:
    """Deterministic tar bytes for ``samples`` (fixed mtime/owner, members in sample order)."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            validate_key(s.key)
            if s.key in seen:
                raise ShardError(f"duplicate sample key {s.key!r} in one shard")
            seen.add(s.key)
            members = {"png": encode_png(s.image), "cls": str(int(s.label)).encode(),
                       "json": json.dumps(s.meta, sort_keys=True).encode()}
            for ext, payload in members.items():
                tar.addfile(_tarinfo(f"{s.key}.{ext}", len(payload)), io.BytesIO(payload))
    return buf.getvalue()


def _split_member(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def parse_shard(data: bytes, name: str) -> list[Sample]:
    """Decode and validate every sample of one shard; ``name`` appears in every error."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key.startswith("_") or posixpath.basename(key).startswith("."):
                    continue  # hidden / metadata members
                f = tar.extractfile(member)
                payload = f.read() if f is not None else b""
                if len(payload) != member.size:
                    raise ShardError(f"shard {name}: member {member.name!r} is truncated")
                groups.setdefault(key, {})[ext] = payload
            end = tar.offset
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"shard {name}: truncated or not a tar archive ({exc})") from None
    # A well-formed tar ends with two zero blocks; tarfile stops quietly at a cut-off header, so a
    # shard truncated between members would otherwise lose its tail without a word.
    if data[end:end + 1024] != bytes(1024):
        raise ShardError(f"shard {name}: truncated (no end-of-archive marker after byte {end})")
    if not groups and data:
        raise ShardError(f"shard {name}: no samples found (not a WebDataset tar?)")
    samples: list[Sample] = []
    shape = None
    for key, members in groups.items():
        image_ext = next((e for e in IMAGE_EXTS + READ_ONLY_EXTS if e in members), None)
        if image_ext is None:
            raise ShardError(f"shard {name}, sample {key!r}: no image member "
                             f"(expected {key}.png); has {sorted(members)}")
        try:
            image = decode_image(members[image_ext])
        except Exception as exc:
            raise ShardError(f"shard {name}, sample {key!r}: {key}.{image_ext} is not a decodable "
                             f"image ({type(exc).__name__})") from None
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise ShardError(f"shard {name}, sample {key!r}: image shape {image.shape} differs "
                             f"from {shape} of earlier samples (mixed image shapes)")
        label_raw = members.get("cls")
        if label_raw is None:
            raise ShardError(f"shard {name}, sample {key!r}: missing label ({key}.cls)")
        try:
            label = int(label_raw.decode().strip())
        except ValueError:
            raise ShardError(f"shard {name}, sample {key!r}: label {label_raw[:20]!r} is not an "
                             "integer") from None
        if label < 0:
            raise ShardError(f"shard {name}, sample {key!r}: label {label} is negative")
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode())
            except (ValueError, UnicodeDecodeError):
                raise ShardError(f"shard {name}, sample {key!r}: {key}.json is not valid JSON") from None
        samples.append(Sample(key, image, label, meta))
    return samples


def list_shards(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted URLs of the ``*.tar`` shards directly under ``url`` (temp/hidden files excluded)."""
    fs, path = storage.get_fs(url, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        raise storage.StorageError(f"{url!r} does not exist") from None
    except Exception as exc:  # e.g. NoSuchBucket surfaces here
        raise storage.StorageError(f"cannot list {url!r}: {exc}") from exc
    names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
    return [storage.join(url, n) for n in names
            if n.endswith(SHARD_SUFFIX) and not n.startswith((".", "_"))]


def read_shard(url: str, storage_options: Mapping[str, Any] | None = None) -> list[Sample]:
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ShardError(f"shard {url} does not exist") from None
    return parse_shard(data, url)


def write_shard(url: str, samples: list[Sample],
                storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard atomically; returns ``{"count", "sha256", "bytes"}``."""
    data = shard_bytes(samples)
    storage.write_bytes(url, data, storage_options)
    return {"count": len(samples), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"
