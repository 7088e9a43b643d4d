"""Crash safety and fault tolerance, with real processes killed by SIGKILL.

* ``ue-dist protect`` (one-step and ``--staged``) killed mid-run, then run again: DST ends exactly as after an uninterrupted
  run (same shard set, same bytes, ledger and shards agree, no temporaries).
* A fit with ``--max-failures 1`` survives one of its Ray Train worker processes being killed
  (found by its process title, ``ray::RayTrainWorker...``, in the command's session); killed
  as a whole after a later checkpoint, then run again with the same run name, it resumes from
  that checkpoint (one fit for both faults: each Ray start costs more than the fit).

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
@pytest.mark.parametrize("path", [[], ["--staged"]], ids=["one-step", "staged"])
def test_protect_killed_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, ray_local, path):
    src, state = str(tmp_path / "src"), str(tmp_path / "state.pt")
    n_shards = 16
    make_source(src, n_shards=n_shards, per_shard=24)
    fit_classwise(state)
    common = ["--method", "classwise", "--state", state, "--actors", "1", *path]

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


def _registered_checkpoints(storage: Path, run_name: str) -> int:
    """How many checkpoints Ray Train's controller has registered (named in its snapshot file).

    A checkpoint folder alone is not enough: the worker writes it before the controller
    registers the report, and a worker killed in between leaves a checkpoint nobody resumes.
    """
    snapshot = storage / run_name / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except (FileNotFoundError, OSError):
        return 0
    return len(set(re.findall(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+", text)))


@pytest.mark.system
def test_fit_survives_a_killed_worker_then_a_killed_driver_resumes(tmp_path, digits16):
    """One fit, two faults: a Ray Train worker is killed (``--max-failures 1``: a new worker
    takes over from the last checkpoint, in the same run), then the whole command is killed
    after a later checkpoint; the same command run again resumes from that one."""
    from ue_dist.methods.base import load_state

    storage = tmp_path / "runs"
    args = ["fit", "--method", "em", "--preset", "quick", *QUICK_EM,
            str(digits16 / "train"), str(tmp_path / "em.pt"), "--storage", str(storage),
            "--run-name", "em-ft", "--max-failures", "1", "--cpus-per-worker", "1"]
    log = tmp_path / "fit-ft.log"
    proc = _start(args, log)
    successors: list[int] = []
    try:
        _wait_for(lambda: _registered_checkpoints(storage, "em-ft") >= 1, proc, 400, log,
                  "a checkpoint")
        (victim,) = ray_train_worker_pids(proc.pid)  # one worker (--workers 1)
        os.kill(victim, signal.SIGKILL)  # one Ray Train worker process dies
        _wait_for(lambda: successors.extend(p for p in ray_train_worker_pids(proc.pid)
                                            if p != victim) or successors, proc, 300, log,
                  "a new Ray Train worker")
        _wait_for(lambda: "resuming source-model training at step" in log.read_text(), proc,
                  300, log, "the new worker resuming")
        first = int(re.search(r"resuming source-model training at step (\d+)",
                              log.read_text()).group(1))
        # a checkpoint written by the new worker, registered: then the driver dies too
        _wait_for(lambda: _registered_checkpoints(storage, "em-ft") >= first // 10 + 1, proc,
                  400, log, "a checkpoint of the new worker")
    finally:
        _kill_group(proc)
    assert successors and victim not in successors  # a new worker took over
    assert first >= 10 and first % 10 == 0, first  # a checkpoint's step
    assert not (tmp_path / "em.pt").exists(), "the fit finished before it was killed"
    assert _run(args, tmp_path / "fit-rerun.log", timeout=500) == 0, \
        (tmp_path / "fit-rerun.log").read_text()[-3000:]
    rerun = (tmp_path / "fit-rerun.log").read_text()
    resumed_at = int(re.search(r"resuming source-model training at step (\d+)", rerun).group(1))
    assert resumed_at > first and resumed_at % 10 == 0, (first, resumed_at)
    state = load_state(str(tmp_path / "em.pt"))
    assert state["method"] == "em" and state["image_shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
