"""Benchmark of the Bayes-error estimator: one objective-and-gradient evaluation.

* n = 4096, d = 512, fp32: the blocked estimator against a plain dense n x n autograd reference,
  in the same process (times, ratio, max |difference| of value and gradient); then the same at
  the largest n (a multiple of 4096) whose dense form fits in a quarter of the available memory
  (the dense autograd graph holds about six n x n fp32 matrices);
* n = 50,000, d = 512: the blocked estimator alone, in a fresh subprocess whose peak resident
  memory above its baseline (after the inputs exist) is read from ``getrusage`` — the dense form
  would need 50,000^2 x 4 B = 10 GB per n x n matrix.

Both run on the benchmark's device (``ue_dist.bench.flops.bench_device``; on CUDA the peak is
``torch.cuda.max_memory_allocated``). FLOPs are counted (``FlopCounterMode``: the kernel's
matrix products, forward and backward) at the comparison's n and scaled by (n / n_counted)^2 for
the large run, whose products are the same blocks, n^2 of them; the achieved GFLOP/s is set
against the fp32 peak measured in the same process.

``python -m ue_dist.bench.bayes [cpu|cifar|small]``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import torch

from ue_dist.bench.flops import bench_device, count_flops, matmul_peak, print_peaks, sync
from ue_dist.core.bayes_error import bayes_error, dense_bayes_error, median_sigma


def _inputs(n: int, d: int, classes: int = 10, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(classes, d, generator=gen)
    e = centres[y] * 0.5 + torch.randn(n, d, generator=gen)
    return e.to(device), y.to(device)


def _timed(fn, e: torch.Tensor, repeats: int) -> tuple[float, float, torch.Tensor]:
    best, value, grad = float("inf"), 0.0, None
    for _ in range(repeats):
        x = e.clone().requires_grad_(True)
        sync(e.device)
        t = time.perf_counter()
        out = fn(x)
        (g,) = torch.autograd.grad(out, x)
        sync(e.device)
        best = min(best, time.perf_counter() - t)
        value, grad = float(out.detach()), g
    return best, value, grad


def objective_flops(n: int, d: int, device: torch.device | str) -> int:
    """FLOPs of one blocked objective-and-gradient evaluation at (n, d), counted."""
    e, y = _inputs(n, d, device=str(device))
    x = e.clone().requires_grad_(True)
    sigma = median_sigma(e, nearest=64)
    return count_flops(lambda: torch.autograd.grad(bayes_error(x, y, sigma), x))


def compare(n: int = 4096, d: int = 512, repeats: int = 3) -> dict[str, Any]:
    device = bench_device()
    e, y = _inputs(n, d, device=str(device))
    sigma = median_sigma(e, nearest=64)
    t_dense, v_dense, g_dense = _timed(lambda x: dense_bayes_error(x, y, sigma), e, repeats)
    t_block, v_block, g_block = _timed(lambda x: bayes_error(x, y, sigma), e, repeats)
    return {"n": n, "d": d, "device": str(device), "sigma": sigma, "dense_s": t_dense,
            "blocked_s": t_block,
            "ratio_blocked_over_dense": t_block / t_dense, "value_dense": v_dense,
            "value_blocked": v_block, "max_abs_value_diff": abs(v_dense - v_block),
            "max_abs_grad_diff": float((g_dense - g_block).abs().max()),
            "max_abs_grad": float(g_dense.abs().max())}


_CHILD = r"""
import json, resource, sys, time, torch
from ue_dist.bench.bayes import _inputs
from ue_dist.core.bayes_error import bayes_error, median_sigma
n, d, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cuda = device.startswith("cuda")
e, y = _inputs(n, d, device=device)
sigma = median_sigma(e, nearest=64)
x = e.clone().requires_grad_(True)
# warm the allocator / BLAS with a small call, then take the baseline
bayes_error(x[:512].detach().clone().requires_grad_(True), y[:512], sigma).backward()
def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
base = rss_kb()
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gpu_base = torch.cuda.memory_allocated()
t = time.perf_counter()
out = bayes_error(x, y, sigma)
(g,) = torch.autograd.grad(out, x)
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = ({"gpu_peak_delta_gb": (torch.cuda.max_memory_allocated() - gpu_base) / 2**30}
       if cuda else {})
