"""Helpers shared by several test modules (plain functions, no fixtures: those live in conftest).

* ``free_port``: a local port never handed out before in this process (moto, Ray nodes, proxies).
* Streaming-protection runs: ``make_source`` / ``add_shard`` write digits shards, ``fit_classwise``
  writes a ``classwise`` state, ``shard_bytes_by_name`` / ``check_consistent`` read a DST back
  (test_protect, test_crash, test_credentials, test_hardening_protect, test_hardening_storage).
* A real two-node Ray cluster on this machine: ``two_node_cluster`` and ``submit`` (test_cluster,
  test_credentials).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ue_dist.core.context import LocalContext
from ue_dist.data import storage
from ue_dist.data.dataset import write_samples
from ue_dist.data.shards import Sample, list_shards, read_shard
from ue_dist.data.sources import digits_arrays
from ue_dist.methods.base import build_method, save_state
from ue_dist.runtime import ledger

BIN = Path(sys.executable).parent


# ports ------------------------------------------------------------------------------------------
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free local port never handed out before in this process: the OS may return a port it
    just released, and Ray refuses two of its components configured with the same port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


# streaming-protection runs ----------------------------------------------------------------------
N_SHARDS, PER_SHARD = 4, 24


def make_source(url, n_shards=N_SHARDS, per_shard=PER_SHARD, storage_options=None, start=0,
                image_size=32):
    images, labels = digits_arrays(image_size)["train"]
    sl = slice(start, start + n_shards * per_shard)
    samples = [Sample(f"digit-{start + i:05d}", img, int(lab), {"protected": False, "version": 1})
               for i, (img, lab) in enumerate(zip(images[sl], labels[sl]))]
    write_samples(url, samples, shard_size=per_shard, num_classes=10,
                  storage_options=storage_options)
    return samples


def add_shard(src_url, name, start, per_shard=PER_SHARD, storage_options=None):
    from ue_dist.data.shards import write_shard

    images, labels = digits_arrays(32)["train"]
    samples = [Sample(f"digit-{start + i:05d}", images[start + i], int(labels[start + i]), {})
               for i in range(per_shard)]
    write_shard(storage.join(src_url, name), samples, storage_options)


def fit_classwise(state_url, storage_options=None, image_size=32, noise_seed=0):
    from ue_dist.core.context import LocalContext
    from ue_dist.data.imageset import ImageSet

    images, labels = digits_arrays(image_size)["train"]
    train = ImageSet.from_numpy_hwc(images[:200], labels[:200], num_classes=10)
    method = build_method("classwise", "paper", [f"noise_seed={noise_seed}"])
    save_state(method.fit(train, LocalContext(device="cpu", log=lambda m: None)), state_url,
               storage_options)


def fit_quick(name, state_url, image_size=8, n=48, overrides=()):
    """Fit ``name`` with its ``quick`` preset (plus ``overrides``) on the first ``n`` digits,
    in this process; returns the state."""
    from ue_dist.core.context import LocalContext
    from ue_dist.data.imageset import ImageSet

    images, labels = digits_arrays(image_size)["train"]
    train = ImageSet.from_numpy_hwc(images[:n], labels[:n], num_classes=10)
    state = build_method(name, "quick", overrides).fit(
        train, LocalContext(device="cpu", log=lambda m: None))
    save_state(state, state_url)
    return state


def shard_bytes_by_name(url, storage_options=None):
    return {ledger.shard_name(u): storage.read_bytes(u, storage_options)
            for u in list_shards(url, storage_options)}


def check_consistent(src, dst, storage_options=None):
    """DST holds one committed output per input shard: ledger and shard set match, no temps."""
    src_names = [ledger.shard_name(u) for u in list_shards(src, storage_options)]
    outputs = shard_bytes_by_name(dst, storage_options)
    assert sorted(outputs) == sorted(src_names)
    records = ledger.committed(dst, storage_options)
    assert sorted(records) == sorted(src_names)
    for name, data in outputs.items():
        assert records[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert records[name]["count"] == len(read_shard(storage.join(dst, name), storage_options))
    fs, path = storage.get_fs(dst, storage_options)
    leftovers = [p for p in fs.find(path) if ledger.TEMP_MARK in p]
    assert not leftovers, leftovers
    return outputs


# a real two-node cluster ------------------------------------------------------------------------
def _pids_mentioning(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one ``ray start --block`` and everything it started: its process group, then any
    process still naming our private temp dir. Never touches other Ray instances."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    for pid in _pids_mentioning(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


@contextlib.contextmanager
def two_node_cluster(log_dir: Path, env_extra: dict | None = None):
    """Head (1 CPU, dashboard) + worker (1 CPU) on 127.0.0.1; yields addresses and env.

    Every port is chosen free (a default one could clash with another Ray on this machine). The
    temp dir is private and short: Ray's unix socket paths must stay under ~107 characters,
    which a pytest tmp_path would exceed.
    """
    temp_dir = tempfile.mkdtemp(prefix="uer", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", **(env_extra or {}))
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()

    def node_args():
        return ["--num-cpus=1", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                "--disable-usage-stats", "--block"]

    procs: list[subprocess.Popen] = []
    try:
        head_cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                    *node_args()]
        procs.append(subprocess.Popen(head_cmd, env=env, start_new_session=True,
                                      stdout=open(log_dir / "head.log", "w"), stderr=subprocess.STDOUT))
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_for_nodes(dashboard, 1, procs, log_dir)
        worker_cmd = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *node_args()]
        procs.append(subprocess.Popen(worker_cmd, env=env, start_new_session=True,
                                      stdout=open(log_dir / "worker.log", "w"), stderr=subprocess.STDOUT))
        _wait_for_nodes(dashboard, 2, procs, log_dir)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir}
    finally:
        for proc in reversed(procs):
            _stop_node(proc, temp_dir)
        leftovers = _pids_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"Ray processes left running: {leftovers}"


def _wait_for_nodes(dashboard: str, n: int, procs, log_dir: Path, timeout: float = 240) -> None:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"ray start exited with {p.returncode}: "
                                   + (log_dir / "head.log").read_text()[-2000:])
        try:
            alive = [x for x in list_nodes(address=dashboard, timeout=10) if x.state == "ALIVE"]
            if len(alive) >= n:
                return
        except Exception:
            pass
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster did not reach {n} alive nodes in {timeout}s")


def submit(cluster, working_dir: Path, entrypoint: list[str], timeout: int = 600,
           runtime_env: dict | None = None):
    """``ray job submit`` (waits and streams the job's logs); returns (completed process, job id)."""
    job_id = f"uedist_{os.getpid()}_{int(time.time())}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"],
           "--submission-id", job_id, "--working-dir", str(working_dir)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    proc = subprocess.run(cmd + ["--", *entrypoint], env=cluster["env"], capture_output=True,
                          text=True, timeout=timeout)
    return proc, job_id


