"""The epsilon contract (property-based), settings/presets, the torchvision fix, CLI help."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from ue_dist.core.config import SettingsError, parse_radius, resolve_settings
from ue_dist.core.quantize import apply_perturbation, pixel_budget
from ue_dist.data.shards import decode_image, encode_png

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
                   st.sampled_from([1, 3]))


@st.composite
def image_and_delta(draw):
    shape = draw(shapes)
    x = draw(arrays(np.uint8, shape))
    d = draw(arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    eps = draw(st.sampled_from([0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.1, 0.5]))
    return x, d, eps


@settings(max_examples=300, deadline=None)
@given(image_and_delta())
def test_bound_and_range_hold_after_png_round_trip(case):
    x, d, eps = case
    out = apply_perturbation(x, d, eps)
    assert out.dtype == np.uint8 and out.shape == x.shape
    budget = int(np.floor(255 * eps + 1e-6))
    assert np.abs(out.astype(int) - x.astype(int)).max(initial=0) <= budget
    # PNG is lossless: the bound holds on what is read back
    for img_x, img_out in zip(x, out):
        back = decode_image(encode_png(img_out))
        assert np.array_equal(back, img_out)
        assert np.abs(back.astype(int) - img_x.astype(int)).max() <= budget


@settings(max_examples=100, deadline=None)
@given(image_and_delta())
def test_small_deltas_round_to_nearest_not_truncate(case):
    x, d, eps = case
    out = apply_perturbation(x, d, eps)
    want = np.clip(x.astype(int) + np.clip(np.rint(d.astype(np.float64) * 255), -pixel_budget(eps),
                                           pixel_budget(eps)), 0, 255)
    assert np.array_equal(out, want)


def test_budget_of_fraction_strings():
    assert pixel_budget(8 / 255) == 8 and pixel_budget(parse_radius("8/255")) == 8
    assert pixel_budget(0.0) == 0
    with pytest.raises(ValueError):
        pixel_budget(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        apply_perturbation(np.zeros((2, 2), np.uint8), np.full((2, 2), np.nan), 0.1)
    with pytest.raises(TypeError):
        apply_perturbation(np.zeros((2, 2), np.float32), np.zeros((2, 2)), 0.1)


def test_settings_presets_and_overrides():
    presets = {"paper": {"eps": 8 / 255, "steps": 10, "arch": "resnet18", "eot": True},
               "quick": {"eps": 8 / 255, "steps": 2, "arch": "small-cnn", "eot": True}}
    s = resolve_settings(presets, "quick", ["steps=5", "eps=4/255", "eot=false"])
    assert s == {"eps": 4 / 255, "steps": 5, "arch": "small-cnn", "eot": False}
    with pytest.raises(SettingsError, match="unknown setting 'stpes'.*valid: arch, eot, eps, steps"):
        resolve_settings(presets, "paper", ["stpes=3"])
    with pytest.raises(SettingsError, match="expected an integer"):
        resolve_settings(presets, "paper", ["steps=three"])
    with pytest.raises(SettingsError, match="unknown preset"):
        resolve_settings(presets, "fast")
    with pytest.raises(SettingsError, match="non-negative"):
        resolve_settings(presets, "paper", ["eps=-1"])


def test_torchvision_imports_in_a_fresh_process():
    code = ("import ue_dist, torchvision, torch; "
            "m = torchvision.models.resnet18(num_classes=3); "
            "print(m(torch.rand(2, 3, 32, 32)).shape[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3"


def test_every_command_has_accurate_help():
    from ue_dist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"convert", "info", "fit", "methods"} <= set(sub.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert text.startswith("usage: ue-dist " + name), name
    fit_help = sub.choices["fit"].format_help()
    assert "--preset" in fit_help and "--set" in fit_help and "--json" in fit_help
