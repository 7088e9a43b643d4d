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
restarts because the ledger in DST decides. A source shard replaced under the same name (its
size or ETag/mtime changed) is redone; an output whose source is gone is reported, and removed
with ``mode="sync"``. One run writes a DST at a time: the run holds DST's lease
(``ue_dist.runtime.lease``) from before its first write to after its last.

Errors: a bad sample (undecodable, a label outside the state's classes, an unusable key) makes
its shard a bad shard (skipped, named, exit 3); a bad setting or state is found in the driver
before any actor starts (exit 2).

Determinism: the perturbation of a shard depends only on (inputs, state, settings, seed, shard
file name): the torch generator is seeded from ``(seed, shard name)`` before each shard, so a
rerun, a resumed run and a run with a different number of actors write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ue_dist.core.config import SettingsError
from ue_dist.data import storage
from ue_dist.runtime import ledger
from ue_dist.runtime.lease import DEFAULT_TTL_S, Lease

#: incremental: skip committed shards whose source is unchanged; overwrite: redo every shard;
#: sync: incremental, and remove the outputs whose source shard is gone.
MODES = ("incremental", "overwrite", "sync")
#: How long a cluster may take to offer a node for an actor no current node can host.
RESOURCE_WAIT_S = 600
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
                                "protected": [], "already_protected": [], "seconds": []}
        for src, fingerprint in zip(batch["src"], batch["fingerprint"]):
            t0 = time.perf_counter()
            row = self.protect_shard(str(src), json.loads(str(fingerprint)))
            out["shard"].append(ledger.shard_name(str(src)))
            out["ok"].append(row["ok"])
            out["reason"].append(row.get("reason", ""))
            out["count"].append(row.get("count", 0))
            out["protected"].append(row.get("protected", 0))
            out["already_protected"].append(row.get("already_protected", 0))
            out["seconds"].append(time.perf_counter() - t0)
        return out

    def protect_shard(self, src: str, fingerprint: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
        """Protect one shard; a bad sample makes the shard a bad shard (``ok: False``)."""
        from ue_dist.data.shards import ShardError, read_shard

        try:
            samples = read_shard(src, self.storage_options)
            return self._protect_samples(src, samples, fingerprint)
        except ShardError as exc:
            return {"ok": False, "reason": str(exc)}

    def _check_samples(self, src: str, samples: list) -> None:
        from ue_dist.data.shards import ShardError
        from ue_dist.methods.base import StateError

        shapes = {tuple(s.image.shape) for s in samples}
        if len(shapes) > 1:
            raise ShardError(f"shard {src!r} mixes image shapes {sorted(shapes)}")
        if samples and self.state_url:
            h, w, c = next(iter(shapes))
            try:
                self.method.check_state(self.state, [c, h, w], source=self.state_url)
            except StateError as exc:
                raise ShardError(f"shard {src!r}: {exc}") from None
        classes = self.state.get("num_classes")
        for s in samples:
            if isinstance(classes, int) and int(s.label) >= classes:
                raise ShardError(f"shard {src}, sample {s.key!r}: label {int(s.label)} is outside "
                                 f"the {classes} classes of the state {self.state_url}")

    def _protect_samples(self, src: str, samples: list,
                         fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
        import torch

        from ue_dist.data.shards import Sample, write_shard
        from ue_dist.methods.protect import protect_uint8, sample_meta, selected_for_protection

        self._check_samples(src, samples)
        name = ledger.shard_name(src)
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
            "protected": int(mask.sum()), "source_fingerprint": dict(fingerprint or {}),
            "samples": [{"key": k, "protected": bool(p)} for k, p in zip(keys, mask)],
        }, self.storage_options)
        already = sum(1 for s, p in zip(samples, mask) if p and (s.meta or {}).get("protected"))
        return {"ok": True, "count": len(samples), "protected": int(mask.sum()),
                "already_protected": already}


# driver ---------------------------------------------------------------------------------------
def _validate(fraction: float, actors: int, gpus_per_actor: float, cpus_per_actor: float,
              batch_size: int, mode: str, poll_seconds: float, max_polls: int | None,
              wait_for_lease: float) -> None:
    if mode not in MODES:
        raise SettingsError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise SettingsError(f"--fraction must lie in [0, 1], got {fraction}")
    if int(actors) < 1:
        raise SettingsError(f"--actors must be >= 1, got {actors}")
    if not (math.isfinite(float(gpus_per_actor)) and math.isfinite(float(cpus_per_actor))) or \
            float(gpus_per_actor) < 0 or float(cpus_per_actor) <= 0:
        raise SettingsError(f"--gpus-per-actor must be >= 0 and --cpus-per-actor > 0, got "
                            f"{gpus_per_actor} and {cpus_per_actor}")
    if int(batch_size) < 1:
        raise SettingsError(f"--batch-size must be >= 1, got {batch_size}")
    if float(poll_seconds) < 0:
        raise SettingsError(f"--poll-seconds must be >= 0, got {poll_seconds}")
    if max_polls is not None and int(max_polls) < 1:
        raise SettingsError(f"max_polls must be >= 1, got {max_polls}")
    if not float(wait_for_lease) >= 0:
        raise SettingsError(f"--wait-for-lease must be >= 0 seconds, got {wait_for_lease}")


