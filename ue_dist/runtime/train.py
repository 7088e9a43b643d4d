"""Fitting a method's model (REM/EM/TAP source model, GUE generator, Bayes embedding) on Ray Train.

``fit_method`` validates everything in the driver, then runs ``Method.fit`` in a TorchTrainer
worker group (DDP: gloo on CPU, NCCL on GPU). The method sees a ``RayTrainContext``: its
``report(metrics, state)`` writes a checkpoint into ``storage_path/run_name``; its ``resume()``
returns the last checkpoint, so a killed run started again with the same run name continues, and
``FailureConfig(max_failures)`` restarts lost workers from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ue_dist import options as opts
from ue_dist.core.context import FitContext, format_metrics
from ue_dist.data import storage
from ue_dist.methods.base import StateError, build_method, save_state

CHECKPOINT_FILE = "state.pt"


class RayTrainContext(FitContext):
    """FitContext inside a Ray Train worker.

    Only reports that carry a checkpoint go to Ray Train. Every ``ray.train.report`` is a
    barrier across the worker group and the controller (about 2 s each, measured on a 2-core
    machine): with GUE's per-step metrics forwarded, its quick fit on Ray took 92 s per epoch,
    without them 7.6 s (one worker; 7 s in a plain process). Metrics-only reports stay in the
    worker: kept in ``history`` and printed by rank 0 when the method has logged nothing for
    ``metrics_log_interval_s`` (GUE reports per step and logs per epoch).
    """

    def __init__(self, device: torch.device, seed: int, metrics_log_interval_s: float = 30.0) -> None:
        from ue_dist.runtime.console import worker_print
        super().__init__(device=device, seed=seed, log=worker_print)
        self.history: list[dict[str, Any]] = []
        self.metrics_log_interval_s = metrics_log_interval_s
        self._last_metrics_log = time.monotonic()

    def log(self, message: str) -> None:
        super().log(message)
        # a method that logs its own progress line needs no "metrics" echo of the same figures
        self._last_metrics_log = time.monotonic()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        import ray.train

        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if state is None:
            self.history.append(metrics)
            now = time.monotonic()
            if now - self._last_metrics_log >= self.metrics_log_interval_s:
                self._last_metrics_log = now
                self.log("metrics " + format_metrics(metrics))
            return
        with tempfile.TemporaryDirectory() as tmp:
            if self.is_main:
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)

    def resume(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                              weights_only=True)


def _fit_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from ue_dist.data.dataset import MixedSizesError, load_imageset

    method = build_method(config["method"], config["preset"], config["overrides"])
    clustered = config.get("labels", "given") == "cluster"
    image_size = config.get("image_size")
    try:
        train = load_imageset(config["train_url"], config["storage_options"],
                              require_labels=not clustered, image_size=image_size,
                              views=config.get("views", "crop"), seed=config["seed"])
    except MixedSizesError as exc:
        raise MixedSizesError(f"{exc}; pass --image-size N (job specs: fit.image_size) to fit "
                              "on one N x N view of every image (--views crop|resize)") from None
    if config.get("train_fraction", 1.0) < 1.0:
        train = subset_for_fit(train, config["train_fraction"], config["seed"])
    labeller = None
    if clustered:  # every worker computes the same seeded labeller from the same images
        train, labeller = pseudo_labelled(train, int(config["clusters"]), config["seed"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    torch.manual_seed(config["seed"])
    ctx = RayTrainContext(device, config["seed"])
    previous = ctx.resume()
    if previous is not None and previous.get("fit_run") == config["run_name"]:
        state = previous  # this run had already finished: its final state is the answer
    else:
        state = dict(method.fit(train, ctx), fit_run=config["run_name"])
        if labeller is not None:
            state["labeller"] = labeller
        if image_size is not None:  # what the fitted image shape was made from
            state["fit_views"] = {"image_size": int(image_size), "views": config["views"]}
    ctx.report({"done": True, "seconds": time.time() - config["started"]}, state)


def pseudo_labelled(train, clusters: int, seed: int):
    """``(train with k-means pseudo-labels, the labeller)``: the labeller is fitted on the
    training images and goes into the state, so protect labels every image the same way."""
    from ue_dist.core import pseudolabels
    from ue_dist.data.imageset import ImageSet

    labeller = pseudolabels.fit_labeller(train.images, clusters, seed)
    labels = pseudolabels.assign(labeller, train.images)
    return ImageSet(train.images, labels, list(train.keys), list(train.meta), clusters), labeller


def subset_for_fit(train, fraction: float, seed: int):
    """A seeded ``fraction`` of the training set (e.g. GUE's generalisation experiment)."""
    from ue_dist.methods.protect import selected_for_protection

    mask = selected_for_protection(train.keys, fraction, seed + 7919)
    return train.subset(mask.nonzero()[0])


def default_run_name(method: str, train_url: str, state_url: str, settings: Mapping[str, Any]) -> str:
    blob = json.dumps([method, storage.normalise(train_url), storage.normalise(state_url),
                       dict(settings)], sort_keys=True, default=str)
    return f"fit-{method}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _declared(name: str) -> Any:
    return opts.default(opts.FIT, name)


def fit_method(method_name: str, train_url: str, state_url: str, *,
               preset: str = _declared("preset"), overrides: Sequence[str] | Mapping[str, Any] = (),
               workers: int = _declared("workers"),
               cpus_per_worker: float = _declared("cpus_per_worker"),
               gpus_per_worker: float = _declared("gpus_per_worker"),
               storage_path: str | None = None, run_name: str | None = None,
               storage_options: Mapping[str, Any] | None = None,
               max_failures: int = _declared("max_failures"),
               train_fraction: float = _declared("train_fraction"),
               labels: str = _declared("labels"), clusters: int = _declared("clusters"),
               image_size: int | None = _declared("image_size"),
               views: str = _declared("views"), overwrite: bool = False,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit ``method_name`` on ``train_url`` with a Ray Train worker group; write its state to
    ``state_url``. The options are ``ue-dist fit``'s (``ue_dist.options.FIT``): the run lives
    in ``storage_path`` (``--storage``; default ``$UE_DIST_STORAGE`` or ``./runs``) under
    ``run_name`` (default derived from the method, data, state URL and settings), so a rerun
    resumes it. ``image_size``/``views``: fit on one fixed-size view of every image
    (``data/views.py``), for shards of mixed sizes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ue_dist.runtime.ray_env import default_storage, ensure_ray, pyarrow_filesystem

    method = build_method(method_name, preset, overrides)  # bad settings fail here, nothing runs
    train_url, state_url = storage.absolute(train_url), storage.absolute(state_url)
    if not 0.0 < train_fraction <= 1.0:
        raise StateError(f"--train-fraction must lie in (0, 1], got {train_fraction}")
    storage.refuse_inside(state_url, train_url, what="state")
    storage.check_writable_root(state_url, storage_options)
    if storage.exists(state_url, storage_options) and not overwrite:
        raise StateError(f"state {state_url!r} already exists; pass --overwrite to refit")
    from ue_dist.data.shards import list_shards
    if not list_shards(train_url, storage_options):
        raise StateError(f"no shards under {train_url!r}")
    for name, value in (("labels", labels), ("clusters", clusters), ("image_size", image_size),
                        ("views", views)):
        opt = opts.option(opts.FIT.options, name)
        opts.check_value(value, opt, opt.flag, StateError)
    pseudo = {"labels": labels, "clusters": int(clusters)} if labels == "cluster" else {}
    # only when given, so that the run names of fits without views stay what they were
    sized = {"image_size": int(image_size), "views": views} if image_size is not None else {}
    run_name = run_name or default_run_name(method_name, train_url, state_url,
                                            dict(method.settings, train_fraction=train_fraction,
                                                 **pseudo, **sized))
    storage_path = storage.absolute(storage_path or default_storage())
    fs, path = pyarrow_filesystem(storage_path, storage_options)
    ensure_ray()
    gpus = float(gpus_per_worker)
    progress(f"[ue-dist] fit {method_name}: run {run_name} in {storage_path} ({workers} "
             f"worker(s), " + (f"{gpus:g} GPU each)" if gpus > 0 else "CPU)"))
    config = {"method": method_name, "preset": preset, "overrides": dict(method.settings),
              "train_url": train_url, "storage_options": dict(storage_options or {}),
              "use_gpu": gpus > 0, "seed": int(method.settings.get("seed", 0)),
              "train_fraction": train_fraction, "run_name": run_name, "started": time.time(),
              "labels": labels, "clusters": int(clusters),
              "image_size": None if image_size is None else int(image_size), "views": views}
    # NCCL needs a GPU of its own per rank; workers sharing GPUs reduce through gloo
    backend = "nccl" if gpus >= 1 or (gpus > 0 and int(workers) == 1) else "gloo"
    resources = {"CPU": float(cpus_per_worker), **({"GPU": gpus} if gpus > 0 else {})}
    trainer = TorchTrainer(
        _fit_worker, train_loop_config=config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    from ue_dist.runtime.ray_env import check_resources, user_error_in
    if not check_resources({"CPU": float(cpus_per_worker), "GPU": gpus},
                           "one fit worker (--cpus-per-worker, --gpus-per-worker)"):
        progress(f"[ue-dist] fit {method_name}: no node offers {cpus_per_worker:g} CPU"
                 + (f" and {gpus:g} GPU" if gpus > 0 else "") + " per worker yet; waiting for "
                 "the cluster")
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:  # Ray Train wraps worker errors: give a user error its status back
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"fit {method_name}: the run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                           weights_only=True)
    save_state(state, state_url, storage_options)
    progress(f"[ue-dist] fit {method_name}: state written to {state_url}")
    return {"state": state_url, "run_name": run_name, "storage_path": storage_path,
            "metrics": dict(result.metrics or {}), "method": method_name}
