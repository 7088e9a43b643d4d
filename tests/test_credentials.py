"""Credentials never leak: a planted AWS secret must not appear in any output.

S3 is served by moto on 127.0.0.1 (tests/conftest.py); its secret key is a random recognisable
string set in ``AWS_SECRET_ACCESS_KEY``. ``ue-dist protect`` reads and writes S3 with it, as a
CLI subprocess with its own local Ray and as a Ray job on a two-node cluster; then every output
(S3 objects, stdout/stderr, Ray's session logs, the job's info and runtime environment) is
searched for the secret.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import fit_classwise, make_source, submit

BIN = Path(sys.executable).parent


def _bucket_objects(bucket_url: str) -> dict[str, bytes]:
    import boto3

    bucket = bucket_url[len("s3://"):]
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _files_containing(root: str, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        if needle in f.read():
                            hits.append(path)
    return hits


def _prepare(bucket: str):
    src, dst, state = f"{bucket}/raw/train", f"{bucket}/protected/train", f"{bucket}/state.pt"
    make_source(src, n_shards=2, per_shard=16)
    fit_classwise(state)
    return src, dst, state


@pytest.mark.system
def test_protect_cli_on_s3_never_prints_or_writes_the_secret(moto_s3, s3_bucket, tmp_path):
    secret = moto_s3["secret"]
    src, dst, state = _prepare(s3_bucket)
    ray_tmp = tempfile.mkdtemp(prefix="uec", dir="/tmp")  # short: Ray's socket paths have a limit
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp,
               PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    assert env["AWS_SECRET_ACCESS_KEY"] == secret
    try:
        proc = subprocess.run([str(BIN / "ue-dist"), "protect", "--method", "classwise",
                               "--state", state, src, dst, "--actors", "2", "--json"],
                              env=env, capture_output=True, timeout=400, start_new_session=True)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        summary = json.loads(next(line for line in proc.stdout.decode().splitlines()
                                  if line.startswith("{")))
        assert summary["shards_done"] == 2 and summary["images_protected"] == 32  # S3 was used
        assert secret.encode() not in proc.stdout + proc.stderr
        objects = _bucket_objects(s3_bucket)
        assert any(k.startswith("protected/train/_ledger/") for k in objects)
        assert [k for k, v in objects.items() if secret.encode() in v] == []
        assert os.listdir(ray_tmp)  # Ray did write its session (logs) there
        canary = Path(ray_tmp) / "canary.txt"  # the search itself finds a leak when there is one
        canary.write_text(f"x={secret}")
        assert _files_containing(ray_tmp, secret.encode()) == [str(canary)]
        canary.unlink()
        assert _files_containing(ray_tmp, secret.encode()) == []
        assert _files_containing(str(tmp_path), secret.encode()) == []
        # a failing run (no such bucket) names the bucket, not the credentials
        bad = subprocess.run([str(BIN / "ue-dist"), "protect", "--method", "classwise",
                              "--state", state, src, "s3://no-such-bucket-ue/x"],
                             env=env, capture_output=True, timeout=120)
        assert bad.returncode == 2 and b"no-such-bucket-ue" in bad.stderr
        assert secret.encode() not in bad.stdout + bad.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.system
def test_ray_job_on_s3_keeps_the_secret_out_of_job_info_logs_and_outputs(moto_s3, s3_bucket,
                                                                          tmp_path, two_nodes):
    from ray.job_submission import JobStatus, JobSubmissionClient

    secret = moto_s3["secret"]
    src, dst, state = _prepare(s3_bucket)
    work = tmp_path / "work"
    work.mkdir()
    (work / "README").write_text("working dir of a credentials test job\n")
    # The nodes carry the credentials in their environment (as an instance role would provide
    # them); the job itself gets none: no secrets in entrypoint, runtime env or metadata.
    cluster = two_nodes  # the session's (tests/conftest.py); earlier tests' logs are searched too
    proc, job_id = submit(cluster, work, [
        "ue-dist", "protect", "--method", "classwise", "--state", state, src, dst,
        "--actors", "2", "--json"], runtime_env={"env_vars": {"UE_DIST_NOTE": "creds-test"}})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = JobSubmissionClient(cluster["dashboard"])
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    job_logs = client.get_job_logs(job_id)
    info_text = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env,
                            "metadata": info.metadata, "message": info.message}, default=str)
    logs_hits = _files_containing(cluster["temp_dir"], secret.encode())
    summary = json.loads(next(line for line in job_logs.splitlines() if line.startswith("{")))
    assert summary["shards_done"] == 2
    assert secret not in info_text and "AWS_SECRET_ACCESS_KEY" not in info_text
    assert secret not in job_logs and secret not in proc.stdout + proc.stderr
    assert logs_hits == [], logs_hits
    objects = _bucket_objects(s3_bucket)
    assert len([k for k in objects if k.startswith("protected/train/_ledger/")]) == 2
    assert [k for k, v in objects.items() if secret.encode() in v] == []