def refuse_overlap(src_url: str, dst_url: str) -> None:
    """DST may be neither SRC, nor inside it, nor contain it, as written or through links;
    nor may the ledger folder DST/_ledger lead into SRC."""
    storage.refuse_inside(dst_url, src_url, refuse_containing=True)
    storage.refuse_inside(ledger.ledger_url(dst_url), src_url, what="ledger folder")
    if storage.protocol_of(dst_url) == "file" and os.path.isfile(dst_url.replace("file://", "", 1)):
        raise storage.StorageError(f"DST {dst_url!r} is an existing file; DST must be a folder "
                                   "or prefix for the protected shards")


def _checked_state(method, state_url: str | None, storage_options) -> tuple[dict | None, str | None]:
    """The fitted state, validated once in the driver (before any actor starts), and its sha256."""
    from ue_dist.methods.base import StateError, load_state

    if not state_url:
        if method.needs_fit:
            raise StateError(f"method {method.name!r} needs a fitted state (--state URL); "
                             f"fit one with `ue-dist fit --method {method.name}`")
        return None, None
    state = load_state(state_url, storage_options)
    method.check_state(state, None, source=state_url)
    method.check_loadable(state, source=state_url)
    return state, hashlib.sha256(storage.read_bytes(state_url, storage_options)).hexdigest()


def _check_shape(method, state, state_url: str, src_url: str, storage_options) -> bool:
    """Check the state against (C, H, W) of SRC's first readable shard; False if none is."""
    from ue_dist.data.shards import ShardError, list_shards, read_shard

    for url in list_shards(src_url, storage_options) if storage.exists(src_url, storage_options) \
            else []:
        try:
            samples = read_shard(url, storage_options)
        except ShardError:
            continue  # reported (and skipped) when the pipeline reaches it
        if samples:
            h, w, c = samples[0].image.shape
            method.check_state(state, [int(c), int(h), int(w)], source=state_url)
            return True
    return False


