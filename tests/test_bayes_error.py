"""The blocked, differentiable Bayes-error estimator (Algorithm 1, Eq. (6)-(7)) and the toys."""
from __future__ import annotations

import math

import pytest
import torch

from ue_dist.core.bayes_error import (bayes_error, dense_bayes_error, kernel_posterior,
                                      max_posterior_sum, median_sigma)
from ue_dist.core.distributed import all_gather_no_grad, all_gather_with_grad


def _data(n=120, d=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    e = torch.randn(n, d, generator=g, dtype=dtype) + torch.randn(classes, d, generator=g, dtype=dtype)[y]
    return e, y


@pytest.mark.parametrize("block", [1, 7, 50, None])
def test_blocked_equals_dense_value_and_gradient(block):
    e, y = _data()
    for sigma in (0.3, 1.0, 4.0):
        a = e.clone().requires_grad_(True)
        b = e.clone().requires_grad_(True)
        vb = bayes_error(a, y, sigma=sigma, block_size=block)
        vd = dense_bayes_error(b, y, sigma)
        (gb,) = torch.autograd.grad(vb, a)
        (gd,) = torch.autograd.grad(vd, b)
        assert abs(float(vb) - float(vd)) < 1e-12
        assert torch.allclose(gb, gd, atol=1e-12, rtol=1e-9)
        assert float(gd.abs().max()) > 0  # the comparison is not trivially 0 == 0


def test_gradient_matches_finite_differences():
    e, y = _data(n=40, d=3)
    sigma = 0.8
    x = e.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(bayes_error(x, y, sigma=sigma, block_size=9), x)
    h = 1e-6
    for i, j in [(0, 0), (5, 2), (17, 1), (39, 0)]:
        plus, minus = e.clone(), e.clone()
        plus[i, j] += h
        minus[i, j] -= h
        fd = (float(bayes_error(plus, y, sigma=sigma)) - float(bayes_error(minus, y, sigma=sigma))) / (2 * h)
        assert abs(fd - float(g[i, j])) < 1e-6


def test_stable_in_high_dimension_and_tiny_bandwidth():
    # the authors' fixed sigma = 0.3 underflows every kernel value on unnormalised features;
    # the softmax form stays finite and keeps a gradient
    e, y = _data(n=200, d=512, classes=10, dtype=torch.float32)
    e = e * 20
    x = e.clone().requires_grad_(True)
    v = bayes_error(x, y, sigma=0.3)
    (g,) = torch.autograd.grad(v, x)
    assert math.isfinite(float(v)) and 0.0 <= float(v) < 0.9
    assert torch.isfinite(g).all()
    # naive kernels underflow completely here
    d2 = torch.cdist(e, e).pow(2)
    assert float(torch.exp(-d2 / (2 * 0.3 ** 2)).fill_diagonal_(0).max()) == 0.0


def test_posterior_rows_sum_to_one_and_self_is_excluded():
    e = torch.tensor([[0.0], [0.01], [5.0], [5.02]])
    y = torch.tensor([0, 1, 1, 0])
    p = kernel_posterior(e, e, y, sigma=0.1, self_index=torch.arange(4))
    assert torch.allclose(p.sum(1), torch.ones(4))
    # without self-exclusion each point would see itself; with it, it sees its neighbour's label
    assert float(p[0, 1]) > 0.99 and float(p[2, 0]) > 0.99


def test_bank_keys_and_self_index():
    e, y = _data(n=60)
    # scoring the first 20 rows against all 60 (self excluded by index) equals their rows in
    # the full estimate
    full = kernel_posterior(e, e, y, 1.0, self_index=torch.arange(60))
    part = kernel_posterior(e[:20], e, y, 1.0, self_index=torch.arange(20))
    assert torch.allclose(full[:20], part)
    # bank: queries are the first 30 rows, keys are themselves + 30 fixed bank rows
    q = e[:30].clone().requires_grad_(True)
    v = bayes_error(q, y[:30], sigma=1.0, bank=e[30:], bank_labels=y[30:])
    assert abs(float(v) - float(1 - full[:30].max(1).values.mean())) < 1e-12
    (g,) = torch.autograd.grad(v, q)
    assert g.abs().sum() > 0


def test_weights_and_per_row_max():
    e, y = _data(n=30)
    w = torch.rand(30, dtype=torch.float64)
    total, m = max_posterior_sum(e, e, y, 1.0, self_index=torch.arange(30), weights=w)
    p = kernel_posterior(e, e, y, 1.0, self_index=torch.arange(30))
    assert torch.allclose(m, p.max(1).values)
    assert abs(float(total) - float((w * m).sum())) < 1e-12


@pytest.mark.parametrize("bad, match", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=float("nan")), "sigma"),
    (dict(single_class=True), "2 classes"), (dict(empty=True), "empty"),
    (dict(nan=True), "NaN or infinite"), (dict(inf=True), "NaN or infinite"),
])
def test_bad_input_is_a_clear_error(bad, match):
    e, y = _data(n=10)
    sigma = bad.get("sigma", 1.0)
    if bad.get("single_class"):
        y = torch.zeros_like(y)
    if bad.get("empty"):
        e, y = e[:0], y[:0]
    if bad.get("nan"):
        e[3, 1] = float("nan")
    if bad.get("inf"):
        e[2, 0] = float("inf")
    with pytest.raises(ValueError, match=match):
        bayes_error(e, y, sigma=sigma)


def test_median_heuristics():
    e, _ = _data(n=300, d=4)
    classic = median_sigma(e)
    local = median_sigma(e, nearest=17)
    assert 0 < local < classic
    d = torch.cdist(e, e)
    off = ~torch.eye(300, dtype=torch.bool)
    assert abs(classic - float(d[off].median())) < 1e-9


def test_all_gather_is_identity_without_process_group():
    t = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(t) is t
    assert all_gather_no_grad(t) is t


def test_gaussians_estimate_matches_analytic():
    from ue_dist.runtime.bayes_joint import gaussians_report

    r = gaussians_report(n=4000)
    assert abs(r["analytic"] - 0.158655) < 1e-5
    assert abs(r["estimate"] - r["analytic"]) <= 0.01, r


def test_moons_estimate_rises_monotonically():
    from ue_dist.runtime.bayes_joint import moons_report

    r = moons_report(n=200, eps=0.25)
    assert r["after"] >= 1.2 * r["before"], r
    hist = r["history"]
    assert all(b >= a - 1e-12 for a, b in zip(hist, hist[1:])), hist
    assert r["max_abs_delta"] <= 0.25 + 1e-12


def test_cli_toys_and_bad_options(capsys, tmp_path):
    import json

    from PIL import Image

    from ue_dist.cli import main

    assert main(["bayes-error", "--toy", "gaussians", "--n", "2000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["toy"] == "gaussians" and abs(out["estimate"] - out["analytic"]) < 0.02
    assert main(["bayes-error", "--toy", "moons", "--sigma", "0"]) == 2
    assert "--sigma" in capsys.readouterr().err
    assert main(["bayes-error", "--toy", "moons", "--eps", "-1"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert main(["bayes-error"]) == 2
    assert "URL" in capsys.readouterr().err
    # the paper's Figure 3: before/after scatter of the moons
    png = tmp_path / "moons.png"
    assert main(["bayes-error", "--toy", "moons", "--n", "60", "--plot", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plot"] == str(png) and "_points" not in out and out["after"] > out["before"]
    with Image.open(png) as img:
        assert img.size[0] > 400
    assert main(["bayes-error", "--toy", "gaussians", "--plot", str(tmp_path / "g.png")]) == 2
    assert "--toy moons" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
