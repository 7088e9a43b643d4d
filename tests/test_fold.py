"""Batch norm folded into convolutions (core.fold): the same function and input gradients as the
model, weights refreshed from the live model, refused in training mode; REM/EM noise from the
folded model as strong as from the model itself."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ue_dist  # noqa: F401
from ue_dist.core.fold import BatchNormFolder, fold_batchnorm
from ue_dist.core.models import build_model
from ue_dist.methods.rem import robust_error_minimizing_noise


def _with_statistics(arch: str, seed: int = 0) -> nn.Module:
    """A model whose running statistics are not the initial 0 / 1 (else folding is trivial)."""
    torch.manual_seed(seed)
    model = build_model(arch, 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32) * 0.8 + 0.1)
    return model.eval()


@pytest.mark.parametrize("arch,pairs", [("small-cnn", 5), ("resnet18", 20), ("wrn-16-2", 7)])
def test_folded_model_is_the_same_function_with_the_same_input_gradient(arch, pairs):
    # float64: in fp32, rounding moves pre-activations across ReLU kinks often enough in
    # ResNet-18's 20 layers that the gradient's difference depends on the thread count
    model = _with_statistics(arch).double()
    folder = BatchNormFolder(model)
    assert len(folder.pairs) == pairs  # every conv -> bn; wrn's pre-activation bn1s stay
    folded = folder()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) or arch == "wrn-16-2"
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    out, out_f = model(x), folded(x)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), x)
    (g_f,) = torch.autograd.grad(F.cross_entropy(out_f, y), x)
    assert torch.allclose(out, out_f, atol=1e-9, rtol=1e-9)
    assert float((g - g_f).norm() / g.norm()) < 1e-6
    assert float((g - g_f).abs().max()) <= 1e-2 * float(g.abs().max())
    # the model itself is untouched: its own convolutions have no bias, its batch norms remain
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= pairs


def test_refresh_follows_the_live_weights_and_statistics_and_shares_the_rest():
    model = _with_statistics("small-cnn")
    folder = BatchNormFolder(model)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        before = folder()(x)
        model.net.features[0][1].running_mean.add_(0.3)  # a first-block batch norm (folded)
        model.net.fc.weight.mul_(2.0)  # not folded: shared with the folded module
        stale = folder.module(x)
        fresh, want = folder()(x), model(x)
    assert not torch.allclose(before, want)
    assert not torch.allclose(stale, want, atol=1e-4)  # the bn change needs a refresh...
    assert torch.allclose(fresh, want, atol=1e-5, rtol=1e-5)  # ...which picks it up
    assert folder.module.get_submodule("1.fc") is model.net.fc


def test_folding_refuses_batch_norm_in_training_mode_and_keeps_the_memory_format():
    model = _with_statistics("resnet18").to(memory_format=torch.channels_last)
    folder = BatchNormFolder(model)
    conv = folder().get_submodule(folder.pairs[0][0])
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.requires_grad
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        folder()


def test_a_model_with_nothing_to_fold_or_that_does_not_trace_is_returned_as_it_is():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_batchnorm(plain) is plain

    class Branchy(nn.Module):  # data-dependent control flow: symbolic tracing fails
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    branchy = Branchy().eval()
    assert fold_batchnorm(branchy) is branchy


@pytest.mark.parametrize("rho_a,eot", [(0.0, 1), (2 / 255, 2)])
def test_noise_from_the_folded_model_is_as_strong(rho_a, eot):
    """EM (rho_a = 0) and REM noise: the folded source model gives the same objective value to
    within a hair, and most pixels of the same noise (sign steps on near-zero gradients differ)."""
    model = _with_statistics("small-cnn", seed=1).requires_grad_(False)
    folded = fold_batchnorm(copy.deepcopy(model))
    x = torch.rand(16, 3, 32, 32)
    y = torch.arange(16) % 10
    kw = dict(eps=8 / 255, step_u=1.6 / 255, steps_u=5, rho_a=rho_a, step_a=rho_a / 5,
              steps_a=2 if rho_a else 0, eot_samples=eot,
              augmentation="crop-flip" if rho_a else "none")
    d = robust_error_minimizing_noise(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
    d_f = robust_error_minimizing_noise(folded, x, y, generator=torch.Generator().manual_seed(0),
                                        **kw)
    assert float((d_f.abs() - 8 / 255).max()) <= 1e-7
    assert float(((d - d_f).abs() < 1e-6).float().mean()) > 0.95
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        loss, loss_f = F.cross_entropy(model(x + d), y), F.cross_entropy(model(x + d_f), y)
    assert loss < clean and loss_f < clean
    assert abs(float(loss - loss_f)) < 0.02 * float(clean)
