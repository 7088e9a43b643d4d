"""Defence-aware EOT: the defences as differentiable views, their per-sample draw, and the methods
that optimise their noise through them."""
from __future__ import annotations

import pytest
import torch

from ue_dist.core.augment import AugParams, apply_params, augment, sample_params
from ue_dist.core.config import SettingsError
from ue_dist.core.defenses import (bdr, bdr_straight_through, eot_view, eot_views, jpeg,
                                   jpeg_differentiable, preprocess)
from ue_dist.methods.base import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=4, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, size, size, generator=g) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_differentiable_jpeg_is_close_to_the_codec_and_passes_gradients(channels):
    x8 = _images(c=channels)
    x = x8.float().div(255).requires_grad_(True)
    out = jpeg_differentiable(x, 10)
    reference = jpeg(x8, 10).float().div(255)
    assert out.shape == x.shape
    # a smooth stand-in for the real codec (PIL): close, not equal
    assert (out - reference).abs().mean() < 0.05
    assert (out - x).abs().mean() > 0.02  # ... and it does change the image
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bdr_straight_through_is_exact_forward_and_identity_backward():
    x8 = _images()
    x = x8.float().div(255).requires_grad_(True)
    out = bdr_straight_through(x, 2)
    assert torch.equal((out * 255).round().to(torch.uint8), bdr(x8, 2))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("spec", ["grayscale", "median", "gaussian", "mean"])
