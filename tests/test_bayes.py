"""The ``bayes`` method: settings, fit/load/perturb, the mixed mask, bad input, effectiveness."""
from __future__ import annotations

import os

import pytest
import torch

from ue_dist.core.config import SettingsError
from ue_dist.core.context import LocalContext
from ue_dist.data.imageset import ImageSet
from ue_dist.data.sources import digits_imageset
from ue_dist.methods.base import StateError, build_method, get_method, load_state, save_state

FAST = ["arch=small-cnn", "embed_epochs=2", "steps=4", "step_size=2/255", "eps=8/255",
        "bank_size=300", "chunk=128"]


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    data = digits_imageset("train", image_size=None)  # native 8x8x3: fast
    return data.subset(range(240))


@pytest.fixture(scope="module")
def fitted(small):
    method = build_method("bayes", "quick", FAST)
    state = method.fit(small, LocalContext(seed=0, log=lambda m: None))
    return method, state


def test_registered_with_presets():
    cls = get_method("bayes")
    assert cls.presets["paper"]["eps"] == pytest.approx(8 / 255)
    assert cls.presets["paper"]["arch"] == "resnet18"
    assert cls.presets["quick"]["arch"] == "small-cnn"
    assert cls.presets["paper"]["step_rule"] == "sign"  # PGA, not AdamW


@pytest.mark.parametrize("override, name", [
    ("eps=0", "eps"), ("sigma=0", "sigma"), ("sigma=-2", "sigma"), ("norm=l1", "norm"),
    ("step_rule=adamw", "step_rule"), ("step_size=0", "step_size"), ("bank_size=0", "bank_size"),
])
def test_bad_settings_name_the_option(override, name):
    with pytest.raises(SettingsError, match=name):
        build_method("bayes", "quick", [override])


def test_fit_state_roundtrip_and_perturb(fitted, small, tmp_path):
    method, state = fitted
    assert state["bank"].shape[0] == 240 and state["sigma"] > 0
    url = str(tmp_path / "bayes.pt")
    save_state(state, url)
    again = load_state(url)  # weights_only load
    loaded = method.load(again)
    x = small.float_images()[:32]
    y = small.labels[:32]
    delta = method.perturb(loaded, x, y)
    assert delta.shape == x.shape
    assert float(delta.abs().max()) <= method.eps + 1e-6
    assert float(delta.abs().max()) > 0
    assert float((x + delta).min()) >= 0 and float((x + delta).max()) <= 1
    # the streaming objective (batch vs the rest of the bank) rises
    from ue_dist.core.bayes_error import bayes_error
    from ue_dist.methods.bayes import embed

    with torch.no_grad():
        bank, bank_y = loaded.bank[32:], loaded.bank_labels[32:]
        before = bayes_error(embed(loaded.model, x), y, loaded.sigma, bank=bank, bank_labels=bank_y)
        after = bayes_error(embed(loaded.model, x + delta), y, loaded.sigma, bank=bank,
                            bank_labels=bank_y)
    assert float(after) > float(before)


def test_joint_mode_respects_the_fixed_mask_and_raises_beta(fitted, small):
    method, state = fitted
    loaded = method.load(state)
    x, y = small.float_images()[:80], small.labels[:80]
    fixed = torch.arange(80) % 2 == 0
    delta, hist = method.perturb_jointly(loaded, x, y, fixed=fixed)
    assert float(delta[fixed].abs().max()) == 0.0
    assert float(delta[~fixed].abs().max()) > 0
    assert float(delta.abs().max()) <= method.eps + 1e-6
    assert hist[-1] > hist[0]
    assert len(hist) == int(method.settings["steps"]) + 1


