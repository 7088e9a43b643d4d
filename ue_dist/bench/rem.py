"""Benchmark of REM / EM noise generation (``robust_error_minimizing_noise``), images per second.

For the small CNN and ResNet-18 at 32x32, in one process: EM (plain PGD descent) and REM
(K_u descent steps, each averaging J EOT views with a K_a-step inner PGD ascent), REM both with
the J views as one ``J x B`` batch and with a Python loop over J (the ratio is the speed-up of
batching). The source models are untrained (the cost does not depend on the weights) and run
with their batch norms folded into the convolutions, as REM/EM run them (``core.fold``;
``ue_dist.bench.rem_profile`` measures the difference).

``cpu`` scale shortens the PGD (fewer K_u / K_a steps, small batches) to stay within about a
minute on a loaded 2-core machine; ``paper_equiv_images_per_s`` rescales a REM figure to the
paper's K_u = 10, K_a = 10 (cost is proportional to K_u x (K_a + 1) at fixed J), the figure to
set against the authors' code (about 0.23 images/s for ResNet-18 REM and 14.5 images/s for EM
PGD on the same 2-core CPU). ``cifar`` scale runs the paper's settings with CIFAR batch sizes.

Every figure is measured in fp32 and in bf16 autocast (channels_last model; ``precision=bf16``)
in the same run, with the bf16/fp32 speed-up, the achieved GFLOP/s (FLOPs counted with
``FlopCounterMode``; ``ue_dist.bench.flops``) and its share of the matmul peak measured in the
same process. ``projection`` turns the ResNet-18 REM figure into the time to generate full
CIFAR-10 REM noise with the paper's settings on this device: 5,000 source-model steps of batch
128, each costing K_u*J*(K_a+1) noise passes + K_a adversarial passes + 1 training pass
(K_u = 10, J = 5, K_a = 10), then one noise regeneration (K_u*J*(K_a+1) passes) for 50,000
images; each pass's FLOPs are counted, the rate is the REM row's achieved GFLOP/s.

``python -m ue_dist.bench.rem [cpu|cifar]``.
"""
from __future__ import annotations

import copy
import sys
from typing import Any

import torch

from ue_dist.bench.flops import (bench_device, best_seconds, count_flops, describe, matmul_peak,
                                 pass_flops, print_peaks, rate_row)
from ue_dist.core.fold import fold_batchnorm
from ue_dist.core.models import build_model
from ue_dist.core.precision import prepare_model
from ue_dist.methods.rem import robust_error_minimizing_noise

SCALES: dict[str, dict[str, dict[str, Any]]] = {
    # per arch: batch, K_u, K_a (REM), J, and EM's batch and steps
    "small": {"small-cnn": {"batch": 2, "steps_u": 1, "steps_a": 1, "eot": 2,
                            "em_batch": 2, "em_steps": 1},
              "resnet18": {"batch": 2, "steps_u": 1, "steps_a": 1, "eot": 2,
                           "em_batch": 2, "em_steps": 1}},
    "cpu": {"small-cnn": {"batch": 16, "steps_u": 2, "steps_a": 2, "eot": 5,
                          "em_batch": 32, "em_steps": 10},
            "resnet18": {"batch": 4, "steps_u": 1, "steps_a": 2, "eot": 5,
                         "em_batch": 8, "em_steps": 2}},
    "cifar": {"small-cnn": {"batch": 128, "steps_u": 10, "steps_a": 10, "eot": 5,
                            "em_batch": 512, "em_steps": 10},
              "resnet18": {"batch": 128, "steps_u": 10, "steps_a": 10, "eot": 5,
                           "em_batch": 512, "em_steps": 10}},
}
PRECISIONS = ("fp32", "bf16")
# the paper's CIFAR-10 REM run (Appendix A.3.1 / Table 5)
PAPER = {"train_steps": 5000, "batch": 128, "steps_u": 10, "eot": 5, "steps_a": 10,
         "images": 50000}


def projection(row_gflops: float, passes: dict[str, float]) -> dict[str, float]:
    """Hours for full CIFAR-10 REM with the paper's settings at ``row_gflops`` sustained."""
    p = PAPER
    noise = p["steps_u"] * p["eot"] * (p["steps_a"] + 1)  # passes per image per noise call
    fit = p["train_steps"] * p["batch"] * ((noise + p["steps_a"]) * passes["input_grad"]
                                           + passes["train_step"])
    regen = p["images"] * noise * passes["input_grad"]
    return {"fit_hours": fit / (row_gflops * 1e9) / 3600,
            "regenerate_hours": regen / (row_gflops * 1e9) / 3600,
            "total_hours": (fit + regen) / (row_gflops * 1e9) / 3600,
            "total_pflop": (fit + regen) / 1e15}


def _summary_row(cfg: dict[str, Any], rows: dict[str, dict[str, Any]],
                 flops: dict[str, float]) -> dict[str, Any]:
    """The figures of one architecture, fp32 under their historical keys."""
    ips = {k: r["images_per_s"] for k, r in rows.items()}
    rescale_rem = cfg["steps_u"] * (cfg["steps_a"] + 1) / (10 * 11)
    row: dict[str, Any] = {
        # fp32 figures under their historical keys
        "em_images_per_s": round(ips["em_fp32"], 2),
        "em_paper_equiv_images_per_s": round(ips["em_fp32"] * cfg["em_steps"] / 10, 2),
        "rem_batched_images_per_s": round(ips["rem_batched_fp32"], 3),
        "rem_looped_images_per_s": round(ips["rem_looped_fp32"], 3),
        "batched_over_looped": round(ips["rem_batched_fp32"] / ips["rem_looped_fp32"], 2),
        "rem_paper_equiv_images_per_s": round(ips["rem_batched_fp32"] * rescale_rem, 4),
        "settings": dict(cfg, rho_u="8/255", rho_a="2/255"),
        # new: bf16, speed-ups, FLOPs
        "bf16": {"em_images_per_s": round(ips["em_bf16"], 2),
                 "rem_batched_images_per_s": round(ips["rem_batched_bf16"], 3),
                 "rem_looped_images_per_s": round(ips["rem_looped_bf16"], 3),
                 "batched_over_looped": round(ips["rem_batched_bf16"] / ips["rem_looped_bf16"], 2),
                 "rem_paper_equiv_images_per_s": round(ips["rem_batched_bf16"] * rescale_rem, 4)},
        "bf16_over_fp32": {k: round(ips[f"{k}_bf16"] / ips[f"{k}_fp32"], 2)
                           for k in ("em", "rem_batched", "rem_looped")},
        "gflop_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "rows": rows,
    }
    return row


