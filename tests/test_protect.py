"""Streaming protection on Ray Data: outputs, ledger, resume, determinism, bad shards, watch.

Runs against a local folder and against S3 served by moto on 127.0.0.1 (tests/conftest.py).
Uses the package's ``classwise`` method (class-wise random noise) because Ray Data actors run in
other processes that only see registered package methods.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from helpers import (N_SHARDS, PER_SHARD, add_shard, check_consistent, fit_classwise, fit_quick,
                     make_source, shard_bytes_by_name)
from ue_dist.data import storage
from ue_dist.data.shards import list_shards, read_shard
from ue_dist.core.config import SettingsError
from ue_dist.methods.base import StateError, method_names
from ue_dist.methods.protect import selected_for_protection
from ue_dist.runtime import ledger
from ue_dist.runtime.protect import protect


@pytest.fixture(scope="module")
def ray_local(moto_s3):
    """Ray started after the moto variables are set, so actors reach the S3 endpoint too."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


# tests -------------------------------------------------------------------------------------------
def test_protect_resume_overwrite_and_determinism(ray_local, root):
    src, dst, state = f"{root}/src/train", f"{root}/prot/train", f"{root}/state.pt"
    inputs = {s.key: s for s in make_source(src)}
    fit_classwise(state)
    lines: list[str] = []
    summary = protect("classwise", src, dst, state_url=state, actors=2, progress=lines.append)
    assert summary["ok"] and summary["shards_done"] == N_SHARDS and summary["shards_skipped"] == 0
    assert summary["images"] == summary["images_protected"] == N_SHARDS * PER_SHARD
    assert any("images/s" in line for line in lines)
    first = check_consistent(src, dst)

    budget = 8  # floor(255 * 8/255)
    changed = 0
    for url in list_shards(dst):
        record = ledger.read_record(dst, ledger.shard_name(url))
        assert record["source"] == storage.join(src, ledger.shard_name(url))
        assert record["method"] == "classwise" and record["protected"] == PER_SHARD
        for s in read_shard(url):
            clean = inputs[s.key]
            assert s.label == clean.label and s.image.shape == clean.image.shape
            diff = np.abs(s.image.astype(int) - clean.image.astype(int))
            assert diff.max() <= budget
            changed += int(diff.any())
            assert s.meta["protected"] is True and s.meta["method"] == "classwise"
            assert abs(s.meta["eps"] - 8 / 255) < 1e-9
            assert s.meta["source_shard"] == record["source"]
        assert [x["key"] for x in record["samples"]] == [s.key for s in read_shard(url)]
    assert changed == N_SHARDS * PER_SHARD

    again = protect("classwise", src, dst, state_url=state, progress=None)
    assert again["shards_done"] == 0 and again["shards_skipped"] == N_SHARDS
    assert shard_bytes_by_name(dst) == first
    # other settings (here the seed) into the same DST: refused in incremental mode
    with pytest.raises(ledger.LedgerError, match="other settings"):
        protect("classwise", src, dst, state_url=state, seed=1, progress=None)

    if root.startswith("s3://"):
        return  # the overwrite pass below costs another actor pool; local covers it
    # overwrite with ONE actor: every shard redone, the very same bytes
    redo = protect("classwise", src, dst, state_url=state, actors=1, mode="overwrite",
                   progress=None)
    assert redo["shards_done"] == N_SHARDS
    assert check_consistent(src, dst) == first