class _Run:
    """What one protect call knows across its polls of SRC."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.handled: dict[str, Any] = {}  # shard name -> source fingerprint done or skipped
        self.bad: dict[str, Any] = {}      # bad shard -> fingerprint; retried once it changes
        self.shape_checked = False

    def pending(self, shards: list[str], fingerprints: Mapping[str, Any],
                done: Mapping[str, Mapping[str, Any]], mode: str, say: Progress
                ) -> list[tuple[str, Any]]:
        out = []
        for url in shards:
            name = ledger.shard_name(url)
            fingerprint = fingerprints.get(name)
            if name in self.handled and self.handled[name] == fingerprint:
                continue
            if name in self.bad and self.bad[name] == fingerprint:
                continue
            record = done.get(name)
            committed_here = mode != "overwrite" and record is not None
            if committed_here and not ledger.source_changed(record, fingerprint):
                if self.summary["polls"] == 1:
                    self.summary["shards_skipped"] += 1
                self.handled[name] = fingerprint
                continue
            if committed_here or name in self.handled:  # done before, from another version
                self.summary["sources_changed"].append(name)
                say(f"[protect] source shard {name} changed since it was protected; redoing it")
            out.append((url, fingerprint))
        return out


def protect(method_name: str, src_url: str, dst_url: str, *, state_url: str | None = None,
            preset: str = "paper", overrides: Sequence[str] | Mapping[str, Any] = (),
            fraction: float = 1.0, seed: int = 0, actors: int = 1, gpus_per_actor: float = 0,
            cpus_per_actor: float = 0.5, batch_size: int = 256, mode: str = "incremental",
            watch: bool = False, poll_seconds: float = 30.0, max_polls: int | None = None,
            stop_file: str | None = None, storage_options: Mapping[str, Any] | None = None,
            wait_for_lease: float = 0.0, lease_ttl_s: float = DEFAULT_TTL_S,
            progress: Progress | None = print) -> dict[str, Any]:
    """Protect every shard of ``src_url`` into ``dst_url``; returns a summary dict.

    ``summary["bad_shards"]`` lists the shards that could not be read (name and reason); they
    get no ledger record, so a rerun retries them. With ``watch``, keeps listing SRC until
    ``max_polls`` listings were made, ``stop_file`` exists, or the process is interrupted.
    ``wait_for_lease``: seconds to wait while another run holds DST (default: refuse at once).
    """
    from ue_dist.methods.base import build_method

    say = progress or (lambda message: None)
    src_url, dst_url = storage.absolute(src_url), storage.absolute(dst_url)
    state_url = storage.absolute(state_url) if state_url else state_url
    _validate(fraction, actors, gpus_per_actor, cpus_per_actor, batch_size, mode, poll_seconds,
              max_polls, wait_for_lease)
    refuse_overlap(src_url, dst_url)
    storage.check_writable_root(dst_url, storage_options)
    storage.check_writable_root(src_url, storage_options)
    method = build_method(method_name, preset, overrides)
    state, state_sha = _checked_state(method, state_url, storage_options)
    run_hash = ledger.settings_hash({"method": method.name, "settings": method.settings,
                                     "state_sha256": state_sha, "fraction": float(fraction),
                                     "seed": int(seed)})
    run = _Run({
        "method": method.name, "src": src_url, "dst": dst_url, "eps": method.eps,
        "fraction": float(fraction), "seed": int(seed), "mode": mode, "settings_hash": run_hash,
        "shards_total": 0, "shards_done": 0, "shards_skipped": 0, "bad_shards": [],
        "sources_changed": [], "orphans": [], "orphans_removed": [], "images": 0,
        "images_protected": 0, "inputs_already_protected": 0, "polls": 0, "seconds": 0.0,
        "images_per_s": 0.0})
    actor_kwargs = dict(method_name=method_name, preset=preset, overrides=overrides,
                        state_url=state_url, dst_url=dst_url, fraction=fraction, seed=seed,
                        batch_size=batch_size, storage_options=storage_options, run_hash=run_hash)
    if state is not None:  # a state that does not fit the images is refused before any write
        run.shape_checked = _check_shape(method, state, state_url, src_url, storage_options)
    lease = Lease(dst_url, storage_options, ttl_s=lease_ttl_s)
    lease.acquire(wait_s=wait_for_lease, say=say)
    t_start = time.perf_counter()
    try:
        _remove_temps(dst_url, storage_options, say)
        _poll(run, method, state, lease, say, src_url=src_url, dst_url=dst_url, mode=mode,
              watch=watch, poll_seconds=poll_seconds, max_polls=max_polls, stop_file=stop_file,
              storage_options=storage_options, actors=actors, gpus_per_actor=gpus_per_actor,
              cpus_per_actor=cpus_per_actor, actor_kwargs=actor_kwargs)
        _remove_temps(dst_url, storage_options, say)  # e.g. left by an actor Ray restarted
    finally:
        lease.release()
    summary = run.summary
    seconds = time.perf_counter() - t_start
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round(summary["images"] / seconds, 2) if seconds > 0 else 0.0
    summary["ok"] = not summary["bad_shards"]
    if summary["inputs_already_protected"]:
        say(f"[protect] warning: {summary['inputs_already_protected']} input sample(s) were "
            "already protected (their metadata says so); protecting them again moves them up to "
            "2 eps from the original. Protect the original data instead.")
    return summary


def _remove_temps(dst_url: str, storage_options, say: Progress) -> None:
    removed = ledger.remove_stale_temps(dst_url, storage_options)
    if removed:
        say(f"[protect] removed {len(removed)} temporary file(s) left by an interrupted run")


def _poll(run: _Run, method, state, lease: Lease, say: Progress, *, src_url: str, dst_url: str,
          mode: str, watch: bool, poll_seconds: float, max_polls: int | None,
          stop_file: str | None, storage_options, actors: int, gpus_per_actor: float,
          cpus_per_actor: float, actor_kwargs: Mapping[str, Any]) -> None:
    """List SRC, protect what is pending, repeat while watching."""
    from ue_dist.data.shards import list_shards

    summary = run.summary
    try:
        while True:
            summary["polls"] += 1
            shards = list_shards(src_url, storage_options)
            if not shards and not watch:
                raise storage.StorageError(f"no shards (*.tar) under {src_url!r}")
            fingerprints = ledger.source_fingerprints(src_url, storage_options)
            _orphans(run, dst_url, {ledger.shard_name(u) for u in shards}, mode, say,
                     storage_options)
            done = ledger.committed(dst_url, storage_options,
                                    expect_hash=None if mode == "overwrite" else
                                    summary["settings_hash"], skip=set(run.handled))
            pending = run.pending(shards, fingerprints, done, mode, say)
            summary["shards_total"] = len({ledger.shard_name(u) for u in shards} | set(run.handled))
            if pending and not run.shape_checked and state is not None:  # watch: SRC was empty
                run.shape_checked = _check_shape(method, state, actor_kwargs["state_url"],
                                                 src_url, storage_options)
            if pending:
                say(f"[protect] {len(pending)} shard(s) to protect, "
                    f"{summary['shards_skipped']} already committed in {dst_url}")
                _run_pipeline(pending, run, lease, say, actors=actors,
                              gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                              **actor_kwargs)
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


def _orphans(run: _Run, dst_url: str, source_names: set[str], mode: str, say: Progress,
             storage_options) -> None:
    """Outputs (or records) in DST whose source shard is gone: removed in sync mode, else named."""
    orphans = sorted(ledger.output_names(dst_url, storage_options) - source_names)
    for name in orphans:
        run.handled.pop(name, None)
        if mode == "sync":
            ledger.remove_output(dst_url, name, storage_options)
            run.summary["orphans_removed"].append(name)
            say(f"[protect] removed {name}: its source shard is gone (--mode sync)")
        elif name not in run.summary["orphans"]:
            run.summary["orphans"].append(name)
            say(f"[protect] {name} in {dst_url} has no source shard any more; "
                "--mode sync removes it")


def _copy_manifest(src_url: str, dst_url: str, summary: Mapping[str, Any],
                   storage_options) -> None:
    """Carry SRC's dataset manifest (class count, image shape) over, noting the protection."""
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


