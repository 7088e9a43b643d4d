"""Photo folders in and out: reversible sample keys, img2dataset's resize modes, export of a
protected set back to image files, and a preview grid with the perturbation's figures.

Keys: a WebDataset key may hold no dot (the first dot starts the extension) and should hold no
'/', so ``path_key`` percent-encodes the relative path without its extension (every byte of its
UTF-8 form outside ``[A-Za-z0-9_-]``, and a leading '_', which readers take for a hidden
member); ``key_path`` decodes it. A path whose key would be longer than ``MAX_KEY`` gets a hashed
key instead: the tar members are USTAR, whose names hold at most 100 bytes without a '/'. Every
converted sample also keeps its relative path in its json as ``source_path``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import uuid
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw

from ue_dist.data import storage
from ue_dist.data.shards import ShardError, encode_png, list_shards, read_shard
from ue_dist.errors import UserError

#: Longest key kept readable: member names (``KEY.json``) must fit USTAR's 100-byte name field.
MAX_KEY = 90
_HASHED = "%%"  # never produced by percent-encoding (a '%' is always followed by two hex digits)
_PLAIN = re.compile(rb"[A-Za-z0-9_-]")
#: img2dataset's resize modes (its Resizer): no, keep_ratio, center_crop, border
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
EXPORT_MANIFEST = "ue-dist-export.json"


class ExportError(UserError, ValueError):
    """An export or preview that cannot be done; the message names the sample or the folder."""


# keys ------------------------------------------------------------------------------------------
def path_key(relpath: str) -> str:
    """The sample key of ``relpath`` (a '/'-separated path relative to the input folder, with
    its extension): ``a/b.c.jpg`` -> ``a%2Fb%2Ec``. ``key_path`` reverses it (not for a hashed
    key: ``source_path`` in the sample's json keeps the path then)."""
    stem = posixpath.splitext(relpath)[0]
    out = []
    for i, byte in enumerate(stem.encode("utf-8", "surrogateescape")):
        char = bytes([byte])
        out.append(char.decode() if _PLAIN.fullmatch(char) and not (i == 0 and char == b"_")
                   else f"%{byte:02X}")
    key = "".join(out)
    if len(key) > MAX_KEY:
        key = _HASHED + hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return key


def key_path(key: str) -> str | None:
    """The relative path (without extension) a key was made from; None for a hashed key."""
    if key.startswith(_HASHED):
        return None
    raw = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "%":
            raw.append(int(key[i + 1:i + 3], 16))
            i += 3
        else:
            raw += key[i].encode()
            i += 1
    return raw.decode("utf-8", "surrogateescape")


# resize ----------------------------------------------------------------------------------------
def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _array(pil: Image.Image) -> np.ndarray:
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _scaled(image: np.ndarray, height: int, width: int, downscale: bool) -> np.ndarray:
    # img2dataset: INTER_AREA to shrink, Lanczos to enlarge; Pillow's BOX is the area filter
    if (height, width) == image.shape[:2]:
        return image
    resample = Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS
    return _array(_pil(image).resize((width, height), resample))


def resize_image(image: np.ndarray, mode: str, size: int | None) -> np.ndarray:
    """img2dataset's resize modes on an H x W x C uint8 image (resize_only_if_bigger off):
    ``no``: as it is; ``keep_ratio``: the smaller side becomes ``size``, aspect kept;
    ``center_crop``: that, then the centre ``size`` x ``size``; ``border``: the longer side
    becomes ``size``, then black padding (zero in every channel) centres it in ``size`` x
    ``size``. (img2dataset pads with black up to 1.2; later releases pad with white.)"""
    if mode == "no" or size is None:
        return image
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    h, w = image.shape[:2]
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(h, w)
        out = _scaled(image, max(1, round(h * scale)), max(1, round(w * scale)), min(h, w) > size)
        if mode == "keep_ratio":
            return out
        top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
        return np.ascontiguousarray(out[top:top + size, left:left + size])
    scale = size / max(h, w)
    out = _scaled(image, max(1, round(h * scale)), max(1, round(w * scale)), max(h, w) > size)
    padded = np.zeros((size, size, image.shape[2]), np.uint8)
    top, left = (size - out.shape[0]) // 2, (size - out.shape[1]) // 2
    padded[top:top + out.shape[0], left:left + out.shape[1]] = out
    return padded


# staging: write into a hidden folder, move into place when all is well ------------------------
def staging_url(out: str, prefix: str) -> str:
    """``OUT/<prefix><random>``: hidden from ``list_shards`` (leading '_' or '.')."""
    return storage.join(out, f"{prefix}{uuid.uuid4().hex[:12]}")


def move(src_url: str, dst_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Move one file into place: ``os.replace`` locally (a link planted at the target is
    replaced, never followed), ``fs.mv`` elsewhere."""
    fs, src = storage.get_fs(src_url, storage_options)
    dst = storage.get_fs(dst_url, storage_options)[1]
    if storage.protocol_of(dst_url) not in storage.OBJECT_STORES:
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
    if storage.protocol_of(dst_url) == "file":
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def remove_tree(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = storage.get_fs(url, storage_options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - cleanup after a failure must not hide the failure
        pass


# export ----------------------------------------------------------------------------------------
def _export_path(sample_key: str, meta: Mapping[str, Any], shard: str) -> str:
    """The relative output path of a sample's PNG; refuses one escaping the output folder."""
    source = meta.get("source_path")
    if source is None:
        rel = sample_key + ".png"
    else:
        if not isinstance(source, str) or not source:
            raise ExportError(f"shard {shard}, sample {sample_key!r}: source_path {source!r} is "
                              "not a relative path")
        rel = posixpath.splitext(source)[0] + ".png"
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or ".." in parts \
            or any(p in ("", ".") for p in parts) or any(ord(c) < 32 for c in rel):
        raise ExportError(f"shard {shard}, sample {sample_key!r}: path {rel!r} would escape the "
                          "output folder (absolute, '..', empty parts or control characters); "
                          "refusing to export it")
    return "/".join(parts)


def _no_links_below(root: str, rel: str) -> None:
    """Local output: no folder between ``root`` and the file may be a symbolic link (makedirs
    and open would follow it out of the output folder)."""
    here = root
    for part in rel.split("/")[:-1]:
        here = os.path.join(here, part)
        if os.path.islink(here):
            raise ExportError(f"{here} is a symbolic link; refusing to write through it")


def export(dst: str, out_dir: str, *, overwrite: bool = False, extras: bool = False,
           storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every image of the shards of ``dst`` as a PNG file under ``out_dir`` at its original
    relative path (``source_path`` with the extension replaced by ``.png``; ``KEY.png`` without
    one), with ``extras`` the sample's other members beside it (``photo.txt``), and a manifest
    ``ue-dist-export.json`` (per file: path, key, shard, protected, method, eps, sha256).

    Everything is written into a hidden staging folder first and moved into place only when
    every sample exported, so a refused sample leaves ``out_dir`` as it was."""
    storage.refuse_inside(out_dir, dst, refuse_containing=True)
    storage.check_writable_root(out_dir, storage_options)
    fs, root = storage.get_fs(out_dir, storage_options)
    local = storage.protocol_of(out_dir) == "file"
    if local and os.path.islink(root):
        raise ExportError(f"output {out_dir!r} is a symbolic link; pass the real folder")
    if fs.isfile(root):
        raise ExportError(f"output {out_dir!r} is an existing file, not a folder")
    if fs.exists(root) and fs.ls(root, detail=False) and not overwrite:
        raise ExportError(f"output {out_dir!r} exists and is not empty; choose an empty folder "
                          "or pass --overwrite")
    shards = list_shards(dst, storage_options)
    if not shards:
        raise ExportError(f"no shards (*.tar) found under {dst!r}")
    created = not fs.exists(root)
    stage = staging_url(out_dir, ".ue-export-tmp-")
    files: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    try:
        for shard in shards:
            name = posixpath.basename(shard)
            for s in read_shard(shard, storage_options):
                rel = _export_path(s.key, s.meta, name)
                written = [(rel, encode_png(s.image))]
                if extras:
                    written += [(posixpath.splitext(rel)[0] + "." + ext, bytes(v))
                                for ext, v in sorted(s.extra.items())]
                for path, data in written:
                    if path in seen or path == EXPORT_MANIFEST:
                        other = seen.get(path, "the export manifest")
                        raise ExportError(f"shard {name}, sample {s.key!r}: {path} is also "
                                          f"written by {other}")
                    seen[path] = f"sample {s.key!r} (shard {name})"
                    storage.write_bytes(storage.join(stage, *path.split("/")), data,
                                        storage_options)
                    files.append({"path": path, "key": s.key, "shard": name,
                                  "protected": bool(s.meta.get("protected")),
                                  "method": s.meta.get("method"), "eps": s.meta.get("eps"),
                                  "sha256": hashlib.sha256(data).hexdigest(),
                                  "member": "image" if path == rel else path.rsplit(".", 1)[1]})
        for f in files:
            if local:
                _no_links_below(root, f["path"])
            move(storage.join(stage, *f["path"].split("/")),
                 storage.join(out_dir, *f["path"].split("/")), storage_options)
    except BaseException:
        remove_tree(stage, storage_options)
        if created and local and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        raise
    remove_tree(stage, storage_options)
    manifest = {"source": dst, "files": files,
                "images": sum(f["member"] == "image" for f in files),
                "protected": sum(f["protected"] for f in files if f["member"] == "image")}
    storage.write_bytes(storage.join(out_dir, EXPORT_MANIFEST),
                        json.dumps(manifest, indent=1, sort_keys=True).encode(), storage_options)
    return {"out": out_dir, "source": dst, "images": manifest["images"],
            "files": len(files), "protected": manifest["protected"],
            "manifest": storage.join(out_dir, EXPORT_MANIFEST)}


# preview ---------------------------------------------------------------------------------------
def _luminance(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float64)
    if x.shape[2] == 1:
        return x[..., 0]
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]  # ITU-R BT.601


def _gaussian_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering with a 1-D window (no padding: borders are not invented)."""
    k = len(window)
    rows = sum(window[i] * x[i:x.shape[0] - k + 1 + i] for i in range(k))
    return sum(window[i] * rows[:, i:rows.shape[1] - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) of two H x W x C uint8 images on their luminance: Gaussian
    window 11, sigma 1.5, K1 0.01, K2 0.03 (a smaller window, still odd, for images under 11
    pixels a side)."""
    x, y = _luminance(a), _luminance(b)
    size = min(11, x.shape[0], x.shape[1])
    size -= 1 - size % 2
    r = np.arange(size) - size // 2
    window = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    window /= window.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _gaussian_valid(x, window), _gaussian_valid(y, window)
    sxx = _gaussian_valid(x * x, window) - mx * mx
    syy = _gaussian_valid(y * y, window) - my * my
    sxy = _gaussian_valid(x * y, window) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def image_metrics(original: np.ndarray, protected: np.ndarray) -> dict[str, float]:
    """``max_delta`` (largest |protected - original| in 8-bit levels, any channel), ``psnr``
    (dB, inf when identical) and ``ssim`` (luminance)."""
    delta = protected.astype(np.int16) - original.astype(np.int16)
    return {"max_delta": int(np.abs(delta).max()) if delta.size else 0,
            "psnr": psnr(original, protected), "ssim": ssim(original, protected)}


def amplified(original: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """The perturbation made visible: 128 + delta scaled so that the largest |delta| reaches
    the full range (grey 128 = unchanged)."""
    delta = protected.astype(np.float64) - original.astype(np.float64)
    peak = np.abs(delta).max()
    if peak == 0:
        return np.full(original.shape, 128, np.uint8)
    return np.clip(np.rint(128 + delta * (127.0 / peak)), 0, 255).astype(np.uint8)


def _pairs(src: str, dst: str, n: int, storage_options: Mapping[str, Any] | None
           ) -> Iterator[tuple[str, str | None, np.ndarray, np.ndarray]]:
    """The first ``n`` keys of ``dst`` (shard order) that ``src`` also holds, with the
    sample's ``source_path``. Protect keeps the input shard's name, so the source shard of the
    same name is looked in first; only a key not there makes one pass over all of ``src`` to
    index its keys (one source shard in memory at a time)."""
    src_shards = list_shards(src, storage_options)
    by_name = {posixpath.basename(u): u for u in src_shards}
    index: dict[str, str] | None = None
    cache: dict[str, dict[str, np.ndarray]] = {}

    def images(url: str) -> dict[str, np.ndarray]:
        if url not in cache:
            cache.clear()
            cache[url] = {t.key: t.image for t in read_shard(url, storage_options)}
        return cache[url]

    found = 0
    for shard in list_shards(dst, storage_options):
        same = by_name.get(posixpath.basename(shard))
        for s in read_shard(shard, storage_options):
            url = same if same is not None and s.key in images(same) else None
            if url is None:
                if index is None:
                    index = {k: u for u in src_shards for k in images(u)}
                url = index.get(s.key)
            if url is None:
                continue
            yield s.key, s.meta.get("source_path"), images(url)[s.key], s.image
            found += 1
            if found >= n:
                return


def _thumb(image: np.ndarray, cell: int) -> Image.Image:
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    pil = Image.fromarray(np.ascontiguousarray(rgb))
    scale = min(cell / pil.width, cell / pil.height)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    # nearest neighbour: small images stay sharp and a perturbation's pixels stay visible
    return pil.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


def preview(src: str, dst: str, out: str | None = None, *, n: int = 16, cell: int = 160,
            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A grid (one row per image: original, protected, amplified perturbation, with a caption)
    of the first ``n`` keys present in both ``src`` and ``dst``; the figures per image."""
    if int(n) < 1:
        raise ExportError(f"--n must be >= 1, got {n}")
    rows, table = [], []
    for key, source, original, protected in _pairs(src, dst, int(n), storage_options):
        if original.shape != protected.shape:
            raise ExportError(f"sample {key!r}: the original is {original.shape} and the "
                              f"protected image {protected.shape}; they cannot be compared")
        figures = image_metrics(original, protected)
        table.append({"key": key, "source_path": source, "shape": list(original.shape),
                      **figures})
        rows.append((original, protected, amplified(original, protected)))
    if not rows:
        raise ExportError(f"no key of {dst!r} is also in {src!r}; pass the protected output "
                          "and the shards it was protected from")
    result: dict[str, Any] = {"src": src, "dst": dst, "images": table}
    if out:
        caption, pad = 14, 4
        width, height = 3 * cell + 4 * pad, len(rows) * (cell + caption + pad) + pad
        grid = Image.new("RGB", (width, height), (32, 32, 32))
        draw = ImageDraw.Draw(grid)
        for i, (row, figures) in enumerate(zip(rows, table)):
            top = pad + i * (cell + caption + pad)
            for j, image in enumerate(row):
                thumb = _thumb(image, cell)
                left = pad + j * (cell + pad)
                grid.paste(thumb, (left + (cell - thumb.width) // 2,
                                   top + (cell - thumb.height) // 2))
            draw.text((pad, top + cell + 1), _caption(figures), fill=(230, 230, 230))
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        storage.write_bytes(out, buf.getvalue(), storage_options)
        result["grid"] = out
    return result


def _caption(f: Mapping[str, Any]) -> str:
    name = f.get("source_path") or f["key"]
    return (f"{name[-40:]}  max|d| {f['max_delta']}  PSNR {f['psnr']:.2f} dB  "
            f"SSIM {f['ssim']:.4f}")


def preview_text(result: Mapping[str, Any]) -> str:
    rows = [("key", "H x W x C", "max |delta|", "PSNR (dB)", "SSIM")]
    rows += [(r["key"], "x".join(map(str, r["shape"])), str(r["max_delta"]),
              "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}")
             for r in result["images"]]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if result.get("grid"):
        lines.append(f"grid (original | protected | perturbation, grey = 0): {result['grid']}")
    return "\n".join(lines)


__all__ = ["path_key", "key_path", "resize_image", "export", "preview", "image_metrics", "ssim",
           "psnr", "amplified", "ExportError", "RESIZE_MODES", "MAX_KEY", "ShardError"]
