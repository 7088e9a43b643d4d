"""Streaming protection of a bucket of WebDataset shards on Ray Data.

``protect(method, SRC, DST, state_url=...)`` lists the input shards, skips those the ledger says
are done (``ue_dist.runtime.ledger``), and streams the rest through a Ray Data actor pool. Each
actor builds the method and loads the fitted state once; each call takes ONE input shard: read
it whole (a corrupt shard is reported and skipped), choose the samples to protect (seeded, per
key), perturb them in batches under the epsilon contract, write the output shard under the same
file name in DST (atomically), then write the shard's ledger record last (the commit marker).
Results stream back to the driver, which prints progress and returns a summary.

The shard is the unit of work, retry and commit; with ``watch=True`` the source is listed again
every ``poll_seconds`` and new shards are protected as they land, each exactly once across
restarts because the ledger in DST decides.

Determinism: the perturbation of a shard depends only on (inputs, state, settings, seed, shard
file name): the torch generator is seeded from ``(seed, shard name)`` before each shard, so a
rerun, a resumed run and a run with a different number of actors write the same bytes.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ue_dist.core.config import SettingsError
from ue_dist.data import storage
from ue_dist.errors import UserError
from ue_dist.runtime import ledger

MODES = ("incremental", "overwrite")
Progress = Callable[[str], None]


def shard_seed(seed: int, name: str) -> int:
    """The torch seed of one shard: a hash of the run seed and the shard's file name."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def _no_state(method) -> dict[str, Any]:
    """What ``load`` gets for a method whose fit learns nothing: its name and settings."""
    return {"method": method.name, "version": 1, "settings": dict(method.settings)}


class ShardProtector:
    """Ray Data actor: the method and its loaded state live here for the actor's lifetime."""

    def __init__(self, *, method_name: str, preset: str, overrides: Any, state_url: str | None,
                 dst_url: str, fraction: float, seed: int, batch_size: int,
                 storage_options: Mapping[str, Any] | None, run_hash: str, threads: int,
                 use_gpu: bool) -> None:
        import torch

        import ue_dist  # noqa: F401  (package import fixes torchvision before any method import)
        from ue_dist.methods.base import build_method, load_state

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.method = build_method(method_name, preset, overrides)
        self.state = load_state(state_url, storage_options) if state_url else _no_state(self.method)
        if state_url:
            self.method.check_state(self.state, None, source=state_url)
        self.loaded = self.method.load(self.state, self.device)
        self.dst_url, self.fraction, self.seed = dst_url, float(fraction), int(seed)
        self.batch_size, self.storage_options = int(batch_size), storage_options
        self.state_url, self.run_hash = state_url, run_hash

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "ok": [], "reason": [], "count": [],
                                "protected": [], "seconds": []}
        for src in batch["src"]:
            t0 = time.perf_counter()
            row = self.protect_shard(str(src))
            out["shard"].append(ledger.shard_name(str(src)))
            out["ok"].append(row["ok"])
            out["reason"].append(row.get("reason", ""))
            out["count"].append(row.get("count", 0))
            out["protected"].append(row.get("protected", 0))
            out["seconds"].append(time.perf_counter() - t0)
        return out

    def protect_shard(self, src: str) -> dict[str, Any]:
        import torch

        from ue_dist.data.shards import Sample, ShardError, read_shard, write_shard
        from ue_dist.methods.base import StateError
        from ue_dist.methods.protect import protect_uint8, sample_meta, selected_for_protection

        name = ledger.shard_name(src)
        try:
            samples = read_shard(src, self.storage_options)
        except ShardError as exc:
            return {"ok": False, "reason": str(exc)}
        shapes = {tuple(s.image.shape) for s in samples}
        if len(shapes) > 1:
            return {"ok": False, "reason": f"shard {src!r} mixes image shapes {sorted(shapes)}"}
        if samples:
            h, w, c = next(iter(shapes))
            try:
                if self.state_url:
                    self.method.check_state(self.state, [c, h, w], source=self.state_url)
            except StateError as exc:
                return {"ok": False, "reason": f"shard {src!r}: {exc}"}
        keys = [s.key for s in samples]
        labels = torch.tensor([int(s.label) for s in samples], dtype=torch.long)
        mask = selected_for_protection(keys, self.fraction, self.seed)
        images = (torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
                  .contiguous() if samples else torch.zeros(0, dtype=torch.uint8))
        out_images = images.clone()
        if mask.any():
            # Any randomness in perturb (random starts, EOT draws) depends on (seed, shard) only.
            seed = shard_seed(self.seed, name)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            idx = torch.from_numpy(np.flatnonzero(mask))
            out_images[idx] = protect_uint8(self.method, self.loaded, images[idx], labels[idx],
                                            self.device, self.batch_size)
        out_samples = []
        for i, s in enumerate(samples):
            meta = {**(s.meta or {}),
                    **sample_meta(bool(mask[i]), self.method.name, self.method.eps, src)}
            image = out_images[i].permute(1, 2, 0).contiguous().numpy()
            out_samples.append(Sample(key=s.key, image=image, label=int(s.label), meta=meta))
        dst_shard = storage.join(self.dst_url, name)
        info = write_shard(dst_shard, out_samples, self.storage_options)
        # The record is written last: it is the commit marker of this shard.
        ledger.write_record(self.dst_url, {
            "shard": name, "source": src, "output": dst_shard, "count": int(info["count"]),
            "sha256": info["sha256"], "bytes": int(info["bytes"]), "method": self.method.name,
            "eps": self.method.eps, "settings_hash": self.run_hash,
            "protected": int(mask.sum()),
            "samples": [{"key": k, "protected": bool(p)} for k, p in zip(keys, mask)],
        }, self.storage_options)
        return {"ok": True, "count": len(samples), "protected": int(mask.sum())}


