"""Crash safety and fault tolerance, with real processes killed by SIGKILL.

* ``ue-dist protect`` killed mid-run, then run again: DST ends exactly as after an uninterrupted
  run (same shard set, same bytes, ledger and shards agree, no temporaries).
* ``ue-dist fit`` killed after its first checkpoint, then run again with the same run name: it
  resumes from that checkpoint.
* A fit with ``--max-failures 1`` survives one of its Ray Train worker processes being killed
  (found by its process title, ``ray::RayTrainWorker...``, in the command's session).

Each command runs as a subprocess in its own process group with its own local Ray; the group is
killed as a whole, so nothing outlives the test.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (check_consistent, fit_classwise, make_source, ray_train_worker_pids,
                     shard_bytes_by_name)

BIN = Path(sys.executable).parent
# EM (quick) with a checkpoint every 10 of 80 steps and no early stop: a fit long enough to be
# killed after its first checkpoint (70 steps still to go) and short enough for a test. Two PGD
# steps instead of ten and 16x16 digits (``digits16``) make a step ~10x cheaper than the quick
# preset on 32x32; what is tested (kill, checkpoint, resume) does not depend on either.
QUICK_EM = ["--set", "stop_acc=0", "--set", "train_steps=80", "--set", "checkpoint_every=10",
            "--set", "log_every=10", "--set", "steps_u=2"]
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    """Digits at 16x16, converted once for the fit tests of this module (they only read it)."""
    from ue_dist.data.converters import convert_digits

    out = tmp_path_factory.mktemp("digits16")
    convert_digits(str(out), image_size=IMAGE_SIZE, shard_size=500)
    return out


def _env(**extra):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _start(args, log: Path, **env):
    return subprocess.Popen([str(BIN / "ue-dist"), *args], env=_env(**env), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _run(args, log: Path, timeout=400, **env) -> int:
    proc = _start(args, log, **env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)  # the local Ray it started goes with it


def _wait_for(predicate, proc, timeout, log: Path, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}:\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])


@pytest.mark.system
def test_protect_killed_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, ray_local):
    src, state = str(tmp_path / "src"), str(tmp_path / "state.pt")
    n_shards = 16
    make_source(src, n_shards=n_shards, per_shard=24)
    fit_classwise(state)
    common = ["--method", "classwise", "--state", state, "--actors", "1"]

    dst = tmp_path / "dst"
    log = tmp_path / "killed.log"
    proc = _start(["protect", *common, src, str(dst)], log)
    try:
        _wait_for(lambda: len(glob.glob(str(dst / "_ledger" / "*.json"))) >= 1, proc, 300, log,
                  "the first committed shard")
    finally:
        _kill_group(proc)  # SIGKILL: no cleanup code runs
    committed_at_kill = len(glob.glob(str(dst / "_ledger" / "*.json")))
    assert committed_at_kill < n_shards, "the run finished before it was killed; nothing tested"
    from ue_dist.data.shards import list_shards

    assert all(".tmp-" not in u for u in list_shards(str(dst)))  # a temp never looks like a shard

    assert _run(["protect", *common, src, str(dst), "--json"], tmp_path / "rerun.log") == 0, \
        (tmp_path / "rerun.log").read_text()[-3000:]
    rerun_log = (tmp_path / "rerun.log").read_text()
    import json

    summary = json.loads(next(line for line in rerun_log.splitlines() if line.startswith("{")))
    assert summary["shards_skipped"] >= committed_at_kill - 1  # a record's shard may be mid-rename
    assert summary["shards_skipped"] + summary["shards_done"] == n_shards

    # the uninterrupted reference: the same CLI command, in this process on the session's Ray
    # (a third local Ray start would cost more than the protection itself)
    from ue_dist.cli import main

    ref = tmp_path / "ref"
    assert main(["protect", *common, src, str(ref)]) == 0
    assert check_consistent(src, str(dst)) == shard_bytes_by_name(str(ref))


def _checkpoint_registered(storage: Path, run_name: str) -> bool:
    """True once Ray Train's controller has recorded a checkpoint (its snapshot file exists).

    A checkpoint folder alone is not enough: the worker writes it before the controller
    registers the report, and a worker killed in between leaves a checkpoint nobody resumes.
    """
    run = storage / run_name
    return (run / "checkpoint_manager_snapshot.json").exists() and bool(
        glob.glob(str(run / "checkpoint_*")))


@pytest.mark.system
def test_fit_killed_after_a_checkpoint_resumes_from_it(tmp_path, digits16):
    from ue_dist.methods.base import load_state

    storage = tmp_path / "runs"
    args = ["fit", "--method", "em", "--preset", "quick", *QUICK_EM,
            str(digits16 / "train"), str(tmp_path / "em.pt"), "--storage", str(storage),
            "--run-name", "em-crash", "--cpus-per-worker", "1"]
    log = tmp_path / "fit-killed.log"
    proc = _start(args, log)
    try:
        _wait_for(lambda: _checkpoint_registered(storage, "em-crash"), proc, 400, log,
                  "the first checkpoint")
    finally:
        _kill_group(proc)
    assert not (tmp_path / "em.pt").exists()
    assert _run(args, tmp_path / "fit-rerun.log", timeout=500) == 0, \
        (tmp_path / "fit-rerun.log").read_text()[-3000:]
    rerun = (tmp_path / "fit-rerun.log").read_text()
    assert "resuming source-model training at step" in rerun, rerun[-3000:]
    resumed_at = int(re.search(r"resuming source-model training at step (\d+)", rerun).group(1))
    assert resumed_at >= 10 and resumed_at % 10 == 0, resumed_at  # a checkpoint's step
    assert load_state(str(tmp_path / "em.pt"))["method"] == "em"


@pytest.mark.system
def test_fit_survives_a_killed_worker_with_max_failures(tmp_path, digits16):
    from ue_dist.methods.base import load_state

    storage = tmp_path / "runs"
    args = ["fit", "--method", "em", "--preset", "quick", *QUICK_EM,
            str(digits16 / "train"), str(tmp_path / "em.pt"), "--storage", str(storage),
            "--run-name", "em-ft", "--max-failures", "1", "--cpus-per-worker", "1", "--json"]
    log = tmp_path / "fit-ft.log"
    proc = _start(args, log)
    successors: list[int] = []
    try:
        _wait_for(lambda: _checkpoint_registered(storage, "em-ft"), proc, 400, log,
                  "a checkpoint")
        (victim,) = ray_train_worker_pids(proc.pid)  # one worker (--workers 1)
        os.kill(victim, signal.SIGKILL)  # one Ray Train worker process dies
        _wait_for(lambda: successors.extend(p for p in ray_train_worker_pids(proc.pid)
                                            if p != victim) or successors, proc, 300, log,
                  "a new Ray Train worker")
        rc = proc.wait(timeout=500)
    finally:
        _kill_group(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert successors and victim not in successors  # a new worker took over
    assert "resuming source-model training at step" in text, text[-3000:]
    state = load_state(str(tmp_path / "em.pt"))
    assert state["method"] == "em" and state["image_shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
