"""Benchmark of GUE: generator forward (protection) throughput and BOME iterations per second.

* ``generator_images_per_s``: one eval-mode U-Net pass on 32x32x3 images (what ``perturb``
  costs per image when protecting a bucket), at the paper's width (64, 7.79 M parameters) and at
  the ``quick`` preset's width. The authors' generator ran at about 308 images/s on the same
  2-core CPU.
* ``bome``: Algorithm 1 iterations per second at batch 32 with ResNet-18 and the width-64 U-Net
  (the paper's models; the authors' code: about 3 images/s, i.e. ~0.1 iterations/s). ``cpu``
  scale times the iteration with T = 0 and T = 2 inner steps and extrapolates linearly to the
  paper's T = 10 (``paper_equiv``; each inner step is one classifier forward+backward), so that
  it fits in about a minute on a loaded machine; ``cifar`` scale times T = 10 directly.

Each figure is measured in fp32 and in bf16 autocast (``precision=bf16``, channels_last models)
in the same run, with the bf16/fp32 speed-up and the achieved GFLOP/s (FLOPs counted with
``FlopCounterMode``) as a share of the dense-kernel peak measured in the same process
(``ue_dist.bench.flops``). The historical keys hold the fp32 figures.

``python -m ue_dist.bench.gue [cpu|cifar]``.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ue_dist.bench.flops import (bench_device, best_seconds, count_flops, describe, matmul_peak,
                                 print_peaks, rate_row)
from ue_dist.core.models import build_model
from ue_dist.core.precision import autocast, prepare_model
from ue_dist.core.unet import UNetGenerator, count_parameters
from ue_dist.methods.gue import Gue, bome_step

SCALES: dict[str, dict[str, Any]] = {
    "small": {"gen_batch": 4, "gen_repeats": 1, "bome_batch": 4, "inner": (0, 1), "repeats": 1},
    "cpu": {"gen_batch": 64, "gen_repeats": 2, "bome_batch": 32, "inner": (0, 2), "repeats": 2},
    "cifar": {"gen_batch": 512, "gen_repeats": 5, "bome_batch": 32, "inner": (10,), "repeats": 3},
}


def _generator_rate(width: int, batch: int, repeats: int, device: torch.device,
                    precision: str = "fp32") -> dict[str, Any]:
    torch.manual_seed(0)
    gen = prepare_model(UNetGenerator(3, 8 / 255, width).to(device).eval(), device, precision)
    x = torch.rand(batch, 3, 32, 32, device=device)
    with torch.no_grad(), autocast(device, precision):
        gen(x[:2])  # warm-up
        sec = best_seconds(lambda: gen(x), repeats, device)
    return {"width": width, "params": count_parameters(gen), "images_per_s": batch / sec,
            "seconds": sec}


def _generator_flops(width: int, device: torch.device) -> float:
    gen = UNetGenerator(3, 8 / 255, width).to(device).eval()
    x = torch.rand(2, 3, 32, 32, device=device)
    with torch.no_grad():
        return count_flops(lambda: gen(x)) / 2


def _bome_setup(inner: int, batch: int, device: torch.device, precision: str):
    torch.manual_seed(0)
    s = Gue.resolve("paper", {"inner_steps": inner, "precision": precision})
    gen = prepare_model(UNetGenerator(3, s["eps"], 64).to(device), device, precision)
    cls = prepare_model(build_model("resnet18", 10, 3, 32).to(device), device, precision)
    gen_opt = torch.optim.SGD(gen.parameters(), lr=s["gen_lr"])
    cls_opt = torch.optim.SGD(cls.parameters(), lr=s["cls_lr"])
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.arange(batch, device=device) % 10
    return lambda: bome_step(gen, cls, gen_opt, cls_opt, x, y, s)


def _bome_seconds(inner: int, batch: int, repeats: int, device: torch.device,
                  precision: str = "fp32") -> float:
    return best_seconds(_bome_setup(inner, batch, device, precision), repeats, device)


def _at_paper_inner_steps(seconds: dict[int, float]) -> float:
    """Seconds per BOME iteration at the paper's T = 10: measured, or extrapolated linearly
    from the measured T values (each inner step is one classifier forward+backward)."""
    if 10 in seconds:
        return seconds[10]
    lo, hi = min(seconds), max(seconds)
    return seconds[lo] + (10 - lo) * (seconds[hi] - seconds[lo]) / (hi - lo)


def _bome_flops_per_image(inner: int, device: torch.device) -> float:
    return count_flops(_bome_setup(inner, 4, device, "fp32")) / 4


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    cfg = SCALES[scale]
    device = bench_device()
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    peaks = matmul_peak(device, smoke=scale == "small")
    print_peaks(device, peaks)
    out["matmul_peak_gflops"] = peaks
    for name, width in (("paper", 64), ("quick", int(Gue.resolve("quick")["width"]))):
        flops = _generator_flops(width, device)
        r = _generator_rate(width, cfg["gen_batch"], cfg["gen_repeats"], device)
        r16 = _generator_rate(width, cfg["gen_batch"], cfg["gen_repeats"], device, "bf16")
        rows = {p: rate_row(cfg["gen_batch"], q["seconds"], flops, p, device, peaks)
                for p, q in (("fp32", r), ("bf16", r16))}
        r.update(bf16=r16, bf16_over_fp32=round(r16["images_per_s"] / r["images_per_s"], 2),
                 gflop_per_image=flops / 1e9, rows=rows)
        out[f"generator_{name}"] = r
        print(f"generator width {width} ({r['params'] / 1e6:.2f} M params): "
              f"{r['images_per_s']:.1f} images/s wall (authors' width-64 code: ~308 on 2-core CPU)",
              flush=True)
        for p in ("fp32", "bf16"):
            print(f"  generator width {width} {p}: {describe(rows[p])}", flush=True)
        print(f"  bf16/fp32 speed-up x{r['bf16_over_fp32']}", flush=True)
    batch = cfg["bome_batch"]
    times: dict[int, float] = {}
    times16: dict[int, float] = {}
    bome_rows: dict[str, Any] = {}
    for t in cfg["inner"]:
        flops = _bome_flops_per_image(t, device)
        times[t] = _bome_seconds(t, batch, cfg["repeats"], device)
        times16[t] = _bome_seconds(t, batch, cfg["repeats"], device, "bf16")
        rows = {"fp32": rate_row(batch, times[t], flops, "fp32", device, peaks),
                "bf16": rate_row(batch, times16[t], flops, "bf16", device, peaks)}
        bome_rows[str(t)] = {**rows, "bf16_seconds": times16[t],
                             "bf16_over_fp32": round(times[t] / times16[t], 2)}
        print(f"BOME iteration, ResNet-18 + U-Net-64, batch {batch}, T={t}: {times[t]:.2f} s wall "
              f"({batch / times[t]:.2f} images/s)", flush=True)
        for p in ("fp32", "bf16"):
            print(f"  BOME T={t} {p}: {describe(rows[p])}", flush=True)
        print(f"  bf16/fp32 speed-up x{bome_rows[str(t)]['bf16_over_fp32']}", flush=True)
    paper_sec, paper_sec16 = _at_paper_inner_steps(times), _at_paper_inner_steps(times16)
    out["bome"] = {"batch": batch, "seconds": {str(k): v for k, v in times.items()},
                   "paper_equiv_seconds": paper_sec,
                   "paper_equiv_iterations_per_s": 1.0 / paper_sec,
                   "paper_equiv_images_per_s": batch / paper_sec,
                   "rows": bome_rows,
                   "bf16_paper_equiv_seconds": paper_sec16,
                   "bf16_paper_equiv_images_per_s": batch / paper_sec16,
                   "bf16_over_fp32_paper_equiv": round(paper_sec / paper_sec16, 2)}
    print(f"BOME at the paper's T=10: {1 / paper_sec:.3f} iterations/s = "
          f"{batch / paper_sec:.2f} images/s wall (authors' code: ~3 images/s on 2-core CPU); "
          f"bf16 {batch / paper_sec16:.2f} images/s (x{out['bome']['bf16_over_fp32_paper_equiv']})",
          flush=True)
    return out


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "cpu")
