"""The model-free baselines: LSP (L2 patches), AR (L2 autoregressive noise), OPS (one pixel, L0).

Fast tests check the properties each paper states (separate class patterns, the AR recurrence,
one pixel per image at the class's position) and the bound after quantisation; the
effectiveness checks (victims trained on fully protected digits) are marked slow:
``pytest tests/test_modelfree.py -m slow``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from ue_dist.core.config import SettingsError
from ue_dist.core.context import LocalContext
from ue_dist.core.quantize import changed_pixels
from ue_dist.data.imageset import ImageSet
from ue_dist.data.sources import digits_imageset
from ue_dist.methods.base import StateError, build_method
from ue_dist.methods.protect import protect_uint8


def _quiet():
    return LocalContext(device="cpu", log=lambda _: None)


@pytest.fixture(scope="module")
def digits():
    return digits_imageset("train"), digits_imageset("test")


@pytest.fixture(scope="module")
def small(digits):
    return digits[0].subset(range(200))


def _fit_protect(name, data, overrides=()):
    method = build_method(name, "quick", overrides)
    state = method.fit(data, _quiet())
    return method, state, protect_uint8(method, method.load(state), data.images, data.labels)


def _l2(before, after):
    d = (after.double() - before.double()) / 255.0
    return d.flatten(1).norm(dim=1)


# --- LSP ------------------------------------------------------------------------------------------
def test_lsp_patterns_are_class_wise_patches_within_the_l2_radius(small):
    method, state, out = _fit_protect("lsp", small)
    p = state["patterns"]
    assert p.shape == (10, 3, 32, 32)
    assert torch.allclose(p.flatten(1).norm(dim=1), torch.ones(10), atol=1e-5)
    # every pattern is constant on its 8 x 8 patches (one feature per patch and channel) ...
    blocks = p.view(10, 3, 4, 8, 4, 8)
    assert torch.allclose(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    # ... and the class patterns differ: far apart, linearly separable (the paper's point)
    dist = torch.cdist(p.flatten(1), p.flatten(1))
    assert float(dist[~torch.eye(10, dtype=torch.bool)].min()) > 0.5
    # after the contract: |x' - x|_2 <= eps per image, and images of a class share the pattern
    assert float(_l2(small.images, out).max()) <= method.eps + 1e-9
    assert float(_l2(small.images, out).mean()) > 0.5 * method.eps
    assert method.bound() == {"eps": pytest.approx(32 * np.sqrt(3) * 6 / 255), "norm": "l2"}


def test_lsp_eps_is_protect_time_and_labels_are_checked(small):
    method, state, _ = _fit_protect("lsp", small.subset(range(40)))
    smaller = type(method).for_state(state, ["eps=0.5"])
    out = protect_uint8(smaller, smaller.load(state), small.images[:40], small.labels[:40])
    assert float(_l2(small.images[:40], out).max()) <= 0.5 + 1e-9
    with pytest.raises(StateError, match="label 10 has no lsp class pattern"):
        method.perturb(method.load(state), small.float_images()[:2], torch.tensor([0, 10]))


def test_lsp_odd_sizes_and_tiny_feature_counts():
    # 10 x 7 single-channel images with 4-pixel patches: 3 x 2 patches, 6 features (64 vertices)
    x = torch.randint(0, 256, (30, 1, 10, 7), dtype=torch.uint8)
    data = ImageSet(x, torch.arange(30) % 10, [f"k{i}" for i in range(30)], num_classes=10)
    method, state, out = _fit_protect("lsp", data, ["patch_size=4", "eps=0.2"])
    assert state["patterns"].shape == (10, 1, 10, 7)
    assert float(_l2(x, out).max()) <= 0.2 + 1e-9
    signs = torch.sign(state["patterns"][:, 0, ::4, ::4].flatten(1))
    assert len({tuple(s.tolist()) for s in signs}) > 1


# --- AR -------------------------------------------------------------------------------------------
def test_ar_noise_follows_its_recurrence_and_classes_differ(small):
    from ue_dist.methods.ar import RELEASED_CIFAR10, residual

    method, state, out = _fit_protect("ar", small)
    b, noise = state["coefficients"], state["noises"]
    assert b.shape == (10, 3, 3, 3) and noise.shape == (10, 3, 32, 32)
    assert torch.allclose(b, torch.tensor(RELEASED_CIFAR10))  # the code's CIFAR-10 processes
    assert torch.all(b[..., -1, -1] == 0)
    assert torch.allclose(b.sum(dim=(2, 3)), torch.ones(10, 3), atol=2e-3)
    # the AR filter (coefficients, -1 at the generated entry) predicts every entry of its noise
    res = residual(b, noise)
    assert res.shape == (10, 3, 30, 30) and float(res.abs().max()) < 1e-5
    # ... while another class's filter does not (the processes are separable)
    other = residual(b.roll(1, dims=0), noise)
    assert float(other.abs().mean()) > 100 * float(res.abs().mean()) + 1e-4
    assert torch.allclose(noise.flatten(1).norm(dim=1), torch.ones(10), atol=1e-5)
    dist = torch.cdist(noise.flatten(1), noise.flatten(1))
    assert float(dist[~torch.eye(10, dtype=torch.bool)].min()) > 0.3
    assert float(_l2(small.images, out).max()) <= method.eps + 1e-9
    with pytest.raises(StateError, match="label 12 has no ar class pattern"):
        method.perturb(method.load(state), small.float_images()[:1], torch.tensor([12]))


def test_ar_search_is_seeded_and_refuses_what_the_released_processes_cannot_do():
    from ue_dist.methods.ar import find_processes, generate, residual

    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, drawn = find_processes(3, 1, (12, 12), 4, gen(), min_response=0.5, max_candidates=4096)
    b, _ = find_processes(3, 1, (12, 12), 4, gen(), min_response=0.5, max_candidates=4096)
    assert torch.equal(a, b) and a.shape == (3, 1, 3, 3) and drawn >= 3
    assert torch.allclose(a.sum(dim=(2, 3)), torch.ones(3, 1), atol=1e-5)
    signal, norm = generate(a, (12, 12), 4, torch.Generator().manual_seed(0))
    assert signal.shape == (3, 1, 8, 8) and bool((norm <= 50).all())
    assert float(residual(a, signal / norm.view(-1, 1, 1, 1)).abs().max()) < 1e-5
    with pytest.raises(SettingsError, match="found 1 of 3"):
        find_processes(3, 1, (12, 12), 4, gen(), min_response=1e9, max_candidates=64)
    grey = ImageSet(torch.zeros((4, 1, 8, 8), dtype=torch.uint8), torch.arange(4), list("abcd"),
                    num_classes=4)
    with pytest.raises(SettingsError, match="coefficients=search"):
        build_method("ar", "quick").fit(grey, _quiet())
    state = build_method("ar", "quick", ["coefficients=search", "min_response=0.5"]).fit(
        grey, _quiet())
    assert state["noises"].shape == (4, 1, 8, 8)


# --- OPS ------------------------------------------------------------------------------------------
@st.composite
def labelled_images(draw):
    k = draw(st.integers(1, 4))
    n = draw(st.integers(k, 12))
    c = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    x = draw(arrays(np.uint8, (n, c, h, w)))
    perm = draw(st.permutations(list(range(n))))
    labels = torch.tensor([i % k for i in perm])
    return ImageSet(torch.from_numpy(x), labels, [f"k{i}" for i in range(n)], num_classes=k)


@settings(max_examples=60, deadline=None)
@given(labelled_images(), st.integers(1, 3))
def test_ops_changes_at_most_k_pixels_at_the_class_positions(data, k):
    c, h, w = data.image_shape
    k = min(k, h * w)
    method, state, out = _fit_protect("ops", data, [f"pixels={k}"])
    assert method.bound() == {"eps": 1.0, "norm": "l0", "pixels": k}
    assert (changed_pixels(data.images, out) <= k).all()
    pos, colours = state["positions"], state["colours"]
    assert pos.shape == (data.num_classes, k, 2) and colours.shape == (data.num_classes, k, c)
    for cls in range(data.num_classes):
        assert len({tuple(p) for p in pos[cls].tolist()}) == k  # k distinct locations
        mine = out[data.labels == cls]
        for (r, q), colour in zip(pos[cls].tolist(), colours[cls]):
            # every image of the class carries the class's colour at the class's position
            want = (colour * 255).to(torch.uint8).expand(len(mine), c)
            assert torch.equal(mine[:, :, r, q], want)
        # and nothing else changed
        changed = (out[data.labels == cls] != data.images[data.labels == cls]).any(dim=1)
        allowed = torch.zeros((h, w), dtype=torch.bool)
        allowed[pos[cls, :, 0], pos[cls, :, 1]] = True
        assert not bool((changed & ~allowed).any())


def test_ops_search_picks_the_most_consistent_change():
    """The official objective, mean/std of |v - x[p]| over a class: a location constant over the
    class (here 0) with the opposite colour beats every varying one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(60, 200, (20, 3, 5, 5), generator=gen, dtype=torch.uint8)
    labels = torch.arange(20) % 2
    x[labels == 0, :, 1, 3] = 0  # class 0: always black at (1, 3)
    x[labels == 1, :, 4, 0] = 255  # class 1: always white at (4, 0)
    data = ImageSet(x, labels, [f"k{i}" for i in range(20)], num_classes=2)
    method, state, out = _fit_protect("ops", data)
    assert state["positions"][:, 0].tolist() == [[1, 3], [4, 0]]
    assert state["colours"][:, 0].tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert (changed_pixels(x, out) == 1).all()
    with pytest.raises(StateError, match="label 2 has no ops class pattern"):
        method.perturb(method.load(state), x[:1].float() / 255, torch.tensor([2]))
    with pytest.raises(SettingsError, match="class 1 has no training image"):
        build_method("ops", "quick").fit(data.subset([0, 2, 4]), _quiet())


