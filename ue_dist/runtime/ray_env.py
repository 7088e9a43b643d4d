"""Starting or joining Ray, and handing our one storage configuration to Ray Train/Tune/Data."""
from __future__ import annotations

import os
from typing import Any, Mapping

import ray

from ue_dist.data import storage
from ue_dist.errors import UserError


class ResourceError(UserError, RuntimeError):
    """A request (CPUs, GPUs per actor or worker) that no node of the cluster can satisfy."""


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` or start a local one (laptop mode)."""
    from ue_dist.runtime import console

    console.hush()  # `import ray` installed console handlers on Ray's loggers
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    console.native_stderr_to_log()
    ray.init(**kwargs)
    console.hush()  # with the CLI's default (no -v): Ray's console output goes to the log file


def started_here() -> bool:
    """Whether this process started the Ray it uses (a local Ray: no autoscaler adds nodes)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def check_resources(need: Mapping[str, float], what: str) -> bool:
    """True when an alive node can host ``need`` (e.g. ``{"CPU": 0.5, "GPU": 1}``) now.

    A request that no node can satisfy would wait forever. On a Ray this process started, no
    node will ever come, so that raises ``ResourceError`` naming the request and the largest
    node; on a cluster it returns False: an autoscaler may still add such a node, and the
    caller waits a bounded time for it.
    """
    need = {k: float(v) for k, v in need.items() if float(v) > 0}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0.0) >= v for k, v in need.items()) for r in nodes):
        return True
    largest = ", ".join(f"{max((r.get(k, 0.0) for r in nodes), default=0):g} {k}" for k in need)
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items())
    if started_here():
        raise ResourceError(f"{what} asks for {asked}, but no node of this Ray offers that "
                            f"(largest node: {largest}); ask for less")
    return False


def gpu_device(gpus: float, option: str) -> str:
    """``"cuda"`` when ``gpus`` > 0 (``option`` asked for them), else ``"cpu"``. Runs in the Ray
    worker that got the GPU: a CPU-only torch there (or no visible device) raises
    ``ResourceError`` instead of silently running on the CPU."""
    if float(gpus) <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ResourceError(
            f"{option} = {float(gpus):g} asks for a GPU, but torch {torch.__version__} in this "
            f"Ray worker has no CUDA device (CUDA_VISIBLE_DEVICES={seen!r}; a CPU-only torch "
            f"build?); install a CUDA build of torch on the GPU nodes, or set {option} to 0")
    return "cuda"


def user_error_in(exc: BaseException) -> UserError | None:
    """The user error inside an exception Ray wrapped (actor and task errors, Ray Train's
    ``WorkerGroupError``/``ControllerError``), or None."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__,
                  getattr(e, "controller_failure", None),
                  *dict(getattr(e, "worker_failures", None) or {}).values()]
    return None


def pyarrow_filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(pyarrow filesystem, path)`` for Ray Train/Tune ``storage_path``.

    Wraps the fsspec filesystem (pyarrow's own S3 filesystem ignores ``AWS_ENDPOINT_URL``), so an
    S3-compatible endpoint configured once works for checkpoints too. Local paths stay plain.
    """
    if storage.protocol_of(url) == "file":
        return None, os.path.abspath(url.replace("file://", "", 1))
    import pyarrow.fs as pafs

    fs, path = storage.get_fs(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def default_storage() -> str:
    return os.environ.get("UE_DIST_STORAGE", os.path.abspath("runs"))


RESULT_FILE = "result.json"


def report_result(metrics: Mapping[str, Any]) -> None:
    """Every Ray Train worker's last report; rank 0's carries ``metrics`` in a checkpoint
    (Ray Train keeps the metrics of a report only with a checkpoint): ``result_metrics`` reads
    them back in the driver."""
    import json
    import tempfile

    import ray.train

    from ue_dist.core.distributed import rank

    with tempfile.TemporaryDirectory() as tmp:
        if rank() == 0:
            with open(os.path.join(tmp, RESULT_FILE), "w") as f:
                json.dump(dict(metrics), f)
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(dict(metrics))


def result_metrics(result: Any, what: str) -> dict[str, Any]:
    """The metrics rank 0 sent with ``report_result`` (``result``: ``trainer.fit()``'s)."""
    import json

    if result.checkpoint is None:
        raise RuntimeError(f"{what}: the worker group ended without its result ({result.error})")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, RESULT_FILE)) as f:
            return json.load(f)
