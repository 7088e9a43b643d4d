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
