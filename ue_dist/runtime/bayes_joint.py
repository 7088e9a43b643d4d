"""Joint (full-strength) Bayes-error protection on a Ray Train worker group, and the
``ue-dist bayes-error`` report.

Joint mode: every worker of a ``TorchTrainer`` (gloo on CPU, NCCL on GPU) owns a contiguous slice
of the samples, embeds it, all-gathers the embeddings with gradients (so the gradient of a key
reaches the worker that owns it), evaluates its rows of the kernel block by block and steps only
its own samples (``BayesErrorMaximisation.perturb_jointly`` under ``torch.distributed``). With
the embedding model in eval mode the result equals the single-process one on the same data.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
from typing import Any, Mapping, Sequence

import torch

from ue_dist.core.bayes_error import check_embeddings, kernel_posterior, resolve_sigma
from ue_dist.core.config import SettingsError, parse_radius
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import StateError, build_method, load_state

DELTA_FILE = "delta.pt"
TOYS = ("gaussians", "moons")


# joint mode ----------------------------------------------------------------------------------
def joint_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: protect this worker's slice jointly with the others' (all-gather per step)."""
    import ray.train
    import ray.train.torch

    from ue_dist.core.distributed import all_gather_no_grad, rank, world_size

    torch.manual_seed(int(config["seed"]))
    method = build_method("bayes", config["preset"], config["overrides"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    loaded = method.load(config["state"], device)
    images, labels = config["images"], config["labels"]
    fixed = config.get("fixed")
    n, r, ws = images.shape[0], rank(), world_size()
    per = math.ceil(n / ws)
    own = slice(r * per, min(n, (r + 1) * per))
    x = ImageSet.to_float(images[own]) if images.dtype == torch.uint8 else images[own].float()
    delta, history = method.perturb_jointly(
        loaded, x.to(device), labels[own].to(device),
        fixed=fixed[own].to(device) if fixed is not None else None)
    full = all_gather_no_grad(delta.cpu())
    metrics = {"beta_before": history[0], "beta_after": history[-1]}
    with tempfile.TemporaryDirectory() as tmp:
        if r == 0:
            torch.save({"delta": full, "history": history}, os.path.join(tmp, DELTA_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def protect_jointly(state: Mapping[str, Any], images: torch.Tensor, labels: torch.Tensor, *,
                    preset: str = "paper", overrides: Sequence[str] | Mapping[str, Any] = (),
                    fixed: torch.Tensor | None = None, num_workers: int = 2,
                    use_gpu: bool = False, cpus_per_worker: float = 1.0,
                    storage_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run joint protection on ``num_workers`` Ray Train workers; returns
    ``{"delta": N x C x H x W float (before quantisation), "history": [beta per step]}``.

    ``images``: uint8 or [0, 1] float ``N x C x H x W``; ``fixed``: bool ``N`` (kept clean).
    Ray must be initialised by the caller (``ue_dist.runtime.ray_env.ensure_ray``).
    """
    method = build_method("bayes", preset, overrides)  # validates settings in the driver
    method.check_state(state, list(images.shape[1:]))
    return _run_joint(state, images, labels, preset=preset, overrides=overrides, fixed=fixed,
                      num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                      storage_path=storage_path, seed=seed)


def _run_joint(state: Mapping[str, Any], images: torch.Tensor, labels: torch.Tensor, *,
               preset: str, overrides: Sequence[str] | Mapping[str, Any],
               fixed: torch.Tensor | None, num_workers: int, use_gpu: bool,
               cpus_per_worker: float, storage_path: str | None, seed: int) -> dict[str, Any]:
    """``protect_jointly`` for a state the caller has checked against the images."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if images.shape[0] < 2:
        raise SettingsError(f"joint protection needs at least 2 images, got {images.shape[0]}")
    if num_workers < 1:
        raise SettingsError(f"num_workers must be >= 1, got {num_workers}")
    if fixed is not None and fixed.shape != (images.shape[0],):
        raise ValueError(f"fixed must have one entry per image, got shape {tuple(fixed.shape)}")
    config = {"state": dict(state), "images": images.cpu(), "labels": labels.cpu().long(),
              "fixed": fixed.cpu().bool() if fixed is not None else None, "preset": preset,
              "overrides": overrides if isinstance(overrides, Mapping) else list(overrides),
              "use_gpu": use_gpu, "seed": seed}
    resources = {"CPU": cpus_per_worker} if not use_gpu else {"CPU": cpus_per_worker, "GPU": 1}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            joint_worker_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(storage_path=storage_path or tmp, name="bayes-joint"))
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"joint protection returned no result: {result.error}")
        with result.checkpoint.as_directory() as directory:
            out = torch.load(os.path.join(directory, DELTA_FILE), weights_only=True)
    return out


def protect_dataset_jointly(src: str, dst: str, state_url: str, *, preset: str = "paper",
                            overrides: Sequence[str] | Mapping[str, Any] = (),
                            fraction: float = 1.0, seed: int = 0, num_workers: int = 2,
                            use_gpu: bool = False, cpus_per_worker: float = 1.0,
                            shard_size: int = 1000,
                            storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Joint protection of a whole split: read ``src``, protect the seeded ``fraction`` of the
    samples jointly (the rest stay clean but count in the objective, Corollary 3.5), apply the
    epsilon contract and write ``dst`` (``ue_dist.pipeline.protect_set``). Everything is
    validated before anything is written; the state is read and validated once here (once more
    in each worker, which loads it)."""
    from ue_dist.data import storage
    from ue_dist.data.dataset import load_imageset
    from ue_dist.methods.protect import selected_for_protection
    from ue_dist.pipeline import PipelineConfig, protect_set, read_state

    storage.refuse_inside(dst, src)
    method = build_method("bayes", preset, overrides)
    state, _ = read_state(method, state_url, storage_options)
    data = load_imageset(src, storage_options)
    method.check_state(state, list(data.image_shape), source=state_url)
    config = PipelineConfig(method=method, state=state, state_url=state_url,
                            fraction=float(fraction), seed=int(seed),
                            storage_options=storage_options)
    chosen = selected_for_protection(data.keys, config.fraction, config.seed)
    out = _run_joint(state, data.images, data.labels, preset=preset, overrides=overrides,
                     fixed=~torch.from_numpy(chosen), num_workers=num_workers, use_gpu=use_gpu,
                     cpus_per_worker=cpus_per_worker, storage_path=None, seed=seed)
    _, shards = protect_set(config, data, out["delta"], dst, mask=chosen, shard_size=shard_size,
                            mode="joint")
    return {"src": src, "dst": dst, "samples": len(data), "protected": int(chosen.sum()),
            "shards": len(shards), "beta_before": out["history"][0],
            "beta_after": out["history"][-1]}


# joint mode on a bucket: ue-dist protect --method bayes --joint ----------------------------------
JOINT_DIR = "_ue-joint"  # in DST: per-run checkpoints and Ray Train's run folder
METRICS_FILE = "joint-metrics.json"


def check_joint(method, state: Mapping[str, Any] | None, opts: Any) -> None:
    """What ``--joint`` refuses before anything is written (``opts``: ``ProtectOptions``)."""
    if method.name != "bayes":
        raise SettingsError(f"--joint optimises one set jointly, the Bayes-error objective's "
                            f"mode; method {method.name!r} perturbs batch by batch: drop --joint")
    if opts.watch:
        raise SettingsError("--joint optimises the shards present now as one set; it cannot "
                            "--watch for new ones (protect new data with a new run)")
    if opts.labels == "predict":
        raise SettingsError("--labels predict: method 'bayes' has no classifier")
    if int(method.settings["retrain_every"]) > 0:
        raise SettingsError("--joint runs on a worker group: retrain_every > 0 (the authors' "
                            "variant) runs single-process only (perturb_jointly in Python)")


def own_shards(shards: Sequence[str], world: int, rank: int) -> list[str]:
    """Rank ``rank``'s contiguous part of ``shards`` (ranks in order = samples in order)."""
    per = math.ceil(len(shards) / world)
    return list(shards[rank * per:(rank + 1) * per])


def _checkpoint_steps(folder: str, storage_options: Mapping[str, Any] | None) -> list[int]:
    """Steps whose checkpoint every rank finished (rank 0 writes ``step-N.done`` after a
    barrier), oldest first."""
    from ue_dist.data import storage

    if not storage.exists(folder, storage_options):
        return []
    names = [posixpath.basename(str(e).rstrip("/")) for e in storage.ls(folder, storage_options)]
    return sorted(int(n[5:-5]) for n in names
                  if n.startswith("step-") and n.endswith(".done") and n[5:-5].isdigit())


def write_checkpoint(folder: str, step: int, parts: Sequence[tuple[str, torch.Tensor]],
                     storage_options: Mapping[str, Any] | None) -> None:
    """One rank's part of the checkpoint after ``step`` ascent steps: the float delta of each of
    its shards, ``folder/step-N/SHARD.pt`` (the step counts once rank 0 writes its marker)."""
    import io

    from ue_dist.data import storage

    for name, delta in parts:
        buf = io.BytesIO()
        torch.save(delta.detach().cpu().clone(), buf)
        storage.write_bytes(storage.join(folder, f"step-{step:06d}", f"{name}.pt"),
                            buf.getvalue(), storage_options)


def mark_checkpoint(folder: str, step: int, storage_options: Mapping[str, Any] | None) -> None:
    """Rank 0, after every rank wrote its part: the step counts; older checkpoints go."""
    from ue_dist.data import storage

    storage.write_bytes(storage.join(folder, f"step-{step:06d}.done"), b"", storage_options)
    for old in _checkpoint_steps(folder, storage_options)[:-1]:
        storage.remove(storage.join(folder, f"step-{old:06d}.done"), storage_options)
        storage.remove_tree(storage.join(folder, f"step-{old:06d}"), storage_options)


def read_checkpoint(folder: str, step: int, names: Sequence[str],
                    storage_options: Mapping[str, Any] | None) -> torch.Tensor:
    """The deltas of shards ``names`` after ``step`` steps, concatenated in that order."""
    import io

    from ue_dist.data import storage

    return torch.cat([torch.load(io.BytesIO(storage.read_bytes(
        storage.join(folder, f"step-{step:06d}", f"{name}.pt"), storage_options)),
        weights_only=True) for name in names])


def bucket_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker of ``protect --joint``: read this rank's shards, ascend jointly with the
    other ranks (embeddings all-gathered every step), checkpoint every few steps into DST, commit
    this rank's shards through the shared shard commit and ledger."""
    import resource
    import time

    import numpy as np
    import ray.train
    import ray.train.torch

    from ue_dist.core.distributed import all_gather_no_grad, all_reduce_sum, barrier, rank, world_size
    from ue_dist.core.quantize import apply_perturbation
    from ue_dist.data import storage
    from ue_dist.data.shards import Sample, ShardError, read_shard
    from ue_dist.methods.base import get_method
    from ue_dist.methods.protect import selected_for_protection
    from ue_dist.pipeline import (PipelineConfig, check_samples, commit_shard, output_meta,
                                  read_state, sample_labels)
    from ue_dist.runtime import ledger

    r, ws = rank(), world_size()
    so = config["storage_options"] or None
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    method = get_method("bayes")(config["settings"])
    state, _ = read_state(method, config["state_url"], so)
    pconfig = PipelineConfig(method=method, state=state, state_url=config["state_url"],
                             loaded=method.load(state, device), fraction=config["fraction"],
                             seed=config["seed"], storage_options=so, device=device,
                             settings_hash=config["run_hash"])
    fitted = tuple(int(v) for v in state["image_shape"])  # C, H, W
    mine, problem = [], None
    try:
        for url in own_shards(config["shards"], ws, r):
            samples = read_shard(url, so)
            check_samples(pconfig, url, samples)
            for smp in samples:
                h, w, c = smp.image.shape
                if (c, h, w) != fitted:
                    raise ShardError(f"shard {url}, sample {smp.key!r}: an image of {h}x{w}x{c}; "
                                     f"--joint optimises the set at the fitted shape "
                                     f"{fitted[1]}x{fitted[2]}x{fitted[0]} (C={fitted[0]})")
            mine.append((url, samples))
    except ShardError as exc:
        problem = exc
    # every rank learns whether any shard is bad before the first collective of the ascent
    if float(all_reduce_sum(torch.tensor([1.0 if problem else 0.0]))) > 0:
        if problem is not None:
            raise problem
        return  # the rank holding the bad shard raises it, naming the shard
    every = [s for _, ss in mine for s in ss]
    x8 = torch.from_numpy(np.stack([s.image for s in every])).permute(0, 3, 1, 2).contiguous()
    labels = sample_labels(pconfig, every)
    chosen = selected_for_protection([s.key for s in every], pconfig.fraction, pconfig.seed)
    folder, steps = config["checkpoints"], int(method.settings["steps"])
    done_steps = _checkpoint_steps(folder, so)
    start, init = 0, None
    if done_steps:  # resume: every rank sees the same markers, so the same step
        start = done_steps[-1]
        init = read_checkpoint(folder, start, [ledger.shard_name(u) for u, _ in mine], so)
    every_k = int(config["checkpoint_every"])
    stamps: list[float] = []

    def on_step(t: int, beta: float, delta: torch.Tensor) -> None:
        stamps.append(time.perf_counter())
        if not every_k or t == start or t % every_k or t >= steps:
            return
        parts, offset = [], 0
        for url, samples in mine:
            parts.append((ledger.shard_name(url), delta[offset:offset + len(samples)]))
            offset += len(samples)
        write_checkpoint(folder, t, parts, so)
        barrier()  # every rank's part is written before the step counts as checkpointed
        if r == 0:
            mark_checkpoint(folder, t, so)

    x = ImageSet.to_float(x8).to(device)
    delta, history = method.perturb_jointly(
        pconfig.loaded, x, labels.to(device), fixed=torch.from_numpy(~chosen).to(device),
        on_step=on_step, init=init, start_step=start)
    delta = delta.cpu()
    protected = torch.from_numpy(apply_perturbation(x8, delta, **method.bound()))
    offset = 0
    for url, samples in mine:
        n = len(samples)
        mask = chosen[offset:offset + n]
        out = [Sample(key=s.key, image=(protected[offset + i] if mask[i] else x8[offset + i])
                      .permute(1, 2, 0).contiguous().numpy(), label=s.label, extra=dict(s.extra),
                      meta=output_meta(s.meta, mask[i], method.name, method.eps, url,
                                       mode="joint"))
               for i, s in enumerate(samples)]
        commit_shard(pconfig, url, config["dst"], out, mask,
                     config["fingerprints"].get(ledger.shard_name(url)))
        offset += n
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    peaks = all_gather_no_grad(peak).tolist()
    barrier()  # every rank committed: the checkpoints are no longer needed
    if r == 0 and storage.exists(folder, so):
        storage.remove_tree(folder, so)
    step_s = float(np.diff(stamps).mean()) if len(stamps) > 1 else float("nan")
    metrics = {"beta_before": history[0], "beta_after": history[-1],
               "start_step": start, "steps": steps, "seconds_per_step": step_s,
               "samples": int(all_reduce_sum(torch.tensor([float(len(every))]))),
               "protected": int(all_reduce_sum(torch.tensor([float(chosen.sum())]))),
               "peak_rss_mib_per_worker": [round(p) for p in peaks]}
    # Ray Train keeps the metrics of a report that carries a checkpoint: rank 0 sends one
    with tempfile.TemporaryDirectory() as tmp:
        if r == 0:
            with open(os.path.join(tmp, METRICS_FILE), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def protect_bucket_jointly(summary: dict[str, Any], method, src_url: str, dst_url: str,
                           opts: Any, lease: Any, say: Any) -> None:
    """The driver of ``protect --joint`` (called by ``runtime.protect.protect`` holding DST's
    lease): skip a finished run, else run ``bucket_worker_loop`` on ``opts.workers`` Ray Train
    workers and fill ``summary``."""
    import time

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ue_dist.data import storage
    from ue_dist.data.shards import list_shards
    from ue_dist.runtime import ledger
    from ue_dist.runtime.ray_env import ensure_ray, pyarrow_filesystem, user_error_in

    so = opts.storage_options
    shards = list_shards(src_url, so)
    if not shards:
        raise storage.StorageError(f"no shards (*.tar) under {src_url!r}")
    names = [ledger.shard_name(u) for u in shards]
    fingerprints = ledger.source_fingerprints(src_url, so)
    run_hash = summary["settings_hash"]
    summary["shards_total"] = len(shards)
    done = ledger.committed(dst_url, so, expect_hash=None if opts.mode == "overwrite"
                            else run_hash)
    if opts.mode != "overwrite" and all(
            n in done and not ledger.source_changed(done[n], fingerprints.get(n)) for n in names):
        summary["shards_skipped"] = len(shards)
        say(f"[protect] --joint: all {len(shards)} shard(s) already committed by this joint run "
            f"in {dst_url}; nothing to do")
        return
    workers = min(int(opts.workers), len(shards))
    folder = storage.join(dst_url, JOINT_DIR, run_hash)
    gpus = float(opts.gpus_per_actor)
    ensure_ray()
    fs, path = pyarrow_filesystem(storage.join(folder, "ray"), so)
    config = {"shards": shards, "settings": dict(method.settings), "state_url": opts.state_url,
              "fraction": float(opts.fraction), "seed": int(opts.seed), "dst": dst_url,
              "storage_options": dict(so or {}), "use_gpu": gpus > 0, "run_hash": run_hash,
              "checkpoints": storage.join(folder, "steps"),
              "checkpoint_every": int(opts.checkpoint_every),
              "fingerprints": {n: fingerprints.get(n) for n in names}}
    say(f"[protect] --joint: {len(shards)} shard(s) as one set on {workers} Ray Train "
        f"worker(s), {int(method.settings['steps'])} ascent steps, checkpoints every "
        f"{int(opts.checkpoint_every)} in {folder}")
    resources = {"CPU": float(opts.cpus_per_actor), **({"GPU": gpus} if gpus > 0 else {})}
    trainer = TorchTrainer(
        bucket_worker_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpus >= 1 else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker=resources),
        # a fresh name per attempt: Ray would resume a finished run of the same name; the
        # ascent resumes from the checkpoints in DST instead
        run_config=RunConfig(name=f"joint-{int(time.time() * 1000)}", storage_path=path,
                             storage_filesystem=fs, failure_config=FailureConfig(max_failures=0)))
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:  # a bad shard is a user error naming it; nothing was committed
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"protect --joint: the worker group ended without its result "
                           f"({result.error})")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, METRICS_FILE)) as f:
            metrics = json.load(f)
    storage.remove_tree(storage.join(dst_url, JOINT_DIR), so)
    summary.update({"shards_done": len(shards), "images": int(metrics.get("samples", 0)),
                    "images_protected": int(metrics.get("protected", 0)), "joint": {
                        k: metrics.get(k) for k in ("beta_before", "beta_after", "start_step",
                                                    "steps", "seconds_per_step",
                                                    "peak_rss_mib_per_worker")}})
    say(f"[protect] --joint: beta {metrics.get('beta_before'):.4f} -> "
        f"{metrics.get('beta_after'):.4f} over steps {metrics.get('start_step')}.."
        f"{metrics.get('steps')}, {metrics.get('seconds_per_step', float('nan')):.2f} s/step, "
        f"peak RSS per worker {metrics.get('peak_rss_mib_per_worker')} MiB")
    lease.check()


# the bayes-error report ----------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def gaussians_report(n: int = 4000, sigma: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Two 1-D Gaussians N(-1, 1), N(1, 1), equal priors: estimate vs the analytic Phi(-1)."""
    if n < 4:
        raise SettingsError(f"--n must be at least 4 for the gaussians toy, got {n}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.randn(n, generator=gen, dtype=torch.float64) + (2.0 * y - 1.0)).unsqueeze(1)
    s = resolve_sigma(sigma, x, nearest=math.ceil(math.sqrt(n)))
    est = _estimate(x, y, s)
    analytic = _phi(-1.0)
    return {"toy": "gaussians", "n": n, "sigma": s, "estimate": est, "analytic": analytic,
            "abs_error": abs(est - analytic), "seed": seed}


def moons_report(n: int = 200, eps: float = 0.25, sigma: float | None = None, noise: float = 0.2,
                 steps: int = 100, step_size: float = 1.0, norm: str = "linf",
                 seed: int = 0) -> dict[str, Any]:
    """scikit-learn moons: the estimate before and after Algorithm 2 (PGA, raw gradient steps)."""
    from sklearn.datasets import make_moons

    from ue_dist.methods.bayes import bayes_pga

    if n < 4:
        raise SettingsError(f"--n must be at least 4 for the moons toy, got {n}")
    if not eps > 0:
        raise SettingsError(f"--eps must be > 0, got {eps}")
    pts, lab = make_moons(n_samples=n, noise=noise, random_state=seed)
    x = torch.tensor(pts, dtype=torch.float64)
    y = torch.tensor(lab, dtype=torch.long)
    s = resolve_sigma(sigma, x, nearest=math.ceil(math.sqrt(n)))
    delta, history = bayes_pga(lambda t: t, x, y, eps=eps, step_size=step_size, steps=steps,
                               sigma=s, num_classes=2, norm=norm, step_rule="gradient", box=None)
    before, after = history[0], history[-1]
    decreases = sum(1 for a, b in zip(history, history[1:]) if b < a - 1e-12)
    return {"toy": "moons", "n": n, "noise": noise, "eps": eps, "norm": norm, "sigma": s,
            "steps": steps, "step_size": step_size, "before": before, "after": after,
            "relative_increase": (after - before) / before if before > 0 else float("inf"),
            "monotone": decreases == 0, "history": history,
            "max_abs_delta": float(delta.abs().max()), "seed": seed,
            # for --plot (the paper's Figure 3); not printed
            "_points": {"before": pts, "after": (x + delta).numpy(), "labels": lab}}


def _estimate(e: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    p = kernel_posterior(e, e, y, sigma, self_index=torch.arange(e.shape[0]))
    return float(1.0 - p.max(dim=1).values.mean())


@torch.no_grad()
def dataset_report(url: str, embedding: str | None = None, sigma: float | None = None,
                   storage_options: Mapping[str, Any] | None = None,
                   chunk: int = 256) -> dict[str, Any]:
    """Bayes-error estimate of the dataset at ``url`` on raw pixels, or through the embedding
    model of a fitted ``bayes`` state (``embedding``), with the clean/protected split when
    the samples carry protection metadata."""
    from ue_dist.data.dataset import load_imageset
    from ue_dist.methods.bayes import embed

    # the embedding state first: a wrong state fails before the data are read
    model = None
    if embedding:
        state = load_state(embedding, storage_options)
        if "model_state" not in state or "arch" not in state:
            raise StateError(f"embedding state {embedding!r} has no embedding model "
                             "(fit one with `ue-dist fit --method bayes`)")
    data = load_imageset(url, storage_options)
    if len(data) < 2:
        raise SettingsError(f"dataset {url!r} has {len(data)} samples; the estimate needs >= 2")
    if int(torch.unique(data.labels).numel()) < 2:
        raise SettingsError(f"dataset {url!r} has a single class "
                            f"({int(data.labels[0])}); the Bayes error needs >= 2 classes")
    if embedding:
        if list(state.get("image_shape", [])) != list(data.image_shape):
            raise StateError(f"embedding state {embedding!r} was fitted on images of shape "
                             f"{state.get('image_shape')} (C,H,W), but {url!r} has "
                             f"{list(data.image_shape)}")
        from ue_dist.core.models import build_model

        c, h, _ = data.image_shape
        model = build_model(state["arch"], int(state["num_classes"]), c, h)
        model.load_state_dict(state["model_state"])
        model.eval()
        feats = torch.cat([embed(model, ImageSet.to_float(data.images[i:i + chunk]))
                           for i in range(0, len(data), chunk)]).double()
    else:
        feats = ImageSet.to_float(data.images).flatten(1).double()
    check_embeddings(feats, "embedded images" if embedding else "images")
    s = resolve_sigma(sigma, feats, nearest=math.ceil(math.sqrt(len(data))))
    p = kernel_posterior(feats, feats, data.labels, s, num_classes=int(data.num_classes),
                         self_index=torch.arange(len(data)))
    per = 1.0 - p.max(dim=1).values
    protected = torch.tensor([bool(m.get("protected", False)) for m in data.meta])
    out: dict[str, Any] = {"source": url, "space": "embedding" if embedding else "pixels",
                           "embedding": embedding, "n": len(data), "dim": int(feats.shape[1]),
                           "classes": int(torch.unique(data.labels).numel()), "sigma": s,
                           "bayes_error": float(per.mean()),
                           "protected_count": int(protected.sum())}
    if 0 < int(protected.sum()) < len(data):
        out["bayes_error_protected_rows"] = float(per[protected].mean())
        out["bayes_error_clean_rows"] = float(per[~protected].mean())
    return out


def bayes_error_report(url: str | None = None, *, embedding: str | None = None,
                       toy: str | None = None, n: int | None = None, eps: float | str | None = None,
                       sigma: float | str | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``ue-dist bayes-error`` prints: a dataset (URL) or a toy problem, as one dict."""
    if sigma is not None:
        sigma = parse_radius(sigma, "--sigma")
        if not sigma > 0:
            raise SettingsError(f"--sigma must be > 0, got {sigma}")
    if eps is not None:
        eps = parse_radius(eps, "--eps")
        if not eps > 0:
            raise SettingsError(f"--eps must be > 0, got {eps}")
    if n is not None and n < 4:
        raise SettingsError(f"--n must be at least 4, got {n}")
    if (url is None) == (toy is None):
        raise SettingsError("give either a dataset URL or --toy gaussians|moons (not both)")
    if toy is not None:
        if toy not in TOYS:
            raise SettingsError(f"unknown --toy {toy!r}; valid: {', '.join(TOYS)}")
        if embedding:
            raise SettingsError("--embedding applies to a dataset URL, not to --toy")
        if toy == "gaussians":
            if eps is not None:
                raise SettingsError("--eps applies to --toy moons only")
            return gaussians_report(n or 4000, sigma)
        return moons_report(n or 200, eps if eps is not None else 0.25, sigma)
    if eps is not None:
        raise SettingsError("--eps applies to --toy moons only")
    return dataset_report(url, embedding, sigma, storage_options)