def ray_train_worker_pids(session: int) -> list[int]:
    """PIDs of the Ray Train worker processes of a command started with ``start_new_session``
    (session id = its pid): Ray titles them ``ray::RayTrainWorker...``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")[0]
            if title.startswith(b"ray::RayTrainWorker") and os.getsid(int(entry)) == session:
                pids.append(int(entry))
        except OSError:  # the process ended while we looked
            continue
    return sorted(pids)



class KeepStates(LocalContext):
    """A quiet local context that keeps the checkpoint states it is given: every report's
    (``None`` included), or only real states with ``skip_empty``."""

    def __init__(self, skip_empty: bool = False):
        super().__init__(device="cpu", log=lambda _message: None)
        self.skip_empty, self.states = skip_empty, []

    def report(self, metrics, state=None):
        super().report(metrics, state)
        if state is not None or not self.skip_empty:
            self.states.append(state)


# effectiveness on the digits ------------------------------------------------------------------
def digits_clean_and_protected(method, epochs: int = 24, batch_size: int = 256) -> tuple[float, float]:
    """Fit ``method`` on the 1,437 training digits (seed 0), protect them all, and train the
    quick victim (small CNN) for ``epochs`` on the clean and on the protected set: the two clean
    test accuracies, as the slow effectiveness checks compare them."""
    from ue_dist.core.context import LocalContext
    from ue_dist.core.victim import resolve_victim_settings, train_victim
    from ue_dist.data.imageset import ImageSet
    from ue_dist.data.sources import digits_imageset
    from ue_dist.methods.protect import protect_uint8

    def quiet():
        return LocalContext(device="cpu", seed=0, log=lambda _m: None)

    train, test = digits_imageset("train"), digits_imageset("test")
    state = method.fit(train, quiet())
    out = protect_uint8(method, method.load(state), train.images, train.labels,
                        batch_size=batch_size)
    protected = ImageSet(out, train.labels.clone(), train.keys, train.meta, train.num_classes)
    settings = resolve_victim_settings("quick", {"epochs": epochs})
    return tuple(float(train_victim(data, test, settings, ctx=quiet())["test_acc"])
                 for data in (train, protected))