def test_filter_views_equal_the_defences_on_float_images(spec):
    x8 = _images()
    x = x8.float().div(255)
    got = (eot_view(spec)(x).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(got, preprocess(spec, x8))


@pytest.mark.parametrize("spec, message", [
    ("mixup", "batch defence; only the pre-processing"), ("foo", "eot_defences: unknown defense"),
    ("jpeg:quality=200", "eot_defences: defense 'jpeg': quality"), ("none", "no view")])
def test_unusable_views_are_refused_by_name(spec, message):
    with pytest.raises(SettingsError, match=message):
        eot_view(spec)
    with pytest.raises(SettingsError, match=message):
        build_method("em", "quick", [f"eot_defences={spec}"])


def test_views_are_drawn_per_sample_after_the_crops_and_applied_before_them():
    x = _images(n=64).float().div(255)
    views = eot_views("grayscale,bdr:bits=1")
    plain = sample_params("crop-flip", 64, torch.Generator().manual_seed(5))
    with_views = sample_params("crop-flip", 64, torch.Generator().manual_seed(5), views=views)
    # the crops are what they were without views: old noise is reproduced bit for bit
    assert torch.equal(plain.offsets, with_views.offsets)
    assert torch.equal(plain.flips, with_views.flips)
    assert set(with_views.choice.tolist()) == {0, 1, 2}
    out = apply_params(x, with_views)
    for i, view in enumerate((lambda z: z, *views)):
        idx = (with_views.choice == i).nonzero().flatten()
        want = apply_params(view(x[idx]), AugParams("crop-flip", plain.pad, plain.offsets[idx],
                                                    plain.flips[idx]))
        torch.testing.assert_close(out[idx], want)
    # a slice keeps each sample's view
    part = with_views.slice(10, 20)
    torch.testing.assert_close(apply_params(x[10:20], part), out[10:20])
    # without views nothing changes
    torch.testing.assert_close(apply_params(x, plain),
                               augment(x, "crop-flip", torch.Generator().manual_seed(5)))


def test_views_without_augmentation():
    x = _images(n=8).float().div(255)
    params = sample_params("none", 8, torch.Generator().manual_seed(1), views=eot_views(["bdr"]))
    out = apply_params(x, params)
    hit = params.choice == 1
    assert hit.any() and (~hit).any()
    assert torch.equal(out[~hit], x[~hit])
    assert torch.equal(out[hit], bdr_straight_through(x[hit], 2))


def _digits(n=48):
    from ue_dist.data.sources import digits_imageset

    return digits_imageset("train", image_size=16).subset(range(n))


@pytest.mark.parametrize("name, fit", [
    ("em", {"train_steps": 4, "batch_size": 16, "lr_decay_every": 4, "checkpoint_every": 0,
            "stop_acc": 0.0, "steps_u": 3}),
    ("tap", {"train_steps": 4, "batch_size": 16, "lr_decay_every": 4, "checkpoint_every": 0,
             "steps": 3}),
    ("shortcutgen", {"width": 4, "cls_width": 4, "epochs": 1, "batch_size": 16}),
    ("gue", {"width": 4, "cls_width": 4, "epochs": 1, "batch_size": 16, "inner_steps": 1}),
    ("deepconfuse", {"width": 4, "cls_width": 4, "epochs": 1, "cls_epochs": 1,
                     "batch_size": 16})])
def test_methods_take_the_views_into_their_noise(name, fit):
    """The same fit with and without views: different noise, both within the bound; the state
    records the views (fit-time for em/shortcutgen, protect-time for tap)."""
    from ue_dist.core.context import LocalContext
    from ue_dist.methods.protect import protect_uint8

    data = _digits()
    outs = {}
    for views in ([], ["jpeg", "bdr"]):
        method = build_method(name, "quick", {**fit, "eot_defences": views})
        state = method.fit(data, LocalContext(device="cpu", seed=0, log=lambda _m: None))
        assert state["settings"]["eot_defences"] == views
        outs[tuple(views)] = protect_uint8(method, method.load(state), data.images, data.labels)
        change = (outs[tuple(views)].int() - data.images.int()).abs().max()
        assert change <= 8
    assert not torch.equal(outs[()], outs[("jpeg", "bdr")])


def test_the_source_model_of_em_and_rem_learns_from_the_views_too():
    """In the min-min game the model step sees the defended images (else the noise would be made
    easy for a model that never saw a defence)."""
    from ue_dist.methods.rem import source_model_loss

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, z):
            seen.append(z.detach().clone())
            return self.fc(z.flatten(1))

    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1.0  # never 0
    y = torch.arange(32) % 4
    loss = source_model_loss(None, rho_a=0.0, step_a=0.0, steps_a=0, augmentation="none",
                             views=(torch.zeros_like,))
    loss(Recorder(), x, y, torch.Generator().manual_seed(1))
    zeroed = (seen[-1].flatten(1).abs().sum(1) == 0)
    assert zeroed.any() and (~zeroed).any()
    plain = source_model_loss(None, rho_a=0.0, step_a=0.0, steps_a=0, augmentation="none")
    plain(Recorder(), x, y, torch.Generator().manual_seed(1))
    assert torch.equal(seen[-1], x)


@pytest.mark.parametrize("channels", [1, 3])
def test_ueraser_view_draws_fresh_augmentations_and_passes_gradients(channels):
    view = eot_view("ueraser-lite")
    x = _images(n=8, c=channels).float().div(255).requires_grad_(True)
    first, second = view(x), view(x)
    assert first.shape == x.shape and 0 <= float(first.min()) and float(first.max()) <= 1
    assert (first - x).abs().mean() > 0.01       # it changes the image
    assert not torch.equal(first, second)        # and each call is a new draw
    # a new view repeats the draws (its generator is seeded)
    again = eot_view("ueraser-lite")
    torch.testing.assert_close(again(x), first)
    grads = 0
    for _ in range(6):
        x.grad = None
        view(x).sum().backward()
        assert torch.isfinite(x.grad).all()
        grads += int(x.grad.abs().sum() > 0)
    assert grads >= 3  # plasma brightness and contrast are differentiable


def test_em_takes_the_ueraser_view():
    method = build_method("em", "quick", ["eot_defences=ueraser-lite,jpeg:quality=10"])
    assert len(eot_views(method.settings["eot_defences"])) == 2
