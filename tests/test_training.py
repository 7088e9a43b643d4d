"""The shared training loop (core/training.py) and adversarial training (core/adversarial.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ue_dist.core.adversarial import (adversarial_examples, adversarial_loss, evaluating,
                                      robust_accuracy)
from ue_dist.core.context import LocalContext
from ue_dist.core.training import (BatchOrder, TrainLoop, cosine_schedule, cross_entropy_loss,
                                   decay_every_schedule)


class FakeWorker(LocalContext):
    """One of ``world`` workers, without torch.distributed (for the batch order only)."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__(device="cpu", log=lambda _m: None)
        self._rank, self._world = rank, world

    distributed = property(lambda self: True)
    rank = property(lambda self: self._rank)
    world_size = property(lambda self: self._world)


def test_batch_order_gives_every_worker_the_same_steps_over_one_shared_permutation():
    n, batch = 23, 8
    orders = [BatchOrder(n, batch, FakeWorker(r, 3), seed=5) for r in range(3)]
    epochs = [o.epoch() for o in orders]
    assert len({len(e) for e in epochs}) == 1  # DDP all-reduces every step: equal counts
    assert all(len(b) == batch // 3 for e in epochs for b in e[:-1])
    seen = torch.cat([torch.cat(e) for e in epochs])
    assert set(seen.tolist()) == set(range(n))  # the wrapped tail repeats, nothing is left out
    # the same seed draws the same permutation on every worker (slices of one order)
    again = BatchOrder(n, batch, FakeWorker(0, 3), seed=5).epoch()
    assert all(torch.equal(a, b) for a, b in zip(again, epochs[0]))
    single = BatchOrder(9, 4, LocalContext(device="cpu"), seed=0).epoch()
    assert [len(b) for b in single] == [4, 4]  # a batch of one would break batch norm


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _loop(model):
    return TrainLoop(model, LocalContext(device="cpu", log=lambda _m: None), n=40, batch_size=6,
                     seed=3, lr=0.1, weight_decay=5e-4, schedule=decay_every_schedule(4, 0.5),
                     schedule_per="step")


def test_resume_inside_an_epoch_continues_exactly_like_the_uninterrupted_run():
    x, y = _data()
    fetch = lambda idx: (x[idx], y[idx])  # noqa: E731
    loss = cross_entropy_loss("crop-flip")  # draws from the loop's generator too
    full = _loop(_model())
    for _ in range(11):
        full.train_step(fetch, loss)
    part = _loop(_model())
    for _ in range(3):  # 3 of the 6 batches of the first epoch
        part.train_step(fetch, loss)
    state = part.state_dict()
    assert state["batch_pos"] == 3 and state["step"] == 3
    resumed = _loop(_model())
    resumed.load_state_dict(state)
    for _ in range(8):
        resumed.train_step(fetch, loss)
    assert resumed.step == 11 and resumed.lr == full.lr == 0.1 * 0.5 ** 2
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_epoch_steps_the_epoch_schedule_and_reports_means():
    x, y = _data()
    loop = TrainLoop(_model(), LocalContext(device="cpu"), n=40, batch_size=8, seed=0, lr=0.2,
                     schedule=cosine_schedule(2))
    lr = loop.train_epoch(lambda idx: (x[idx], y[idx]), cross_entropy_loss())
    assert lr == 0.2 and loop.epoch == 1 and loop.step == 5 and loop.samples_seen == 40
    assert abs(loop.lr - 0.1) < 1e-12  # half-way down the cosine
    metrics = loop.take_metrics()
    assert metrics["train_loss"] > 0 and 0 <= metrics["train_acc"] <= 1
    assert loop.samples_seen == 0


def test_adversarial_examples_stay_in_the_ball_and_keep_the_inputs_graph():
    model = _model().eval()
    x, y = _data(12)
    eps = 4 / 255
    for method in ("pgd", "trades"):
        xg = x.clone().requires_grad_(True)
        adv = adversarial_examples(model, xg, y, method=method, eps=eps, step_size=eps / 4,
                                   steps=3, generator=torch.Generator().manual_seed(1))
        d = (adv - x).detach()
        assert d.abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        loss, logits = adversarial_loss(model, xg, adv, y, method=method, beta=1.0)
        (grad,) = torch.autograd.grad(loss, xg)  # GUE's generator gradient flows through x
        assert grad.abs().sum() > 0 and logits.shape == (12, 4)
    # TRADES starts at x + 0.001 N(0, 1) (its authors' code), PGD-AT uniformly in the ball
    start = adversarial_examples(model, x, y, method="trades", eps=eps, step_size=eps / 4,
                                 steps=0, generator=torch.Generator().manual_seed(1)) - x
    assert start.abs().max() < 0.01 and start.std() > 0
    noise = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(start, noise.clamp(-eps, eps), atol=1e-7)


def test_trades_loss_is_ce_plus_beta_kl_and_robust_accuracy_counts():
    model = _model().eval()
    x, y = _data(10)
    x_adv = (x + 0.01).clamp(0, 1)
    loss, logits = adversarial_loss(model, x, x_adv, y, method="trades", beta=2.0)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
    assert torch.allclose(loss, F.cross_entropy(model(x), y) + 2.0 * kl, atol=1e-6)
    images = (x * 255).round().to(torch.uint8)
    clean = robust_accuracy(model, images, y, torch.arange(10), device=torch.device("cpu"))
    assert clean == int((model(images.float() / 255).argmax(1) == y).sum())
    attacked = robust_accuracy(model, images, y, torch.arange(10), device=torch.device("cpu"),
                               eps=8 / 255, steps=5)
    assert attacked <= clean


def test_evaluating_restores_the_training_mode():
    model = _model().train()
    with evaluating(model):
        assert not model.training
    assert model.training
