"""Benchmark of victim training: training images per second for the small CNN and ResNet-18,
standard training and PGD adversarial training (10 PGD steps of eps/4 at eps = 8/255, the
papers' Madry-style victims), on random 32x32x3 images with 10 classes.

``scale="cpu"``: a few hundred images per run (a minute or two on a laptop CPU);
``scale="cifar"``: 10,240 images per run, batch 128 (a GPU run of CIFAR-size batches).
The figure is ``train_victim``'s own ``images_per_s`` (training steps only, evaluation excluded),
with the one-epoch warm-up (first run) discarded. ``python -m ue_dist.bench.victim [cpu|cifar]``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from ue_dist.core.context import LocalContext
from ue_dist.core.victim import resolve_victim_settings, train_victim
from ue_dist.data.imageset import ImageSet

SIZES = {  # scale -> arch -> (training images, batch size)
    "cpu": {"small-cnn": (512, 64), "resnet18": (128, 32)},
    "cifar": {"small-cnn": (10240, 128), "resnet18": (10240, 128)},
}


def _data(n: int, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return ImageSet(images, labels, num_classes=10)


def _one(arch: str, n: int, batch: int, adv: bool, device: torch.device) -> dict[str, Any]:
    train, test = _data(n), _data(20, seed=1)
    settings = resolve_victim_settings("quick", {
        "arch": arch, "epochs": 1, "batch_size": batch, "augment": True, "eval_robust": False,
        "adv_eps": 8 / 255 if adv else 0.0, "adv_steps": 10})
    ctx = LocalContext(device=device, log=lambda m: None)
    t0 = time.perf_counter()
    out = train_victim(train, test, settings, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": round(float(out["images_per_s"]), 1), "images": n, "batch": batch,
            "wall_s": round(time.perf_counter() - t0, 2)}


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SIZES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SIZES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {"scale": scale, "device": str(device),
                               "threads": torch.get_num_threads(), "adv": "PGD-10, eps 8/255"}
    _one("small-cnn", 64, 32, False, device)  # warm-up (allocator, kernels)
    for arch, (n, batch) in SIZES[scale].items():
        std = _one(arch, n, batch, False, device)
        at = _one(arch, n, batch, True, device)
        results[arch] = {"standard": std, "pgd_at": at,
                         "at_slowdown": round(std["images_per_s"] / max(at["images_per_s"], 1e-9), 2)}
        print(f"[bench victim] {arch}: standard {std['images_per_s']} img/s, PGD-AT "
              f"{at['images_per_s']} img/s (x{results[arch]['at_slowdown']} slower)", flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=2))
