"""Shared PGD: bounds, direction (min / max), L2 ball, random start, nested use."""
import pytest
import torch
import torch.nn.functional as F

from ue_dist.core.pgd import pgd, project, random_init


def _linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def _ce(model, y):
    return lambda z: F.cross_entropy(model(z), y, reduction="sum")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("maximize", [True, False])
def test_pgd_bounds_and_direction(norm, maximize):
    model = _linear_model()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4
    eps = 8 / 255 if norm == "linf" else 0.5
    delta = pgd(_ce(model, y), x, eps=eps, step_size=eps / 4, steps=10, norm=norm,
                maximize=maximize, random_start=True, generator=torch.Generator().manual_seed(2))
    assert not delta.requires_grad
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        moved = F.cross_entropy(model(x + delta), y)
    assert (moved > clean + 0.05) if maximize else (moved < clean - 0.05)


def test_random_start_seeded_and_zero_eps():
    x = torch.rand(4, 3, 8, 8)
    a = random_init(x, 0.1, "linf", torch.Generator().manual_seed(0))
    b = random_init(x, 0.1, "linf", torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= 0.1 + 1e-7 and a.abs().max() > 0.05
    d = pgd(lambda z: z.sum(), x, eps=0.0, step_size=0.1, steps=3)
    assert d.abs().max() == 0
    assert project(torch.full((2, 3), 2.0), 1.0, "l2").norm(dim=1).max() <= 1.0 + 1e-6


def test_pgd_nested_inner_maximisation():
    """REM's use: loss_fn runs an inner PGD; the outer gradient still flows to the outer delta."""
    model = _linear_model()
    x = torch.rand(4, 3, 8, 8)
    y = torch.arange(4)

    def outer(z):
        da = pgd(_ce(model, y), z, eps=2 / 255, step_size=1 / 255, steps=3)
        return F.cross_entropy(model(z + da), y, reduction="sum")

    delta = pgd(outer, x, eps=8 / 255, step_size=2 / 255, steps=5, maximize=False)
    assert 0 < delta.abs().max() <= 8 / 255 + 1e-6


def test_pgd_rejects_bad_arguments():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown norm"):
        pgd(lambda z: z.sum(), x, eps=0.1, step_size=0.1, steps=1, norm="l1")
    with pytest.raises(ValueError, match="step_size > 0"):
        pgd(lambda z: z.sum(), x, eps=0.1, step_size=0.0, steps=1)


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_l2_adversarial_training_examples_stay_in_the_l2_ball_and_raise_the_loss(method):
    # REM App. E: PGD-AT / TRADES in the L2 ball; the step is the normalised gradient times the
    # step size, then the projection onto the ball (core/pgd, the REM authors' pgd_attacker.py)
    from ue_dist.core.adversarial import adversarial_examples

    model = _linear_model()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    y = torch.arange(8) % 4
    eps = 100 / 255  # REM Table 11's larger L2 radius
    x_adv = adversarial_examples(model, x, y, method=method, eps=eps, step_size=eps / 5,
                                 steps=10, norm="l2", generator=torch.Generator().manual_seed(3))
    d = (x_adv - x).flatten(1)
    assert d.norm(dim=1).max() <= eps + 1e-5
    assert d.norm(dim=1).min() > 0.9 * eps  # 10 steps of eps/5 reach the sphere
    # an L2 ball, not the L-inf one: some pixel moves by more than the L-inf radius would allow
    # at the same L2 budget spread evenly (eps / sqrt(d))
    assert d.abs().max() > 2 * eps / d.shape[1] ** 0.5
    # the attack beats a random direction of the same L2 length by far (CE for PGD-AT, the KL
    # to the clean prediction for TRADES)
    g = torch.Generator().manual_seed(4)
    rand = torch.randn(x.shape, generator=g)
    x_rand = x + rand / rand.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        objective = (lambda z: F.cross_entropy(model(z), y)) if method == "pgd" else \
            (lambda z: F.kl_div(F.log_softmax(model(z), 1), p, reduction="batchmean"))
        clean, moved, random = objective(x), objective(x_adv), objective(x_rand)
    assert moved > clean and moved - clean > 5 * (random - clean).abs(), (clean, moved, random)
