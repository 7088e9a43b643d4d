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
# Every node runs Ray's own image at the Ray version this project is tested with (the installed
# one); the configs, the Dockerfile and the KubeRay rayVersion must all name it.
RAY_IMAGE = "rayproject/ray:{version}-py311-gpu"
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"   # where `ray get-auth-token --generate` writes it
CONTAINER_HOME = "/home/ray"               # user ray in the rayproject/ray images


def _ray_version() -> str:
    import ray

    return ray.__version__


def _pins() -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of constraints.txt (the tested torch)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _launcher() -> dict:
    return _docs(CLUSTER / "aws-gpu.yaml")[0]


def _installs(commands: list[str]) -> list[str]:
    return [c for c in commands if "pip install" in c]


def _gib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert m, quantity
    return float(m.group(1)) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[m.group(2)]


def test_launcher_config_validates_against_rays_own_schema():
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(_launcher(), json.loads(schema_path.read_text()))


def test_launcher_config_has_gpu_workers_and_the_project_installed():
    cfg = _launcher()
    for key in ("cluster_name", "max_workers", "provider", "auth", "docker", "available_node_types",
                "head_node_type", "file_mounts", "setup_commands", "head_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if str(t["node_config"]["InstanceType"]).startswith(("g5", "g6", "p4", "p5"))]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert sum(t["max_workers"] for t in gpu) <= cfg["max_workers"]
    # with docker:, file_mounts targets and setup commands are inside the container
    mounts = cfg["file_mounts"]
    project = [dst for dst, src in mounts.items() if str(src) in (".", "./")]
    assert project == [f"{CONTAINER_HOME}/ue_dist"], mounts
    assert any(f"install --no-cache-dir -e {project[0]}" in c for c in _installs(cfg["setup_commands"]))
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_launcher_config_runs_the_tested_ray_image_with_a_cuda_torch():
    cfg, version, pins = _launcher(), _ray_version(), _pins()
    assert cfg["docker"]["image"] == RAY_IMAGE.format(version=version) == "rayproject/ray:2.60.0-py311-gpu"
    assert not {"head_image", "worker_image"} & set(cfg["docker"])
    installs = _installs(cfg["setup_commands"])
    # torch first, at the tested version, from the default index (PyPI: the CUDA build on Linux)
    first = installs[0]
    assert f"torch=={pins['torch']}" in first and f"torchvision=={pins['torchvision']}" in first
    assert "ue_dist" not in first and "--index-url" not in first and "cpu" not in first
    for c in installs:  # constraints.txt pins the CPU torch wheel: never on the cluster
        assert "constraints" not in c and not re.search(r"\s(-c|--constraint)\s", c), c
    project = [c for c in installs if "ue_dist" in c]
    assert len(project) == 1
    # Ray named at the image's version in the same command, so pip cannot move it
    assert re.search(rf"ray\[[a-z,]+\]=={re.escape(version)}", project[0]), project[0]
    assert f"torch=={pins['torch']}" in project[0]
    check = " ".join(cfg["setup_commands"][cfg["setup_commands"].index(project[0]) + 1:])
    assert f"ray.__version__ == '{version}'" in check and "torch.version.cuda" in check
    for c in cfg["setup_commands"] + cfg["head_setup_commands"]:
        assert not re.search(r"pip install[^\n]*\s(-U|--upgrade)\s+ray", c), c


def test_launcher_config_names_a_gpu_ami_with_docker_not_rays_default():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    for name, t in _launcher()["available_node_types"].items():
        ami = str(t["node_config"].get("ImageId", ""))
        assert ami.lower() not in ("", "latest_dlami") and ami not in DEFAULT_AMI.values(), name
        assert ami.startswith("ami-") or ami == (
            "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
            "base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"), ami


def test_launcher_config_head_installs_boto3_and_roles_are_stated():
    cfg = _launcher()
    assert any("boto3" in c for c in _installs(cfg["head_setup_commands"]))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    # no profile on the head: `ray up` attaches Ray's default ray-autoscaler-v1 (EC2 + S3)
    assert "IamInstanceProfile" not in head
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "ray-autoscaler-v1" in text and "iam:PassRole" in text
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert t["node_config"]["IamInstanceProfile"] == {"Name": "ue-dist-s3-access"}, name


def test_launcher_config_turns_token_auth_on_and_keeps_the_dashboard_local():
    cfg = _launcher()
    # every container runs with RAY_AUTH_MODE=token ...
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, c
    # ... and the locally generated token at the default token path inside the container
    assert cfg["file_mounts"][f"{CONTAINER_HOME}/.ray/auth_token"] == DEFAULT_TOKEN_PATH
    # the dashboard (and Jobs API) stay on the head's 127.0.0.1: reached through `ray dashboard`
    for c in cfg["head_start_ray_commands"]:
        assert "--dashboard-host" not in c, c
    assert "0.0.0.0" not in yaml.safe_dump(cfg)


def test_dockerfile_builds_on_the_ray_image_with_a_cuda_torch_and_keeps_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    version, pins = _ray_version(), _pins()
    assert args["RAY_VERSION"] == version == "2.60.0"
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    runs = [r for r in re.split(r"^(?=RUN |COPY |FROM |ARG |WORKDIR |USER )", text, flags=re.M)
            if r.startswith("RUN ") and "pip install" in r]
    torch_run, project_run = runs
    assert '"torch==${TORCH_VERSION}"' in torch_run and "-e ." not in torch_run
    assert "-e ." in project_run and '"ray[train,tune,data,default]==${RAY_VERSION}"' in project_run
    assert '"torch==${TORCH_VERSION}"' in project_run
    assert "constraints" not in project_run
    assert "assert ray.__version__ == '${RAY_VERSION}'" in project_run
    assert "assert torch.version.cuda" in project_run
    assert not re.search(r"^USER root", text, re.M)


def _kuberay() -> tuple[dict, dict]:
    (rc,) = _docs(CLUSTER / "kuberay-raycluster.yaml")
    (rj,) = _docs(CLUSTER / "kuberay-rayjob.yaml")
    return rc, rj


def _pod_specs(rc: dict) -> list[dict]:
    return [rc["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]


def test_kuberay_manifests_use_only_fields_of_the_kuberay_crd():
    """Validated against the KubeRay v1.5.1 CRD schemas, pruned to the fields these manifests use
    (tests/data/kuberay-crd-subset.json, written by tests/data/make_kuberay_crd_subset.py, which
    refuses a field the CRD lacks). Unknown fields are rejected: the API server would drop them."""
    import jsonschema

    subset = json.loads((REPO / "tests" / "data" / "kuberay-crd-subset.json").read_text())
    assert subset["kuberay_version"] == "v1.5.1"
    for doc in _kuberay():
        assert "ray.io_" in subset["source"][doc["kind"]]
        try:
            jsonschema.validate(doc, subset["kinds"][doc["kind"]])
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{doc['kind']}.{'.'.join(map(str, exc.absolute_path))}: {exc.message} "
                        "(a new field? rerun tests/data/make_kuberay_crd_subset.py)")


def test_kuberay_manifests_run_an_existing_job_spec_on_gpus():
    rc, rj = _kuberay()
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
    # data on S3: no volume holds it, every location the job reads or writes is an s3:// URL
    assert runtime_env["env_vars"] and all(v.startswith("s3://") for v in runtime_env["env_vars"].values())
    # the job spec it names loads and validates with the variables the RayJob provides
    from ue_dist.runtime.jobs import load_spec

    old = {k: os.environ.get(k) for k in runtime_env["env_vars"]}
    os.environ.update(runtime_env["env_vars"])
    try:
        loaded = load_spec(str(spec))
        assert loaded["name"] == spec.stem
        assert loaded["root"].startswith("s3://")
        assert all(p.startswith("s3://") for p in loaded["convert"]["inputs"])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_kuberay_runs_the_tested_ray_image_with_token_auth_and_shared_memory():
    rc, rj = _kuberay()
    version = _ray_version()
    assert rc["spec"]["rayVersion"] == version
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    images = {c["image"] for p in _pod_specs(rc) for c in p["containers"]} | \
        {c["image"] for c in rj["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1 and version in images.pop()   # the cluster/Dockerfile image
    for pod in _pod_specs(rc):
        (ray_container,) = pod["containers"]
        shm = [m["name"] for m in ray_container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, ray_container["name"]
        (vol,) = [v for v in pod["volumes"] if v["name"] == shm[0]]
        assert vol["emptyDir"]["medium"] == "Memory"
        # Ray's default object store is 30% of the memory; a smaller /dev/shm sends it to disk
        memory = _gib(ray_container["resources"]["limits"]["memory"])
        assert 0.3 * memory <= _gib(vol["emptyDir"]["sizeLimit"]) < memory, ray_container["name"]


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
def test_two_node_cluster_runs_a_job_spec_through_the_jobs_api(tmp_path, two_nodes, s3_bucket):
    """`ray job submit` as the README's recipe does it: the job spec's output root comes from
    the runtime environment (`--runtime-env-json`, not the client's shell), and the job reads
    and writes S3 (the moto server; the nodes hold the credentials, as an instance role would)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ue_dist.data.shards import list_shards
    from ue_dist.runtime import ledger

    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    # a root relative to the spec inside the uploaded working dir would vanish with the job's
    # session: a cluster job writes to shared storage, here an S3 bucket
    (work / "jobs" / "tiny.yaml").write_text("""
name: tiny
root: ${UE_DIST_ROOT}/tiny
convert: {source: digits, shard_size: 400}
method: {name: classwise, preset: quick}
fit: {workers: 1, cpus_per_worker: 0.5}
protect: {actors: 2, cpus_per_actor: 0.5}
""")
    out = f"{s3_bucket}/runs/tiny"
    cluster = two_nodes
    from ray.util.state import list_nodes

    assert len([n for n in list_nodes(address=cluster["dashboard"]) if n.state == "ALIVE"]) == 2
    proc, job_id = submit(cluster, work, ["ue-dist", "run", "jobs/tiny.yaml", "--json"],
                          runtime_env={"env_vars": {"UE_DIST_ROOT": f"{s3_bucket}/runs"}})
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
    assert result["steps"]["fit"]["state"] == f"{out}/state.pt"
    # everything it wrote is in the bucket
    assert len(list_shards(f"{out}/protected/train")) == 4
    assert len(ledger.committed(f"{out}/protected/train")) == 4
    assert len(list_shards(f"{out}/data/train")) == 4  # convert wrote ROOT/data/{train,test}
