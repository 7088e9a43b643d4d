"""FLOP accounting for the benchmarks: what each stage computes, and how close to the machine's
own matmul limit it runs.

* ``count_flops(fn)``: the FLOPs ``fn()`` dispatches (convolutions, matmuls; forward and
  backward), from ``torch.utils.flop_counter.FlopCounterMode``. Elementwise work (BN, ReLU,
  pooling, the PGD update) is not counted: it is memory-bound, and leaving it out makes the
  figure the usual "model FLOPs" one.
* ``matmul_peak(device)``: GFLOP/s of a large square matrix product (4096^2 on CPU, 8192^2 on
  CUDA) and of a large 3x3 convolution, measured in this process with the current thread count:
  on CPU fp32 and bf16, on CUDA fp32 (TF32 off), tf32 and bf16. The better of the two kernels
  is the ceiling a stage's achieved GFLOP/s is set against ("peak").
* ``rate_row(...)``: one benchmark row: images/s, GFLOP/s achieved, % of the matching peak.

On CUDA, fp32 convolutions use TF32 tensor cores by default (``cudnn.allow_tf32``), so fp32
rows there are set against the tf32 peak.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

_PEAK_CACHE: dict[str, dict[str, float]] = {}
#: ``auto`` (CUDA when torch sees one), ``cpu`` or ``cuda``; an environment variable rather than
#: an argument so that the subprocesses and Ray actors a part starts measure on the same device.
DEVICE_ENV = "UE_DIST_BENCH_DEVICE"
DEVICES = ("auto", "cpu", "cuda")


def bench_device() -> torch.device:
    """The device every part measures on (``python -m ue_dist.bench --device``)."""
    import os

    name = os.environ.get(DEVICE_ENV, "auto")
    if name not in DEVICES:
        raise ValueError(f"{DEVICE_ENV}={name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the benchmark was asked for CUDA, but torch {torch.__version__} sees "
                           "no CUDA device")
    return torch.device(name)


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (only around timings; never inside the timed loops)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], Any], repeats: int, device: torch.device | str) -> float:
    """Best wall time of ``repeats`` calls (best-of: the least disturbed run on a shared machine)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: its module hooks make
    ``torch.autograd.grad`` w.r.t. a leaf input (every PGD step) raise, and only the total is
    needed here."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs dispatched by ``fn()`` (forward and any backward it runs)."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def pass_flops(model: torch.nn.Module, device: torch.device | str, channels: int = 3,
               size: int = 32) -> dict[str, float]:
    """FLOPs per image of one forward+backward of ``model``: w.r.t. the input only (a PGD step:
    ``input_grad``) and w.r.t. the weights too (a training step: ``train_step``)."""
    import copy

    import torch.nn.functional as F

    x = torch.rand(2, channels, size, size, device=device, requires_grad=True)
    y = torch.tensor([0, 1], device=device)
    net = copy.deepcopy(model).requires_grad_(False)
    to_input = count_flops(lambda: torch.autograd.grad(F.cross_entropy(net(x), y), x))
    net.requires_grad_(True).train()
    full = count_flops(lambda: F.cross_entropy(net(x), y).backward())
    return {"input_grad": to_input / 2, "train_step": full / 2}


def _set_tf32(device: torch.device, on: bool) -> tuple[bool, bool] | None:
    if device.type != "cuda":
        return None
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return saved


