"""The one supervised training loop: victims, REM/EM/TAP source models, the Bayes embedding model
and its retrainer all train through :class:`TrainLoop`; each supplies only its data (``fetch``)
and its loss (``loss``).

What the loop owns, so that every trainer does it the same way:

* **batch order** (:class:`BatchOrder`): per epoch one seeded permutation shared by every worker;
  each worker takes its contiguous slice of it and a shorter slice wraps around to the start of
  the shared permutation, so every worker takes the same number of steps (DDP all-reduces every
  one). The global batch is split over the workers; a batch of one sample is skipped (it breaks
  batch norm) unless the data hold a single sample. Step-counted trainers (REM's source model)
  run through epochs of this order one batch at a time, like a cycled shuffling DataLoader in the
  REM authors' code.
* **the optimiser** (SGD with momentum and weight decay) and its learning-rate schedule, stepped
  per epoch or per step;
* **device, precision, DDP**: the model is put in channels_last where bf16/CUDA want it, then
  wrapped by ``ctx.prepare_model``; the loss runs under ``precision`` autocast;
* **randomness**: one CPU generator per worker for whatever the loss draws (augmentation, PGD
  starts, noise), seeded from (seed, rank);
* **metrics**: running sums on the device (one host synchronisation per read), averaged over
  workers by :meth:`TrainLoop.take_metrics`;
* **checkpoints**: :meth:`TrainLoop.state_dict` / :meth:`TrainLoop.load_state_dict` carry the
  model, optimiser, schedule, both generators and the position in the order, so a run resumed
  from a checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ue_dist.core.augment import augment
from ue_dist.core.context import FitContext
from ue_dist.core.precision import autocast, prepare_model, resolve_precision, upcast

Fetch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# loss(net, x, y, generator) -> (scalar loss, logits for the accuracy meter)
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator],
                tuple[torch.Tensor, torch.Tensor]]
Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def cosine_schedule(periods: int) -> Schedule:
    """Cosine annealing to 0 over ``periods`` scheduler steps."""
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, periods))


def step_schedule(milestones: list[int], gamma: float = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` at each milestone."""
    return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones,
                                                            gamma=gamma)


