"""The epsilon contract (property-based), settings/presets, the torchvision fix, CLI help, and
the contract every registered method honours (bound, determinism, state round trip, refusals)."""
from __future__ import annotations

import re
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from ue_dist.core.config import SettingsError, parse_radius, resolve_settings
from ue_dist.core.context import LocalContext
from ue_dist.core.quantize import apply_perturbation, pixel_budget
from ue_dist.data.shards import Sample, decode_image, encode_png, read_shard, write_shard
from ue_dist.data.sources import digits_imageset
from ue_dist.methods.base import StateError, build_method, load_state, method_names, save_state
from ue_dist.methods.protect import protect_uint8

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


@st.composite
def batch_and_delta(draw):
    n, c, h, w = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 6)), \
        draw(st.integers(1, 6))
    x = draw(arrays(np.uint8, (n, c, h, w)))
    d = draw(arrays(np.float32, (n, c, h, w), elements=st.floats(-1, 1, width=32)))
    return x, d


@settings(max_examples=200, deadline=None)
@given(batch_and_delta(), st.sampled_from([0.0, 1 / 255, 0.01, 0.05, 0.3, 1.0, 2.5]))
def test_l2_bound_holds_per_image_after_rounding(case, eps):
    x, d = case
    out = apply_perturbation(x, d, eps, norm="l2")
    change = (out.astype(np.float64) - x.astype(np.float64)) / 255.0
    assert out.dtype == np.uint8
    assert (np.linalg.norm(change.reshape(len(x), -1), axis=1) <= eps + 1e-9).all()
    # an image whose rounded delta lies inside the ball gets it unchanged (as under L-inf)
    grid = np.rint(d.astype(np.float64) * 255.0)
    inside = np.linalg.norm(grid.reshape(len(x), -1), axis=1) <= 255.0 * eps
    want = np.clip(x.astype(int) + grid, 0, 255)
    assert np.array_equal(out[inside], want[inside])


def test_l2_keeps_what_fits_and_scales_down_what_does_not():
    x = np.full((2, 1, 4, 4), 128, np.uint8)
    d = np.zeros((2, 1, 4, 4))
    d[0, 0, 0, 0] = 3 / 255  # |d|_2 = 3/255 <= 4/255: kept exactly
    d[1] = 2 / 255  # |d|_2 = 8/255 > 4/255: projected to 1/255 per entry, then rounded
    out = apply_perturbation(x, d, 4 / 255, norm="l2").astype(int) - 128
    assert out[0, 0, 0, 0] == 3 and np.abs(out[0]).sum() == 3
    assert np.sqrt((out[1] ** 2).sum()) <= 4 and np.abs(out[1]).max() == 1


@settings(max_examples=200, deadline=None)
@given(batch_and_delta(), st.integers(0, 4), st.sampled_from([4 / 255, 0.5, 1.0]))
def test_l0_contract_changes_at_most_k_pixel_locations(case, k, eps):
    from ue_dist.core.quantize import changed_pixels

    x, d = case
    out = apply_perturbation(x, d, eps, norm="l0", pixels=k)
    assert (changed_pixels(x, out) <= k).all()
    assert np.abs(out.astype(int) - x.astype(int)).max(initial=0) <= pixel_budget(eps)
    # what it keeps is what the L-inf contract gives at those locations
    full = apply_perturbation(x, d, eps)
    kept = (out != x).any(axis=1, keepdims=True)
    assert np.array_equal(np.where(kept, full, x), out)
    if k >= x.shape[2] * x.shape[3]:
        assert np.array_equal(out, full)


