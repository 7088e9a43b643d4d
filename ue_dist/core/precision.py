"""Numerical precision of model forwards: ``fp32`` (default), ``bf16`` autocast, or ``auto``.

``bf16`` runs the *models* (convolutions, linear layers, and what autocast lowers with them)
in bfloat16 under ``torch.autocast``; everything around them stays fp32: PGD's ``delta``, its
signed step and projection, the epsilon contract, optimiser state and master weights. Losses are
taken on logits cast back to fp32, and the gradient w.r.t. an fp32 input comes back fp32, so a
``bf16`` run changes *how the gradient is computed*, never the bound the output satisfies.

``auto`` is ``bf16`` where the hardware runs it fast (CUDA with ``is_bf16_supported()``; a CPU
whose oneDNN reports bf16 support, i.e. AVX-512 BF16 / AMX) and ``fp32`` elsewhere. The
tolerances that justify it are measured in ``tests/test_precision.py``.

Memory format: ``channels_last`` (NHWC) is what oneDNN's bf16 kernels and cuDNN's tensor-core
kernels want; ``use_channels_last`` says when to convert a model (bf16 anywhere, any precision
on CUDA). On CPU in fp32 the model stays NCHW so that fp32 results are bit-for-bit what they
were before this module existed, although NHWC is faster there too (measured, 1 thread, fp32
forward+backward: small CNN x1.35, ResNet-18 x1.08; a 3x3 convolution x1.5).

``auto`` resolves per device, so the same settings can give bf16 on one machine and fp32 on
another: protected outputs are then equally strong but not bit-identical across machines.
Pure torch (no ray).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ue_dist.core.config import SettingsError

PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(value: Any, option: str = "precision") -> str:
    """Return ``value`` if it is one of ``PRECISIONS``; else a ``SettingsError`` naming ``option``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise SettingsError(f"{option} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def bf16_is_fast(device: torch.device | str | None) -> bool:
    """True where bf16 matmuls/convolutions run on native hardware (not emulated)."""
    dev = _device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        try:  # oneDNN's own check: avx512_bf16 / amx_bf16 (private op; absent on some builds)
            return bool(torch.backends.mkldnn.is_available()
                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(value: Any, device: torch.device | str | None) -> str:
    """``fp32`` or ``bf16`` for this device (``auto``: bf16 only where it is fast)."""
    value = check_precision(value)
    if value == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return value


def autocast(device: torch.device | str | None, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 for ``precision`` ``bf16``/``auto``-on-fast-hardware.

    For ``fp32`` it is an explicit ``enabled=False`` region, so an fp32 call nested in a bf16
    region really runs fp32 (and outside any autocast region it changes nothing).
    """
    dev = _device(device)
    if dev.type not in ("cpu", "cuda"):
        if resolve_precision(precision, dev) == "bf16":
            raise SettingsError(f"precision=bf16 is supported on cpu and cuda devices, not {dev.type!r}")
        return contextlib.nullcontext()
    enabled = resolve_precision(precision, dev) == "bf16"
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def use_channels_last(device: torch.device | str | None, precision: str) -> bool:
    """Convert models to NHWC? Yes for bf16 (oneDNN / tensor cores want it) and on CUDA."""
    return resolve_precision(precision, device) == "bf16" or _device(device).type == "cuda"


def prepare_model(model: nn.Module, device: torch.device | str | None, precision: str) -> nn.Module:
    """Put ``model``'s 4-d weights in channels_last where ``use_channels_last`` says so (in place;
    parameters keep their identity, so optimisers built before still hold them). Inputs need no
    conversion: oneDNN and cuDNN pick NHWC when the weight is NHWC, and 3-channel input images
    are cheap to reorder."""
    if use_channels_last(device, precision):
        model.to(memory_format=torch.channels_last)
    return model


def as_input(x: torch.Tensor, device: torch.device | str | None, precision: str) -> torch.Tensor:
    """A batch in the memory format the model prefers (a no-op for fp32 on CPU)."""
    if x.ndim == 4 and use_channels_last(device, precision):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 result (from an autocast region) back in fp32; any other dtype (fp32, a
    float64 reference model) unchanged, so fp32 and fp64 code paths are untouched."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def in_precision(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str | None,
                 precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a model forward) run under ``precision`` autocast, its result back in fp32."""
    def run(z: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return upcast(fn(z))
    return run