def decay_every_schedule(every: int, decay: float) -> Schedule:
    """``lr * decay ** (t // every)``: the REM source model's step decay."""
    every = max(1, int(every))
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(decay) ** (t // every))


def constant_schedule() -> Schedule:
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous: a channels_last (bf16) run checkpoints the same NCHW tensors as an fp32 run
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def cross_entropy_loss(augmentation: str = "none") -> Loss:
    """Plain supervised training: augment (``core.augment`` kind), then CE."""
    def loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logits = upcast(net(augment(x, augmentation, generator=generator)))
        return F.cross_entropy(logits, y), logits

    return loss


def uint8_fetch(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Fetch:
    """Batches of uint8 images (moved to the device first, then scaled to [0, 1]) and labels."""
    return lambda idx: (images[idx].to(device).float().div_(255.0), labels[idx].to(device))


class BatchOrder:
    """This worker's batches of ``range(n)``, epoch after epoch (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, ctx: FitContext, seed: int) -> None:
        self.n = int(n)
        self.ctx = ctx
        self.per_worker = max(1, int(batch_size) // ctx.world_size)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.mine = ctx.shard_indices(self.n) if ctx.distributed else None

    def batches_per_epoch(self) -> int:
        """How many batches :meth:`epoch` returns (drawn on a copy: the order is untouched)."""
        state = self.generator.get_state()
        try:
            return len(self.epoch())
        finally:
            self.generator.set_state(state)

    def epoch(self) -> list[torch.Tensor]:
        """Draw the next epoch's permutation; its batches for this worker."""
        perm = torch.randperm(self.n, generator=self.generator)
        if self.mine is not None:
            per = math.ceil(self.n / self.ctx.world_size)
            perm = torch.cat([perm[self.mine], perm[:per - len(self.mine)]])
        batches = [perm[i:i + self.per_worker] for i in range(0, len(perm), self.per_worker)]
        if len(perm) >= 2:
            batches = [b for b in batches if len(b) >= 2]
        return batches


class TrainLoop:
    """SGD on ``loss(net, *fetch(batch), generator)`` over a :class:`BatchOrder`.

    ``model`` is the bare module (built by the caller with its seed); the loop moves it to
    ``ctx.device``, prepares its memory format for ``precision`` and wraps it for DDP. ``schedule``
    builds the learning-rate scheduler; it is stepped once per epoch (``schedule_per="epoch"``)
    or once per step (``"step"``). ``generator_seed`` seeds the per-worker generator handed to
    ``loss`` (default ``seed * 1000 + 1``, plus the rank).
    """

    def __init__(self, model: nn.Module, ctx: FitContext, *, n: int, batch_size: int, seed: int,
                 lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 precision: str = "fp32", schedule: Schedule | None = None,
                 schedule_per: str = "epoch", generator_seed: int | None = None) -> None:
        if schedule_per not in ("epoch", "step"):
            raise ValueError(f"schedule_per must be 'epoch' or 'step', got {schedule_per!r}")
        self.ctx = ctx
        self.device = ctx.device
        self.precision = resolve_precision(precision, self.device)
        # channels_last before DDP wraps it (bf16 / CUDA only; fp32 on CPU stays NCHW)
        self.net = ctx.prepare_model(prepare_model(model.to(self.device), self.device,
                                                   self.precision))
        self.model = unwrap(self.net)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=float(lr),
                                         momentum=float(momentum), weight_decay=float(weight_decay))
        self.scheduler = (schedule or constant_schedule())(self.optimizer)
        self.schedule_per = schedule_per
        self.order = BatchOrder(n, batch_size, ctx, seed)
        base = int(seed) * 1000 + 1 if generator_seed is None else int(generator_seed)
        self.generator = torch.Generator().manual_seed(base + ctx.rank)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed steps
        self._batches: list[torch.Tensor] = []
        self._pos = 0  # next batch of the current epoch
        self._order_at_epoch: torch.Tensor | None = None
        self._reset_meter()

    # one step / one epoch ------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _next_batch(self) -> torch.Tensor:
        if self._pos >= len(self._batches):
            self._order_at_epoch = self.order.generator.get_state()
            self._batches, self._pos = self.order.epoch(), 0
        batch = self._batches[self._pos]
        self._pos += 1
        return batch

    def train_step(self, fetch: Fetch, loss_fn: Loss) -> None:
        """One optimiser step on the next batch (drawing a new epoch's order when one ends)."""
        x, y = fetch(self._next_batch())
        self.net.train()
        with autocast(self.device, self.precision):
            loss, logits = loss_fn(self.net, x, y, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._meter_loss += loss.detach() * len(y)
        self._meter_correct += (logits.detach().argmax(1) == y).sum()
        self._meter_count += len(y)
        self.step += 1
        if self.schedule_per == "step":
            self.scheduler.step()

    def train_epoch(self, fetch: Fetch, loss_fn: Loss, stop_at: int | None = None) -> float:
        """The rest of the current epoch of the order (all of a fresh one), then the per-epoch
        schedule step; returns the learning rate the epoch ran at. ``stop_at``: end the epoch
        early once ``step`` reaches it (the last, partial epoch of a step-counted run)."""
        self.train_step(fetch, loss_fn)
        while self._pos < len(self._batches) and (stop_at is None or self.step < stop_at):
            self.train_step(fetch, loss_fn)
        lr = self.lr
        self.epoch += 1
        if self.schedule_per == "epoch":
            self.scheduler.step()
        return lr

    # metrics -------------------------------------------------------------------------------------
    def _reset_meter(self) -> None:
        # running sums stay on the device: one host synchronisation per read, not per step
        self._meter_loss = torch.zeros((), device=self.device)
        self._meter_correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._meter_count = 0

    @property
    def samples_seen(self) -> int:
        return self._meter_count

    def take_metrics(self) -> dict[str, float]:
        """Mean training loss and accuracy since the last call, averaged over workers."""
        count = max(self._meter_count, 1)
        out = {"train_loss": self.ctx.all_reduce_mean(float(self._meter_loss) / count),
               "train_acc": self.ctx.all_reduce_mean(int(self._meter_correct) / count)}
        self._reset_meter()
        return out

    # checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (CPU copies)."""
        return {"model": cpu_state_dict(self.model),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(),
                "order_gen": (self._order_at_epoch if self._pos < len(self._batches)
                              else self.order.generator.get_state()),
                "batch_pos": self._pos if self._pos < len(self._batches) else 0,
                "generator": self.generator.get_state(), "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order.generator.set_state(state["order_gen"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._batches, self._pos = [], 0
        if int(state["batch_pos"]) > 0:  # resume inside an epoch: redraw it, skip what was done
            self._order_at_epoch = self.order.generator.get_state()
            self._batches, self._pos = self.order.epoch(), int(state["batch_pos"])