def test_ops_on_digits_is_one_pixel_per_image_and_survives_the_contract(small):
    method, state, out = _fit_protect("ops", small)
    assert (changed_pixels(small.images, out) <= 1).all()
    assert float((changed_pixels(small.images, out) == 1).mean()) > 0.9
    # the same class, the same position
    pos = state["positions"][:, 0]
    assert len({tuple(p) for p in pos.tolist()}) == 10  # one location per class


# --- effectiveness (slow) -------------------------------------------------------------------------
# The quick small-CNN victim (crop + flip augmentation) trained to convergence on fully protected
# 32 x 32 digits, as tests/test_rem.py's EM check. Measured (2 cores shared with other jobs): clean
# 98.3 %, lsp 19.4 %, ar 15.8 %, ops 98.9 % (does not protect: xfail); ~10 min wall per victim.
VICTIM_EPOCHS = 24


def _victim(train, test):
    from ue_dist.core.config import resolve_settings
    from ue_dist.core.victim import VICTIM_PRESETS, train_victim

    settings_ = resolve_settings(VICTIM_PRESETS, "quick",
                                 {"epochs": VICTIM_EPOCHS, "eval_robust": False})
    return train_victim(train, test, settings_, _quiet())["test_acc"]


@pytest.fixture(scope="module")
def clean_acc(digits):
    return _victim(*digits)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lsp", "ar", pytest.param("ops", marks=pytest.mark.xfail(
    reason="measured 98.9 % (clean 98.3 %): OPS does not protect the digits against the crop+flip "
    "victim; its search puts the pixels on the always-black side columns 1 and 30, which the "
    "flip swaps between class pairs and the crop moves (not investigated further)"))])
def test_model_free_shortcut_makes_digits_unlearnable(name, digits, clean_acc):
    train, test = digits
    _, _, out = _fit_protect(name, train)
    protected = _victim(ImageSet(out, train.labels, train.keys, num_classes=10), test)
    print(f"\n{name}, standard victim ({VICTIM_EPOCHS} epochs): clean test acc {clean_acc:.3f}, "
          f"{name}-protected {protected:.3f}")
    assert clean_acc > 0.9
    assert protected < 0.4
