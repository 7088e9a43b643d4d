"""cluster/ configs (launcher YAML, KubeRay manifests) and a REAL two-node Ray cluster on this machine.

The live test starts a head and a worker node with ``ray start --block`` in their own process
groups and a private, short temp dir, submits a job spec through the Ray Jobs API, checks its
output, and stops exactly the processes it started (``ray stop`` would stop every Ray instance on
the machine, including other users' ones).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from helpers import submit

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SECRET_PATTERNS = [re.compile(p) for p in (
    r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}",
    r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}",
    r"(?i)aws_session_token\s*[:=]\s*\S{16,}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----")]
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    yield path, node


def _job_spec_in(entrypoint: str) -> Path:
    m = re.search(r"ue-dist run (\S*?jobs/[\w.-]+\.ya?ml)", entrypoint)
    assert m, f"entrypoint does not run a jobs/ spec: {entrypoint!r}"
    return REPO / "jobs" / Path(m.group(1)).name


# static checks ----------------------------------------------------------------------------------
def test_launcher_config_has_gpu_workers_and_keeps_cuda_torch():
    cfg = _docs(CLUSTER / "aws-gpu.yaml")[0]
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type", "file_mounts", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if str(t["node_config"]["InstanceType"]).startswith(("g5", "g6", "p4", "p5"))]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert sum(t["max_workers"] for t in gpu) <= cfg["max_workers"]
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert any("ue_dist" in c for c in installs)
    for c in installs:  # the CPU constraints file would replace the AMI's CUDA torch
        assert "constraints" not in c and not re.search(r"\s(-c|--constraint)\s", c), c
    assert any(str(src) in (".", "./") for src in cfg["file_mounts"].values())
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_kuberay_manifests_run_an_existing_job_spec_on_gpus():
    cluster = _docs(CLUSTER / "kuberay-raycluster.yaml")
    job = _docs(CLUSTER / "kuberay-rayjob.yaml")
    (rc,), (rj,) = cluster, job
    assert rc["apiVersion"] == rj["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster" and rj["kind"] == "RayJob"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and any(p["containerPort"] == 8265 for p in head["ports"])
    groups = rc["spec"]["workerGroupSpecs"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    spec = _job_spec_in(rj["spec"]["entrypoint"])
    assert spec.exists(), spec
    assert rj["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    runtime_env = yaml.safe_load(rj["spec"]["runtimeEnvYAML"])
    assert not set(runtime_env.get("env_vars", {})) & set(CREDENTIAL_ENV)
    # the job spec it names loads and validates with the variables the RayJob provides
    from ue_dist.runtime.jobs import load_spec

    old = {k: os.environ.get(k) for k in runtime_env["env_vars"]}
    os.environ.update(runtime_env["env_vars"])
    try:
        assert load_spec(str(spec))["name"] == spec.stem
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_no_secrets_inline_in_cluster_configs_and_job_specs():
    files = sorted(CLUSTER.iterdir()) + sorted((REPO / "jobs").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{path.name}: looks like an inline secret ({pattern.pattern})"
        if path.suffix not in (".yaml", ".yml"):
            continue
        for doc in _docs(path):
            for where, node in _walk(doc):
                if isinstance(node, dict) and node.get("name") in CREDENTIAL_ENV:
                    assert "value" not in node, f"{path.name}{where}: credential given inline"
                if isinstance(node, dict):
                    for k in node:
                        assert str(k) not in CREDENTIAL_ENV or not isinstance(node[k], str), \
                            f"{path.name}{where}.{k}: credential given inline"
                        assert str(k).lower() not in ("aws_secret_access_key", "secret", "password"), \
                            f"{path.name}{where}.{k}"


# a real two-node cluster --------------------------------------------------------------------------
@pytest.mark.system
def test_two_node_cluster_runs_a_job_spec_through_the_jobs_api(tmp_path, two_nodes):
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    out = tmp_path / "out"
    # relative to the spec inside the uploaded working dir would vanish with the job's session:
    # a cluster job writes to shared storage (here: this machine's tmp_path)
    (work / "jobs" / "tiny.yaml").write_text(f"""
name: tiny
root: {out}
convert: {{source: digits, shard_size: 400}}
method: {{name: classwise, preset: quick}}
fit: {{workers: 1, cpus_per_worker: 0.5}}
protect: {{actors: 2, cpus_per_actor: 0.5}}
""")
    cluster = two_nodes
    from ray.util.state import list_nodes

    assert len([n for n in list_nodes(address=cluster["dashboard"]) if n.state == "ALIVE"]) == 2
    proc, job_id = submit(cluster, work, ["ue-dist", "run", "jobs/tiny.yaml", "--json"])
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    client = JobSubmissionClient(cluster["dashboard"])
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == "ue-dist run jobs/tiny.yaml --json"
    job_logs = client.get_job_logs(job_id)
    assert "[ue-dist run tiny] protect" in job_logs
    # the run's one JSON object (keys sorted; the job's other lines are progress)
    result = next(json.loads(line) for line in job_logs.splitlines()
                  if line.startswith("{") and '"name": "tiny"' in line)
    assert result["ok"] and result["steps"]["protect"]["shards_done"] == 4
    assert result["steps"]["fit"]["state"] == str(out / "state.pt")
    from ue_dist.data.shards import list_shards
    from ue_dist.runtime import ledger

    assert len(list_shards(str(out / "protected" / "train"))) == 4
    assert len(ledger.committed(str(out / "protected" / "train"))) == 4