# driver ---------------------------------------------------------------------------------------
def _user_error_in(exc: BaseException) -> UserError | None:
    """Ray wraps exceptions raised in actors; find the user error inside, if any."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _validate(method_name: str, fraction: float, actors: int, gpus_per_actor: float,
              cpus_per_actor: float, batch_size: int, mode: str, poll_seconds: float,
              max_polls: int | None) -> None:
    if mode not in MODES:
        raise SettingsError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise SettingsError(f"--fraction must lie in [0, 1], got {fraction}")
    if int(actors) < 1:
        raise SettingsError(f"--actors must be >= 1, got {actors}")
    if float(gpus_per_actor) < 0 or float(cpus_per_actor) <= 0:
        raise SettingsError(f"--gpus-per-actor must be >= 0 and --cpus-per-actor > 0, got "
                            f"{gpus_per_actor} and {cpus_per_actor}")
    if int(batch_size) < 1:
        raise SettingsError(f"--batch-size must be >= 1, got {batch_size}")
    if float(poll_seconds) < 0:
        raise SettingsError(f"--poll-seconds must be >= 0, got {poll_seconds}")
    if max_polls is not None and int(max_polls) < 1:
        raise SettingsError(f"max_polls must be >= 1, got {max_polls}")


def _image_shape(shards: Sequence[str], storage_options) -> list[int] | None:
    """(C, H, W) of the first readable input shard, to validate the state before writing."""
    from ue_dist.data.shards import ShardError, read_shard

    for url in shards:
        try:
            samples = read_shard(url, storage_options)
        except ShardError:
            continue  # reported (and skipped) when the pipeline reaches it
        if samples:
            h, w, c = samples[0].image.shape
            return [int(c), int(h), int(w)]
    return None


def protect(method_name: str, src_url: str, dst_url: str, *, state_url: str | None = None,
            preset: str = "paper", overrides: Sequence[str] | Mapping[str, Any] = (),
            fraction: float = 1.0, seed: int = 0, actors: int = 1, gpus_per_actor: float = 0,
            cpus_per_actor: float = 0.5, batch_size: int = 256, mode: str = "incremental",
            watch: bool = False, poll_seconds: float = 30.0, max_polls: int | None = None,
            stop_file: str | None = None, storage_options: Mapping[str, Any] | None = None,
            progress: Progress | None = print) -> dict[str, Any]:
    """Protect every shard of ``src_url`` into ``dst_url``; returns a summary dict.

    ``summary["bad_shards"]`` lists the shards that could not be read (name and reason); they
    get no ledger record, so a rerun retries them. With ``watch``, keeps listing SRC until
    ``max_polls`` listings were made, ``stop_file`` exists, or the process is interrupted.
    """
    from ue_dist.data.shards import list_shards
    from ue_dist.methods.base import StateError, build_method, load_state

    say = progress or (lambda message: None)
    src_url, dst_url = storage.absolute(src_url), storage.absolute(dst_url)
    state_url = storage.absolute(state_url) if state_url else state_url
    _validate(method_name, fraction, actors, gpus_per_actor, cpus_per_actor, batch_size, mode,
              poll_seconds, max_polls)
    storage.refuse_inside(dst_url, src_url)
    storage.check_writable_root(dst_url, storage_options)
    storage.check_writable_root(src_url, storage_options)
    method = build_method(method_name, preset, overrides)

    state_sha = None
    state = None
    if state_url:
        state = load_state(state_url, storage_options)
        method.check_state(state, None, source=state_url)
        state_sha = hashlib.sha256(storage.read_bytes(state_url, storage_options)).hexdigest()
    elif method.needs_fit:
        raise StateError(f"method {method.name!r} needs a fitted state (--state URL); "
                         f"fit one with `ue-dist fit --method {method.name}`")
    run_hash = ledger.settings_hash({"method": method.name, "settings": method.settings,
                                     "state_sha256": state_sha, "fraction": float(fraction),
                                     "seed": int(seed)})
    removed = ledger.remove_stale_temps(dst_url, storage_options)
    if removed:
        say(f"[protect] removed {len(removed)} temporary file(s) left by an interrupted run")

    summary: dict[str, Any] = {
        "method": method.name, "src": src_url, "dst": dst_url, "eps": method.eps,
        "fraction": float(fraction), "seed": int(seed), "mode": mode, "settings_hash": run_hash,
        "shards_total": 0, "shards_done": 0, "shards_skipped": 0, "bad_shards": [],
        "images": 0, "images_protected": 0, "polls": 0, "seconds": 0.0, "images_per_s": 0.0}
    handled: set[str] = set()
    bad_sizes: dict[str, Any] = {}  # in watch mode a bad shard is retried only when it changes
    shape_checked = False
    t_start = time.perf_counter()
    try:
        while True:
            summary["polls"] += 1
            shards = list_shards(src_url, storage_options)
            if not shards and not watch:
                raise storage.StorageError(f"no shards (*.tar) under {src_url!r}")
            done = ledger.committed(dst_url, storage_options,
                                    expect_hash=run_hash if mode == "incremental" else None,
                                    skip=handled)
            pending = []
            for url in shards:
                name = ledger.shard_name(url)
                if name in handled:
                    continue
                if mode == "incremental" and name in done:
                    if summary["polls"] == 1:
                        summary["shards_skipped"] += 1
                    handled.add(name)
                    continue
                if name in bad_sizes and bad_sizes[name] == _size(url, storage_options):
                    continue
                pending.append(url)
            summary["shards_total"] = len(set(ledger.shard_name(u) for u in shards) | handled)
            if pending and not shape_checked and state is not None:
                shape = _image_shape(pending, storage_options)
                if shape is not None:
                    method.check_state(state, shape, source=state_url)
                    shape_checked = True
            if pending:
                say(f"[protect] {len(pending)} shard(s) to protect, "
                    f"{summary['shards_skipped']} already committed in {dst_url}")
                _run_pipeline(pending, summary, handled, bad_sizes, say,
                              method_name=method_name, preset=preset, overrides=overrides,
                              state_url=state_url, dst_url=dst_url, fraction=fraction, seed=seed,
                              batch_size=batch_size, storage_options=storage_options,
                              run_hash=run_hash, actors=actors, gpus_per_actor=gpus_per_actor,
                              cpus_per_actor=cpus_per_actor)
            _copy_manifest(src_url, dst_url, summary, storage_options)
            if not watch:
                break
            if max_polls is not None and summary["polls"] >= int(max_polls):
                break
            if stop_file and storage.exists(stop_file, storage_options):
                say(f"[protect] stop file {stop_file} found; stopping")
                break
            time.sleep(float(poll_seconds))
    except KeyboardInterrupt:
        if not watch:
            raise
        say("[protect] interrupted; committed shards stay committed")
    seconds = time.perf_counter() - t_start
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round(summary["images"] / seconds, 2) if seconds > 0 else 0.0
    summary["ok"] = not summary["bad_shards"]
    return summary


def _copy_manifest(src_url: str, dst_url: str, summary: Mapping[str, Any],
                   storage_options) -> None:
    """Carry SRC's dataset manifest (class count, image shape) over, noting the protection."""
    import json

    from ue_dist.data.dataset import MANIFEST

    try:
        manifest = json.loads(storage.read_bytes(storage.join(src_url, MANIFEST), storage_options))
    except (FileNotFoundError, ValueError):
        return
    if not isinstance(manifest, dict):
        return
    manifest["protection"] = {k: summary[k] for k in ("method", "eps", "fraction", "seed",
                                                      "settings_hash")}
    manifest["protection"]["source"] = src_url
    storage.write_bytes(storage.join(dst_url, MANIFEST),
                        json.dumps(manifest, indent=1, sort_keys=True).encode(), storage_options)