def test_l0_contract_limits_a_delta_that_changes_more_pixels():
    from ue_dist.core.quantize import changed_pixels

    x = np.zeros((1, 3, 4, 4), np.uint8)
    d = np.zeros((1, 3, 4, 4))
    d[0, 0, 1, 1], d[0, 2, 3, 0], d[0, 1, 0, 2] = 1.0, 0.5, 0.2  # three locations
    out = apply_perturbation(x, d, 1.0, norm="l0", pixels=1)
    assert changed_pixels(x, out).tolist() == [1] and out[0, 0, 1, 1] == 255 and out.sum() == 255
    two = apply_perturbation(x, d, 1.0, norm="l0", pixels=2)
    assert changed_pixels(x, two).tolist() == [2] and two[0, 2, 3, 0] == 128
    with pytest.raises(ValueError, match="pixels"):
        apply_perturbation(x, d, 1.0, norm="l0")
    with pytest.raises(ValueError, match="N x C x H x W"):
        apply_perturbation(x[0], d[0], 1.0, norm="l0", pixels=1)
    with pytest.raises(ValueError, match="norm"):
        apply_perturbation(x, d, 1.0, norm="l1")


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


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_each_setting_once_and_its_presets_obey(name):
    from ue_dist.methods.base import get_method

    from ue_dist.methods.base import KINDS

    cls = get_method(name)
    assert cls.declared, f"{name} declares no settings"
    # what `ue-dist methods` lists: family, year, labels; the paper in the docstring
    assert cls.kind in KINDS and 2000 < cls.year < 2100 and isinstance(cls.needs_labels, bool)
    assert cls.paper and (cls.__doc__ or __import__(cls.__module__).__doc__), name
    for preset, values in cls.presets.items():
        assert set(values) == set(cls.declared), (name, preset)
        build_method(name, preset)  # every preset passes its own declaration
    with pytest.raises(SettingsError, match=f"unknown setting 'nope' for method '{name}'"):
        build_method(name, "quick", ["nope=1"])
    # --set text is parsed by the declared kind: a radius as a fraction, a bad int named
    assert build_method(name, "quick", ["eps=4/255"]).eps == pytest.approx(4 / 255)
    ints = [k for k, s in cls.declared.items() if s.kind == "int" and s.low == 1]
    if ints:
        with pytest.raises(SettingsError, match=f"{ints[0]}.*expected an integer"):
            build_method(name, "quick", [f"{ints[0]}=two"])
        with pytest.raises(SettingsError, match=f"{ints[0]} for method '{name}' must be an integer >= 1"):
            build_method(name, "quick", {ints[0]: 0})


def test_declared_kinds_bounds_and_seed_key():
    from ue_dist.core.settings import Setting, check_declared, parse_text, seed_key
    from ue_dist.methods.base import get_method

    declared = {"eps": Setting("radius"), "lr": Setting("float", above=0), "n": Setting("int", low=1),
                "flag": Setting("bool"), "sigma": Setting("float", optional=True),
                "kind": Setting("str", choices=("a", "b")), "seed": Setting("seed")}
    good = {"eps": "8/255", "lr": 0.1, "n": 3, "flag": True, "sigma": None, "kind": "a", "seed": 0}
    out = check_declared(declared, good, "test")
    assert out["eps"] == pytest.approx(8 / 255) and out["n"] == 3 and isinstance(out["n"], int)
    for key, bad in [("lr", 0), ("n", 1.5), ("flag", "yes"), ("kind", "c"), ("seed", -1),
                     ("eps", float("nan")), ("lr", float("inf"))]:
        with pytest.raises(SettingsError, match=key):
            check_declared(declared, {**good, key: bad}, "test")
    with pytest.raises(SettingsError, match="lack seed"):
        check_declared(declared, {k: v for k, v in good.items() if k != "seed"}, "test")
    assert parse_text("sigma", "none", declared["sigma"]) is None
    assert parse_text("flag", "off", declared["flag"]) is False
    assert seed_key(declared) == "seed"
    assert get_method("classwise").seed_key() == "noise_seed"
    assert get_method("gue").seed_key() is None  # GUE is seeded by the run (ctx.seed)


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


# --- every registered method honours the same contract -------------------------------------------
# Parametrised over ``method_names()``: a method is tested here the day it is registered. Each fits
# on 48 native 8x8x3 digits (every method accepts them) with its ``quick`` preset plus the tiny
# overrides below, the ONE place that sizes these fits; a method missing here runs its plain
# ``quick`` preset (add an entry if that is slow). A method whose fit cannot be made this small
# goes into SLOW_METHODS with the reason (its case is then marked ``slow``); none is today.
# Measured: all methods' cases together (7 methods, 49 tests, each fit twice) 14 s, 25 s with
# other jobs on the 2 shared cores; the model-free lsp, ar and ops add about a second.
_SOURCE_MODEL = {"train_steps": 2, "batch_size": 16, "lr_decay_every": 2, "log_every": 1,
                 "checkpoint_every": 0}
_GENERATOR = {"width": 4, "cls_width": 4, "epochs": 1, "batch_size": 16, "inner_steps": 1,
              "select_every": 0, "val_fraction": 0.0, "log_every": 1}
CONTRACT_SETTINGS: dict[str, dict] = {
    "bayes": {"embed_epochs": 1, "embed_batch_size": 16, "steps": 2, "bank_size": 48, "chunk": 64},
    "classwise": {},
    "em-classwise": {"batch_size": 16, "train_steps": 1, "max_rounds": 2, "subset_fraction": 0.5},
    "random-samplewise": {},
    "em": {**_SOURCE_MODEL, "steps_u": 2},
    "rem": {**_SOURCE_MODEL, "steps_u": 2, "steps_a": 1},
    "tap": {**_SOURCE_MODEL, "steps": 2},
    "hypo": {**_SOURCE_MODEL, "steps": 2},
    "entf-push": {**_SOURCE_MODEL, "steps": 2, "ref_steps": 1},
    "entf-pull": {**_SOURCE_MODEL, "steps": 2, "ref_steps": 1},
    "gue": dict(_GENERATOR),
    "gue-at": {**_GENERATOR, "at_steps": 1},
    "deepconfuse": {"width": 4, "cls_width": 4, "epochs": 1, "cls_epochs": 1, "batch_size": 16,
                    "select_every": 0, "val_fraction": 0.0, "log_every": 1},
    "shortcutgen": {"width": 4, "cls_width": 4, "epochs": 1, "batch_size": 16,
                    "select_every": 0, "val_fraction": 0.0, "log_every": 1},
    "lsp": {},
    "ar": {},
    "ops": {},
    "ntga": {"target_size": 16, "steps": 2, "tile": 32},
}
SLOW_METHODS: dict[str, str] = {}  # name -> why its fit cannot be made small


