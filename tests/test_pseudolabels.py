"""Pseudo-labels for photos without labels (``fit --labels cluster``): k-means clusters of pooled
pixels, stored in the state, labelling every image protect sees."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ue_dist.core import pseudolabels
from ue_dist.core.context import LocalContext
from ue_dist.data.imageset import ImageSet
from ue_dist.data.shards import Sample, read_shard, write_shard
from ue_dist.data.sources import digits_arrays
from ue_dist.methods.base import build_method, save_state
from ue_dist.pipeline import open_protect_config, protect_shard
from ue_dist.runtime.train import pseudo_labelled


def _digits(n=400, size=16):
    images, labels = digits_arrays(size)["train"]
    return ImageSet.from_numpy_hwc(images[:n], labels[:n], num_classes=10)


def test_clusters_follow_the_digit_classes_and_any_size_gets_the_same_label():
    train = _digits()
    labeller = pseudolabels.fit_labeller(train.images, 10, seed=0)
    clusters = pseudolabels.assign(labeller, train.images)
    assert sorted(torch.unique(clusters).tolist()) == list(range(10))
    # real digits: clusters of pooled pixels agree with the classes far above chance (0.1)
    purity = pseudolabels.cluster_agreement(train.labels.numpy(), clusters.numpy())
    assert purity > 0.6, purity
    # a 3x nearest-upsampled image pools to the same features: same label, one image at a time
    big = [torch.repeat_interleave(torch.repeat_interleave(im, 3, 1), 3, 2)
           for im in train.images[:40]]
    assert torch.equal(pseudolabels.assign(labeller, big), clusters[:40])
    # grey photos with a colour labeller are replicated; alpha is not content
    rgba = torch.cat([train.images[:5], torch.full((5, 1, 16, 16), 7, dtype=torch.uint8)], 1)
    assert torch.equal(pseudolabels.assign(labeller, rgba), clusters[:5])
    assert torch.equal(pseudolabels.fit_labeller(train.images, 10, seed=0)["centroids"],
                       labeller["centroids"])  # seeded


def test_too_few_images_or_clusters_are_refused():
    train = _digits(n=5)
    with pytest.raises(ValueError, match="5 images cannot form 10 clusters"):
        pseudolabels.fit_labeller(train.images, 10)
    with pytest.raises(ValueError, match="at least 2"):
        pseudolabels.fit_labeller(train.images, 1)


def test_unlabelled_shard_is_protected_with_the_states_pseudo_labels(tmp_path):
    """classwise fitted on clusters: every protected image carries exactly its cluster's
    pattern, the output shard gains no .cls, captions pass through."""
    train = _digits(n=200, size=16)
    pseudo, labeller = pseudo_labelled(train, 6, seed=0)
    method = build_method("classwise", "paper", [])
    state = dict(method.fit(pseudo, LocalContext(device="cpu", log=lambda m: None)),
                 labeller=labeller)
    save_state(state, str(tmp_path / "state.pt"))
    hwc = train.numpy_hwc()
    src = str(tmp_path / "src" / "photos-000.tar")
    write_shard(src, [Sample(f"p{i:03d}", hwc[i], None, {"url": f"u{i}"}, {"txt": b"cap"})
                      for i in range(30)])
    config = open_protect_config("classwise", str(tmp_path / "state.pt"), batch_size=8)
    result = protect_shard(config, src, str(tmp_path / "dst"))
    assert result["ok"] and result["protected"] == 30, result
    out = read_shard(str(tmp_path / "dst" / "photos-000.tar"))
    want = pseudolabels.assign(labeller, train.images[:30])
    deltas = [o.image.astype(int) - hwc[i].astype(int) for i, o in enumerate(out)]
    for i, o in enumerate(out):
        assert o.label is None and o.extra == {"txt": b"cap"} and o.meta["url"] == f"u{i}"
        assert o.meta["protected"] and np.abs(deltas[i]).max() <= 8
    # images of one cluster got one pattern (away from the clipping at 0/255), others another
    same = [i for i in range(30) if want[i] == want[0]]
    other = next(i for i in range(30) if want[i] != want[0])
    inner = (hwc[same[0]] > 8) & (hwc[same[0]] < 247) & (hwc[other] > 8) & (hwc[other] < 247)
    assert inner.sum() > 20
    assert not np.array_equal(deltas[same[0]][inner], deltas[other][inner])
    for i in same[1:]:
        both = inner & (hwc[i] > 8) & (hwc[i] < 247)
        assert np.array_equal(deltas[i][both], deltas[same[0]][both])


def test_without_a_labeller_an_unlabelled_sample_is_a_bad_shard(tmp_path):
    train = _digits(n=50, size=16)
    method = build_method("classwise", "paper", [])
    save_state(method.fit(train, LocalContext(device="cpu", log=lambda m: None)),
               str(tmp_path / "state.pt"))
    src = str(tmp_path / "src" / "s.tar")
    write_shard(src, [Sample("a", train.numpy_hwc()[0], None)])
    config = open_protect_config("classwise", str(tmp_path / "state.pt"))
    result = protect_shard(config, src, str(tmp_path / "dst"))
    assert not result["ok"] and "sample 'a': no label" in result["reason"]


def test_predicted_labels_are_the_classifiers_and_protect_as_given_ones(tmp_path):
    """protect --labels predict: an unlabelled shard is protected exactly as the same shard
    labelled with the state's classifier's predictions."""
    from helpers import fit_quick

    state = fit_quick("em", str(tmp_path / "em.pt"), image_size=8, n=48,
                      overrides=["train_steps=30"])
    images, _ = digits_arrays(8)["train"]
    config = open_protect_config("em", str(tmp_path / "em.pt"), batch_size=16, labels="predict")
    unlabelled = [Sample(f"d{i:02d}", images[100 + i], None) for i in range(20)]
    predicted = torch.cat([config.method.predict(
        config.loaded, torch.from_numpy(images[100 + i:101 + i]).permute(0, 3, 1, 2) / 255)
        for i in range(20)])
    assert len(torch.unique(predicted)) > 1
    write_shard(str(tmp_path / "a" / "s.tar"), unlabelled)
    write_shard(str(tmp_path / "b" / "s.tar"), [Sample(s.key, s.image, int(y)) for s, y in
                                                zip(unlabelled, predicted)])
    assert protect_shard(config, str(tmp_path / "a" / "s.tar"), str(tmp_path / "da"))["ok"]
    given = open_protect_config("em", str(tmp_path / "em.pt"), batch_size=16)
    assert protect_shard(given, str(tmp_path / "b" / "s.tar"), str(tmp_path / "db"))["ok"]
    a = read_shard(str(tmp_path / "da" / "s.tar"))
    b = read_shard(str(tmp_path / "db" / "s.tar"))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert all(x.label is None for x in a) and state["method"] == "em"


def test_predict_refused_for_a_method_without_classifier(tmp_path):
    from ue_dist.core.config import SettingsError
    from ue_dist.runtime.protect import protect
    from helpers import fit_classwise, make_source

    make_source(str(tmp_path / "src"), n_shards=1, per_shard=4)
    fit_classwise(str(tmp_path / "cw.pt"))
    with pytest.raises(SettingsError, match="--labels predict: method 'classwise' cannot"):
        protect("classwise", str(tmp_path / "src"), str(tmp_path / "dst"),
                state_url=str(tmp_path / "cw.pt"), labels="predict")
    assert not (tmp_path / "dst").exists()


def test_a_broken_labeller_is_named_with_the_state(tmp_path):
    from ue_dist.methods.base import StateError

    train = _digits(n=50, size=16)
    method = build_method("classwise", "paper", [])
    state = dict(method.fit(train, LocalContext(device="cpu", log=lambda m: None)),
                 labeller={"kind": "pixel-kmeans", "size": 16, "channels": 3})
    save_state(state, str(tmp_path / "bad.pt"))
    with pytest.raises(StateError, match=r"bad.pt.*labeller is incomplete.*mean"):
        open_protect_config("classwise", str(tmp_path / "bad.pt"))
