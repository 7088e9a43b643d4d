"""The GUE generator: shapes, the paper's parameter count, the eps bound by construction."""
import pytest
import torch

from ue_dist.core.unet import UNetGenerator, count_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_width_has_7_79_million_parameters():
    # the authors' U-Net (double conv 64/128/256/512, 1x1 conv + BN head) on RGB images
    n = count_parameters(UNetGenerator(3, 8 / 255, 64))
    assert n == 7_788_681
    assert round(n / 1e6, 2) == 7.79


def test_width_scales_parameters_quadratically():
    small, large = (count_parameters(UNetGenerator(3, 8 / 255, w)) for w in (8, 16))
    assert 3.5 < large / small < 4.1


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 1, 8, 8), (2, 3, 13, 7), (2, 3, 1, 1)])
def test_output_has_input_shape(shape):
    gen = UNetGenerator(shape[1], 8 / 255, 4)
    assert gen(torch.rand(shape)).shape == torch.Size(shape)


@pytest.mark.parametrize("train_mode", [True, False])
def test_bound_holds_even_when_saturated(train_mode):
    torch.manual_seed(0)
    eps = 4 / 255
    gen = UNetGenerator(3, eps, 4).train(train_mode)
    with torch.no_grad():  # blow the head up so tanh saturates
        gen.head[0].weight.mul_(1e4)
        gen.head[1].weight.mul_(1e3)
    x = torch.rand(4, 3, 16, 16)
    delta = gen(x)
    assert delta.abs().max() <= eps + 1e-7
    assert delta.abs().max() > 0.9 * eps  # saturated: the bound is reached, not just respected
    xp = gen.perturbed(x)
    assert xp.min() >= 0 and xp.max() <= 1
    assert (xp - x).abs().max() <= eps + 1e-7


def test_gradients_reach_every_parameter():
    gen = UNetGenerator(3, 8 / 255, 4)
    gen(torch.rand(2, 3, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_eval_mode_is_batch_independent():
    torch.manual_seed(0)
    gen = UNetGenerator(3, 8 / 255, 4)
    gen(torch.rand(16, 3, 8, 8))  # update running statistics
    gen.eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        whole = gen(x)
        single = torch.cat([gen(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(channels=0), dict(width=0), dict(eps=0.0)])
def test_bad_arguments_are_refused(kwargs):
    args = dict(channels=3, eps=8 / 255, width=4) | kwargs
    with pytest.raises(ValueError):
        UNetGenerator(**args)
