"""fit at one resolution: ``fit --image-size N --views crop|resize`` (data/views.py), REM's
``imagenet`` preset, and the ImageNet stem of the source model at 224."""
from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from ue_dist import options as opts
from ue_dist.data import dataset
from ue_dist.data.dataset import MixedSizesError, load_imageset
from ue_dist.data.shards import Sample, write_shard
from ue_dist.data.views import make_view, view_rng


def _coded(h: int, w: int) -> np.ndarray:
    """An H x W x 3 image whose pixels name their position (row in 0, column in 1)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows % 256, cols % 256, (rows * 7 + cols) % 256], -1).astype(np.uint8)


# the view function ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 60, 3), (16, 16, 3), (10, 30, 3), (50, 12, 1), (9, 7, 4)])
@pytest.mark.parametrize("views", ["crop", "resize"])
def test_view_shape_alpha_dropped(shape, views):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    out = make_view(image, 16, views, rng=view_rng(0, "k"))
    assert out.shape == (16, 16, 1 if shape[2] == 1 else 3) and out.dtype == np.uint8


def test_crop_is_native_scale():
    """A crop of an image at least N in both sides is a window of the original, pixel for pixel."""
    image = _coded(40, 70)
    for key in ("a", "b", "c"):
        out = make_view(image, 16, "crop", rng=view_rng(3, key))
        top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
        np.testing.assert_array_equal(out, image[top:top + 16, left:left + 16])


def test_crop_scales_up_a_small_image_first():
    image = _coded(8, 24)  # smaller side 8 -> 16: the scaled image is 16 x 48
    out = make_view(image, 16, "crop", rng=view_rng(0, "k"))
    assert out.shape == (16, 16, 3)
    # the rows span the whole (scaled) height: first row near row 0, last near row 7
    assert out[0, :, 0].max() <= 1 and out[-1, :, 0].min() >= 6


def test_resize_is_antialiased_centre():
    """A 1-pixel checkerboard shrunk 4x averages to grey (no aliasing), and the centre of a wide
    image is kept."""
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
    out = make_view(checker, 16, "resize")
    assert out.shape == (16, 16, 1)
    assert np.abs(out.astype(int) - 127.5).max() <= 3, out.min()
    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, 16:32] = 200  # the centre third
    np.testing.assert_array_equal(make_view(wide, 16, "resize"), wide[:, 16:32])


def test_views_are_seeded_by_seed_and_key():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    keys = [f"k{i}" for i in range(6)]
    a = [make_view(image, 16, "crop", rng=view_rng(5, k)) for k in keys]
    b = [make_view(image, 16, "crop", rng=view_rng(5, k)) for k in reversed(keys)][::-1]
    c = [make_view(image, 16, "crop", rng=view_rng(6, k)) for k in keys]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # order does not matter
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))  # the seed does
    assert len({x.tobytes() for x in a}) > 1  # keys get their own crops


def test_unknown_views_refused():
    with pytest.raises(ValueError, match="views must be one of crop, resize"):
        make_view(np.zeros((4, 4, 3), np.uint8), 2, "squash")


# a mixed-size folder of shards -------------------------------------------------------------------
SHAPES = [(20, 30, 3), (40, 17, 3), (12, 12, 3), (16, 64, 1), (25, 25, 4), (33, 21, 3)]


def _mixed(url: str, labelled: bool = True) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = [Sample(f"img-{i:03d}", rng.integers(0, 256, shape, dtype=np.uint8),
                      (i % 2) if labelled else None, {})
               for i, shape in enumerate(SHAPES * 2)]
    os.makedirs(url, exist_ok=True)
    write_shard(os.path.join(url, "shard-000000.tar"), samples[:5])
    write_shard(os.path.join(url, "shard-000001.tar"), samples[5:])
    return samples


def test_mixed_sizes_refused_without_image_size(tmp_path):
    _mixed(str(tmp_path / "mixed"))
    with pytest.raises(MixedSizesError, match="mixed image shapes"):
        load_imageset(str(tmp_path / "mixed"))


def test_load_views_of_a_mixed_folder(tmp_path, monkeypatch):
    url = str(tmp_path / "mixed")
    samples = _mixed(url)
    # the view path reads shard by shard, never every shard's originals at once
    monkeypatch.setattr(dataset, "read_all_shards", lambda *a, **k: pytest.fail("read all"))
    train = load_imageset(url, image_size=16, views="crop", seed=3)
    assert train.image_shape == (3, 16, 16) and len(train) == len(samples)
    assert train.keys == [s.key for s in samples] and train.num_classes == 2
    assert train.labels.tolist() == [s.label for s in samples]
    grey = train.images[SHAPES.index((16, 64, 1))]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])  # replicated to 3
    again = load_imageset(url, image_size=16, views="crop", seed=3)
    other = load_imageset(url, image_size=16, views="crop", seed=4)
    resized = load_imageset(url, image_size=16, views="resize", seed=3)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, other.images)
    assert not torch.equal(train.images, resized.images)
    assert torch.equal(resized.images, load_imageset(url, image_size=16, views="resize",
                                                     seed=9).images)  # resize draws nothing


def test_grey_set_stays_grey_and_labels_are_checked(tmp_path):
    url = str(tmp_path / "grey")
    os.makedirs(url)
    rng = np.random.default_rng(0)
    write_shard(os.path.join(url, "shard-000000.tar"),
                [Sample(f"g{i}", rng.integers(0, 256, (10 + i, 20, 1), dtype=np.uint8), 0, {})
                 for i in range(3)])
    assert load_imageset(url, image_size=8).image_shape == (1, 8, 8)
    _mixed(str(tmp_path / "unlabelled"), labelled=False)
    with pytest.raises(Exception, match="no label"):
        load_imageset(str(tmp_path / "unlabelled"), image_size=8)
    unlabelled = load_imageset(str(tmp_path / "unlabelled"), image_size=8, require_labels=False)
    assert set(unlabelled.labels.tolist()) == {-1}


# options ------------------------------------------------------------------------------------------
def test_fit_options_declared_once():
    from ue_dist.cli import build_parser
    from ue_dist.runtime.jobs import JobSpecError

    args = build_parser().parse_args(["fit", "--method", "em", "T", "S"])
    assert args.image_size is None and args.views == "crop"
    args = build_parser().parse_args(["fit", "--method", "em", "--image-size", "224", "--views",
                                      "resize", "--preset", "imagenet", "T", "S"])
    assert (args.image_size, args.views, args.preset) == (224, "resize", "imagenet")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--method", "em", "--views", "squash", "T", "S"])
    fit = opts.check_section({"image_size": 32, "views": "resize"}, opts.FIT.spec_options(),
                             "fit", JobSpecError)
    assert (fit["image_size"], fit["views"]) == (32, "resize")
    with pytest.raises(JobSpecError, match="fit.image_size must be >= 1"):
        opts.check_section({"image_size": 0}, opts.FIT.spec_options(), "fit", JobSpecError)
    with pytest.raises(JobSpecError, match="fit.views must be one of crop, resize"):
        opts.check_section({"views": "squash"}, opts.FIT.spec_options(), "fit", JobSpecError)


# REM's ImageNet-subset preset and the ImageNet stem ------------------------------------------------
def test_rem_imagenet_preset_is_the_papers():
    from ue_dist.core.config import SettingsError
    from ue_dist.methods import build_method

    s = build_method("rem", "imagenet").settings
    # App. A.3.1: 3,000 iterations of 128, SGD 0.1 (momentum 0.9, wd 5e-4), x0.1 every 1,200
    assert (s["arch"], s["train_steps"], s["batch_size"]) == ("resnet18", 3000, 128)
    assert (s["lr"], s["momentum"], s["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert (s["lr_decay_every"], s["lr_decay"]) == (1200, 0.1)
    # Table 5 (ImageNet subset, REM): K_u = 7 of rho_u/4, K_a = 10 of rho_a/5; EOT J = 4
    assert Fraction(s["eps"]).limit_denominator(255) == Fraction(8, 255)
    assert Fraction(s["rho_a"]).limit_denominator(255) == Fraction(4, 255)
    assert (s["steps_u"], s["step_frac_u"], s["steps_a"], s["step_frac_a"]) == (7, 0.25, 10, 0.2)
    assert s["eot_samples"] == 4
    with pytest.raises(SettingsError, match="unknown preset 'imagenet' for method 'em'"):
        build_method("em", "imagenet")


def test_source_model_stem_by_size():
    from torch import nn

    from ue_dist.core.models import build_model
    from ue_dist.methods import build_method

    arch = build_method("rem", "imagenet").settings["arch"]
    big = build_model(arch, 100, 3, 224).net
    assert (big.conv1.kernel_size, big.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(big.maxpool, nn.MaxPool2d) and big.maxpool.kernel_size == 3
    big.eval()
    with torch.no_grad():
        assert big(torch.rand(1, 3, 224, 224)).shape == (1, 100)
    small = build_model(arch, 10, 3, 32).net
    assert (small.conv1.kernel_size, small.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)


# the command end to end (Ray Train) ---------------------------------------------------------------
@pytest.mark.system
def test_fit_image_size_on_mixed_shards(ray_local, tmp_path, capsys):
    from ue_dist.cli import main
    from ue_dist.methods.base import load_state

    url = str(tmp_path / "mixed")
    _mixed(url)
    common = ["--method", "classwise", "--cpus-per-worker", "0.5", "--storage",
              str(tmp_path / "runs")]
    code = main(["fit", *common, url, str(tmp_path / "refused.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "mixed image shapes" in err and "--image-size" in err, err
    assert not os.path.exists(tmp_path / "refused.pt")
    code = main(["fit", *common, "--image-size", "16", "--json", url, str(tmp_path / "s.pt")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["state"].endswith("s.pt")
    state = load_state(str(tmp_path / "s.pt"))
    assert state["image_shape"] == [3, 16, 16]
    assert state["fit_views"] == {"image_size": 16, "views": "crop"}
