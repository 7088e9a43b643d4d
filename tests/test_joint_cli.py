"""`ue-dist protect --method bayes --joint`: all shards of SRC optimised as one set on a Ray Train
worker group, written through the shard commit and ledger; checkpoints in DST, resumed."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ue_dist.cli import main
from ue_dist.core.context import LocalContext
from ue_dist.data.dataset import write_imageset
from ue_dist.data.shards import list_shards, read_shard
from ue_dist.data.sources import digits_imageset
from ue_dist.methods.base import build_method, save_state
from ue_dist.methods.protect import selected_for_protection
from ue_dist.runtime import ledger
from ue_dist.runtime.bayes_joint import JOINT_DIR, mark_checkpoint, write_checkpoint
from ue_dist.runtime.protect import protect

# native 8x8 digits, a one-epoch embedding, 4 signed steps of 2/255 (sums of equal steps:
# the rounded bytes do not hang on the last bits of a float reduction)
SETTINGS = ["arch=small-cnn", "embed_epochs=1", "embed_batch_size=12", "steps=4", "eps=8/255",
            "step_size=2/255", "step_rule=sign", "bank_size=12", "chunk=8", "block_size=7"]
N, PER_SHARD, FRACTION = 36, 12, 0.5


@pytest.fixture(scope="module")
def bucket(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    torch.set_num_threads(1)
    data = digits_imageset("train", image_size=None).subset(range(N))
    src = str(root / "src")
    write_imageset(src, data, shard_size=PER_SHARD)
    method = build_method("bayes", "quick", SETTINGS)
    state = method.fit(data, LocalContext(seed=0, log=lambda m: None))
    state_url = str(root / "bayes.pt")
    save_state(state, state_url)
    return {"root": root, "src": src, "state_url": state_url, "data": data, "method": method,
            "state": state}


def _bytes(dst):
    return {os.path.basename(u): open(u, "rb").read() for u in list_shards(dst)}


def _single(bucket, upto=None):
    """perturb_jointly in this process with the run's mask; (delta, history, delta at ``upto``)."""
    method, data = bucket["method"], bucket["data"]
    chosen = selected_for_protection(data.keys, FRACTION, 0)
    seen = {}

    def on_step(t, beta, delta):
        if t == upto:
            seen["delta"] = delta.clone()

    delta, history = method.perturb_jointly(method.load(bucket["state"]), data.float_images(),
                                            data.labels, fixed=torch.from_numpy(~chosen),
                                            on_step=on_step)
    return delta, history, seen.get("delta"), chosen


def test_joint_cli_two_workers_match_one_and_the_single_process_objective(bucket, capsys):
    root = bucket["root"]
    two, one = str(root / "two"), str(root / "one")
    code = main(["protect", "--method", "bayes", "--state", bucket["state_url"], "--joint",
                 "--workers", "2", "--fraction", str(FRACTION), "--cpus-per-actor", "0.5",
                 "--json", bucket["src"], two])
    assert code == 0
    import json
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["shards_done"] == 3 and summary["images"] == N
    joint = summary["joint"]
    assert joint["start_step"] == 0 and joint["steps"] == 4
    assert len(joint["peak_rss_mib_per_worker"]) == 2
    _, history, _, chosen = _single(bucket)
    assert summary["images_protected"] == int(chosen.sum())
    assert abs(joint["beta_before"] - history[0]) < 1e-6
    assert abs(joint["beta_after"] - history[-1]) < 1e-5 and history[-1] > history[0]
    r1 = protect("bayes", bucket["src"], one, state_url=bucket["state_url"], joint=True,
                 workers=1, fraction=FRACTION, cpus_per_actor=0.5, progress=None)
    assert r1["ok"] and abs(r1["joint"]["beta_after"] - joint["beta_after"]) < 1e-5
    assert _bytes(one) == _bytes(two)  # the same protected bytes with 1 and 2 workers
    # the written images: the selected ones within 8 levels, the others untouched
    out = {s.key: s for u in list_shards(two) for s in read_shard(u)}
    data = bucket["data"]
    for i, key in enumerate(data.keys):
        diff = np.abs(out[key].image.astype(int) - data.images[i].permute(1, 2, 0).numpy())
        assert (diff.max() <= 8 and out[key].meta["mode"] == "joint"
                and out[key].meta["protected"] is bool(chosen[i]))
        if not chosen[i]:
            assert diff.max() == 0
    # a ledger record per shard; the checkpoints are gone; a rerun changes nothing
    assert sorted(ledger.committed(two)) == ["shard-000000.tar", "shard-000001.tar",
                                             "shard-000002.tar"]
    assert not os.path.exists(os.path.join(two, JOINT_DIR))
    before = _bytes(two)
    again = protect("bayes", bucket["src"], two, state_url=bucket["state_url"], joint=True,
                    workers=2, fraction=FRACTION, cpus_per_actor=0.5, progress=None)
    assert again["shards_skipped"] == 3 and again["shards_done"] == 0 and _bytes(two) == before
    bucket["reference"] = before
    bucket["run_hash"] = summary["settings_hash"]


