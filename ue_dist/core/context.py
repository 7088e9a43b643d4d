"""What a method's ``fit`` (or a victim trainer) sees of the process it runs in.

core and methods never import Ray. The runtime hands them a context: ``LocalContext`` in one
process (tests, notebooks), or the Ray Train one in ``ue_dist.runtime.train`` whose ``report``
writes checkpoints to the run's storage and whose ``resume`` returns the last one. When
``torch.distributed`` is initialised the same code shards its data and wraps its models in DDP.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from ue_dist.core.progress import ProgressLine


def format_metrics(metrics: dict[str, Any]) -> str:
    """``k=v`` pairs for a log line, floats to 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items())


class FitContext:
    def __init__(self, device: torch.device | str | None = None, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> None:
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.seed = seed
        self._log = log or (lambda msg: print(msg, flush=True))

    # distribution --------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device; wrap in DDP when several workers train it."""
        model = model.to(self.device)
        if self.distributed and any(p.requires_grad for p in model.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def shard_indices(self, n: int) -> torch.Tensor:
        """This worker's slice of ``range(n)``: contiguous, padded-free, equal sizes +-1."""
        per = math.ceil(n / self.world_size)
        return torch.arange(self.rank * per, min(n, (self.rank + 1) * per))

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    # reporting / checkpoints ---------------------------------------------------------------
    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """Record metrics; with ``state``, also a checkpoint a restarted run resumes from."""

    def resume(self) -> dict[str, Any] | None:
        """The state of the last checkpoint of this run, or None for a fresh start."""
        return None

    def log(self, message: str) -> None:
        if self.is_main:
            self._log(message)

    def progress(self, label: str, total: int, lines: int = 10) -> ProgressLine:
        """A progress line for a long stage, printed through ``log`` (so by the main worker
        only), ``lines`` times at most; the driver's console redraws it on a terminal."""
        return ProgressLine(label, total, self.log, lines=lines, tty=False)


class LocalContext(FitContext):
    """One process; keeps the reported metrics and the last checkpointed state in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[dict[str, Any]] = []
        self.last_state: dict[str, Any] | None = None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        self.history.append(dict(metrics))
        if state is not None:
            self.last_state = state

    def resume(self) -> dict[str, Any] | None:
        return self.last_state
