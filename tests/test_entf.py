"""EntF: the class centroids, the pull target, the two objectives, the fitted state, and (slow)
whether it protects the digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ue_dist.core.context import LocalContext
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.bayes import embed
from ue_dist.methods.entf import EntFPull, EntFPush, class_centroids, pull_targets
from ue_dist.methods.protect import protect_uint8
from helpers import digits_clean_and_protected

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"train_steps": 4, "batch_size": 16, "lr_decay_every": 4, "log_every": 2,
        "checkpoint_every": 0, "ref_steps": 2, "steps": 10, "augmentation": "none"}


def _tiny():
    from ue_dist.data.sources import digits_imageset

    return digits_imageset("train", image_size=None).subset(range(80))


@pytest.fixture(scope="module")
def fitted():
    data = _tiny()
    method = EntFPush(EntFPush.resolve("quick", TINY))
    state = method.fit(data, LocalContext(device="cpu", seed=0, log=lambda _m: None))
    return data, state


def test_centroids_are_the_class_means_of_the_clean_embeddings(fitted):
    data, state = fitted
    model = EntFPush(state["settings"]).load(state).model
    with torch.no_grad():
        e = embed(model, ImageSet.to_float(data.images))
    want = torch.stack([e[data.labels == k].mean(0) for k in range(data.num_classes)])
    torch.testing.assert_close(state["centroids"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(class_centroids(model, data, torch.device("cpu"), batch=7), want,
                               rtol=1e-4, atol=1e-5)


def test_a_class_without_images_is_refused(fitted):
    data, state = fitted
    model = EntFPush(state["settings"]).load(state).model
    keep = torch.nonzero(data.labels != 3).flatten()
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have none"):
        class_centroids(model, data.subset(keep), torch.device("cpu"))


def test_pull_target_is_the_nearest_other_centre():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    emb = torch.tensor([[0.1, 0.0], [0.1, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    got = pull_targets(emb, centroids, y)
    # own class excluded even when it is the nearest; otherwise the nearest by squared distance
    assert torch.equal(got, centroids[torch.tensor([1, 0, 0])])


def _distances(method, state, data, out):
    model = method.load(state).model
    cen = state["centroids"]
    with torch.no_grad():
        clean = embed(model, ImageSet.to_float(data.images))
        poisoned = embed(model, ImageSet.to_float(out))
    return clean, poisoned, cen


def test_push_moves_features_away_from_their_own_centre(fitted):
    data, state = fitted
    method = EntFPush(state["settings"])
    out = protect_uint8(method, method.load(state), data.images, data.labels)
    clean, poisoned, cen = _distances(method, state, data, out)
    own = cen[data.labels]
    before = F.mse_loss(clean, own, reduction="none").mean(1)
    after = F.mse_loss(poisoned, own, reduction="none").mean(1)
    assert (after > before).float().mean() > 0.9
    assert after.mean() > 1.2 * before.mean()


def test_pull_moves_features_toward_another_class(fitted):
    data, state = fitted
    settings = dict(state["settings"])
    pull_state = {**state, "method": "entf-pull"}
    method = EntFPull(settings)
    out = protect_uint8(method, method.load(pull_state), data.images, data.labels)
    clean, poisoned, cen = _distances(method, pull_state, data, out)
    d_clean = ((clean[:, None] - cen[None]) ** 2).mean(-1)
    d_poison = ((poisoned[:, None] - cen[None]) ** 2).mean(-1)
    other = F.one_hot(data.labels, data.num_classes).bool()
    nearest_other_before = d_clean.masked_fill(other, float("inf")).min(1).values
    nearest_other_after = d_poison.masked_fill(other, float("inf")).min(1).values
    assert (nearest_other_after < nearest_other_before).float().mean() > 0.9


@pytest.mark.slow
@pytest.mark.xfail(reason="EntF is aimed at adversarially trained victims and is weak under "
                          "standard training in its paper too (GUE Table 4: 88.78 % vs 92.36 % "
                          "clean on CIFAR-10); measured on digits, quick preset, 24-epoch "
                          "victims: entf-push 93.9 % (clean 98.3 %), under PGD-AT 2/255 "
                          "99.7 % (clean 99.4 %). Figures in docs/results.md", strict=False)
@pytest.mark.parametrize("cls", [EntFPush, EntFPull], ids=["push", "pull"])
def test_entf_on_digits(cls):
    """Quick preset on the 1,437 training digits; victims: the quick small CNN, 24 epochs,
    standard training. Figures in docs/results.md."""
    method = cls(cls.resolve("quick"))
    clean, poisoned = digits_clean_and_protected(method)
    print(f"\n{cls.name} digits (24-epoch victims): clean {clean:.3f}, protected {poisoned:.3f}")
    assert clean > 0.9
    assert poisoned < clean - 0.4