def _size(url: str, storage_options) -> Any:
    try:
        fs, path = storage.get_fs(url, storage_options)
        return fs.info(path).get("size")
    except Exception:
        return None


def _run_pipeline(pending: list[str], summary: dict[str, Any], handled: set[str],
                  bad_sizes: dict[str, Any], say: Progress, *, actors: int,
                  gpus_per_actor: float, cpus_per_actor: float, **actor_kwargs: Any) -> None:
    import ray
    import ray.data

    from ue_dist.runtime.ray_env import ensure_ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    ctx.print_on_execution_start = False
    n_actors = min(int(actors), len(pending))
    ds = ray.data.from_items([{"src": url} for url in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ShardProtector, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor) or None,
        fn_constructor_kwargs={**actor_kwargs, "threads": max(1, int(math.floor(cpus_per_actor))),
                               "use_gpu": float(gpus_per_actor) > 0})
    total = len(pending)
    finished = 0
    images_before, t_pipe = summary["images"], time.perf_counter()
    try:
        for row in ds.iter_rows():
            finished += 1
            name = str(row["shard"])
            if bool(row["ok"]):
                handled.add(name)
                bad_sizes.pop(name, None)  # repaired since an earlier poll
                summary["bad_shards"] = [b for b in summary["bad_shards"] if b["shard"] != name]
                summary["shards_done"] += 1
                summary["images"] += int(row["count"])
                summary["images_protected"] += int(row["protected"])
                rate = (summary["images"] - images_before) / max(time.perf_counter() - t_pipe, 1e-9)
                say(f"[protect] {finished}/{total} shards, {summary['images']} images, "
                    f"{rate:.1f} images/s ({name}: {int(row['count'])} "
                    f"images in {float(row['seconds']):.2f}s)")
            else:
                reason = str(row["reason"])
                url = next(u for u in pending if ledger.shard_name(u) == name)
                bad_sizes[name] = _size(url, actor_kwargs.get("storage_options"))
                summary["bad_shards"] = [b for b in summary["bad_shards"] if b["shard"] != name]
                summary["bad_shards"].append({"shard": name, "reason": reason})
                say(f"[protect] {finished}/{total} shards: SKIPPED bad shard {name}: {reason}")
    except Exception as exc:
        user = _user_error_in(exc)
        if user is not None:
            raise user from None
        raise


__all__ = ["protect", "shard_seed", "ShardProtector", "MODES"]
