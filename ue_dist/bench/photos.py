"""Benchmark of protecting photos at native resolution: images/s, megapixels/s, peak memory.

A bucket of real photos of mixed sizes is made from the two JPEG photographs scikit-learn ships
(``china.jpg``, ``flower.jpg``, 427x640): each image a seeded crop of one of them (aspect 1:2 to
2:1) scaled so its longer side is log-uniform in [256, 2048] px, saved as JPEG (quality 90)
with a caption, in img2dataset's layout (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, no labels)
in shards of 50. Each method then protects every shard through ``pipeline.protect_shard`` (what
one Ray Data actor runs: read + decode, tiles of the fitted 32x32 size, ε contract, PNG encode,
tar write, ledger record) in a child process of its own, so that its peak resident memory
(``ru_maxrss``) is that method's alone.

Methods: GUE (``quick`` generator width, one forward pass per tile) and EM (``quick``: PGD 10
steps on a small CNN per tile; unlabelled photos labelled by its classifier, ``--labels
predict``), both fitted briefly on 32x32 digits (throughput does not depend on how well the
state is trained; the fit is not timed). ``python -m ue_dist.bench.photos [--images N]``;
``scale="cifar"`` is the same with the GPU when there is one.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np

METHODS = {
    "gue": ("quick", {"epochs": 1}),
    "em": ("quick", {"train_steps": 3, "log_every": 3, "checkpoint_every": 0, "stop_acc": 0.0}),
}
SHARD_SIZE, BATCH = 50, 256


def photo_bucket(folder: str, n: int = 200, low: int = 256, high: int = 2048,
                 seed: int = 0) -> dict[str, Any]:
    """Write ``n`` mixed-size JPEG photos as img2dataset-style shards under ``folder``; returns
    their count and megapixels."""
    from PIL import Image

    from ue_dist.data.sources import sample_photos

    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in sample_photos().values()]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    pixels, shards = 0, 0
    for i in range(n):
        src = photos[i % len(photos)]
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
        ch = int(min(src.height, src.width / aspect) * rng.uniform(0.5, 1.0))
        cw = max(8, int(ch * aspect))
        top, left = rng.integers(0, src.height - ch + 1), rng.integers(0, src.width - cw + 1)
        crop = src.crop((left, top, left + cw, top + ch))
        longer = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        scale = longer / max(cw, ch)
        img = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        pixels += img.width * img.height
        key = f"{i:09d}"
        members += [(f"{key}.jpg", buf.getvalue()),
                    (f"{key}.txt", f"photo {i}, {img.width}x{img.height}".encode()),
                    (f"{key}.json", json.dumps({"key": key, "width": img.width,
                                                "height": img.height}).encode())]
        if len(members) == 3 * SHARD_SIZE or i == n - 1:
            with tarfile.open(os.path.join(folder, f"{shards:05d}.tar"), "w") as tar:
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            members, shards = [], shards + 1
    return {"images": n, "megapixels": round(pixels / 1e6, 2), "shards": shards}


def _fit(method: str, state_url: str) -> None:
    import torch

    from ue_dist.core.context import LocalContext
    from ue_dist.data.imageset import ImageSet
    from ue_dist.data.sources import digits_arrays
    from ue_dist.methods.base import build_method, save_state

    preset, overrides = METHODS[method]
    images, labels = digits_arrays(32)["train"]
    train = ImageSet.from_numpy_hwc(images[:256], labels[:256], num_classes=10)
    torch.manual_seed(0)
    state = build_method(method, preset, overrides).fit(
        train, LocalContext(device="cpu", log=lambda m: None))
    save_state(state, state_url)


def _protect_all(method: str, src: str, dst: str, state_url: str, device: str) -> dict[str, Any]:
    """In this (child) process: every shard of ``src`` through ``protect_shard``."""
    from ue_dist.data.shards import list_shards
    from ue_dist.methods.base import get_method, load_state
    from ue_dist.pipeline import open_config, protect_shard

    state = load_state(state_url)
    m = get_method(method).for_state(state)
    labels = "predict" if m.needs_labels else "given"
    config = open_config(m, state_url, device=device, batch_size=BATCH, labels=labels)
    shards = list_shards(src)
    t0 = time.perf_counter()
    images = 0
    for url in shards:
        result = protect_shard(config, url, dst)
        if not result["ok"]:
            raise RuntimeError(result["reason"])
        images += result["count"]
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"images": images, "wall_s": round(wall, 1), "peak_rss_mib": round(peak)}


def run(scale: str = "cpu", n: int = 200) -> dict[str, Any]:
    import torch

    device = "cuda" if scale == "cifar" and torch.cuda.is_available() else "cpu"
    tmp = tempfile.mkdtemp(prefix="ue-bench-photos-")
    try:
        src = os.path.join(tmp, "src")
        bucket = photo_bucket(src, n)
        print(f"bucket: {bucket['images']} photos, {bucket['megapixels']} Mpx, longer side "
              f"256..2048 px, {bucket['shards']} shards", flush=True)
        results: dict[str, Any] = {"scale": scale, "device": str(device), **bucket,
                                   "threads": torch.get_num_threads()}
        for method in METHODS:
            state = os.path.join(tmp, f"{method}.pt")
            _fit(method, state)
            out = subprocess.run(
                [sys.executable, "-m", "ue_dist.bench.photos", "--child", method, src,
                 os.path.join(tmp, f"dst-{method}"), state, device],
                check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["images_per_s"] = round(r["images"] / r["wall_s"], 2)
            r["megapixels_per_s"] = round(bucket["megapixels"] / r["wall_s"], 3)
            results[method] = r
            print(f"{method} ({METHODS[method][0]}): {r['images_per_s']} images/s, "
                  f"{r['megapixels_per_s']} Mpx/s, {r['wall_s']} s, peak RSS "
                  f"{r['peak_rss_mib']} MiB", flush=True)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench.photos", description=__doc__)
    parser.add_argument("--images", type=int, default=200, help="photos in the bucket")
    parser.add_argument("--scale", choices=["cpu", "cifar"], default="cpu")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "SRC", "DST", "STATE", "DEVICE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_protect_all(*args.child)))
        return 0
    print(json.dumps(run(args.scale, args.images), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