print(json.dumps({"n": n, "d": d, "device": device, **gpu, "seconds": seconds, "value": float(out),
                  "peak_rss_delta_gb": (peak - base) / 2**20, "peak_rss_gb": peak / 2**20,
                  "baseline_rss_gb": base / 2**20, "grad_finite": bool(torch.isfinite(g).all()),
                  "threads": torch.get_num_threads()}))
"""


def large(n: int = 50_000, d: int = 512) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(bench_device())],
                          capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_dense_n(step: int = 4096, matrices: int = 6, share: float = 0.25) -> int:
    """The largest multiple of ``step`` whose dense estimator (about ``matrices`` n x n fp32
    tensors alive in its autograd graph) fits in ``share`` of the available memory."""
    if bench_device().type == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    n = step
    while matrices * 4 * (n + step) ** 2 <= share * free:
        n += step
    return n


def run(scale: str = "cpu") -> dict[str, Any]:
    """``cpu`` / ``cifar``: n = 4096 comparison and n = 50,000 (CIFAR-10's training set) blocked;
    ``small``: n = 1024 and 8192 (a smoke run)."""
    if scale not in ("cpu", "cifar", "small"):
        raise ValueError(f"scale must be 'cpu', 'cifar' or 'small', got {scale!r}")
    small = scale == "small"
    device = bench_device()
    peaks = matmul_peak(device, smoke=scale == "small")
    print_peaks(device, peaks)
    cmp_ = compare(1024 if small else 4096)
    counted = objective_flops(cmp_["n"], cmp_["d"], device)

    def rate(n: int, seconds: float) -> dict[str, float]:
        gflops = counted * (n / cmp_["n"]) ** 2 / seconds / 1e9  # the n^2 kernel blocks
        return {"gflop": counted * (n / cmp_["n"]) ** 2 / 1e9, "gflops": gflops,
                "pct_of_fp32_peak": 100.0 * gflops / peaks["fp32"]}

    cmp_["blocked_rate"] = rate(cmp_["n"], cmp_["blocked_s"])
    print(f"[bench bayes] n={cmp_['n']} d={cmp_['d']} objective+gradient: dense "
          f"{cmp_['dense_s']:.3f} s, blocked {cmp_['blocked_s']:.3f} s, ratio "
          f"{cmp_['ratio_blocked_over_dense']:.2f}x; |value diff| {cmp_['max_abs_value_diff']:.2e}, "
          f"max |grad diff| {cmp_['max_abs_grad_diff']:.2e} (max |grad| {cmp_['max_abs_grad']:.2e}); "
          f"blocked {cmp_['blocked_rate']['gflop']:.1f} GFLOP at {cmp_['blocked_rate']['gflops']:.0f} "
          f"GFLOP/s ({cmp_['blocked_rate']['pct_of_fp32_peak']:.1f}% of fp32 peak)", flush=True)
    n_max = 2048 if small else largest_dense_n()
    cmp_max = None
    if n_max > cmp_["n"]:
        cmp_max = compare(n_max, repeats=1 if small else 2)
        print(f"[bench bayes] largest dense n that fits ({n_max}): dense {cmp_max['dense_s']:.3f} s, "
              f"blocked {cmp_max['blocked_s']:.3f} s, ratio {cmp_max['ratio_blocked_over_dense']:.2f}x; "
              f"|value diff| {cmp_max['max_abs_value_diff']:.2e}", flush=True)
    big = large(8192 if small else 50_000)
    big["rate"] = rate(big["n"], big["seconds"])
    gpu = (f", GPU peak +{big['gpu_peak_delta_gb']:.2f} GB" if "gpu_peak_delta_gb" in big else "")
    print(f"[bench bayes] n={big['n']} d={big['d']} blocked objective+gradient on {device}: "
          f"{big['seconds']:.1f} s ({big['rate']['gflop']:.0f} GFLOP at {big['rate']['gflops']:.0f} "
          f"GFLOP/s, {big['rate']['pct_of_fp32_peak']:.1f}% of fp32 peak), peak memory "
          f"+{big['peak_rss_delta_gb']:.2f} GB above baseline (peak RSS {big['peak_rss_gb']:.2f} "
          f"GB{gpu}, {big['threads']} threads)", flush=True)
    return {"compare": cmp_, "compare_largest_dense": cmp_max, "large": big}


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "cpu")