def test_gradient_rule_l2_and_authors_variant(fitted, small):
    _, state = fitted
    x, y = small.float_images()[:40], small.labels[:40]
    for extra in (["norm=l2", "eps=0.5", "step_size=0.2"],
                  ["step_rule=gradient", "step_size=50"],
                  ["step_rule=adam", "step_size=1/255", "retrain_every=2", "embed_batch_size=20"]):
        method = build_method("bayes", "quick", FAST + extra)
        loaded = method.load(state)
        delta, hist = method.perturb_jointly(loaded, x, y)
        if method.settings["norm"] == "l2":
            assert float(delta.flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
        else:
            assert float(delta.abs().max()) <= method.eps + 1e-6
        if method.settings["retrain_every"]:
            # the retrained embedding is a copy: the loaded state is unchanged
            for k, v in loaded.model.state_dict().items():
                assert torch.equal(v.cpu(), state["model_state"][k])
            assert len(hist) == int(method.settings["steps"]) + 1
        else:
            assert hist[-1] > hist[0], (extra, hist)


def test_bad_states_and_inputs(fitted, small, tmp_path):
    method, state = fitted
    loaded = method.load(state)
    with pytest.raises(StateError, match="shape"):
        method.perturb(loaded, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        method.perturb(loaded, torch.rand(2, 3, 8, 8), torch.tensor([0, 12]))
    # an embedding checkpoint for another image size, given as a setting
    url = str(tmp_path / "emb.pt")
    save_state(state, url)
    other = digits_imageset("train", image_size=16).subset(range(50))
    m2 = build_method("bayes", "quick", FAST + [f"embedding_state={url}"])
    with pytest.raises(StateError, match="shape"):
        m2.fit(other, LocalContext(log=lambda m: None))
    # a single class
    one = ImageSet(small.images[:20], torch.zeros(20, dtype=torch.long), num_classes=10)
    with pytest.raises(SettingsError, match="2 classes"):
        build_method("bayes", "quick", FAST).fit(one, LocalContext(log=lambda m: None))
    # a state of another method
    with pytest.raises(StateError, match="bayes"):
        method.load({**state, "method": "rem"})


def test_embedding_state_is_reused(fitted, small, tmp_path):
    _, state = fitted
    url = str(tmp_path / "emb.pt")
    save_state(state, url)
    m2 = build_method("bayes", "quick", FAST + [f"embedding_state={url}"])
    s2 = m2.fit(small, LocalContext(log=lambda m: None))
    for k, v in state["model_state"].items():
        assert torch.equal(v, s2["model_state"][k])


# effectiveness (slow): victims trained on protected digits ------------------------------------
# 32x32x3 digits at the paper's eps 8/255, the quick preset's ascent (10 signed steps of 2/255
# against a small CNN embedding trained 8 epochs); victims are the quick small CNN (crop+flip)
# trained to convergence, 30 epochs: at the quick preset's 8 the clean half (half the steps) was
# undertrained (89 % vs 98 % at 30), which biased the mixed comparison. A single victim on the
# protected sets still swings by up to 40 points with its seed, so every figure is the mean over
# three victim seeds.
EFFECT = ["eps=8/255", "steps=10", "step_size=2/255", "embed_epochs=8", "chunk=2048"]
VICTIM_SEEDS = (0, 1, 2)
VICTIM_EPOCHS = 30


@pytest.fixture(scope="module")
def digits_protection():
    from ue_dist.core.quantize import apply_perturbation
    from ue_dist.core.victim import resolve_victim_settings, train_victim

    # all cores unless OMP_NUM_THREADS says otherwise (the fast tests above pinned one thread)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    train, test = digits_imageset("train"), digits_imageset("test")
    assert train.image_shape == (3, 32, 32)
    method = build_method("bayes", "quick", EFFECT)
    loaded = method.load(method.fit(train, LocalContext(seed=0, log=lambda m: None)))
    x = train.float_images()

    def protected_set(delta):
        imgs = torch.from_numpy(apply_perturbation(train.images, delta, method.eps))
        return ImageSet(imgs, train.labels, train.keys, num_classes=train.num_classes)

    # mixed: half the samples protected, the other half fixed (clean) but in the objective
    half = torch.arange(len(train)) % 2 == 0
    sets = {"clean": train,
            "protected": protected_set(method.perturb_jointly(loaded, x, train.labels)[0]),
            "mixed": protected_set(method.perturb_jointly(loaded, x, train.labels,
                                                          fixed=~half)[0]),
            "clean_half": train.subset(torch.nonzero(~half).squeeze(1))}
    acc = {}
    for name, data in sets.items():
        runs = [train_victim(data, test, resolve_victim_settings(
            "quick", {"eval_robust": False, "seed": seed, "epochs": VICTIM_EPOCHS}),
            LocalContext(seed=0, log=lambda m: None))["test_acc"] for seed in VICTIM_SEEDS]
        acc[name] = sum(runs) / len(runs)
        print(f"\nbayes digits eps 8/255, {name}: mean {acc[name]:.4f} over seeds "
              f"{VICTIM_SEEDS}: {[round(r, 4) for r in runs]}")
    return acc


@pytest.mark.slow
def test_protection_of_fully_protected_digits(digits_protection):
    acc = digits_protection
    assert acc["clean"] > 0.9
    assert acc["protected"] < acc["clean"] - 0.3  # far below the clean victim


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "the paper's mixed-data claim is not reproduced on digits (measured 2026-11-21, means over "
    "victim seeds 0-2, victims 30 epochs): clean 0.991, clean half alone 0.980, 50 % clean + 50 % "
    "protected 0.989 (fully protected 0.489). With 8-epoch victims: clean half 0.891, mixed "
    "0.924; a stronger ascent (embedding 30 epochs, 40 steps of 1/255) gave 0.939. Also measured "
    "with 30-epoch victims, seeds 0-2: the authors' variant (embedding retrained on the current "
    "images every step, 1 epoch) mixed 0.986, 20 steps of 1/255 0.985, 2 epochs per step 0.993; "
    "a ResNet-18 embedding (12 epochs) mixed 0.992, all vs clean half 0.980; the paper's pairing, "
    "ResNet-18 embedding and ResNet-18 victims (20 epochs, seed 0): clean half 0.961, mixed "
    "0.981; EOT over the victims' crop+flip in the ascent (4 draws per step, 20 steps of 1/255) "
    "0.985; eps 16/255 0.988, 32/255 0.981. The baselines do the same on digits (same victims): "
    "TAP mixed 0.989 (fully protected 0.365), EM mixed 0.980 (fully protected 0.100). The "
    "protected half still adds usable signal to near-binary digits at eps 8/255"))
