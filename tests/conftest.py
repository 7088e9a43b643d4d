"""Shared fixtures: an S3 endpoint served by moto on 127.0.0.1 (no network, no real AWS).

``moto_s3`` starts one ThreadedMotoServer per test session and points the standard AWS variables
at it (``AWS_ENDPOINT_URL``, keys, ``AWS_EC2_METADATA_DISABLED``), so s3fs, boto3 and Ray
workers started afterwards by this process all reach it. The secret key is a random, recognisable
string: credential tests search outputs for it. ``s3_bucket`` gives each test a fresh bucket; ``s3_server`` is an alias of ``moto_s3``.
"""
from __future__ import annotations

import os
import tempfile
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The CLI's log files of Ray's output (ue_dist.runtime.console) stay out of the checkout.
os.environ.setdefault("UE_DIST_LOG_DIR", tempfile.mkdtemp(prefix="ue-dist-test-logs-"))

from helpers import free_port  # noqa: E402  (after the Ray variable: helpers imports ue_dist)


def _share_the_cores() -> None:
    """Under pytest-xdist (`make test` runs `-n 2`) each worker process gets its share of the
    cores for torch's intra-op threads (and the subprocesses it starts inherit it), so two
    workers on 2 cores do not run 4 busy threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        torch.set_num_threads(share)


_share_the_cores()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models: the test machine is shared, and several
    threads per process thrash it (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def moto_s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    secret = f"uedistPLANTEDsecret{uuid.uuid4().hex}"
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAUEDISTTEST0001",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "secret": secret,
               "key_id": env["AWS_ACCESS_KEY_ID"], "env": dict(env)}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def two_nodes(moto_s3, tmp_path_factory):
    """One real two-node Ray cluster for the session (head with dashboard + worker, 1 CPU each,
    tests/helpers.py ``two_node_cluster``): jobs are submitted to it and CLI commands join it
    (``RAY_ADDRESS``), so each system test does not pay for starting and stopping Ray. Its
    nodes carry the moto S3 variables in their environment, as an instance role would."""
    from helpers import two_node_cluster

    with two_node_cluster(tmp_path_factory.mktemp("two-nodes")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server(moto_s3):
    """The same server under the name the data-layer tests use."""
    return moto_s3


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh, empty bucket; yields its ``s3://name`` URL."""
    import boto3

    name = f"ue-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3["endpoint"]).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """One local Ray for the whole session (2 CPUs; actors take fractions). Tests that need Ray
    in this process use this fixture and never shut Ray down themselves. It starts after the
    moto variables are set, so every Ray worker reaches the S3 endpoint with the test keys,
    whichever test happened to start Ray first."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Digits converted once: ``DIR/train`` (1437 samples) and ``DIR/test`` (360)."""
    from ue_dist.data.converters import convert_digits

    out = tmp_path_factory.mktemp("digits")
    convert_digits(str(out), shard_size=500)
    return out
