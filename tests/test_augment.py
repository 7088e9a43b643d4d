"""Per-sample differentiable crop+flip: exact pixel shifts, gradients, parameter replay."""
import pytest
import torch

from ue_dist.core.augment import (AUGMENTATIONS, apply_params, augment, default_augmentation,
                                  random_crop_flip, resolve_augmentation, sample_params)


def _reference(x, offsets, flips, pad):
    """Loop-per-sample reference: pad, slice, flip."""
    out = []
    h, w = x.shape[-2:]
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(x.shape[0]):
        r, c = offsets[i].tolist()
        v = xp[i, :, r:r + h, c:c + w]
        out.append(v.flip(-1) if flips[i] else v)
    return torch.stack(out)


def test_crop_flip_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 10, generator=g)
    params = sample_params("crop-flip", 16, generator=g, pad=3)
    assert params.offsets.min() >= 0 and params.offsets.max() <= 6
    assert params.flips.any() and (~params.flips).any()  # per-sample, not one draw for the batch
    assert len(set(map(tuple, params.offsets.tolist()))) > 1
    torch.testing.assert_close(apply_params(x, params), _reference(x, params.offsets, params.flips, 3))


def test_augment_is_differentiable_and_sample_independent():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    y = augment(x, "crop-flip", torch.Generator().manual_seed(1), pad=2)
    (grad,) = torch.autograd.grad(y[1].sum(), x)
    assert grad[1].abs().sum() > 0
    assert grad[[0, 2, 3]].abs().sum() == 0  # a sample's view depends on that sample only
    assert set(grad[1].unique().tolist()) <= {0.0, 1.0}  # exact shift: no interpolation


def test_same_generator_same_views_and_kinds():
    x = torch.rand(5, 3, 32, 32)
    a = random_crop_flip(x, 4, True, torch.Generator().manual_seed(3))
    b = augment(x, "crop-flip", torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    f = augment(x, "flip", torch.Generator().manual_seed(3))
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for i in range(5))
    assert augment(x, "none") is x
    assert set(AUGMENTATIONS) == {"crop-flip", "flip", "none"}


def test_params_slice_and_kind_resolution():
    x = torch.rand(6, 3, 32, 32)
    p = sample_params("crop-flip", 6, torch.Generator().manual_seed(5))
    torch.testing.assert_close(apply_params(x[2:4], p.slice(2, 4)), apply_params(x, p)[2:4])
    assert default_augmentation(32) == "crop-flip" and default_augmentation(8) == "flip"
    assert resolve_augmentation("auto", 32) == "crop-flip"
    assert resolve_augmentation("none", 32) == "none"
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        resolve_augmentation("rotate", 32)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "mixup")
    with pytest.raises(ValueError, match="parameters for 6 samples"):
        apply_params(x[:3], p)
