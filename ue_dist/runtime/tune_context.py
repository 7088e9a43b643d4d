"""The FitContext of a Ray Tune trial (a sweep's victim): checkpoints go through Tune.

``report(metrics, state)`` is one ``tune.report`` whose checkpoint holds ``state`` (a victim's
epoch: model, optimiser, schedule and generator states, the records so far), so a trial that
Tune restarts after a failure (``FailureConfig``) finds it in ``resume()`` and continues at the
next epoch, with the results an uninterrupted trial would have had.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch

from ue_dist.core.context import FitContext

CHECKPOINT_FILE = "state.pt"


def numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of ``metrics`` (what Tune's results and reporters can hold)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class TuneTrialContext(FitContext):
    """Inside a Tune function trainable; ``after_report(metrics)`` runs once a report (and its
    checkpoint) is through, e.g. a test's fault injection."""

    def __init__(self, device: torch.device | str, seed: int,
                 after_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(device=device, seed=seed, log=lambda message: None)
        self.history: list[dict[str, Any]] = []
        self.after_report = after_report

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        from ray import tune

        metrics = numeric(metrics)
        self.history.append(metrics)
        if state is None:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:  # Tune copies it into the trial's storage
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if self.after_report is not None:
            self.after_report(dict(metrics))

    def resume(self) -> dict[str, Any] | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                              weights_only=True)
