"""CPU-drawn random numbers onto the compute device without stalling it.

Every random draw of PGD starts, EOT crops/flips and defences comes from a CPU generator (the
same numbers on any device: reproducible across CPU and GPU runs). A plain ``.to("cuda")`` of a
pageable CPU tensor waits for the copy, and with it for the work queued before it on the
stream; REM makes three such copies per noise descent step. ``to_device`` copies from pinned
memory without blocking, so the host keeps queueing kernels (PyTorch's pinned-memory allocator
keeps the buffer alive until its copy is done). Elsewhere it is ``.to(device)``.
Pure torch (no ray).
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``; on CUDA an asynchronous copy from pinned memory."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
