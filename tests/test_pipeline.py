"""The Ray-free protection pipeline (ue_dist/pipeline.py), without Ray: one shard (epsilon bound,
fraction selection, metadata, ledger record, determinism, bad shards), the state read and
validated once, and a whole set."""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import fit_classwise, make_source
from ue_dist import pipeline
from ue_dist.data import storage
from ue_dist.data.dataset import load_imageset
from ue_dist.data.shards import first_image_shape, list_shards, read_shard
from ue_dist.methods import base
from ue_dist.methods.base import Method, StateError, build_method
from ue_dist.methods.protect import selected_for_protection
from ue_dist.runtime import ledger

torch.set_num_threads(1)
PER_SHARD = 24


class RandomSigns(Method):
    """Test-only method (not registered: the pipeline takes the instance) that learns nothing
    and draws its perturbation from torch's generator."""

    name = "test-random-signs"
    needs_fit = False
    presets = {"paper": {"eps": 4 / 255}, "quick": {"eps": 4 / 255}}

    def perturb(self, loaded, images, labels):
        return self.eps * torch.sign(torch.rand(images.shape) - 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    src, state_url = str(root / "src"), str(root / "state.pt")
    samples = make_source(src, n_shards=2, per_shard=PER_SHARD)
    fit_classwise(state_url)
    return {"root": root, "src": src, "state": state_url, "samples": samples,
            "shards": list_shards(src)}


def _config(setup, fraction=0.5, seed=3, **kw):
    method = build_method("classwise", "paper")
    return pipeline.open_config(method, setup["state"], fraction=fraction, seed=seed,
                                settings_hash="test-hash", **kw)


def _pixels(url):
    return {s.key: s for s in read_shard(url)}


def test_one_shard_bound_selection_metadata_and_record(setup, tmp_path):
    config = _config(setup)
    src, dst = setup["shards"][0], str(tmp_path / "dst")
    fingerprint = ledger.source_fingerprints(setup["src"])[ledger.shard_name(src)]
    row = pipeline.protect_shard(config, src, dst, fingerprint)
    name = ledger.shard_name(src)
    clean, out = _pixels(src), _pixels(storage.join(dst, name))
    keys = list(clean)
    chosen = dict(zip(keys, selected_for_protection(keys, 0.5, 3)))
    assert row == {"ok": True, "count": PER_SHARD, "protected": sum(chosen.values()),
                   "already_protected": 0}
    assert 0 < row["protected"] < PER_SHARD and list(out) == keys  # same keys, same order
    bound = math.floor(255 * config.method.eps + 1e-9)
    for key in keys:
        diff = np.abs(out[key].image.astype(int) - clean[key].image.astype(int))
        meta = out[key].meta
        assert out[key].label == clean[key].label and meta["source_shard"] == src
        assert meta["protected"] is bool(chosen[key])
        if chosen[key]:
            assert 0 < diff.max() <= bound
            assert meta["method"] == "classwise" and meta["eps"] == config.method.eps
        else:
            assert diff.max() == 0 and meta["method"] is None and meta["eps"] is None
    record = ledger.read_record(dst, name)
    data = storage.read_bytes(storage.join(dst, name))
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
    assert record["count"] == PER_SHARD and record["protected"] == row["protected"]
    assert record["settings_hash"] == "test-hash" and record["source"] == src
    assert record["source_fingerprint"] == fingerprint
    assert record["samples"] == [{"key": k, "protected": bool(chosen[k])} for k in keys]
    assert ledger.committed(dst, expect_hash="test-hash").keys() == {name}


def test_one_shard_is_deterministic(setup, tmp_path):
    """Same (inputs, state, settings, seed, shard name): same bytes, whatever the process's
    random state (the pipeline seeds from (seed, shard name)); another seed: other bytes."""
    src = setup["shards"][1]
    name = ledger.shard_name(src)
    method = RandomSigns()
    outputs = []
    for i, seed in enumerate([3, 3, 4]):
        torch.manual_seed(1000 + i)
        np.random.seed(i)
        config = pipeline.open_config(method, None, seed=seed, batch_size=5)
        dst = str(tmp_path / f"dst{i}")
        assert pipeline.protect_shard(config, src, dst)["ok"]
        outputs.append(storage.read_bytes(storage.join(dst, name)))
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_bad_shard_writes_nothing(setup, tmp_path):
    config = _config(setup)
    broken = str(tmp_path / "broken.tar")
    storage.write_bytes(broken, storage.read_bytes(setup["shards"][0])[:5000])
    dst = str(tmp_path / "dst")
    row = pipeline.protect_shard(config, broken, dst)
    assert row["ok"] is False and "broken.tar" in row["reason"]
    assert ledger.read_record(dst, "broken.tar") is None
    assert not storage.exists(storage.join(dst, "broken.tar"))
    few = pipeline.PipelineConfig(**{**config.__dict__, "state": {**config.state,
                                                                   "num_classes": 1}})
    row = pipeline.protect_shard(few, setup["shards"][0], dst)
    assert row["ok"] is False and "outside the 1 classes" in row["reason"]


def test_state_is_read_and_validated_once(setup, monkeypatch):
    reads, checks = [], []
    real_read, real_validate = storage.read_bytes, base.validate_state
    monkeypatch.setattr(storage, "read_bytes", lambda url, *a: reads.append(url) or
                        real_read(url, *a))
    monkeypatch.setattr(base, "validate_state", lambda state, source="state": checks.append(
        source) or real_validate(state, source))
    config = _config(setup)
    assert reads == [setup["state"]] and len(checks) == 1
    pipeline.protect_shard(config, setup["shards"][0], str(setup["root"] / "once"))
    assert reads.count(setup["state"]) == 1 and len(checks) == 1  # the shard check reuses it
    state, sha = pipeline.read_state(config.method, setup["state"], loadable=True)
    assert sha == hashlib.sha256(real_read(setup["state"])).hexdigest()
    with pytest.raises(StateError, match="needs a fitted state"):
        pipeline.read_state(config.method, None)


def test_whole_set_selection_contract_and_metadata(setup, tmp_path):
    """A whole set given deltas for every sample: the contract bounds it, only the selected
    samples change (the same ones a shard-by-shard run selects), metadata and shards written."""
    data = load_imageset(setup["src"])
    config = pipeline.PipelineConfig(method=build_method("classwise", "paper"), fraction=0.5,
                                     seed=3)
    delta = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(0))
    out, shards = pipeline.protect_set(config, data, delta, str(tmp_path / "set"),
                                       shard_size=20, mode="joint")
    chosen = selected_for_protection(data.keys, 0.5, 3)
    diff = (out.images.int() - data.images.int()).abs().flatten(1).amax(1)
    bound = math.floor(255 * config.method.eps + 1e-9)
    assert len(shards) == math.ceil(len(data) / 20)
    assert int(diff[torch.from_numpy(chosen)].min()) > 0 and int(diff.max()) <= bound
    assert int(diff[torch.from_numpy(~chosen)].max()) == 0
    back = load_imageset(str(tmp_path / "set"))
    assert back.keys == data.keys and torch.equal(back.images, out.images)
    for m, before, p in zip(back.meta, data.meta, chosen):
        assert m["protected"] is bool(p) and m["mode"] == "joint"
        assert m["source_shard"] == before["source_shard"]
    per_shard = pipeline.protect_shard(_config(setup), setup["shards"][0], str(tmp_path / "sh"))
    assert per_shard["protected"] == int(chosen[:PER_SHARD].sum())
    mixed = pipeline.finish_set(data, out.images, chosen, "classwise", config.method.eps)
    assert torch.equal(mixed.images, out.images) and all(m["source_shard"] is None
                                                         for m in mixed.meta)


def test_first_image_shape_reads_a_prefix(setup, tmp_path):
    url = setup["shards"][0]
    assert first_image_shape(url) == first_image_shape(url, chunk=600) == (32, 32, 3)
    assert first_image_shape(url) == read_shard(url)[0].image.shape


def test_pipeline_never_imports_ray(setup, tmp_path):
    code = (f"import sys; from ue_dist import pipeline; "
            f"from ue_dist.methods.base import build_method; "
            f"c = pipeline.open_config(build_method('classwise', 'paper'), {setup['state']!r}); "
            f"assert pipeline.protect_shard(c, {setup['shards'][0]!r}, {str(tmp_path)!r})['ok']; "
            f"assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
