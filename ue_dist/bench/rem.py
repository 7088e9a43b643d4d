"""Benchmark of REM / EM noise generation (``robust_error_minimizing_noise``), images per second.

For the small CNN and ResNet-18 at 32x32, in one process: EM (plain PGD descent) and REM
(K_u descent steps, each averaging J EOT views with a K_a-step inner PGD ascent), REM both with
the J views as one ``J x B`` batch and with a Python loop over J (the ratio is the speed-up of
batching). The source models are untrained (the cost does not depend on the weights).

``cpu`` scale shortens the PGD (fewer K_u / K_a steps, small batches) to stay within about a
minute on a loaded 2-core machine; ``paper_equiv_images_per_s`` rescales a REM figure to the
paper's K_u = 10, K_a = 10 (cost is proportional to K_u x (K_a + 1) at fixed J), the figure to
set against the authors' code (about 0.23 images/s for ResNet-18 REM and 14.5 images/s for EM
PGD on the same 2-core CPU). ``cifar`` scale runs the paper's settings with CIFAR batch sizes.

``python -m ue_dist.bench.rem [cpu|cifar]``.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ue_dist.core.models import build_model
from ue_dist.methods.rem import robust_error_minimizing_noise

SCALES: dict[str, dict[str, dict[str, Any]]] = {
    # per arch: batch, K_u, K_a (REM), J, and EM's batch and steps
    "cpu": {"small-cnn": {"batch": 16, "steps_u": 2, "steps_a": 2, "eot": 5,
                          "em_batch": 32, "em_steps": 10},
            "resnet18": {"batch": 4, "steps_u": 1, "steps_a": 2, "eot": 5,
                         "em_batch": 8, "em_steps": 2}},
    "cifar": {"small-cnn": {"batch": 128, "steps_u": 10, "steps_a": 10, "eot": 5,
                            "em_batch": 512, "em_steps": 10},
              "resnet18": {"batch": 128, "steps_u": 10, "steps_a": 10, "eot": 5,
                           "em_batch": 512, "em_steps": 10}},
}


def _rate(fn, batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch / best


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 1 if scale == "cpu" else 2
    eps, rho_a = 8 / 255, 2 / 255
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    for arch, cfg in SCALES[scale].items():
        torch.manual_seed(0)
        model = build_model(arch, 10).to(device).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)

        def em(b: int = cfg["em_batch"]) -> torch.Tensor:
            x = torch.rand(b, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            return robust_error_minimizing_noise(model, x, y, eps=eps, step_u=eps / 5,
                                                 steps_u=cfg["em_steps"], generator=gen)

        def rem(batched: bool, b: int = cfg["batch"]) -> torch.Tensor:
            x = torch.rand(b, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            return robust_error_minimizing_noise(
                model, x, y, eps=eps, step_u=eps / 5, steps_u=cfg["steps_u"], rho_a=rho_a,
                step_a=rho_a / 5, steps_a=cfg["steps_a"], eot_samples=cfg["eot"],
                augmentation="crop-flip", generator=gen, batched=batched)

        em(2)  # warm-up (allocator, kernels)
        em_rate = _rate(em, cfg["em_batch"], repeats)
        batched = _rate(lambda: rem(True), cfg["batch"], repeats)
        looped = _rate(lambda: rem(False), cfg["batch"], repeats)
        rescale_rem = cfg["steps_u"] * (cfg["steps_a"] + 1) / (10 * 11)
        row = {"em_images_per_s": round(em_rate, 2),
               "em_paper_equiv_images_per_s": round(em_rate * cfg["em_steps"] / 10, 2),
               "rem_batched_images_per_s": round(batched, 3),
               "rem_looped_images_per_s": round(looped, 3),
               "batched_over_looped": round(batched / looped, 2),
               "rem_paper_equiv_images_per_s": round(batched * rescale_rem, 4),
               "settings": dict(cfg, rho_u="8/255", rho_a="2/255")}
        out[arch] = row
        print(f"{arch:10s} EM {row['em_images_per_s']:8.2f} img/s "
              f"({cfg['em_steps']} steps; paper-equiv {row['em_paper_equiv_images_per_s']:.2f}) | "
              f"REM K_u={cfg['steps_u']} K_a={cfg['steps_a']} J={cfg['eot']}: batched "
              f"{batched:.3f} img/s, looped {looped:.3f} img/s, ratio "
              f"{row['batched_over_looped']:.2f}x (paper-equiv {row['rem_paper_equiv_images_per_s']:.4f} img/s)",
              flush=True)
    return out


if __name__ == "__main__":
    import ue_dist  # noqa: F401

    run(sys.argv[1] if len(sys.argv) > 1 else "cpu")
