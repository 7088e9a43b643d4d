"""Profile of REM's two units of work at the paper's settings, and what folding batch norm saves.

The two units (REM, Fu et al. ICLR 2022, Algorithm 1 and Appendix A.3.1, ResNet-18 on 32x32x3,
batch B = 128, rho_u = 8/255 with K_u = 10 steps of rho_u/5, rho_a = 4/255 with K_a = 10 steps
of rho_a/5, J = 5 EOT views of crop + flip):

* ``noise_step``: one of the K_u descent steps on the noise (``steps_u=1``): J x B views, each
  with K_a inner PGD-ascent passes and one more for the outer gradient, all input-gradient
  passes of the eval-mode model; the unit of both the fit and the final regeneration.
* ``train_step``: one source-model step (``TrainLoop.train_step`` with REM's own loss): the
  noise (K_u descent steps), K_a PGD-AT passes on the augmented batch, one SGD step.

The noise step is timed without the profiler (best of ``repeats``, after a warm-up) and then
run once under ``torch.profiler``; the training step (ten noise steps long) is run once, under
the profiler, which is its timing too (the profiler's overhead, seen on the noise step, is a
few per cent); the profile's self times are grouped (convolutions and matmuls, which is the
arithmetic; batch norm; ReLU and residual adds; casts and copies; allocation; the rest of the
element-wise work: PGD's step and projection, crop and flip, the loss) and the time outside any
operator (Python, the autograd engine) is the wall time minus their sum. FLOPs per unit come from
the per-pass counts (``flops.pass_flops``) times the passes each unit makes (checked against a
direct count at the smoke scale by the tests), so the achieved GFLOP/s and its share of the peak
measured in the same run follow from the timed wall time. Both units are measured with the
model as it is (``baseline``) and with its batch norms folded into the convolutions before them
(``folded``, ``core.fold``: what REM, EM and TAP now do); the ratio is the speed-up.

``python -m ue_dist.bench.rem_profile [small|paper] [--precisions fp32,bf16] [--units
noise_step,train_step]``; ``small`` is the smoke run of the code (toy sizes), not a measurement.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any, Callable

import torch

from ue_dist.bench.flops import bench_device, best_seconds, matmul_peak, pass_flops, peak_for, sync
from ue_dist.core.models import build_model

SCALES: dict[str, dict[str, Any]] = {
    "small": {"batch": 2, "steps_u": 2, "steps_a": 1, "eot": 2, "repeats": 1},
    "paper": {"batch": 128, "steps_u": 10, "steps_a": 10, "eot": 5, "repeats": 2},
}
UNITS = ("noise_step", "train_step")
VARIANTS = ("baseline", "folded")
# profiler operator names by what they do (self times; the first matching group wins)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution / matmul", ("convolution", "conv2d", "addmm", "aten::mm", "bmm", "matmul",
                              "linear")),
    ("batch norm", ("batch_norm",)),
    ("relu / residual add", ("relu", "threshold", "aten::add")),
    ("casts / copies", ("_to_copy", "aten::to", "copy_", "clone", "contiguous")),
    ("allocation / fill", ("empty", "zeros", "zero_", "fill_", "resize_", "ones")),
)
OTHER = "other element-wise (PGD step, crop/flip, loss)"
OUTSIDE = "outside operators (Python, autograd engine)"


def _group(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return OTHER


def breakdown(prof: torch.profiler.profile, wall_s: float, device: torch.device) -> dict[str, Any]:
    """Seconds per group of the profiled run (self times), the rest outside operators, and the
    ten costliest operators."""
    cuda = device.type == "cuda"
    per_op: dict[str, float] = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        per_op[ev.key] = per_op.get(ev.key, 0.0) + us / 1e6
    groups: dict[str, float] = {g: 0.0 for g, _ in GROUPS}
    groups[OTHER] = 0.0
    for name, s in per_op.items():
        groups[_group(name)] += s
    if not cuda:  # on a GPU, host time overlaps the kernels: no "outside" share
        groups[OUTSIDE] = max(0.0, wall_s - sum(groups.values()))
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {"seconds": {g: round(s, 3) for g, s in groups.items()},
            "share": {g: round(s / wall_s, 3) for g, s in groups.items()},
            "top_ops": [(k, round(s, 3)) for k, s in top]}


def unit_flops(unit: str, cfg: dict[str, Any], passes: dict[str, float]) -> float:
    """FLOPs of one unit: its input-gradient passes (and the one training pass) per image."""
    b, j, ka = cfg["batch"], cfg["eot"], cfg["steps_a"]
    noise_passes = (ka + 1) * j * b  # one descent step: J x B views, K_a ascent passes + 1
    if unit == "noise_step":
        return noise_passes * passes["input_grad"]
    return ((cfg["steps_u"] * noise_passes + ka * b) * passes["input_grad"]
            + b * passes["train_step"])


def _units(cfg: dict[str, Any], precision: str, folded: bool,
           device: torch.device) -> dict[str, Callable[[], Any]]:
    """The two units as callables, on fresh inputs drawn once."""
    from ue_dist.core.context import LocalContext
    from ue_dist.core.training import TrainLoop, uint8_fetch
    from ue_dist.methods.base import build_method
    from ue_dist.methods.rem import (robust_error_minimizing_noise, source_model_loss,
                                     source_model_noise)

    method = build_method("rem", "paper", {"precision": precision, "batch_size": cfg["batch"],
                                           "steps_u": cfg["steps_u"], "steps_a": cfg["steps_a"],
                                           "eot_samples": cfg["eot"]})
    kw = method.noise_kwargs(32)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model("resnet18", 10).to(device)
    ctx = LocalContext(device=device, log=lambda m: None)
    loop = TrainLoop(model, ctx, n=cfg["batch"], batch_size=cfg["batch"], seed=0, lr=0.1,
                     momentum=0.9, weight_decay=5e-4, precision=precision)
    images = torch.randint(0, 256, (cfg["batch"], 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(cfg["batch"]) % 10
    fetch = uint8_fetch(images, labels, device)
    x, y = fetch(torch.arange(cfg["batch"]))
    loss = source_model_loss(source_model_noise(precision, kw), rho_a=kw["rho_a"],
                             step_a=kw["step_a"], steps_a=kw["steps_a"],
                             augmentation=kw["augmentation"], fold=folded)
    # the noise step on a frozen copy, as perturb runs it (folded once, as ``load`` does)
    frozen = copy.deepcopy(loop.model).eval().requires_grad_(False)
    if folded:
        from ue_dist.core.fold import fold_batchnorm

        frozen = fold_batchnorm(frozen)
    one_step = dict(kw, steps_u=1)
    return {
        "noise_step": lambda: robust_error_minimizing_noise(frozen, x, y, generator=gen,
                                                            precision=precision, **one_step),
        "train_step": lambda: loop.train_step(fetch, loss),
    }


def run(scale: str = "paper", precisions: tuple[str, ...] = ("fp32", "bf16"),
        units: tuple[str, ...] = UNITS) -> dict[str, Any]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    unknown = sorted(set(units) - set(UNITS))
    if unknown:
        raise ValueError(f"unknown unit(s) {unknown}; valid: {', '.join(UNITS)}")
    cfg = SCALES[scale]
    device = bench_device()
    peaks = matmul_peak(device, smoke=scale == "small")
    passes = pass_flops(build_model("resnet18", 10).to(device), device)
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(),
                           "settings": dict(cfg, arch="resnet18", rho_u="8/255", rho_a="4/255"),
                           "matmul_peak_gflops": peaks,
                           "pass_gflop_per_image": {k: v / 1e9 for k, v in passes.items()}}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for precision in precisions:
        kind, peak = peak_for(precision, device, peaks)
        for variant in VARIANTS:
            fns = _units(cfg, precision, variant == "folded", device)
            for unit in units:
                fn = fns[unit]
                if unit == "noise_step":
                    fn()  # warm-up (kernel choice, the fold's trace); also for the train step
                    wall = best_seconds(fn, cfg["repeats"], device)
                with torch.profiler.profile(activities=activities) as prof:
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    profiled = time.perf_counter() - t0
                if unit == "train_step":  # K_u noise steps long: timed by its profiled run
                    wall = profiled
                flops = unit_flops(unit, cfg, passes)
                gflops = flops / wall / 1e9
                row = {"wall_s": round(wall, 3), "profiled_wall_s": round(profiled, 3),
                       "gflop": round(flops / 1e9, 1), "gflops": round(gflops, 1),
                       "peak_kind": kind, "pct_of_peak": round(100 * gflops / peak, 1),
                       **breakdown(prof, profiled, device)}
                out[f"{unit}_{precision}_{variant}"] = row
                shares = ", ".join(f"{g} {100 * s:.0f}%" for g, s in row["share"].items() if s)
                print(f"{unit:10s} {precision} {variant:8s} {wall:8.2f} s  {gflops:7.1f} GFLOP/s "
                      f"({row['pct_of_peak']:.1f}% of {kind} peak {peak:.0f}); profiled "
                      f"{profiled:.2f} s: {shares}", flush=True)
        for unit in units:
            base, fold = out[f"{unit}_{precision}_baseline"], out[f"{unit}_{precision}_folded"]
            out[f"{unit}_{precision}_speedup"] = round(base["wall_s"] / fold["wall_s"], 3)
            print(f"{unit:10s} {precision} folded / baseline speed-up "
                  f"x{out[f'{unit}_{precision}_speedup']}: {base['pct_of_peak']}% -> "
                  f"{fold['pct_of_peak']}% of the {kind} peak", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench.rem_profile",
                                     allow_abbrev=False)
    parser.add_argument("scale", nargs="?", default="paper", choices=sorted(SCALES))
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--units", default=",".join(UNITS), help=f"of {', '.join(UNITS)}")
    args = parser.parse_args(argv)
    precisions = tuple(p for p in args.precisions.split(",") if p)
    bad = sorted(set(precisions) - {"fp32", "bf16"})
    if bad:
        parser.error(f"--precisions: unknown {bad}; valid: fp32, bf16")
    return run(args.scale, precisions, tuple(u for u in args.units.split(",") if u))


if __name__ == "__main__":
    import ue_dist  # noqa: F401

    print(json.dumps(main(), indent=1))