def _restore_tf32(saved: tuple[bool, bool] | None) -> None:
    if saved is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_peak(device: torch.device | str, n: int | None = None,
                repeats: int = 3, smoke: bool = False) -> dict[str, float]:
    """The best dense-kernel GFLOP/s per precision, measured now (cached per device/threads).

    Two kernels per precision: an ``n x n`` matrix product (``matmul_<kind>``) and a 3x3
    convolution, 256 channels at 16x16, channels_last (``conv3x3_<kind>``); ``<kind>`` alone is
    the larger of the two, the ceiling rows are set against. ``smoke``: tiny sizes (a test of
    the code, not a measurement). Both are needed: on AMD CPUs
    PyTorch's fp32 matmul goes through MKL's generic path and runs well below what oneDNN's
    convolutions reach on the same core, so the matmul alone is not the machine's limit.
    """
    dev = torch.device(device)
    key = f"{dev}-{torch.get_num_threads()}-{smoke}"
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    cuda = dev.type == "cuda"
    # smoke (``--scale small``): tiny kernels, so that the code runs in seconds; not a peak
    n = n or (256 if smoke else 8192 if cuda else 4096)
    batch = 2 if smoke else 1024 if cuda else 64
    repeats = max(repeats, 10) if cuda else repeats
    kinds = ["fp32", "tf32", "bf16"] if cuda else ["fp32", "bf16"]
    out: dict[str, float] = {}
    gen = torch.Generator(device=dev).manual_seed(0)
    for kind in kinds:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        saved = _set_tf32(dev, kind == "tf32")
        try:
            a = torch.randn(n, n, device=dev, generator=gen).to(dtype)
            b = torch.randn(n, n, device=dev, generator=gen).to(dtype)
            a @ b  # warm-up (oneDNN / cuBLAS kernel choice)
            out[f"matmul_{kind}"] = 2.0 * n ** 3 / best_seconds(lambda: a @ b, repeats, dev) / 1e9
            del a, b
            cl = torch.channels_last
            x = torch.randn(batch, 256, 16, 16, device=dev, generator=gen).to(dtype)
            w = torch.randn(256, 256, 3, 3, device=dev, generator=gen).to(dtype)
            x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
            conv = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
            conv()
            flops = 2.0 * batch * 256 * 256 * 9 * 16 * 16
            out[f"conv3x3_{kind}"] = flops / best_seconds(conv, repeats, dev) / 1e9
            del x, w
        finally:
            _restore_tf32(saved)
        out[kind] = max(out[f"matmul_{kind}"], out[f"conv3x3_{kind}"])
    _PEAK_CACHE[key] = out
    return out


def peak_for(precision: str, device: torch.device | str, peaks: dict[str, float]) -> tuple[str, float]:
    """The peak a row of this precision is set against (fp32 convs on CUDA run as TF32)."""
    dev = torch.device(device)
    if precision == "bf16":
        return "bf16", peaks["bf16"]
    if dev.type == "cuda" and torch.backends.cudnn.allow_tf32 and "tf32" in peaks:
        return "tf32", peaks["tf32"]
    return "fp32", peaks["fp32"]


def rate_row(images: float, seconds: float, flops_per_image: float, precision: str,
             device: torch.device | str, peaks: dict[str, float]) -> dict[str, Any]:
    """images/s, achieved GFLOP/s and % of the matching matmul peak for one timed run."""
    ips = images / seconds
    gflops = ips * flops_per_image / 1e9
    kind, peak = peak_for(precision, device, peaks)
    return {"images_per_s": ips, "gflop_per_image": flops_per_image / 1e9,
            "gflops": gflops, "peak_kind": kind, "pct_of_peak": 100.0 * gflops / peak}


def describe(row: dict[str, Any]) -> str:
    return (f"{row['images_per_s']:9.2f} img/s  {row['gflops']:7.1f} GFLOP/s "
            f"({row['pct_of_peak']:5.1f}% of {row['peak_kind']} peak)")


def print_peaks(device: torch.device | str, peaks: dict[str, float]) -> None:
    kinds = [k for k in peaks if "_" not in k]
    shown = "; ".join(f"{k} {peaks[k]:.0f} (matmul {peaks['matmul_' + k]:.0f}, conv3x3 "
                      f"{peaks['conv3x3_' + k]:.0f})" for k in kinds)
    print(f"peak GFLOP/s on {device} ({torch.get_num_threads()} threads): {shown}", flush=True)
