"""The EM paper's class-wise error-minimising noise and its sample-wise random-noise baseline.

Fast tests on a slice of the digits; the effectiveness check (a victim trained on fully protected
digits) is marked slow: ``pytest tests/test_em_baselines.py -m slow``.
"""
import pytest
import torch

from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext, LocalContext
from ue_dist.data.imageset import ImageSet
from ue_dist.data.sources import digits_imageset
from ue_dist.methods.base import build_method
from ue_dist.methods.protect import protect_uint8


@pytest.fixture(scope="module")
def digits():
    return digits_imageset("train"), digits_imageset("test")


@pytest.fixture(scope="module")
def digits16():
    """16x16 digits for the fast fits: a round costs a quarter of 32x32's."""
    return digits_imageset("train", image_size=16)


def _quiet():
    return LocalContext(device="cpu", log=lambda _: None)


def test_classwise_em_patterns_lower_the_classifiers_error_within_the_ball(digits16):
    train = digits16.subset(range(150))
    method = build_method("em-classwise", "quick", {"max_rounds": 4, "stop_error": 0.0,
                                                    "batch_size": 32, "train_steps": 5})
    reports = []

    class Ctx(LocalContext):
        def report(self, metrics, state=None):
            reports.append(metrics)

    state = method.fit(train, Ctx(device="cpu", log=lambda _: None))
    patterns = state["patterns"]
    assert patterns.shape == (10, 3, 16, 16) and patterns.abs().max() <= 8 / 255 + 1e-7
    assert state["rounds"] == 4 and [r["round"] for r in reports] == list(range(1, 5))
    # the min-min works: the classifier's error on its noisy subset falls round after round
    errors = [r["noisy_error"] for r in reports]
    print("\nem-classwise, error on the noisy subset per round:", [f"{e:.3f}" for e in errors])
    assert errors[-1] < errors[0] and errors[-1] < 0.5
    # one pattern per class, looked up by label; the ε contract holds in the stored pixels
    loaded = method.load(state)
    batch = train.subset(range(64))
    out = protect_uint8(method, loaded, batch.images, batch.labels)
    diff = out.int() - batch.images.int()
    assert diff.abs().max() <= 8
    inside = (batch.images.int() >= 8) & (batch.images.int() <= 247)  # not clipped at 0 or 255
    for c in batch.labels.unique():
        rows = batch.labels == c
        want = (batch.images[rows].float() / 255 + patterns[c]).clamp(0, 1)
        got = out[rows].float() / 255
        assert (got - want).abs()[inside[rows]].max() <= 0.5 / 255 + 1e-6


def test_classwise_em_stops_at_its_error_and_refuses_several_workers(digits16):
    train = digits16.subset(range(100))
    state = build_method("em-classwise", "quick", {"max_rounds": 20, "stop_error": 0.4,
                                                   "batch_size": 32, "train_steps": 5}).fit(
        train, _quiet())
    assert state["noisy_error"] < 0.4 and state["rounds"] < 20

    class TwoWorkers(FitContext):
        @property
        def distributed(self):
            return True

    with pytest.raises(SettingsError, match="one worker"):
        build_method("em-classwise", "quick").fit(train, TwoWorkers(device="cpu"))


def test_samplewise_random_noise_follows_the_image_not_the_batch(digits):
    method = build_method("random-samplewise", "quick")
    x = digits[0].images[:8].float() / 255
    y = digits[0].labels[:8]
    whole = method.perturb(None, x, y)
    assert whole.abs().max() <= 8 / 255 + 1e-7 and ((x + whole) >= 0).all() and ((x + whole) <= 1).all()
    # the same image gets the same noise alone, in another batch, in another order
    assert torch.equal(method.perturb(None, x[3:4], y[3:4]), whole[3:4])
    assert torch.equal(method.perturb(None, x.flip(0), y.flip(0)), whole.flip(0))
    # images differ: so do their noises; another seed: other noise
    assert not torch.equal(whole[0], whole[1])
    other = build_method("random-samplewise", "quick", {"noise_seed": 1})
    assert not torch.equal(other.perturb(None, x, y), whole)


# --- effectiveness (slow) ----------------------------------------------------------------------
@pytest.mark.slow
def test_classwise_em_makes_digits_unlearnable_and_random_noise_does_not(digits):
    """Huang et al.'s Table 1 shape: class-wise error-minimising noise takes a standard victim
    close to chance; sample-wise random noise leaves it where it was."""
    from ue_dist.core.config import resolve_settings
    from ue_dist.core.victim import VICTIM_PRESETS, train_victim

    train, test = digits
    settings = resolve_settings(VICTIM_PRESETS, "quick", {"epochs": 24, "eval_robust": False})
    acc = {"clean": train_victim(train, test, settings, _quiet())["test_acc"]}
    for name in ("em-classwise", "random-samplewise"):
        method = build_method(name, "quick")
        state = method.fit(train, _quiet())
        images = protect_uint8(method, method.load(state), train.images, train.labels)
        protected = ImageSet(images, train.labels, train.keys, num_classes=train.num_classes)
        acc[name] = train_victim(protected, test, settings, _quiet())["test_acc"]
        if name == "em-classwise":
            acc["rounds"] = state["rounds"]
    print("\nstandard victims on digits (24 epochs): "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in acc.items()))
    assert acc["clean"] > 0.9
    assert acc["em-classwise"] < 0.4
    assert acc["random-samplewise"] > acc["clean"] - 0.1
