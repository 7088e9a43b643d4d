"""ShortcutGen: the fixed random discriminator, the generator's step, resume, selection, and (slow)
whether it protects the digits."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ue_dist.core.context import LocalContext
from ue_dist.core.unet import UNetGenerator
from ue_dist.methods.shortcutgen import ShortcutGen, random_discriminator, shortcut_step
from helpers import digits_clean_and_protected

pytestmark = pytest.mark.usefixtures("one_thread")


def _disc(seed=3):
    return random_discriminator("small-cnn", 4, 3, 8, 4, seed, torch.device("cpu"))


def test_discriminator_is_fixed_by_its_seed_alone():
    torch.manual_seed(123)
    a = _disc()
    torch.manual_seed(456)  # the global RNG state does not enter it ...
    b = _disc()
    after = torch.rand(1)
    torch.manual_seed(456)
    assert torch.equal(after, torch.rand(1))  # ... and is left as it was
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert not all(torch.equal(v, w) for v, w in zip(_disc(4).parameters(), a.parameters()))
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_one_step_lowers_the_discriminators_loss_and_leaves_it_unchanged():
    torch.manual_seed(0)
    gen = UNetGenerator(3, 8 / 255, 4)
    disc = _disc()
    before = copy.deepcopy(disc.state_dict())
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 4

    def loss():
        gen.train()  # the step's own mode: BN by batch statistics
        with torch.no_grad():
            return float(F.cross_entropy(disc((x + gen(x)).clamp(0, 1)), y))

    start = loss()
    reported = shortcut_step(gen, disc, opt, x, y, "none", "fp32")
    assert reported == pytest.approx(start, rel=1e-5)
    for _ in range(5):
        shortcut_step(gen, disc, opt, x, y, "none", "fp32")
    assert loss() < start
    for k, v in disc.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: not even BN statistics move


def _tiny():
    from ue_dist.data.sources import digits_imageset

    return digits_imageset("train", image_size=None).subset(range(64))


TINY = {"width": 4, "cls_width": 4, "epochs": 2, "batch_size": 16, "log_every": 1}


def test_fit_checkpoints_each_epoch_and_resumes_to_the_same_generator():
    data = _tiny()
    method = ShortcutGen(ShortcutGen.resolve("quick", TINY))
    ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    state = method.fit(data, ctx)
    assert state["method"] == "shortcutgen" and "training" not in state
    assert ctx.last_state["training"]["epoch"] == 2
    one_ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    ShortcutGen(ShortcutGen.resolve("quick", TINY | {"epochs": 1})).fit(data, one_ctx)
    resumed_ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    resumed_ctx.last_state = one_ctx.last_state
    resumed = method.fit(data, resumed_ctx)
    assert resumed_ctx.last_state["training"]["epoch"] == 2
    assert min(h["epoch"] for h in resumed_ctx.history if "epoch" in h) == 2
    for k, v in state["generator"].items():
        torch.testing.assert_close(resumed["generator"][k], v, msg=k)


def test_selection_keeps_the_epoch_with_the_lowest_held_out_score():
    data = _tiny()
    method = ShortcutGen(ShortcutGen.resolve("quick", TINY | {
        "val_fraction": 0.25, "select_every": 1, "select_epochs": 1}))
    ctx = LocalContext(device="cpu", seed=0, log=lambda _m: None)
    state = method.fit(data, ctx)
    scores = [h["val_acc"] for h in ctx.history if "val_acc" in h]
    assert len(scores) == 2 and state["val_count"] == 16
    assert state["selection_val_acc"] == min(scores)
    assert state["selected_epoch"] == 1 + max(i for i, v in enumerate(scores) if v == min(scores))


@pytest.mark.slow
def test_shortcutgen_makes_digits_unlearnable():
    """Quick preset on the 1,437 training digits (fit about 45 s on one thread); victim: the quick
    small CNN, 24 epochs (clean reaches about 98 %)."""
    method = ShortcutGen(ShortcutGen.resolve("quick"))
    clean, poisoned = digits_clean_and_protected(method)
    print(f"\nShortcutGen digits (24-epoch victims): clean {clean:.3f}, protected {poisoned:.3f}")
    assert clean > 0.9
    assert poisoned < clean - 0.4