@pytest.mark.slow  # two more Ray Train runs (about 3 min under load)
def test_joint_run_resumes_from_its_last_checkpoint(bucket):
    """A run that crashed after 2 of its 4 steps left a checkpoint in DST: the next run starts
    at step 2 and writes the bytes of the uninterrupted run."""
    if "reference" not in bucket:
        whole = protect("bayes", bucket["src"], str(bucket["root"] / "whole"),
                        state_url=bucket["state_url"], joint=True, workers=2, fraction=FRACTION,
                        cpus_per_actor=0.5, progress=None)
        bucket["reference"] = _bytes(str(bucket["root"] / "whole"))
        bucket["run_hash"] = whole["settings_hash"]
    dst = str(bucket["root"] / "resumed")
    _, _, at_two, _ = _single(bucket, upto=2)
    folder = os.path.join(dst, JOINT_DIR, bucket["run_hash"], "steps")
    parts = [(f"shard-{i:06d}.tar", at_two[i * PER_SHARD:(i + 1) * PER_SHARD])
             for i in range(N // PER_SHARD)]
    write_checkpoint(folder, 2, parts, None)
    mark_checkpoint(folder, 2, None)
    r = protect("bayes", bucket["src"], dst, state_url=bucket["state_url"], joint=True, workers=2,
                fraction=FRACTION, cpus_per_actor=0.5, progress=None)
    assert r["ok"] and r["joint"]["start_step"] == 2
    assert _bytes(dst) == bucket["reference"]


def test_joint_refusals(bucket, tmp_path):
    with pytest.raises(Exception, match="method 'random-samplewise' perturbs batch by batch"):
        protect("random-samplewise", bucket["src"], str(tmp_path / "d"), joint=True,
                progress=None)
    with pytest.raises(Exception, match="cannot --watch"):
        protect("bayes", bucket["src"], str(tmp_path / "d"), state_url=bucket["state_url"],
                joint=True, watch=True, progress=None)
    assert not os.path.exists(tmp_path / "d") or not list_shards(str(tmp_path / "d"))


def test_sweep_joint_mode_protects_each_fraction_jointly(bucket):
    """bayes_mode: joint in a sweep: one joint protection per fraction (its clean part fixed in
    the objective), the same as perturb_jointly with that mask; streaming shares one."""
    from ue_dist.core.quantize import apply_perturbation
    from ue_dist.runtime.sweep import cache_key, fit_and_protect

    settings = dict(bucket["method"].settings)
    data = bucket["data"]
    state, protected = fit_and_protect("bayes", settings, data, joint=(FRACTION, 0))
    delta, _, _, chosen = _single(bucket)
    assert torch.equal(protected, torch.from_numpy(apply_perturbation(data.images, delta, eps=8 / 255)))
    assert torch.equal(protected[torch.from_numpy(~chosen)], data.images[torch.from_numpy(~chosen)])
    joint = {"bayes_mode": "joint"}
    assert cache_key(joint, "bayes", 0, 0.5) != cache_key(joint, "bayes", 0, 1.0)
    assert cache_key({"bayes_mode": "streaming"}, "bayes", 0, 0.5) == "bayes:0"
    assert cache_key(joint, "em", 0, 0.5) == "em:0"
