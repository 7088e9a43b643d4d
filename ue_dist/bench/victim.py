"""Benchmark of victim training: training images per second for the small CNN and ResNet-18,
standard training and PGD adversarial training (10 PGD steps of eps/4 at eps = 8/255, the
papers' Madry-style victims), on random 32x32x3 images with 10 classes.

``scale="cpu"``: about a hundred images per run (a minute or two on a laptop CPU);
``scale="cifar"``: 10,240 images per run, batch 128 (a GPU run of CIFAR-size batches).
Each run trains ``repeats`` epochs (2 on cpu, 3 on cifar) and ``images_per_s`` is its best
epoch (training plus a 20-image evaluation), so kernel warm-up is not counted; a first
warm-up run is discarded as well. Every row is measured in fp32 and in bf16
(``precision=bf16``: autocast, channels_last model) in the same process, with the bf16/fp32
speed-up and the achieved GFLOP/s (FLOPs per training image counted with ``FlopCounterMode``:
one weight-gradient pass, plus ``adv_steps`` input-gradient passes for PGD-AT) as a share of
the dense-kernel peak measured in the same process (``ue_dist.bench.flops``).
``python -m ue_dist.bench.victim [cpu|cifar]``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from ue_dist.bench.flops import (bench_device, describe, matmul_peak, pass_flops, print_peaks,
                                 rate_row, sync)
from ue_dist.core.context import LocalContext
from ue_dist.core.models import build_model
from ue_dist.core.victim import resolve_victim_settings, train_victim
from ue_dist.data.imageset import ImageSet

SIZES = {  # scale -> arch -> (training images, batch size)
    "small": {"small-cnn": (20, 10), "resnet18": (10, 5)},  # every class once
    "cpu": {"small-cnn": (512, 64), "resnet18": (96, 32)},
    "cifar": {"small-cnn": (10240, 128), "resnet18": (10240, 128)},
}
REPEATS = {"small": 1, "cpu": 2, "cifar": 3}
ADV_STEPS = 10


def _data(n: int, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return ImageSet(images, labels, num_classes=10)


def _one(arch: str, n: int, batch: int, adv: bool, device: torch.device,
         precision: str = "fp32", epochs: int = 1) -> dict[str, Any]:
    train, test = _data(n), _data(20, seed=1)
    settings = resolve_victim_settings("quick", {
        "arch": arch, "epochs": epochs, "batch_size": batch, "augment": True,
        "eval_robust": False, "adv_eps": 8 / 255 if adv else 0.0, "adv_steps": ADV_STEPS,
        "precision": precision})
    ctx = LocalContext(device=device, log=lambda m: None)
    t0 = time.perf_counter()
    out = train_victim(train, test, settings, ctx)
    sync(device)
    best = min(r["seconds"] for r in out["per_epoch"])  # evaluation reads .item(): synchronised
    return {"images_per_s": round(n / best, 1), "images": n, "batch": batch, "epochs": epochs,
            "best_epoch_s": best, "wall_s": round(time.perf_counter() - t0, 2)}


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SIZES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SIZES)}")
    device = bench_device()
    results: dict[str, Any] = {"scale": scale, "device": str(device),
                               "threads": torch.get_num_threads(),
                               "adv": f"PGD-{ADV_STEPS}, eps 8/255"}
    peaks = matmul_peak(device, smoke=scale == "small")
    print_peaks(device, peaks)
    results["matmul_peak_gflops"] = peaks
    for p in ("fp32", "bf16"):
        _one("small-cnn", 64, 32, False, device, p)  # warm-up (allocator, kernels)
    for arch, (n, batch) in SIZES[scale].items():
        passes = pass_flops(build_model(arch, 10).to(device), device)
        per_image = {"standard": passes["train_step"],
                     "pgd_at": passes["train_step"] + ADV_STEPS * passes["input_grad"]}
        row: dict[str, Any] = {"gflop_per_image": {k: v / 1e9 for k, v in per_image.items()}}
        for p in ("fp32", "bf16"):
            for kind, adv in (("standard", False), ("pgd_at", True)):
                r = _one(arch, n, batch, adv, device, p, REPEATS[scale])
                r.update(rate_row(n, r["best_epoch_s"], per_image[kind], p, device, peaks))
                r["images_per_s"] = round(r["images_per_s"], 1)
                key = kind if p == "fp32" else f"{kind}_bf16"  # fp32 keeps the historical keys
                row[key] = r
                print(f"[bench victim] {arch} {kind:8s} {p}: {describe(r)}", flush=True)
        row["at_slowdown"] = round(row["standard"]["images_per_s"]
                                   / max(row["pgd_at"]["images_per_s"], 1e-9), 2)
        row["bf16_over_fp32"] = {k: round(row[f"{k}_bf16"]["images_per_s"]
                                          / row[k]["images_per_s"], 2)
                                 for k in ("standard", "pgd_at")}
        results[arch] = row
        print(f"[bench victim] {arch}: standard {row['standard']['images_per_s']} img/s, PGD-AT "
              f"{row['pgd_at']['images_per_s']} img/s (x{row['at_slowdown']} slower); bf16/fp32 "
              f"speed-up: standard x{row['bf16_over_fp32']['standard']}, PGD-AT "
              f"x{row['bf16_over_fp32']['pgd_at']}", flush=True)
    return results


if __name__ == "__main__":
    import ue_dist  # noqa: F401

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=2))
