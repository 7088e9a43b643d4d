"""DeepConfuse: the pseudo-update objective and its gradient, the two players' steps, resume, and
(slow) whether it protects the digits."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ue_dist.core.context import LocalContext
from ue_dist.core.models import build_model
from ue_dist.core.unet import UNetGenerator
from ue_dist.methods.deepconfuse import DeepConfuse, confuse_step, pseudo_update_objective
from helpers import digits_clean_and_protected


pytestmark = pytest.mark.usefixtures("one_thread")


def _players(lr=0.05, gen_lr=1e-3, dtype=torch.float32):
    torch.manual_seed(0)
    gen = UNetGenerator(3, 8 / 255, 4).to(dtype)
    cls = build_model("small-cnn", 4, 3, 8).to(dtype)
    return {"gen": gen, "atk": copy.deepcopy(gen).eval().requires_grad_(False), "cls": cls,
            "gen_opt": torch.optim.Adam(gen.parameters(), lr=gen_lr),
            "cls_opt": torch.optim.SGD(cls.parameters(), lr=lr)}


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g).to(dtype), torch.arange(16) % 4


def test_generator_gradient_is_the_derivative_through_the_pseudo_update():
    """float64 central differences along a random direction of the generator's weights agree
    with autograd's second-order gradient; with a zero classifier step it is exactly zero. The
    classifier is smooth here (softplus): a ReLU network's gradient jumps where a unit switches,
    so its pseudo-update is only piecewise smooth and differences across a jump mean nothing."""
    torch.manual_seed(0)
    gen = UNetGenerator(3, 8 / 255, 4).double()
    cls = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                              torch.nn.Softplus(), torch.nn.Flatten(),
                              torch.nn.Linear(6 * 64, 4)).double()
    x, y = _batch(torch.float64)
    w = [q for q in gen.parameters()]

    def objective():
        return pseudo_update_objective(gen, cls, x, y, lr=0.5)[1]

    grads = torch.autograd.grad(objective(), w)
    torch.manual_seed(2)
    direction = [torch.randn_like(q) for q in w]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h = 1e-6
    with torch.no_grad():
        for q, d in zip(w, direction):
            q.add_(h * d)
    up = objective().detach()
    with torch.no_grad():
        for q, d in zip(w, direction):
            q.sub_(2 * h * d)
    down = objective().detach()
    numeric = (up - down) / (2 * h)
    assert float(analytic) != 0.0
    assert float(numeric) == pytest.approx(float(analytic), rel=1e-4)
    # lr = 0: theta' = theta, the clean loss does not depend on the generator
    zero = torch.autograd.grad(pseudo_update_objective(gen, cls, x, y, lr=0.0)[1], w,
                               allow_unused=True, materialize_grads=True)
    assert all(float(g.abs().max()) == 0.0 for g in zero)


def test_step_ascends_through_the_generator_and_trains_the_classifier_on_the_frozen_one():
    p = _players()
    x, y = _batch()
    ref_cls = copy.deepcopy(p["cls"])
    atk_before = {k: v.clone() for k, v in p["atk"].state_dict().items()}
    w_before = [q.detach().clone() for q in p["gen"].parameters()]
    m = confuse_step(p, x, y, {"precision": "fp32"})
    # the generator moved; the frozen copy did not
    assert any(not torch.equal(a, b) for a, b in zip(w_before, p["gen"].parameters()))
    for k, v in p["atk"].state_dict().items():
        assert torch.equal(v, atk_before[k]), k
    # the classifier took exactly one SGD step on the frozen generator's images (train-mode BN
    # normalises by the batch, so the pseudo forward's statistics do not enter it)
    ref_cls.train()
    with torch.no_grad():
        x_atk = (x + p["atk"](x)).clamp(0, 1)
    loss = F.cross_entropy(ref_cls(x_atk), y)
    grads = torch.autograd.grad(loss, list(ref_cls.parameters()))
    for q, ref, g in zip(p["cls"].parameters(), ref_cls.parameters(), grads):
        torch.testing.assert_close(q.detach(), ref.detach() - 0.05 * g, rtol=1e-5, atol=1e-6)
    assert m["clean_loss_after"] > 0 and m["poison_loss"] > 0
    # the generator's step raised the clean loss after the pseudo-update (same classifier)
    after = pseudo_update_objective(p["gen"], ref_cls, x, y, 0.05)[1]
    assert float(after.detach()) > m["clean_loss_after"]


def _tiny():
    from ue_dist.data.sources import digits_imageset

    return digits_imageset("train", image_size=None).subset(range(64))


TINY = {"width": 4, "cls_width": 4, "epochs": 2, "cls_epochs": 1, "batch_size": 16,
        "log_every": 1}


def test_fit_checkpoints_each_round_and_resumes_to_the_same_generator():
    data = _tiny()
    method = DeepConfuse(DeepConfuse.resolve("quick", TINY))
    ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    state = method.fit(data, ctx)
    assert [h["epoch"] for h in ctx.history if "round_poison_loss" in h] == [1, 2]
    assert state["method"] == "deepconfuse" and "training" not in state
    assert ctx.last_state["training"]["epoch"] == 2
    one_ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    DeepConfuse(DeepConfuse.resolve("quick", TINY | {"epochs": 1})).fit(data, one_ctx)
    resumed_ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    resumed_ctx.last_state = one_ctx.last_state
    resumed = method.fit(data, resumed_ctx)
    assert [h["epoch"] for h in resumed_ctx.history if "round_poison_loss" in h] == [2]
    for k, v in state["generator"].items():
        torch.testing.assert_close(resumed["generator"][k], v, msg=k)


def test_selection_keeps_the_round_with_the_lowest_held_out_score():
    data = _tiny()
    method = DeepConfuse(DeepConfuse.resolve("quick", TINY | {
        "val_fraction": 0.25, "select_every": 1, "select_epochs": 1}))
    ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    state = method.fit(data, ctx)
    scores = [h["val_acc"] for h in ctx.history if "val_acc" in h]
    assert len(scores) == 2 and state["val_count"] == 16
    assert state["selection_val_acc"] == min(scores)
    assert state["selected_epoch"] == 1 + max(i for i, v in enumerate(scores) if v == min(scores))


@pytest.mark.slow
@pytest.mark.xfail(reason="the quick preset (6 rounds) weakens a converged victim but does not "
                          "protect: measured 86.9 % after 24 epochs (64.7 % after 8; clean 98.3 % at 24); "
                          "gen_lr 1e-2: 96.1 %; cls_lr 0.1 with 8 epochs per round: 97.8 %. The "
                          "authors train 1,000 rounds", strict=False)
def test_deepconfuse_makes_digits_unlearnable():
    """Quick preset on the 1,437 training digits; victims: quick small CNN, 24 epochs. Fit:
    about 11 minutes on one thread (shared machine)."""
    method = DeepConfuse(DeepConfuse.resolve("quick"))
    clean, poisoned = digits_clean_and_protected(method)
    print(f"\nDeepConfuse digits (24-epoch victims): clean {clean:.3f}, protected {poisoned:.3f}")
    assert clean > 0.9
    assert poisoned < clean - 0.4
