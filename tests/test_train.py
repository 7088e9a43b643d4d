"""Fitting on Ray Train: two DDP workers (gloo) produce a usable state; bad input fails early."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ue_dist.core.config import SettingsError
from ue_dist.data.dataset import write_imageset
from ue_dist.data.sources import digits_imageset
from ue_dist.methods import StateError, build_method, load_state
from ue_dist.runtime.train import fit_method


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_imageset(str(root / "train"), digits_imageset("train").subset(range(256)), shard_size=128)
    return root


def test_two_worker_ddp_fit_gives_a_working_state(small_digits, tmp_path, ray_local, monkeypatch):
    # relative paths, as a user types them: Ray workers do not share the driver's working dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(small_digits)
    state_url = "em.pt"
    result = fit_method("em", "data/train", state_url, preset="quick",
                        # 2 PGD steps, not 10: the DDP plumbing is under test, not EM's loop
                        overrides={"train_steps": 20, "stop_acc": 0.0, "steps_u": 2},
                        workers=2,
                        cpus_per_worker=0.5, storage_path="runs",
                        progress=lambda m: None)
    assert result["metrics"].get("done") is True
    state = load_state(str(tmp_path / state_url))
    method = build_method("em", "quick")
    method.check_state(state, (3, 32, 32))
    loaded = method.load(state)
    x = digits_imageset("test").subset(range(8))
    delta = method.perturb(loaded, x.float_images(), x.labels)
    assert delta.shape == x.images.shape and delta.abs().max() <= method.eps + 1e-6
    assert delta.abs().mean() > 0.3 * method.eps


def test_fit_refuses_bad_input_before_running(small_digits, tmp_path):
    with pytest.raises(SettingsError, match="unknown method 'nope'"):
        fit_method("nope", str(small_digits / "train"), str(tmp_path / "x.pt"))
    with pytest.raises(SettingsError, match="unknown setting"):
        fit_method("em", str(small_digits / "train"), str(tmp_path / "x.pt"), overrides=["stpes=1"])
    (tmp_path / "exists.pt").write_bytes(b"x")
    with pytest.raises(StateError, match="already exists"):
        fit_method("em", str(small_digits / "train"), str(tmp_path / "exists.pt"))
    with pytest.raises(Exception, match="inside the input"):
        fit_method("em", str(small_digits / "train"), str(small_digits / "train" / "s.pt"))


def test_only_checkpointed_reports_reach_ray_train(monkeypatch):
    # each ray.train.report is a barrier across the worker group (~2 s): per-step metrics made
    # GUE's fit on Ray 12x slower, so metrics-only reports must stay in the worker
    import ray.train

    from ue_dist.runtime.train import RayTrainContext

    calls = []
    monkeypatch.setattr(ray.train, "report",
                        lambda metrics, checkpoint=None: calls.append((metrics, checkpoint)))
    logged = []
    ctx = RayTrainContext(torch.device("cpu"), seed=0, metrics_log_interval_s=0.0)
    ctx._log = logged.append
    for step in range(3):
        ctx.report({"step": step, "loss": 0.5, "note": object()})
    assert calls == []
    assert ctx.history == [{"step": s, "loss": 0.5} for s in range(3)]
    assert len(logged) == 3 and logged[-1] == "metrics step=2 loss=0.5"
    # a method that logs its own progress gets no "metrics" echo of the same figures
    chatty = RayTrainContext(torch.device("cpu"), seed=0, metrics_log_interval_s=60.0)
    lines: list[str] = []
    chatty._log = lines.append
    chatty._last_metrics_log -= 120  # however long it was silent before its own line
    chatty.log("em step 25/200 loss 1.6")
    chatty.report({"step": 25, "loss": 1.6})
    assert lines == ["em step 25/200 loss 1.6"]
    ctx.report({"epoch": 1}, state={"w": torch.zeros(2)})
    assert len(calls) == 1 and calls[0][0] == {"epoch": 1} and calls[0][1] is not None