def _run_pipeline(pending: list[tuple[str, Any]], run: _Run, lease: Lease, say: Progress, *,
                  actors: int, gpus_per_actor: float, cpus_per_actor: float,
                  **actor_kwargs: Any) -> None:
    import ray
    import ray.data

    from ue_dist.runtime.ray_env import (ResourceError, check_resources, ensure_ray,
                                         user_error_in)

    ensure_ray()
    from ue_dist.runtime import console
    console.hush()  # ray.data installs console handlers of its own on import
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    ctx.print_on_execution_start = False
    if not check_resources({"CPU": float(cpus_per_actor), "GPU": float(gpus_per_actor)},
                           "one protect actor (--cpus-per-actor, --gpus-per-actor)"):
        say(f"[protect] no node offers {cpus_per_actor:g} CPU / {gpus_per_actor:g} GPU per actor "
            f"yet; waiting up to {RESOURCE_WAIT_S} s for the cluster to add one")
        ctx.wait_for_min_actors_s = RESOURCE_WAIT_S
    n_actors = min(int(actors), len(pending))
    ds = ray.data.from_items([{"src": url, "fingerprint": json.dumps(fp, sort_keys=True)}
                              for url, fp in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        ShardProtector, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor) or None,
        fn_constructor_kwargs={**actor_kwargs, "threads": max(1, int(math.floor(cpus_per_actor))),
                               "use_gpu": float(gpus_per_actor) > 0})
    fingerprints = {ledger.shard_name(url): fp for url, fp in pending}
    summary, total, finished = run.summary, len(pending), 0
    images_before, t_pipe = summary["images"], time.perf_counter()
    try:
        for row in ds.iter_rows():
            lease.check()
            finished += 1
            name = str(row["shard"])
            summary["bad_shards"] = [b for b in summary["bad_shards"] if b["shard"] != name]
            if bool(row["ok"]):
                run.handled[name] = fingerprints[name]
                run.bad.pop(name, None)  # repaired since an earlier poll
                summary["shards_done"] += 1
                summary["images"] += int(row["count"])
                summary["images_protected"] += int(row["protected"])
                summary["inputs_already_protected"] += int(row["already_protected"])
                rate = (summary["images"] - images_before) / max(time.perf_counter() - t_pipe, 1e-9)
                say(f"[protect] {finished}/{total} shards, {summary['images']} images, "
                    f"{rate:.1f} images/s ({name}: {int(row['count'])} "
                    f"images in {float(row['seconds']):.2f}s)")
            else:
                run.bad[name] = fingerprints[name]
                summary["bad_shards"].append({"shard": name, "reason": str(row["reason"])})
                say(f"[protect] {finished}/{total} shards: SKIPPED bad shard {name}: {row['reason']}")
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(f"no node of the cluster started a protect actor with "
                            f"{cpus_per_actor:g} CPU / {gpus_per_actor:g} GPU within "
                            f"{RESOURCE_WAIT_S} s; ask for less or add such nodes") from None
    except Exception as exc:
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise


__all__ = ["protect", "refuse_overlap", "shard_seed", "ShardProtector", "MODES"]