def test_bad_shard_fraction_and_retry(ray_local, tmp_path, capsys):
    """A corrupt shard is named and skipped (exit 3, no ledger record); --fraction protects the
    seeded subset and copies the rest unchanged; the rerun retries only the repaired shard."""
    from ue_dist.cli import main as cli

    src, dst, state = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "s.pt")
    inputs = {s.key: s for s in make_source(src, n_shards=3)}
    fit_classwise(state)
    good = (tmp_path / "src" / "shard-000001.tar").read_bytes()
    (tmp_path / "src" / "shard-000001.tar").write_bytes(good[:700])  # truncated mid-member
    code = cli(["protect", "--method", "classwise", "--state", state, src, dst, "--json",
                "--fraction", "0.5", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 3
    summary = json.loads(captured.out)
    assert [b["shard"] for b in summary["bad_shards"]] == ["shard-000001.tar"]
    assert "shard-000001.tar" in summary["bad_shards"][0]["reason"]
    assert "truncated" in summary["bad_shards"][0]["reason"]
    assert "shard-000001.tar" in captured.err and summary["shards_done"] == 2
    assert not summary["ok"]
    assert sorted(ledger.committed(dst)) == ["shard-000000.tar", "shard-000002.tar"]
    assert not os.path.exists(tmp_path / "dst" / "shard-000001.tar")

    keys = sorted(inputs)
    expected = dict(zip(keys, selected_for_protection(keys, 0.5, 3)))
    for url in list_shards(dst):
        record = ledger.read_record(dst, ledger.shard_name(url))
        flags = {x["key"]: x["protected"] for x in record["samples"]}
        for s in read_shard(url):
            assert s.meta["protected"] == expected[s.key] == flags[s.key]
            assert np.array_equal(s.image, inputs[s.key].image) != expected[s.key]
            if not expected[s.key]:
                assert s.meta["method"] is None and s.meta["eps"] is None
    assert 0 < summary["images_protected"] < summary["images"]

    (tmp_path / "src" / "shard-000001.tar").write_bytes(good)  # repaired: the rerun does only it
    summary = protect("classwise", src, dst, state_url=state, fraction=0.5, seed=3, progress=None)
    assert summary["ok"] and summary["shards_done"] == 1 and summary["shards_skipped"] == 2
    check_consistent(src, dst)


def test_refusals_happen_before_anything_is_written(ray_local, tmp_path):
    src, state = str(tmp_path / "src"), str(tmp_path / "s.pt")
    make_source(src, n_shards=1)
    with pytest.raises(storage.StorageError, match="inside the input"):
        protect("classwise", src, f"{src}/prot", state_url=state, progress=None)
    with pytest.raises(StateError, match="needs a fitted state"):
        protect("classwise", src, str(tmp_path / "d0"), progress=None)
    # an L2 method's state fitted on 16x16 images cannot protect 32x32 data (its bound is one
    # on a whole 16x16 image): refused before any shard is written
    fit_quick("lsp", str(tmp_path / "s16.pt"), image_size=16)
    with pytest.raises(StateError, match="L2 norm of a whole image of the fitted size 16x16"):
        protect("lsp", src, str(tmp_path / "d1"), state_url=str(tmp_path / "s16.pt"),
                progress=None)
    assert not os.path.exists(tmp_path / "d1") or not list_shards(str(tmp_path / "d1"))
    fit_classwise(state)
    if "em" in method_names():
        with pytest.raises(StateError, match="fitted by method 'classwise', not 'em'"):
            protect("em", src, str(tmp_path / "d1"), state_url=state, preset="quick",
                    progress=None)
    with pytest.raises(Exception, match="--fraction"):
        protect("classwise", src, str(tmp_path / "d2"), state_url=state, fraction=1.5)
    with pytest.raises(Exception, match="unknown method"):
        protect("no-such-method", src, str(tmp_path / "d2"), state_url=state)


def test_protect_takes_the_settings_the_state_was_fitted_with(ray_local, tmp_path, capsys):
    """A state fitted with --preset quick is protected with quick's ascent without --preset
    (before, the default paper preset's: 100 steps of 1/255 instead of 10 of 2/255)."""
    src, state_url = str(tmp_path / "src"), str(tmp_path / "bayes.pt")
    make_source(src, n_shards=2, image_size=8)
    state = fit_quick("bayes", state_url)
    runs = {"plain": {}, "quick": {"preset": "quick"}, "more": {"overrides": ["steps=11"]}}
    out = {k: protect("bayes", src, str(tmp_path / k), state_url=state_url, progress=None, **kw)
           for k, kw in runs.items()}
    assert out["plain"]["settings"] == state["settings"] == out["quick"]["settings"]
    assert out["more"]["settings"] == {**state["settings"], "steps": 11}  # a protect-time setting
    plain = check_consistent(src, str(tmp_path / "plain"))
    assert shard_bytes_by_name(str(tmp_path / "quick")) == plain
    assert shard_bytes_by_name(str(tmp_path / "more")) != plain

    # REM fitted at eps = 8/255, rho_a = 2/255 (quick; one step: only its settings matter here)
    rem_url, dst = str(tmp_path / "rem.pt"), tmp_path / "refused"
    fit_quick("rem", rem_url, overrides={"train_steps": 1})
    with pytest.raises(SettingsError, match=re.escape(
            "--set eps=16/255, rho_a=4/255 conflicts with state file " + repr(rem_url)
            + ", fitted with eps=8/255, rho_a=2/255")):
        protect("rem", src, str(dst), state_url=rem_url, overrides=["eps=16/255", "rho_a=4/255"],
                progress=None)
    with pytest.raises(SettingsError, match=r"--preset paper rho_a=4/255, arch='resnet18'"):
        protect("rem", src, str(dst), state_url=rem_url, preset="paper", progress=None)
    from ue_dist.cli import main

    capsys.readouterr()
    code = main(["protect", "--method", "rem", "--state", rem_url, "--set", "eps=16/255", src,
                 str(dst)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fitted with eps=8/255" in err, err
    assert not dst.exists()  # refused before the lease, a ledger or a shard was written


def test_missing_bucket_is_named(ray_local, s3_bucket, tmp_path):
    with pytest.raises(storage.StorageError, match="no-such-bucket-ue"):
        protect("classwise", str(tmp_path), "s3://no-such-bucket-ue/x", progress=None)


def test_watch_protects_new_shards_exactly_once_across_restarts(ray_local, tmp_path):
    src, dst, state = str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "s.pt")
    make_source(src, n_shards=1)
    fit_classwise(state)
    stop = tmp_path / "STOP"
    landed = []

    def progress(line):
        # a new shard lands while the watcher runs; once it is protected, ask the watcher to stop
        if "] 1/1 · " in line and not landed:  # the progress line of a one-shard pass
            add_shard(src, "shard-000001.tar", start=100)
            landed.append(1)
        elif "] 1/1 · " in line and landed:
            stop.write_text("stop")

    summary = protect("classwise", src, dst, state_url=state, watch=True, poll_seconds=0.2,
                      max_polls=20, stop_file=str(stop), progress=progress)
    assert summary["shards_done"] == 2 and summary["polls"] < 20
    check_consistent(src, dst)
    before = shard_bytes_by_name(dst)
    stop.unlink()
    # a restarted watcher finds nothing new: the ledger decides, nothing is redone
    summary = protect("classwise", src, dst, state_url=state, watch=True, poll_seconds=0.1,
                      max_polls=2, progress=None)
    assert summary["shards_done"] == 0 and summary["shards_skipped"] == 2
    assert shard_bytes_by_name(dst) == before