def _print_rows(arch: str, cfg: dict[str, Any], rows: dict[str, dict[str, Any]],
                row: dict[str, Any]) -> None:
    for prec in PRECISIONS:
        print(f"{arch:10s} {prec} EM ({cfg['em_steps']} steps)        {describe(rows[f'em_{prec}'])}",
              flush=True)
        for kind in ("batched", "looped"):
            print(f"{arch:10s} {prec} REM {kind:7s} K_u={cfg['steps_u']} K_a={cfg['steps_a']} "
                  f"J={cfg['eot']} {describe(rows[f'rem_{kind}_{prec}'])}", flush=True)
    print(f"{arch:10s} bf16/fp32 speed-up: EM x{row['bf16_over_fp32']['em']}, REM batched "
          f"x{row['bf16_over_fp32']['rem_batched']}, REM looped "
          f"x{row['bf16_over_fp32']['rem_looped']}; batched/looped fp32 "
          f"x{row['batched_over_looped']}, bf16 x{row['bf16']['batched_over_looped']}; "
          f"paper-equiv REM fp32 {row['rem_paper_equiv_images_per_s']:.4f} img/s, bf16 "
          f"{row['bf16']['rem_paper_equiv_images_per_s']:.4f} img/s", flush=True)


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    device = bench_device()
    repeats = {"small": 1, "cpu": 2}.get(scale, 3)
    eps, rho_a = 8 / 255, 2 / 255
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    peaks = matmul_peak(device, smoke=scale == "small")
    print_peaks(device, peaks)
    out["matmul_peak_gflops"] = peaks
    for arch, cfg in SCALES[scale].items():
        torch.manual_seed(0)
        base = build_model(arch, 10).to(device).eval().requires_grad_(False)
        # batch norm folded into the convolutions, as REM/EM's perturb and fit run the model
        models = {"fp32": fold_batchnorm(base),
                  "bf16": fold_batchnorm(prepare_model(copy.deepcopy(base), device, "bf16"))}
        gen = torch.Generator().manual_seed(0)

        def em(prec: str, b: int = cfg["em_batch"]) -> torch.Tensor:
            x = torch.rand(b, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            return robust_error_minimizing_noise(models[prec], x, y, eps=eps, step_u=eps / 5,
                                                 steps_u=cfg["em_steps"], generator=gen,
                                                 precision=prec)

        def rem(prec: str, batched: bool, b: int = cfg["batch"]) -> torch.Tensor:
            x = torch.rand(b, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            return robust_error_minimizing_noise(
                models[prec], x, y, eps=eps, step_u=eps / 5, steps_u=cfg["steps_u"],
                rho_a=rho_a, step_a=rho_a / 5, steps_a=cfg["steps_a"], eot_samples=cfg["eot"],
                augmentation="crop-flip", generator=gen, batched=batched, precision=prec)

        # FLOPs per image of each unit of work (counted once, in fp32: the same work in bf16)
        flops = {"em": count_flops(lambda: em("fp32", 2)) / 2,
                 "rem": count_flops(lambda: rem("fp32", True, 2)) / 2}
        passes = pass_flops(base, device)
        rows: dict[str, dict[str, Any]] = {}
        for prec in PRECISIONS:
            em(prec, 2)  # warm-up (allocator, oneDNN kernel choice)
            rem(prec, True, 2)
            rows[f"em_{prec}"] = rate_row(cfg["em_batch"], best_seconds(
                lambda: em(prec), repeats, device), flops["em"], prec, device, peaks)
            for kind, batched in (("batched", True), ("looped", False)):
                rows[f"rem_{kind}_{prec}"] = rate_row(cfg["batch"], best_seconds(
                    lambda: rem(prec, batched), repeats, device), flops["rem"], prec, device, peaks)
        row = _summary_row(cfg, rows, flops)
        _print_rows(arch, cfg, rows, row)
        if arch == "resnet18":
            row["pass_gflop_per_image"] = {k: round(v / 1e9, 3) for k, v in passes.items()}
            out["projection"] = {}
            for prec in PRECISIONS:
                proj = projection(rows[f"rem_batched_{prec}"]["gflops"], passes)
                out["projection"][prec] = proj
                print(f"projection, full CIFAR-10 REM (paper settings, ResNet-18, "
                      f"{proj['total_pflop']:.0f} PFLOP) on {device} in {prec} at "
                      f"{rows[f'rem_batched_{prec}']['gflops']:.0f} GFLOP/s: source model "
                      f"{proj['fit_hours']:.0f} h + regeneration {proj['regenerate_hours']:.1f} h = "
                      f"{proj['total_hours']:.0f} h ({proj['total_hours'] / 24:.1f} days)",
                      flush=True)
        out[arch] = row
    return out


if __name__ == "__main__":
    import ue_dist  # noqa: F401

    run(sys.argv[1] if len(sys.argv) > 1 else "cpu")
