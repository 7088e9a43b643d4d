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


def test_bench_smoke_run_on_cpu_writes_every_figure(tmp_path, monkeypatch):
    """``--scale small --device cpu`` runs the REM, GUE and victim parts end to end (the code
    of the GPU benchmark, at toy sizes): every row has its FLOPs and share of the peak, and the
    REM part projects full CIFAR-10 REM."""
    import json

    from ue_dist.bench.__main__ import main
    from ue_dist.bench.flops import DEVICE_ENV

    monkeypatch.setenv(DEVICE_ENV, "auto")  # main sets it; monkeypatch restores it
    out = tmp_path / "bench.json"
    assert main(["--scale", "small", "--device", "cpu", "--only", "rem,gue,victim",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["rem"]["device"] == "cpu"
    for row in (res["gue"]["generator_paper"]["rows"]["fp32"], res["victim"]["resnet18"]["pgd_at"]):
        assert row["gflop_per_image"] > 0 and 0 < row["pct_of_peak"]
    # PGD-AT does the standard step's work plus 10 input-gradient passes per image
    at, std = res["victim"]["resnet18"]["pgd_at"], res["victim"]["resnet18"]["standard"]
    assert at["gflop_per_image"] > 5 * std["gflop_per_image"]
    assert res["rem"]["projection"]["fp32"]["total_hours"] > 0


def test_bench_gpu_is_refused_where_torch_sees_no_cuda(monkeypatch, capsys):
    import pytest

    from ue_dist.bench.__main__ import main
    from ue_dist.bench.flops import DEVICE_ENV

    monkeypatch.setenv(DEVICE_ENV, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--gpu"])
    assert exc.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gpu", "--scale", "cpu"])  # --gpu fixes the scale
    assert "--gpu runs --scale cifar" in capsys.readouterr().err


def test_rem_profile_counts_each_units_flops_and_splits_its_time():
    """The profile's FLOPs per unit (passes x per-pass counts) match a direct count of the same
    unit, and its smoke run times both variants: the folded noise step runs no batch norm."""
    from ue_dist.bench import rem_profile
    from ue_dist.core.models import build_model

    cfg = rem_profile.SCALES["small"]
    passes = pass_flops(build_model("resnet18", 10), "cpu")
    units = rem_profile._units(cfg, "fp32", False, torch.device("cpu"))
    for unit in rem_profile.UNITS:
        counted = count_flops(units[unit])
        # the training pass skips the first convolution's input gradient: 0.2 % of the pass
        assert abs(counted - rem_profile.unit_flops(unit, cfg, passes)) <= 0.01 * counted, unit
    out = rem_profile.run("small", ("fp32",))
    for unit in rem_profile.UNITS:
        for variant in rem_profile.VARIANTS:
            row = out[f"{unit}_fp32_{variant}"]
            assert row["wall_s"] > 0 and 0 < row["pct_of_peak"]
            assert row["share"]["convolution / matmul"] > 0.2
            assert sum(row["seconds"].values()) >= 0.9 * row["profiled_wall_s"]
        assert out[f"{unit}_fp32_baseline"]["seconds"]["batch norm"] > 0
    assert out["noise_step_fp32_folded"]["seconds"]["batch norm"] == 0
    assert out["noise_step_fp32_speedup"] > 0
