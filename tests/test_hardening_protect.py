"""Hardening of ``ue-dist protect``: the source is never overwritten, one run writes a DST at a
time, the ledger follows source changes, and bad samples, settings and requests are named.

The symlink and lease cases run the real CLI (``ue_dist.cli.main`` in this process, or the
installed ``ue-dist`` in a subprocess where two runs must overlap).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import check_consistent, fit_classwise, make_source, shard_bytes_by_name
from ue_dist.cli import main
from ue_dist.data import storage
from ue_dist.data.shards import Sample, list_shards, read_shard, write_shard
from ue_dist.runtime import ledger
from ue_dist.runtime.lease import LEASE_FILE, Lease, LeaseError
from ue_dist.runtime.protect import protect

BIN = Path(sys.executable).parent


def _tree_digest(path) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def source(tmp_path):
    src, state = str(tmp_path / "src"), str(tmp_path / "state.pt")
    make_source(src, n_shards=2, per_shard=12)
    fit_classwise(state)
    return src, state


# 1. symbolic links never lead a write into SRC -----------------------------------------------
@pytest.mark.system
def test_symlinked_dst_is_refused_and_source_untouched(source, tmp_path, capsys):
    src, state = source
    before = _tree_digest(src)
    link = tmp_path / "linkdst"
    link.symlink_to(src)
    inner = tmp_path / "inner"
    inner.symlink_to(os.path.join(src, "sub"))  # a link to a folder inside SRC (not yet there)
    for dst, words in ((str(link), "through a symbolic link"), (str(inner), "inside the input"),
                       (str(tmp_path), "contains the input")):
        code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state, src, dst)
        assert code == 2, err
        assert words in err and err.count("\n") == 1, err
    # DST/_ledger planted as a link into SRC
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "_ledger").symlink_to(src)
    code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state, src, str(dst))
    assert code == 2 and "ledger folder" in err, err
    assert _tree_digest(src) == before


@pytest.mark.system
def test_output_shard_planted_as_link_into_src_is_replaced_not_followed(ray_local, source,
                                                                       tmp_path):
    src, state = source
    before = _tree_digest(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    first = ledger.shard_name(list_shards(src)[0])
    (dst / first).symlink_to(os.path.join(src, first))
    summary = protect("classwise", src, str(dst), state_url=state, progress=None)
    assert summary["shards_done"] == 2
    assert _tree_digest(src) == before  # the source shard behind the link is unchanged
    assert not (dst / first).is_symlink()
    check_consistent(src, str(dst))


# 2. the lease: one run writes a DST at a time -------------------------------------------------
def _plant_lease(dst, *, pid, expires_in, host=None):
    os.makedirs(dst, exist_ok=True)
    now = time.time()
    with open(os.path.join(dst, LEASE_FILE), "w") as f:
        json.dump({"owner": "f" * 32, "host": host or socket.gethostname(), "pid": pid,
                   "purpose": "protect", "taken": now, "heartbeat": now,
                   "expires": now + expires_in}, f)


def test_lease_is_exclusive_renewed_and_detects_takeover(tmp_path):
    dst = str(tmp_path / "dst")
    a = Lease(dst, ttl_s=30)
    a.acquire()
    with pytest.raises(LeaseError, match="being written by another run"):
        Lease(dst, ttl_s=30).acquire(wait_s=0)
    first = json.loads(open(os.path.join(dst, LEASE_FILE)).read())
    time.sleep(0.01)
    a.renew()
    renewed = json.loads(open(os.path.join(dst, LEASE_FILE)).read())
    assert renewed["owner"] == a.owner and renewed["expires"] > first["expires"]
    _plant_lease(dst, pid=os.getpid(), expires_in=30)  # someone took it over
    a.renew()
    with pytest.raises(LeaseError, match="taken over"):
        a.check()
    a.release()  # does not delete the new owner's lease
    assert json.loads(open(os.path.join(dst, LEASE_FILE)).read())["owner"] == "f" * 32


def test_expired_or_dead_owner_lease_is_taken_over(tmp_path):
    dst = str(tmp_path / "dst")
    _plant_lease(dst, pid=os.getpid(), expires_in=-1)  # expired
    said = []
    lease = Lease(dst)
    lease.acquire(say=said.append)
    assert any("taking over the expired lease" in m for m in said)
    lease.release()
    assert not os.path.exists(os.path.join(dst, LEASE_FILE))
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant_lease(dst, pid=dead.pid, expires_in=600)  # a killed run of this host
    lease = Lease(dst)
    lease.acquire()
    lease.release()


def test_live_lease_refuses_then_waits(tmp_path, source, capsys):
    src, state = source
    dst = str(tmp_path / "dst")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _plant_lease(dst, pid=holder.pid, expires_in=600)
        temp = os.path.join(dst, f".shard-000000.tar{ledger.TEMP_MARK}inflight")
        open(temp, "wb").write(b"partial")
        code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state, src, dst)
        assert code == 2 and "being written by another run" in err, err
        assert f"pid {holder.pid}" in err and err.count("\n") == 1
        assert os.path.exists(temp)  # the holder's in-flight file is not ours to delete
        started = time.time()
        with pytest.raises(LeaseError):
            Lease(dst).acquire(wait_s=1.0, poll_s=0.2)
        assert time.time() - started >= 1.0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.system
def test_two_concurrent_cli_runs_one_refused(tmp_path, source, two_nodes):
    """A second run into a DST that a live run holds is refused; the first finishes whole.
    Both join the session's cluster (two processes on one cluster, as two users would)."""
    src, state = source
    dst = str(tmp_path / "dst")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_ADDRESS=two_nodes["gcs"])
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([str(BIN / "ue-dist"), "protect", "--method", "classwise",
                              "--state", state, "--seed", "1", src, dst], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(dst, LEASE_FILE)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline
            time.sleep(0.02)
        second = subprocess.run([str(BIN / "ue-dist"), "protect", "--method", "classwise",
                                 "--state", state, "--seed", "2", src, dst], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "being written by another run" in second.stderr
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    check_consistent(src, dst)
    assert not os.path.exists(os.path.join(dst, LEASE_FILE))
    hashes = {r["settings_hash"] for r in ledger.committed(dst).values()}
    assert len(hashes) == 1  # every shard from the one run that held the lease


# 3. the ledger follows source changes ----------------------------------------------------------
@pytest.mark.system
def test_changed_source_is_redone_and_sync_removes_orphans(ray_local, source, tmp_path):
    src, state = source
    dst = str(tmp_path / "dst")
    protect("classwise", src, dst, state_url=state, progress=None)
    names = [ledger.shard_name(u) for u in list_shards(src)]
    # replace the first source shard under the same name with other samples
    replaced = read_shard(os.path.join(src, names[0]))
    replaced = [Sample(s.key, 255 - s.image, s.label, s.meta) for s in replaced]
    write_shard(os.path.join(src, names[0]), replaced)
    said = []
    again = protect("classwise", src, dst, state_url=state, progress=said.append)
    assert again["shards_done"] == 1 and again["sources_changed"] == [names[0]], again
    assert again["shards_skipped"] == 1
    fresh = str(tmp_path / "fresh")
    protect("classwise", src, fresh, state_url=state, progress=None)
    assert shard_bytes_by_name(dst) == shard_bytes_by_name(fresh)
    # delete a source shard: incremental reports the orphan, sync removes output and record
    os.remove(os.path.join(src, names[1]))
    kept = protect("classwise", src, dst, state_url=state, progress=None)
    assert kept["orphans"] == [names[1]] and os.path.exists(os.path.join(dst, names[1]))
    synced = protect("classwise", src, dst, state_url=state, mode="sync", progress=None)
    assert synced["orphans_removed"] == [names[1]]
    assert not os.path.exists(os.path.join(dst, names[1]))
    assert not os.path.exists(ledger.record_url(dst, names[1]))
    check_consistent(src, dst)


# 4. errors inside workers are the shard's (exit 3) or refused before workers start (exit 2) ---
def _write_bad_label_shard(src):
    shard = read_shard(list_shards(src)[0])
    shard[3] = Sample(shard[3].key, shard[3].image, 99, shard[3].meta)
    write_shard(list_shards(src)[0], shard)


@pytest.mark.system
def test_label_outside_the_states_classes_skips_only_its_shard(ray_local, source, tmp_path,
                                                             capsys):
    src, state = source
    _write_bad_label_shard(src)
    dst = str(tmp_path / "dst")
    code = main(["protect", "--method", "classwise", "--state", state, src, dst])
    err = capsys.readouterr().err
    assert code == 3, err
    bad = ledger.shard_name(list_shards(src)[0])
    assert f"SKIPPED bad shard {bad}" in err and "label 99 is outside the 10 classes" in err
    assert sorted(ledger.committed(dst)) == [ledger.shard_name(list_shards(src)[1])]


def test_nan_state_is_refused_before_any_worker(source, tmp_path, capsys):
    src, state = source
    payload = torch.load(state, weights_only=True)
    payload["patterns"][0, 0, 0, 0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    dst = tmp_path / "dst"
    code, err = _cli(capsys, "protect", "--method", "classwise", "--state",
                     str(tmp_path / "nan.pt"), src, str(dst))
    assert code == 2 and "nan.pt" in err and err.count("\n") == 1, err
    assert not dst.exists()


# 5. a request no node can satisfy is refused, not waited on forever ----------------------------
def test_impossible_actor_resources_are_refused(ray_local, source, tmp_path, capsys):
    src, state = source
    code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state,
                     "--cpus-per-actor", "100", src, str(tmp_path / "dst"))
    assert code == 2, err
    assert "asks for 100 CPU" in err and "largest node" in err, err
    assert not list_shards(str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst" / LEASE_FILE)


@pytest.mark.system
def test_a_gpu_this_ray_lacks_is_refused_not_run_on_the_cpu(ray_local, source, tmp_path, capsys):
    if ray_local.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU")
    src, state = source
    code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state,
                     "--gpus-per-actor", "1", src, str(tmp_path / "dst"))
    assert code == 2, err
    assert "(--cpus-per-actor, --gpus-per-actor) asks for 0.5 CPU, 1 GPU" in err, err
    assert not list_shards(str(tmp_path / "dst"))


# 6. protecting protected data is warned about ------------------------------------------------
@pytest.mark.system
def test_protecting_already_protected_data_warns(ray_local, source, tmp_path):
    src, state = source
    once = str(tmp_path / "once")
    protect("classwise", src, once, state_url=state, progress=None)
    said = []
    twice = protect("classwise", once, str(tmp_path / "twice"), state_url=state,
                    progress=said.append)
    assert twice["inputs_already_protected"] == 24
    assert any("already protected" in m and "2 eps" in m for m in said)


def test_storage_refuse_inside_forms():
    with pytest.raises(storage.StorageError):
        storage.refuse_inside("/a/b/../b/c", "/a/b")
    storage.refuse_inside("/a/bc", "/a/b")  # a sibling with a common prefix is fine
    storage.refuse_inside("/a", "/a/b")  # containment is refused only when asked
    with pytest.raises(storage.StorageError, match="contains"):
        storage.refuse_inside("/a", "/a/b", refuse_containing=True)


@pytest.mark.system
def test_user_error_inside_a_ray_train_worker_keeps_its_status(ray_local, tmp_path, capsys):
    """A shard only the worker reads is corrupt: ``fit`` exits 2 naming it, not a raw
    ``TrainingFailedError`` traceback."""
    train = str(tmp_path / "train")
    make_source(train, n_shards=2, per_shard=12)
    with open(os.path.join(train, "shard-000001.tar"), "wb") as f:
        f.write(os.urandom(3000))
    code, err = _cli(capsys, "fit", "--method", "classwise", "--cpus-per-worker", "0.5",
                     "--storage", str(tmp_path / "runs"), train, str(tmp_path / "s.pt"))
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ue-dist fit: error:")]
    assert len(errors) == 1 and "shard-000001.tar" in errors[0], err
    assert not os.path.exists(tmp_path / "s.pt")


def test_dst_that_is_a_file_is_refused(source, tmp_path, capsys):
    src, state = source
    (tmp_path / "afile").write_bytes(b"x")
    code, err = _cli(capsys, "protect", "--method", "classwise", "--state", state, src,
                     str(tmp_path / "afile"))
    assert code == 2 and "is an existing file" in err, err
    assert (tmp_path / "afile").read_bytes() == b"x"
