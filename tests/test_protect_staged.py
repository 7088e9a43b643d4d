"""``protect --staged`` (read/decode and encode/write as Ray Data CPU tasks around the perturb
actor pool) against the one-step actor path, and ``--actors MIN:MAX`` (an autoscaling pool)."""
from __future__ import annotations

import json

import pytest

from helpers import fit_classwise, make_source, shard_bytes_by_name
from ue_dist.core.config import SettingsError
from ue_dist.data import storage
from ue_dist.data.shards import Sample, read_shard, write_shard
from ue_dist.runtime import ledger
from ue_dist.runtime.protect import protect


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """4 good shards, one truncated (a read-step bad shard) and one with a label outside the
    state's 10 classes (a perturb-step bad shard)."""
    root = tmp_path_factory.mktemp("staged")
    src, state = str(root / "src"), str(root / "s.pt")
    make_source(src, n_shards=4)
    good = (root / "src" / "shard-000001.tar").read_bytes()
    (root / "src" / "shard-000001.tar").write_bytes(good[:700])  # truncated mid-member
    first = read_shard(storage.join(src, "shard-000000.tar"))[0]
    write_shard(storage.join(src, "shard-000009.tar"),
                [Sample("odd-00000", first.image, 42, {})])
    fit_classwise(state)
    return root, src, state


BAD = {"shard-000001.tar": "truncated", "shard-000009.tar": "outside the 10 classes"}


def _bad(summary):
    return {b["shard"]: b["reason"] for b in summary["bad_shards"]}


def test_staged_writes_the_same_bytes_and_skips_the_same_bad_shards(ray_local, source):
    root, src, state = source
    common = dict(state_url=state, fraction=0.5, seed=3, progress=None)
    old = protect("classwise", src, str(root / "old"), actors=1, **common)
    # a pool that takes every CPU of the session's 2-CPU Ray: the CPU steps must still run
    new = protect("classwise", src, str(root / "new"), actors=2, cpus_per_actor=1.0,
                  staged=True, **common)
    for summary in (old, new):
        assert sorted(_bad(summary)) == sorted(BAD) and not summary["ok"]
        for name, why in BAD.items():
            assert name in _bad(summary)[name] and why in _bad(summary)[name]
    for key in ("shards_done", "images", "images_protected", "inputs_already_protected",
                "settings_hash"):
        assert old[key] == new[key], key
    assert 0 < new["images_protected"] < new["images"]  # the fraction chose some, not all
    assert shard_bytes_by_name(str(root / "new")) == shard_bytes_by_name(str(root / "old"))
    new_records, old_records = ledger.committed(str(root / "new")), ledger.committed(str(root / "old"))
    assert sorted(new_records) == sorted(old_records)
    for name, record in new_records.items():  # all but where it was written
        for key in ("count", "sha256", "bytes", "settings_hash", "protected", "samples",
                    "source_fingerprint"):
            assert record[key] == old_records[name][key], (name, key)


def test_staged_resumes_a_run_of_either_path_and_scales_its_pool(ray_local, source, tmp_path):
    """A DST half done (here: by the one-step path, then a shard's output and record removed, as
    a killed run leaves it) is finished by ``--staged --actors 1:2`` with the same bytes."""
    root, src, state = source
    ref = protect("classwise", src, str(tmp_path / "ref"), state_url=state, progress=None)
    dst = str(tmp_path / "dst")
    protect("classwise", src, dst, state_url=state, progress=None)
    ledger.remove_output(dst, "shard-000002.tar")
    again = protect("classwise", src, dst, state_url=state, staged=True, actors="1:2",
                    progress=None)
    assert again["shards_done"] == 1 and again["shards_skipped"] == ref["shards_done"] - 1
    assert shard_bytes_by_name(dst) == shard_bytes_by_name(str(tmp_path / "ref"))
    records = ledger.committed(dst)
    assert sorted(records) == sorted(ledger.committed(str(tmp_path / "ref")))


@pytest.mark.parametrize("value", ["0", "2:1", "x", "1:2:3", "0:3", "1:", "-1", True])
def test_bad_actor_counts_are_refused_naming_the_option(tmp_path, value):
    from ue_dist.runtime.jobs import JobSpecError, load_spec

    with pytest.raises(SettingsError, match="--actors"):
        protect("classwise", str(tmp_path / "s"), str(tmp_path / "d"), actors=value,
                progress=None)
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "t", "root": "out",
                                "data": {"train": "d/train", "test": "d/test"},
                                "method": {"name": "classwise", "preset": "quick"},
                                "protect": {"actors": value}}))
    with pytest.raises(JobSpecError, match="protect.actors"):
        load_spec(str(path))


def test_actor_ranges_parse_on_the_command_line_and_in_job_specs(tmp_path):
    from ue_dist.cli import build_parser
    from ue_dist.options import actor_range
    from ue_dist.runtime.jobs import load_spec

    args = build_parser().parse_args(["protect", "--method", "em", "S", "D", "--actors", "1:2",
                                      "--staged"])
    assert args.actors == "1:2" and args.staged
    assert actor_range(args.actors, "--actors", SettingsError) == (1, 2)
    assert actor_range(3, "--actors", SettingsError) == (3, 3)
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"name": "t", "root": "out",
                                "data": {"train": "d/train", "test": "d/test"},
                                "method": {"name": "classwise", "preset": "quick"},
                                "protect": {"actors": "1:4", "staged": True}}))
    spec = load_spec(str(path))
    assert spec["protect"]["actors"] == "1:4" and spec["protect"]["staged"] is True


def test_staged_and_joint_are_refused_together(tmp_path):
    with pytest.raises(SettingsError, match="--staged"):
        protect("bayes", str(tmp_path / "s"), str(tmp_path / "d"), staged=True, joint=True,
                progress=None)