def _method_params():
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if name in SLOW_METHODS else [])
            for name in method_names()]


def _contract_method(name):
    return build_method(name, "quick", CONTRACT_SETTINGS.get(name, {}))


def _fit(name, data):
    method = _contract_method(name)
    torch.manual_seed(0)
    return method, method.fit(data, LocalContext(device="cpu", seed=0, log=lambda _msg: None))


def _protect(method, state, data, seed=1, **kw):
    loaded = method.load(state, "cpu")
    torch.manual_seed(seed)
    return protect_uint8(method, loaded, data.images, data.labels, device="cpu", **kw)


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def contract_data():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and 2 shared cores)
    yield digits_imageset("train", image_size=None).subset(range(48))  # native 8x8x3
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=_method_params())
def fitted(request, contract_data):
    name = request.param
    method, state = _fit(name, contract_data)
    return name, method, state, _protect(method, state, contract_data)


def assert_within_bound(method, x, out):
    """``out`` (uint8, N x C x H x W) lies within ``method``'s stated bound of ``x``: its eps in
    its norm (L-inf levels; L2 per image on the [0, 1] scale; L0 changed locations per image)."""
    from ue_dist.core.quantize import changed_pixels

    bound = method.bound()
    diff = out.numpy().astype(np.int64) - x.numpy().astype(np.int64)
    if bound["norm"] == "l2":
        norms = np.sqrt((diff.reshape(len(x), -1).astype(np.float64) ** 2).sum(axis=1)) / 255
        assert norms.max(initial=0) <= bound["eps"] + 1e-9, (method.name, norms.max())
    else:
        assert np.abs(diff).max(initial=0) <= int(np.floor(255 * method.eps + 1e-6)), method.name
    if bound["norm"] == "l0":
        assert changed_pixels(x, out).max(initial=0) <= bound["pixels"], method.name


def test_method_protects_within_the_budget(fitted, contract_data):
    name, method, state, out = fitted
    x = contract_data.images
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert method.norm in ("linf", "l2", "l0"), name
    assert_within_bound(method, x, out)
    diff = (out.int() - x.int()).abs()
    assert int(diff.max()) > 0, f"{name} changed no pixel"
    # the common state fields every method records
    assert state["method"] == name and state["image_shape"] == list(contract_data.image_shape)
    assert state["num_classes"] == contract_data.num_classes and state["settings"] == method.settings
    # no state carried from batch to batch: a batch protected on its own (another actor, a
    # retry) gets the bytes it gets inside the whole run. (Not: any batching gives the same bytes;
    # the PGD methods seed their random start by the batch's content.)
    whole = _protect(method, state, contract_data, batch_size=16)
    alone = _protect(method, state, contract_data.subset(range(16, 32)), batch_size=16)
    assert np.array_equal(alone.numpy(), whole[16:32].numpy()), name