def test_protected_half_hurts_a_mixed_victim(digits_protection):
    acc = digits_protection
    assert acc["mixed"] < acc["clean_half"]  # the protected half hurts, not helps


def test_bayes_error_report_on_a_dataset(fitted, small, tmp_path):
    from ue_dist.data.dataset import write_imageset
    from ue_dist.runtime.bayes_joint import bayes_error_report

    _, state = fitted
    data = small.subset(range(120))
    data.meta = [{"protected": i % 2 == 0} for i in range(120)]
    url = str(tmp_path / "train")
    write_imageset(url, data, shard_size=50)
    raw = bayes_error_report(url)
    assert raw["space"] == "pixels" and raw["n"] == 120 and raw["dim"] == 3 * 8 * 8
    assert 0 <= raw["bayes_error"] < 0.9 and raw["protected_count"] == 60
    assert "bayes_error_protected_rows" in raw
    emb_url = str(tmp_path / "state.pt")
    save_state(state, emb_url)
    emb = bayes_error_report(url, embedding=emb_url, sigma="0.5")
    assert emb["space"] == "embedding" and emb["sigma"] == 0.5 and emb["dim"] == 128
    # an embedding fitted on 8x8 images applied to 16x16 data
    big = digits_imageset("train", image_size=16).subset(range(30))
    big_url = str(tmp_path / "big")
    write_imageset(big_url, big)
    with pytest.raises(StateError, match="shape"):
        bayes_error_report(big_url, embedding=emb_url)
    with pytest.raises(SettingsError, match="--sigma"):
        bayes_error_report(url, sigma="-1")
    with pytest.raises(SettingsError, match="toy"):
        bayes_error_report(url, toy="moons")
