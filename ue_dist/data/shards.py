"""WebDataset tar shards, read and written through fsspec.

A sample is ``KEY.png`` (uint8 image, lossless), ``KEY.cls`` (decimal label, optional: photo
buckets and img2dataset shards have none) and ``KEY.json`` (metadata: protected or not, by which
method and eps, source shard, over the input's own fields), plus any other members of the input
sample (``KEY.txt`` captions, ...), passed through byte for byte. On input the image may be any
of ``READ_EXTS``; on output it is always PNG: a lossy re-encode (JPEG) would move pixels by more
than eps and undo the bound. Members of one sample are consecutive, as WebDataset expects; keys
contain no dots (WebDataset splits the extension at the first dot). We own the tar I/O (rather
than Ray's row-level webdataset reader/writer) so that a shard is read and committed whole, output shards keep their input's name, and the bytes written
are a deterministic function of the samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageOps

from ue_dist.data import storage
from ue_dist.errors import UserError

SHARD_SUFFIX = ".tar"
IMAGE_EXTS = ("png",)  # written
# accepted on input (third-party shards, img2dataset, photo buckets), never written: the output
# image member is PNG whatever the input's format
READ_ONLY_EXTS = ("jpg", "jpeg", "webp", "tif", "tiff", "bmp")
READ_EXTS = IMAGE_EXTS + READ_ONLY_EXTS
OWN_EXTS = READ_EXTS + ("cls", "json")  # every other member of a sample passes through


class ShardError(UserError, ValueError):
    """A shard or sample that cannot be used; the message names the shard and the sample.

    The message is always one line: line breaks (from a library's text) are folded into spaces.
    """

    def __init__(self, message: object = "", *args: object):
        super().__init__(" ".join(part.strip() for part in str(message).splitlines()), *args)


@dataclass
class Sample:
    key: str
    image: np.ndarray  # H x W x C uint8
    label: int | None  # None: the sample has no KEY.cls
    meta: dict[str, Any] = field(default_factory=dict)
    # the sample's other members (extension -> bytes: "txt" captions, ...), written back unchanged
    extra: dict[str, bytes] = field(default_factory=dict)


def validate_key(key: str) -> str:
    if (not key or "." in posixpath.basename(key) or key.startswith("/") or ".." in key.split("/")
            or any(ord(c) < 32 or ord(c) == 127 for c in key)):
        raise ShardError(f"sample key {key!r} is not usable in a WebDataset shard "
                         "(no dots, not empty, relative, no '..', no control characters)")
    return key


def encode_png(image: np.ndarray) -> bytes:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ShardError(f"image must be uint8 HxWxC with C in 1/3/4, got {img.dtype} {img.shape}")
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)  # fixed level: identical bytes for identical pixels
    return buf.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bits_per_channel(data: bytes, pil: Image.Image) -> int:
    """Bits per channel of an opened (not yet loaded) image: from PIL's mode, for PNG from the
    IHDR bit depth and for TIFF from BitsPerSample (Pillow opens a 48/64-bit RGB(A) PNG as plain
    "RGB"/"RGBA" and drops the low byte of every value on load)."""
    if pil.mode in ("I", "F") or pil.mode.startswith(("I;", "F;")):
        return 16 if "16" in pil.mode else 32
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24:
        return max(8, data[24])
    tags = getattr(pil, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # TIFF BitsPerSample
        bits = bits if isinstance(bits, (tuple, list)) else (bits,)
        return max([8] + [int(b) for b in bits if isinstance(b, int)])
    return 8


def _channels_mode(pil: Image.Image) -> str:
    """The mode an image is read in: grey stays grey (1 channel), colour becomes RGB, and an
    image with transparency RGBA (its alpha is kept, and never perturbed)."""
    if pil.mode in ("L", "RGB", "RGBA"):
        return pil.mode
    if pil.mode == "1":
        return "L"
    if pil.mode in ("LA", "La", "PA", "RGBa") or (pil.mode == "P" and "transparency" in pil.info):
        return "RGBA"
    return "RGB"  # P, CMYK, YCbCr, LAB, HSV, RGBX


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (any format Pillow reads: PNG, JPEG, WebP, TIFF, BMP, ...) to
    H x W x C uint8, by one rule: C = 1 for grey (and bilevel), 3 for colour (palette, CMYK,
    YCbCr converted to RGB), 4 for an image with transparency (RGBA, LA, a palette with a
    transparent colour). The EXIF orientation is applied (``ImageOps.exif_transpose``), once:
    the PNG written back carries no orientation tag, so a reader shows it the same way.

    Images with more than 8 bits per channel (16-bit PNGs, modes "I;16", "I;16B", "I", "F", ...)
    are refused, not converted: reading them as uint8 would clip or drop bits silently, and the
    perturbation bound eps is defined on 8-bit pixel values. Convert such images to 8-bit first.
    Raises ``ShardError`` without shard or sample names; ``parse_shard`` adds them.
    """
    with Image.open(io.BytesIO(data)) as pil:
        bits = bits_per_channel(data, pil)
        if bits > 8:
            raise ShardError(f"{bits}-bit image (mode {pil.mode}); the eps bound is defined on "
                             "8-bit pixels: convert it to 8-bit first")
        pil.load()
        upright = ImageOps.exif_transpose(pil)  # a copy where an orientation tag said so
        mode = _channels_mode(upright)
        arr = np.asarray(upright if upright.mode == mode else upright.convert(mode),
                         dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's RECORDSIZE: an archive is padded to a whole record
_OWNER = b"ue_dist".ljust(32, b"\0")
# the fixed fields of our members (tarfile's USTAR layout): mode 0444, uid/gid 0, mtime 0, a
# regular file (type "0", no link, device fields empty), the checksum field as spaces
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_AFTER_SIZE = b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" + _OWNER * 2


def _ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte header ``tarfile`` writes in USTAR format for one of our members (name of
    at most 100 bytes, mode 0444, owner ue_dist, mtime 0), built directly: ``tarfile``'s
    per-member ``TarInfo`` copying and field formatting cost more than the PNG encoding of a
    28x28 image. The checksum is the sum of the header's bytes with its own field as spaces."""
    head = (name.ljust(100, b"\0") + _MODE_IDS + b"%011o\0" % size + _AFTER_SIZE).ljust(
        _BLOCK, b"\0")
    return head[:148] + b"%06o\0" % sum(head) + head[155:]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "ue_dist"
    return info


def _members(samples: Iterable[Sample]) -> Iterable[tuple[str, bytes]]:
    seen: set[str] = set()
    for s in samples:
        validate_key(s.key)
        if s.key in seen:
            raise ShardError(f"duplicate sample key {s.key!r} in one shard")
        seen.add(s.key)
        yield f"{s.key}.png", encode_png(s.image)
        if s.label is not None:
            yield f"{s.key}.cls", str(int(s.label)).encode()
        yield f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode()
        for ext in sorted(s.extra):
            if ext.lower() in OWN_EXTS:
                raise ShardError(f"sample {s.key!r}: extra member {ext!r} would clash with the "
                                 "sample's own image, label or metadata member")
            yield f"{s.key}.{ext}", bytes(s.extra[ext])


def shard_bytes(samples: Iterable[Sample]) -> bytes:
    """Deterministic tar bytes for ``samples`` (fixed mtime/owner, members in sample order):
    the bytes ``tarfile`` writes in USTAR format, headers built by ``_ustar_header``; a member
    name over 100 bytes (which USTAR splits into prefix and name) goes through ``tarfile``."""
    members = list(_members(samples))
    encoded = [(name.encode("utf-8", "surrogateescape"), payload) for name, payload in members]
    if any(len(name) > 100 for name, _ in encoded):
        return _tarfile_bytes(members)
    parts: list[bytes] = []
    for name, payload in encoded:
        parts += (_ustar_header(name, len(payload)), payload,
                  b"\0" * (-len(payload) % _BLOCK))
    parts.append(b"\0" * (2 * _BLOCK))  # end-of-archive marker
    size = sum(map(len, parts))
    parts.append(b"\0" * (-size % _RECORD))
    return b"".join(parts)


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
    return buf.getvalue()


def _split_member(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    # our own members by their lower-case extension; any other member keeps its name as it is
    ext = ext.lower() if ext.lower() in OWN_EXTS else ext
    return (posixpath.join(directory, stem) if directory else stem), ext


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_shard(data: bytes, name: str) -> list[Sample]:
    """Decode and validate every sample of one shard; ``name`` appears in every error.

    Refused, each with a one-line ``ShardError``: bytes that are not a tar archive, a truncated
    archive, a member that appears twice (a later copy would silently replace the earlier), keys
    that ``validate_key`` refuses (``../x``, absolute, control characters), dotted keys (``a.b.png``
    is key ``a`` with extension ``b.png`` to WebDataset), a sample with two image members,
    undecodable or 16-bit images, and labels that are not non-negative integers. Hidden members
    (``.name``, ``_name``) are skipped. Images may differ in size; a sample without ``.cls`` has
    label None; members other than the image, ``.cls`` and ``.json`` are kept in ``extra``.
    """
    if not data:
        raise ShardError(f"shard {name}: not a tar archive (zero bytes)")
    groups: dict[str, dict[str, bytes]] = {}
    member_names: dict[str, dict[str, str]] = {}
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        raise ShardError(f"shard {name}: truncated or not a tar archive ({len(data)} bytes, no "
                         "valid tar header at the start)") from None
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key.startswith("_") or posixpath.basename(member.name).startswith("."):
                    continue  # hidden / metadata members
                try:
                    validate_key(key)
                except ShardError as exc:
                    raise ShardError(f"shard {name}, sample {key!r}: {exc} "
                                     f"(member {member.name!r})") from None
                exts = groups.setdefault(key, {})
                if ext in exts:
                    first = member_names[key][ext]
                    also = "" if first == member.name else f" (as {first!r} and {member.name!r})"
                    raise ShardError(f"shard {name}, sample {key!r}: duplicate member "
                                     f"{member.name!r}{also}: it appears twice in the shard, and "
                                     "the later copy would silently replace the earlier")
                f = tar.extractfile(member)
                payload = f.read() if f is not None else b""
                if len(payload) != member.size:
                    raise ShardError(f"shard {name}: member {member.name!r} is truncated")
                exts[ext] = payload
                member_names.setdefault(key, {})[ext] = member.name
            end = tar.offset
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ShardError(f"shard {name}: truncated or corrupt tar archive ({_one_line(exc)})") \
            from None
    # A well-formed tar ends with two zero blocks; tarfile stops quietly at a cut-off header, so a
    # shard truncated between members would otherwise lose its tail without a word.
    if data[end:end + 1024] != bytes(1024):
        raise ShardError(f"shard {name}: truncated (no end-of-archive marker after byte {end})")
    if not groups:
        raise ShardError(f"shard {name}: no samples found (not a WebDataset tar?)")
    return [_decode_sample(name, key, members, member_names[key])
            for key, members in groups.items()]


def _decode_sample(name: str, key: str, members: Mapping[str, bytes],
                   member_names: Mapping[str, str]) -> Sample:
    """One sample of shard ``name`` from its members (``{extension: bytes}``), validated."""
    image_exts = [e for e in READ_EXTS if e in members]
    if len(image_exts) > 1:
        raise ShardError(f"shard {name}, sample {key!r}: two image members "
                         f"({', '.join(member_names[e] for e in image_exts)}); which one to "
                         "protect is ambiguous")
    image_ext = image_exts[0] if image_exts else None
    if image_ext is None:
        dotted = [member_names[e] for e in sorted(members)
                  if "." in e and e.rsplit(".", 1)[1].lower() in READ_EXTS]
        if dotted:
            raise ShardError(f"shard {name}, sample {key!r}: sample keys may not contain dots "
                             f"(member {dotted[0]!r} reads as key {key!r} with extension "
                             f"{_split_member(dotted[0])[1]!r}: WebDataset splits at the "
                             "first dot)")
        raise ShardError(f"shard {name}, sample {key!r}: no image member "
                         f"(expected {key}.png); has {sorted(members)}")
    try:
        image = decode_image(members[image_ext])
    except ShardError as exc:
        raise ShardError(f"shard {name}, sample {key!r}: {key}.{image_ext} is a {exc}") \
            from None
    except Exception as exc:
        raise ShardError(f"shard {name}, sample {key!r}: {key}.{image_ext} is not a decodable "
                         f"image ({type(exc).__name__})") from None
    extra = {e: bytes(v) for e, v in members.items() if e not in OWN_EXTS}
    label_raw = members.get("cls")
    meta = _decode_meta(name, key, members.get("json"))
    if label_raw is None:
        return Sample(key, image, None, meta, extra)
    try:
        label = int(label_raw.decode().strip())
    except ValueError:
        raise ShardError(f"shard {name}, sample {key!r}: label {label_raw[:20]!r} is not an "
                         "integer") from None
    if label < 0:
        raise ShardError(f"shard {name}, sample {key!r}: label {label} is negative")
    if label >= 2 ** 63:
        raise ShardError(f"shard {name}, sample {key!r}: label {label_raw[:20]!r}... does not "
                         "fit in 64 bits")
    return Sample(key, image, label, meta, extra)


def _decode_meta(name: str, key: str, raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        raise ShardError(f"shard {name}, sample {key!r}: {key}.json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ShardError(f"shard {name}, sample {key!r}: {key}.json holds a "
                         f"{type(meta).__name__}, not a JSON object")
    return meta


def list_shards(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted URLs of the ``*.tar`` shards directly under ``url`` (temp/hidden files excluded)."""
    fs, path = storage.get_fs(url, storage_options)
    entries = storage.ls(url, storage_options)  # a missing bucket/prefix, dead endpoint: named
    if len(entries) == 1 and str(entries[0]).rstrip("/") == path.rstrip("/") and fs.isfile(path):
        raise storage.StorageError(f"{url!r} is a file, not a folder of shards; pass the folder "
                                   "that holds the shards (e.g. OUT/train)")
    names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
    return [storage.join(url, n) for n in names
            if n.endswith(SHARD_SUFFIX) and not n.startswith((".", "_"))]


def read_shard(url: str, storage_options: Mapping[str, Any] | None = None) -> list[Sample]:
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ShardError(f"shard {url} does not exist") from None
    return parse_shard(data, url)


def first_image_shape(url: str, storage_options: Mapping[str, Any] | None = None,
                      chunk: int = 1 << 16) -> tuple[int, ...] | None:
    """``(H, W, C)`` of the first image of shard ``url`` (None: the shard holds no image), read
    only as far as that image: a shape check before the shard is protected does not read it
    whole a second time. Raises ``ShardError`` when no image can be decoded from the archive."""
    size = int(chunk)
    while True:
        data = storage.read_prefix(url, size, storage_options)
        complete = len(data) < size
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
                for member in tar:
                    if member.isfile() and \
                            _split_member(member.name)[1] in READ_EXTS:
                        f = tar.extractfile(member)
                        return decode_image(f.read() if f is not None else b"").shape
        except ShardError as exc:
            raise ShardError(f"shard {url}: first image is a {exc}") from None
        except Exception as exc:  # a cut-off prefix, or a shard that is not an archive
            if complete:
                raise ShardError(f"shard {url}: no decodable first image ({_one_line(exc)})") \
                    from None
        else:
            if complete:
                return None
        size *= 4

def write_shard(url: str, samples: list[Sample],
                storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard atomically; returns ``{"count", "sha256", "bytes"}``."""
    data = shard_bytes(samples)
    storage.write_bytes(url, data, storage_options)
    return {"count": len(samples), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"