def test_method_bound_holds_after_shard_png_round_trip(fitted, contract_data, tmp_path):
    name, method, _, out = fitted
    protected_hwc = out.permute(0, 2, 3, 1).numpy()
    url = str(tmp_path / "shard-000000.tar")
    write_shard(url, [Sample(k, img, int(y), {"protected": True})
                      for k, img, y in zip(contract_data.keys, protected_hwc,
                                           contract_data.labels.tolist())])
    back = read_shard(url)
    assert [s.key for s in back] == contract_data.keys
    images = np.stack([s.image for s in back])
    assert images.dtype == np.uint8 and np.array_equal(images, protected_hwc)
    assert_within_bound(method, contract_data.images,
                        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def test_method_same_seed_same_bytes(fitted, contract_data):
    name, method, state, out = fitted
    again = _protect(method, state, contract_data)
    assert np.array_equal(again.numpy(), out.numpy()), f"{name}: perturb is not deterministic"
    method2, state2 = _fit(name, contract_data)  # fit again with the same seed
    _assert_same(state, state2)
    assert np.array_equal(_protect(method2, state2, contract_data).numpy(), out.numpy())


@pytest.mark.parametrize("where", ["memory", "local"])
def test_method_state_round_trip(fitted, contract_data, tmp_path, where):
    name, method, state, out = fitted
    url = (f"memory://ue-contract-{uuid.uuid4().hex}/{name}.pt" if where == "memory"
           else str(tmp_path / "states" / f"{name}.pt"))
    save_state(state, url)
    back = load_state(url)
    if where == "memory":
        fsspec.filesystem("memory").rm(url, recursive=True)
    _assert_same(state, back)
    fresh = _contract_method(name)  # as in another process: a new instance, the loaded state
    fresh.check_state(back, contract_data.image_shape, source=url)
    fresh.check_loadable(back, source=url)
    assert np.array_equal(_protect(fresh, back, contract_data).numpy(), out.numpy())


def test_method_refuses_other_methods_state(fitted):
    name, _, state, _ = fitted
    for other in method_names():
        if other != name:
            with pytest.raises(StateError, match=re.escape(f"method {name!r}, not {other!r}")):
                build_method(other, "quick").check_state(state)


def test_method_refuses_other_image_shape(fitted, contract_data):
    name, method, state, _ = fitted
    c, h, w = contract_data.image_shape
    method.check_state(state, [c, h, w])
    for shape in ([c, h + 1, w], [1, h, w], [c, 32, 32]):
        with pytest.raises(StateError, match=r"shape"):
            method.check_state(state, shape)


# --- protect uses the settings the state was fitted with (Method.for_state) -----------------------
# the setting each method's noise takes its PGD / ascent step count from (a protect-time setting)
STEP_SETTING = {"em": "steps_u", "rem": "steps_u", "tap": "steps", "hypo": "steps",
                "entf-push": "steps", "entf-pull": "steps",
                "bayes": "steps", "ntga": "steps"}
# methods whose fit depends on eps: the source model trains on noise of that radius, the class
# patterns are drawn at it, the generator's eps * tanh is built with it
EPS_FITTED = {"classwise", "em-classwise", "em", "rem", "gue", "gue-at", "deepconfuse",
              "shortcutgen"}


def test_method_for_its_state_takes_the_fitted_settings(fitted, contract_data):
    name, method, state, out = fitted
    cls = type(method)
    bound = cls.for_state(state)  # what protect builds: no preset, no --set
    assert bound.settings == state["settings"]
    assert np.array_equal(_protect(bound, state, contract_data).numpy(), out.numpy()), name
    for key in ("rho_a", "arch", "seed", "noise_seed", "at_eps", "embedding_state"):
        assert key not in cls.declared or not cls.declared[key].protect_time, (name, key)
    assert (name in EPS_FITTED) != cls.declared["eps"].protect_time, name
    if name in EPS_FITTED:
        with pytest.raises(SettingsError, match=re.escape(
                "--set eps=16/255 conflicts with state file 's.pt', fitted with eps=8/255")):
            cls.for_state(state, ["eps=16/255"], source="s.pt")
    else:  # the fit never sees the noise: the same state protects at another radius
        assert cls.for_state(state, ["eps=16/255"]).eps == pytest.approx(16 / 255)
    fitted_eps = state["settings"]["eps"]  # 8/255, or the L2 / L0 methods' own
    assert cls.for_state(state, [f"eps={fitted_eps!r}"]).settings == state["settings"]


def test_method_for_its_state_changes_only_protect_time_settings(fitted, contract_data):
    name, method, state, out = fitted
    cls = type(method)
    key = STEP_SETTING.get(name)
    if key is not None:  # more steps for the final noise: applied, and other bytes
        steps = int(state["settings"][key]) + 1
        bound = cls.for_state(state, [f"{key}={steps}"])
        assert bound.settings == {**state["settings"], key: steps}
        assert not np.array_equal(_protect(bound, state, contract_data).numpy(), out.numpy())
    fitted_keys = [k for k, s in cls.declared.items() if not s.protect_time]
    if all(cls.presets["paper"][k] == state["settings"][k] for k in fitted_keys):
        # paper = quick (the model-free methods): the preset agrees with the fit; a seed does not
        assert cls.for_state(state, preset="paper").settings == \
            {**state["settings"], **cls.presets["paper"]}
        seed = cls.seed_key()
        if seed is not None:
            with pytest.raises(SettingsError, match=f"{seed}=5 conflicts .* {seed}=0"):
                cls.for_state(state, [f"{seed}=5"])
    else:  # the paper preset differs from the contract's fit in fitted settings: all named
        with pytest.raises(SettingsError, match=r"--preset paper .* fixed by the fit"):
            cls.for_state(state, preset="paper")
    with pytest.raises(StateError, match="lack"):  # a state without its settings' full record
        cls.for_state({**state, "settings": {"eps": method.eps}}, source="old.pt")
