"""The benchmark suite's own machinery: FLOP counts that match the arithmetic, and a small Bayes
run end to end (the full suite is `make bench`; its figures are in the README)."""
import torch
from torch import nn

import ue_dist  # noqa: F401
from ue_dist.bench import bayes as bench_bayes
from ue_dist.bench.flops import count_flops, pass_flops


def test_flop_count_of_a_linear_layer_forward_and_backward():
    layer = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    forward = count_flops(lambda: layer(x))
    assert forward == 2 * 8 * 64 * 32
    both = count_flops(lambda: torch.autograd.grad(layer(x).sum(), x))
    assert both == 2 * forward  # backward w.r.t. the input only: one more matmul


def test_pass_flops_grows_with_the_model():
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    wide = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 32 * 32, 10))
    a, b = pass_flops(small, "cpu"), pass_flops(wide, "cpu")
    assert 0 < a["input_grad"] < b["input_grad"]
    # a training step also computes weight gradients: more work than an input-gradient step
    assert a["input_grad"] < a["train_step"] and b["input_grad"] < b["train_step"]


def test_bayes_benchmark_small_scale_runs_and_agrees_with_dense():
    out = bench_bayes.run("small")
    for cmp_ in (out["compare"], out["compare_largest_dense"]):
        assert cmp_["max_abs_value_diff"] < 1e-6
        assert cmp_["dense_s"] > 0 and cmp_["blocked_s"] > 0
    assert out["large"]["n"] == 8192 and out["large"]["grad_finite"]
    assert out["large"]["peak_rss_delta_gb"] < 4
