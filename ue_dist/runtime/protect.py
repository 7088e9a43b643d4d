"""Streaming protection of a bucket of WebDataset shards on Ray Data.

``protect(method, SRC, DST, state_url=..., **options)`` lists the input shards, skips those the
ledger says are done (``ue_dist.runtime.ledger``), and streams the rest through a Ray Data actor
pool. This module holds only the Ray parts: the driver (validation, listing, lease, the poll
loop) and the ``ShardProtector`` actor. The work on one shard -- read it whole (a corrupt shard is
reported and skipped), choose the samples to protect (seeded, per key), perturb them in batches
under the epsilon contract, write the output shard under the same file name in DST (atomically),
then write the shard's ledger record last (the commit marker) -- is ``ue_dist.pipeline``'s
``protect_shard``, Ray-free. Each actor reads and loads the fitted state once; results stream
back to the driver, which prints progress and returns a summary.

The shard is the unit of work, retry and commit; with ``watch=True`` the source is listed again
every ``poll_seconds`` and new shards are protected as they land, each exactly once across
restarts because the ledger in DST decides. A source shard replaced under the same name (its
size or ETag/mtime changed) is redone; an output whose source is gone is reported, and removed
with ``mode="sync"``. One run writes a DST at a time: the run holds DST's lease
(``ue_dist.runtime.lease``) from before its first write to after its last.

Errors: a bad sample (undecodable, a label outside the state's classes, an unusable key) makes
its shard a bad shard (skipped, named, exit 3); a bad setting or state is found in the driver
before any actor starts (exit 2). Transient storage errors are retried by botocore, then by
``ue_dist.data.storage``, then by Ray Data running the shard's task again (``ACTOR_TASK_RETRIES``);
a GPU asked for (``--gpus-per-actor``) where no node or torch has one is an error (exit 2).

Determinism: the perturbation of a shard depends only on (inputs, state, settings, seed, shard
file name): the torch generator is seeded from ``(seed, shard name)`` before each shard, so a
rerun, a resumed run and a run with a different number of actors write the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ue_dist import options as opts_schema
from ue_dist.core.config import SettingsError
from ue_dist.data import storage
from ue_dist.methods.base import get_method, method_names
from ue_dist.pipeline import shard_seed  # noqa: F401  (re-exported: the seed of one shard)
from ue_dist.runtime import ledger
from ue_dist.runtime.console import ProgressLine
from ue_dist.runtime.lease import DEFAULT_TTL_S, Lease

#: incremental: skip committed shards whose source is unchanged; overwrite: redo every shard;
#: sync: incremental, and remove the outputs whose source shard is gone.
MODES = ("incremental", "overwrite", "sync")
#: How long a cluster may take to offer a node for an actor no current node can host.
RESOURCE_WAIT_S = 600
#: Times Ray Data runs a shard's actor task again after it raised a transient storage error
#: that outlived botocore's and ``storage``'s own retries (a longer throttling or outage);
#: bounded, so that an endpoint that stays down fails the run.
ACTOR_TASK_RETRIES = 3
Progress = Callable[[str], None]


def _declared(name: str) -> Any:
    return opts_schema.default(opts_schema.PROTECT, name)


@dataclass(frozen=True)
class ProtectOptions:
    """The options of one ``protect`` run (the keyword arguments of ``protect``); the defaults
    and valid ranges are those declared for the command in ``ue_dist.options``."""

    state_url: str | None = None
    preset: str | None = _declared("preset")  # None: the state's settings (see open_method)
    overrides: Sequence[str] | Mapping[str, Any] = ()
    fraction: float = _declared("fraction")
    seed: int = _declared("seed")
    actors: int | str = _declared("actors")  # N, or "MIN:MAX" for an autoscaling pool
    gpus_per_actor: float = _declared("gpus_per_actor")
    cpus_per_actor: float = _declared("cpus_per_actor")
    batch_size: int = _declared("batch_size")
    joint: bool = False
    staged: bool = False  # read/decode and encode/write as CPU tasks around the actor pool
    workers: int = _declared("workers")
    checkpoint_every: int = _declared("checkpoint_every")
    labels: str = _declared("labels")
    mode: str = _declared("mode")
    watch: bool = False
    poll_seconds: float = _declared("poll_seconds")
    max_polls: int | None = None
    stop_file: str | None = None
    storage_options: Mapping[str, Any] | None = None
    wait_for_lease: float = _declared("wait_for_lease")
    lease_ttl_s: float = DEFAULT_TTL_S

    def check(self) -> None:
        """Refuse a bad value, naming its option (by its command-line flag)."""
        for name in ("fraction", "seed", "actors", "gpus_per_actor", "cpus_per_actor",
                     "batch_size", "workers", "checkpoint_every", "labels", "mode",
                     "poll_seconds", "wait_for_lease", "max_polls"):
            opt = opts_schema.option(opts_schema.PROTECT.options, name)
            opts_schema.check_value(getattr(self, name), opt, opt.flag, SettingsError)
        if self.joint and self.staged:
            raise SettingsError("--staged streams shards through an actor pool; --joint "
                                "optimises one set on --workers Ray Train workers: give one")


def _result_columns() -> dict[str, list]:
    return {"shard": [], "ok": [], "reason": [], "count": [], "protected": [],
            "already_protected": [], "seconds": []}


def _add_result(out: dict[str, list], src: str, row: Mapping[str, Any], seconds: float) -> None:
    """One shard's result row (as ``protect_shard`` returns it) appended to ``out``."""
    out["shard"].append(ledger.shard_name(src))
    out["ok"].append(row["ok"])
    out["reason"].append(row.get("reason", ""))
    out["count"].append(row.get("count", 0))
    out["protected"].append(row.get("protected", 0))
    out["already_protected"].append(row.get("already_protected", 0))
    out["seconds"].append(seconds)


class ShardProtector:
    """Ray Data actor: the method and its loaded state live here for the actor's lifetime; each
    call protects its shards with ``ue_dist.pipeline.protect_shard``."""

    def __init__(self, *, method_name: str, options: ProtectOptions, dst_url: str,
                 run_hash: str, threads: int, use_gpu: bool,
                 task_retries: int = ACTOR_TASK_RETRIES) -> None:
        import torch

        import ue_dist  # noqa: F401  (package import fixes torchvision before any method import)
        from ue_dist.pipeline import open_protect_config
        from ue_dist.runtime.ray_env import gpu_device

        torch.set_num_threads(max(1, threads))
        device = torch.device(gpu_device(options.gpus_per_actor if use_gpu else 0,
                                         "--gpus-per-actor"))  # a CPU torch: error, not CPU
        # the same settings as the driver's: the state's, with the same protect-time overrides
        self.config = open_protect_config(
            method_name, options.state_url, preset=options.preset, overrides=options.overrides,
            device=device, fraction=float(options.fraction), seed=int(options.seed),
            batch_size=int(options.batch_size), labels=options.labels,
            storage_options=options.storage_options, settings_hash=run_hash)
        self.dst_url = dst_url
        # Ray retries an actor task on the same actor, with no bound of its own for errors
        # (max_task_retries is -1): the attempts at each shard are counted here
        self.task_retries, self.attempts = int(task_retries), {}

    def _protect_shard(self, src: str, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        from ue_dist.pipeline import protect_shard

        try:
            return protect_shard(self.config, src, self.dst_url, fingerprint)
        except storage.StorageTransientError as exc:
            self.attempts[src] = self.attempts.get(src, 0) + 1
            if self.attempts[src] > self.task_retries:  # a StorageError is not retried
                raise storage.StorageError(f"{exc} (the shard was tried "
                                           f"{self.attempts[src]} times)") from None
            raise

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = _result_columns()
        for src, fingerprint in zip(batch["src"], batch["fingerprint"]):
            t0 = time.perf_counter()
            row = self._protect_shard(str(src), json.loads(str(fingerprint)))
            _add_result(out, str(src), row, time.perf_counter() - t0)
        return out


# --staged: one row per shard through three steps; the decoded shard travels pickled -----------
def _staged_row(src: Any, fingerprint: Any, reason: str, payload: bytes, seconds: float
                ) -> dict[str, Any]:
    return {"src": str(src), "fingerprint": str(fingerprint), "reason": reason,
            "payload": payload, "seconds": float(seconds)}


def _staged_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("src", "fingerprint", "reason", "payload",
                                               "seconds")}


def read_step(batch: dict[str, np.ndarray], *, config) -> dict[str, list]:
    """Ray Data CPU task: read and decode each shard (``pipeline.read_stage``); a bad shard
    goes on as its reason with no payload."""
    import pickle

    from ue_dist.data.shards import ShardError
    from ue_dist.pipeline import bad_shard, read_stage

    rows = []
    for src, fingerprint in zip(batch["src"], batch["fingerprint"]):
        t0 = time.perf_counter()
        try:  # protocol 5: the image arrays are copied as buffers, not re-encoded
            reason, payload = "", pickle.dumps(read_stage(config, str(src)), protocol=5)
        except ShardError as exc:
            reason, payload = bad_shard(exc)["reason"], b""
        rows.append(_staged_row(src, fingerprint, reason, payload, time.perf_counter() - t0))
    return _staged_columns(rows)


class StagedProtector(ShardProtector):
    """Ray Data actor of ``--staged``: only the perturb step (``pipeline.perturb_stage``) on the
    shards the read step decoded; the state is loaded once, as in ``ShardProtector``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import pickle

        from ue_dist.data.shards import ShardError
        from ue_dist.pipeline import bad_shard, perturb_stage

        rows = []
        for src, fingerprint, reason, payload, seconds in zip(
                batch["src"], batch["fingerprint"], batch["reason"], batch["payload"],
                batch["seconds"]):
            t0 = time.perf_counter()
            if not reason:
                try:
                    shard = perturb_stage(self.config, str(src), pickle.loads(payload))
                    payload = pickle.dumps(shard, protocol=5)
                except ShardError as exc:
                    reason, payload = bad_shard(exc)["reason"], b""
            rows.append(_staged_row(src, fingerprint, reason, payload,
                                    seconds + time.perf_counter() - t0))
        return _staged_columns(rows)


def commit_step(batch: dict[str, np.ndarray], *, config, dst_url: str) -> dict[str, list]:
    """Ray Data CPU task: PNG-encode, write and commit each perturbed shard
    (``pipeline.commit_stage``); the result rows are those of ``ShardProtector``."""
    import pickle

    from ue_dist.data.shards import ShardError
    from ue_dist.pipeline import bad_shard, commit_stage

    out = _result_columns()
    for src, fingerprint, reason, payload, seconds in zip(
            batch["src"], batch["fingerprint"], batch["reason"], batch["payload"],
            batch["seconds"]):
        t0 = time.perf_counter()
        try:
            row = ({"ok": False, "reason": str(reason)} if reason else
                   commit_stage(config, str(src), dst_url, pickle.loads(payload),
                                json.loads(str(fingerprint))))
        except ShardError as exc:
            row = bad_shard(exc)
        _add_result(out, str(src), row, float(seconds) + time.perf_counter() - t0)
    return out


# driver ---------------------------------------------------------------------------------------
def refuse_overlap(src_url: str, dst_url: str) -> None:
    """DST may be neither SRC, nor inside it, nor contain it, as written or through links;
    nor may the ledger folder DST/_ledger lead into SRC."""
    storage.refuse_inside(dst_url, src_url, refuse_containing=True)
    storage.refuse_inside(ledger.ledger_url(dst_url), src_url, what="ledger folder")
    if storage.protocol_of(dst_url) == "file" and os.path.isfile(dst_url.replace("file://", "", 1)):
        raise storage.StorageError(f"DST {dst_url!r} is an existing file; DST must be a folder "
                                   "or prefix for the protected shards")


def _check_shape(method, state, state_url: str, src_url: str, storage_options) -> bool:
    """Check the state against (C, H, W) of the first image of SRC's first shard that has a
    readable one, reading only that far (the actor reads the shard whole, once); False if none."""
    from ue_dist.data.shards import ShardError, first_image_shape, list_shards
    from ue_dist.methods.base import StateError

    for url in list_shards(src_url, storage_options) if storage.exists(src_url, storage_options) \
            else []:
        try:
            shape = first_image_shape(url, storage_options)
        except ShardError:
            continue  # reported (and skipped) when the pipeline reaches it
        if shape is not None:
            from ue_dist.methods.protect import native_problem

            h, w, c = shape
            problem = native_problem(method, state, (int(c), int(h), int(w)))
            if problem:  # the whole bucket is refused before anything is written
                raise StateError(f"{state_url} cannot protect {url} (an image of {h}x{w}x{c}): "
                                 f"{problem}")
            return True
    return False


@dataclass
class _Run:
    """What one protect call knows across its polls of SRC; the driver's only mutable record."""

    summary: dict[str, Any]
    handled: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> fingerprint done
    bad: dict[str, Any] = dataclasses.field(default_factory=dict)  # retried once it changes
    shape_checked: bool = False

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

    def absorb(self, row: Mapping[str, Any], fingerprint: Any) -> bool:
        """Count one shard's result; whether it was protected (else it is a bad shard)."""
        summary, name = self.summary, str(row["shard"])
        summary["bad_shards"] = [b for b in summary["bad_shards"] if b["shard"] != name]
        if not bool(row["ok"]):
            self.bad[name] = fingerprint
            summary["bad_shards"].append({"shard": name, "reason": str(row["reason"])})
            return False
        self.handled[name] = fingerprint
        self.bad.pop(name, None)  # repaired since an earlier poll
        summary["shards_done"] += 1
        summary["images"] += int(row["count"])
        summary["images_protected"] += int(row["protected"])
        summary["inputs_already_protected"] += int(row["already_protected"])
        return True


def _new_summary(method, src_url: str, dst_url: str, opts: ProtectOptions,
                 run_hash: str) -> dict[str, Any]:
    return {"method": method.name, "src": src_url, "dst": dst_url, "eps": method.eps,
            "fraction": float(opts.fraction), "seed": int(opts.seed), "mode": opts.mode,
            "settings_hash": run_hash, "settings": dict(method.settings), "shards_total": 0, "shards_done": 0, "shards_skipped": 0,
            "bad_shards": [], "sources_changed": [], "orphans": [], "orphans_removed": [],
            "images": 0, "images_protected": 0, "inputs_already_protected": 0, "polls": 0,
            "seconds": 0.0, "images_per_s": 0.0}


def protect(method_name: str, src_url: str, dst_url: str, options: ProtectOptions | None = None,
            *, progress: Progress | None = print, **kwargs: Any) -> dict[str, Any]:
    """Protect every shard of ``src_url`` into ``dst_url``; returns a summary dict.

    ``options`` (or the same fields as keyword arguments: ``state_url``, ``fraction``, ``seed``,
    ``actors``, ``mode``, ``watch``, ...; see ``ProtectOptions``). ``summary["bad_shards"]``
    lists the shards that could not be read (name and reason); they get no ledger record, so a
    rerun retries them. With ``watch``, keeps listing SRC until ``max_polls`` listings were
    made, ``stop_file`` exists, or the process is interrupted. ``wait_for_lease``: seconds to
    wait while another run holds DST (default: refuse at once).
    """
    from ue_dist.pipeline import open_method

    if options is not None and kwargs:
        raise TypeError("protect() takes options or keyword options, not both")
    opts = options if options is not None else ProtectOptions(**kwargs)
    say = progress or (lambda message: None)
    src_url, dst_url = storage.absolute(src_url), storage.absolute(dst_url)
    opts = dataclasses.replace(opts, state_url=storage.absolute(opts.state_url)
                               if opts.state_url else opts.state_url)
    opts.check()
    refuse_overlap(src_url, dst_url)
    so = opts.storage_options
    storage.check_writable_root(dst_url, so)
    storage.check_writable_root(src_url, so)
    # the state's own settings, protect-time overrides applied, a conflicting one refused: all
    # before the lease is taken or anything is written
    method, state, state_sha = open_method(method_name, opts.state_url, preset=opts.preset,
                                           overrides=opts.overrides, storage_options=so,
                                           loadable=True)
    run_hash = ledger.settings_hash({"method": method.name, "settings": method.settings,
                                     "state_sha256": state_sha, "fraction": float(opts.fraction),
                                     "seed": int(opts.seed),
                                     # the label source changes the bytes; "given" keeps the
                                     # hash of runs from before the option existed
                                     **({"labels": opts.labels} if opts.labels != "given"
                                        else {}),
                                     # one set optimised jointly: other bytes than streaming
                                     **({"joint": True} if opts.joint else {})})
    if opts.labels == "predict" and (state is None or not method.predicts
                                     or "labeller" in state):
        why = ("its state labels images by their clusters (fit --labels cluster)"
               if state is not None and "labeller" in state else "it has no classifier")
        raise SettingsError(f"--labels predict: method {method.name!r} cannot predict labels "
                            f"({why}); methods with a classifier: "
                            f"{', '.join(n for n in method_names() if get_method(n).predicts)}")
    if opts.joint:
        from ue_dist.runtime.bayes_joint import check_joint
        check_joint(method, state, opts)
    run = _Run(_new_summary(method, src_url, dst_url, opts, run_hash))
    if state is not None:  # a state that does not fit the images is refused before any write
        run.shape_checked = _check_shape(method, state, opts.state_url, src_url, so)
    lease = Lease(dst_url, so, ttl_s=opts.lease_ttl_s)
    lease.acquire(wait_s=opts.wait_for_lease, say=say)
    t_start = time.perf_counter()
    try:
        if state is not None:  # after the lease: a refused run's error stays its one line
            _say_changed_settings(method, state, say)
        _remove_temps(dst_url, so, say)
        if opts.joint:
            from ue_dist.runtime.bayes_joint import protect_bucket_jointly
            protect_bucket_jointly(run.summary, method, src_url, dst_url, opts, lease, say)
            _copy_manifest(src_url, dst_url, run.summary, so)
        else:
            _poll(run, method, state, lease, say, src_url=src_url,
                  dst_url=dst_url, opts=opts)
        _remove_temps(dst_url, so, say)  # e.g. left by an actor Ray restarted
    finally:
        lease.release()
    return _finish(run.summary, time.perf_counter() - t_start, say)


def _say_changed_settings(method, state: Mapping[str, Any], say: Progress) -> None:
    """Name the protect-time settings this run changed from those the state was fitted with."""
    from ue_dist.core.settings import same_value

    fitted = state.get("settings", {})
    changed = {k: v for k, v in method.settings.items() if not same_value(v, fitted.get(k))}
    if changed:
        say(f"[protect] {method.name}: the state's settings, changed for protection: "
            + json.dumps(changed, sort_keys=True, default=str))


def _finish(summary: dict[str, Any], seconds: float, say: Progress) -> dict[str, Any]:
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


def _poll(run: _Run, method, state, lease: Lease, say: Progress, *,
          src_url: str, dst_url: str, opts: ProtectOptions) -> None:
    """List SRC, protect what is pending, repeat while watching."""
    from ue_dist.data.shards import list_shards

    summary, so, watch = run.summary, opts.storage_options, opts.watch
    try:
        while True:
            summary["polls"] += 1
            shards = list_shards(src_url, so)
            if not shards and not watch:
                raise storage.StorageError(f"no shards (*.tar) under {src_url!r}")
            fingerprints = ledger.source_fingerprints(src_url, so)
            _orphans(run, dst_url, {ledger.shard_name(u) for u in shards}, opts.mode, say, so)
            done = ledger.committed(dst_url, so, expect_hash=None if opts.mode == "overwrite" else
                                    summary["settings_hash"], skip=set(run.handled))
            pending = run.pending(shards, fingerprints, done, opts.mode, say)
            summary["shards_total"] = len({ledger.shard_name(u) for u in shards}
                                           | set(run.handled))
            if pending and not run.shape_checked and state is not None:  # watch: SRC was empty
                run.shape_checked = _check_shape(method, state, opts.state_url, src_url, so)
            if pending:
                say(f"[protect] {len(pending)} shard(s) to protect, "
                    f"{summary['shards_skipped']} already committed in {dst_url}")
                rows = _run_pipeline(pending, method, dst_url, opts, summary["settings_hash"],
                                     say)
                _absorb_rows(run, rows, dict(pending), lease, say)
            _copy_manifest(src_url, dst_url, summary, so)
            if not watch:
                break
            if opts.max_polls is not None and summary["polls"] >= int(opts.max_polls):
                break
            if opts.stop_file and storage.exists(opts.stop_file, so):
                say(f"[protect] stop file {opts.stop_file} found; stopping")
                break
            time.sleep(float(opts.poll_seconds))
    except KeyboardInterrupt:
        if not watch:
            raise
        say("[protect] interrupted; committed shards stay committed")


def _absorb_rows(run: _Run, rows: Iterator[dict[str, Any]], fingerprint_of: Mapping[str, Any],
                 lease: Lease, say: Progress) -> None:
    """Count each shard's result as it streams back, checking the lease and printing progress."""
    summary, total = run.summary, len(fingerprint_of)
    fingerprints = {ledger.shard_name(url): fp for url, fp in fingerprint_of.items()}
    images_before, t_pipe = summary["images"], time.perf_counter()
    line = ProgressLine("[protect] shards", total, say)
    for finished, row in enumerate(rows, 1):
        lease.check()
        name = str(row["shard"])
        if not run.absorb(row, fingerprints[name]):
            line.note(f"[protect] SKIPPED bad shard {name}: {row['reason']}")
        rate = (summary["images"] - images_before) / max(time.perf_counter() - t_pipe, 1e-9)
        line.update(finished, f"{summary['images']} images · {rate:.1f} images/s")


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


def actor_pool(actors: int | str, shards: int):
    """The Ray Data pool for ``--actors`` N (fixed) or MIN:MAX (autoscaling), no larger than
    the number of pending ``shards`` (an actor with no shard would only load the state)."""
    import ray.data

    low, high = opts_schema.actor_range(actors, "--actors", SettingsError)
    high = min(high, max(1, shards))
    low = min(low, high)
    if low == high:
        return ray.data.ActorPoolStrategy(size=low)
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def _actor_dataset(pending: list[tuple[str, Any]], method, dst_url: str,
                   opts: ProtectOptions, run_hash: str, say: Progress):
    """The pending shards as a Ray Dataset mapped through a pool of ``ShardProtector`` actors
    (``--staged``: read step -> ``StagedProtector`` pool -> commit step)."""
    import ray.data

    from ue_dist.pipeline import PipelineConfig

    from ue_dist.runtime.ray_env import check_resources

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    ctx.print_on_execution_start = False
    # a shard is idempotent (atomic writes, its ledger record last): redoing it is safe
    ctx.actor_task_retry_on_errors = [storage.StorageTransientError]
    cpus, gpus = float(opts.cpus_per_actor), float(opts.gpus_per_actor)
    if not check_resources({"CPU": cpus, "GPU": gpus},
                           "one protect actor (--cpus-per-actor, --gpus-per-actor)"):
        say(f"[protect] no node offers {cpus:g} CPU / {gpus:g} GPU per actor "
              f"yet; waiting up to {RESOURCE_WAIT_S} s for the cluster to add one")
        ctx.wait_for_min_actors_s = RESOURCE_WAIT_S
    ds = ray.data.from_items([{"src": url, "fingerprint": json.dumps(fp, sort_keys=True)}
                              for url, fp in pending], override_num_blocks=len(pending))
    actor_kwargs = dict(
        batch_size=1, compute=actor_pool(opts.actors, len(pending)),
        num_cpus=cpus, num_gpus=gpus or None,
        fn_constructor_kwargs={"method_name": method.name, "options": opts, "dst_url": dst_url,
                               "run_hash": run_hash, "threads": max(1, int(math.floor(cpus))),
                               "use_gpu": gpus > 0, "task_retries": ACTOR_TASK_RETRIES})
    if not opts.staged:
        return ds.map_batches(ShardProtector, **actor_kwargs)
    # what the CPU steps need: the method's name and eps, the storage options, the run's hash
    # (no state: only the actors load it)
    light = PipelineConfig(method=method, fraction=float(opts.fraction), seed=int(opts.seed),
                           storage_options=opts.storage_options, settings_hash=run_hash)
    # The steps ask for no CPU of their own, at most MAX of each at a time: a pool that takes
    # every CPU would leave them none and the run would wait forever (seen: --actors 2
    # --cpus-per-actor 1 on 2 CPUs). A step is idempotent like the whole shard: a transient
    # storage error reruns it, bounded (Ray 2.60 has no named parameter for these yet; the
    # remote args warn of a future removal).
    most = opts_schema.actor_range(opts.actors, "--actors", SettingsError)[1]
    tasks = {"batch_size": 1, "num_cpus": 0, "concurrency": max(1, min(most, len(pending))),
             "max_retries": ACTOR_TASK_RETRIES,
             "retry_exceptions": [storage.StorageTransientError]}
    ds = ds.map_batches(read_step, fn_kwargs={"config": light}, **tasks)
    ds = ds.map_batches(StagedProtector, **actor_kwargs)
    return ds.map_batches(commit_step, fn_kwargs={"config": light, "dst_url": dst_url}, **tasks)


def _run_pipeline(pending: list[tuple[str, Any]], method, dst_url: str,
                  opts: ProtectOptions, run_hash: str, say: Progress
                  ) -> Iterator[dict[str, Any]]:
    """Protect ``pending`` on the actor pool; yields one result row per shard as it finishes
    (the caller counts them: nothing of the caller's is changed here)."""
    import ray
    import ray.data  # noqa: F401  (before console.hush: it installs console handlers on import)

    from ue_dist.runtime import console
    from ue_dist.runtime.ray_env import ResourceError, ensure_ray, user_error_in

    ensure_ray()
    console.hush()  # ray.data installs console handlers of its own on import
    ds = _actor_dataset(pending, method, dst_url, opts, run_hash, say)
    try:
        yield from ds.iter_rows()
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(f"no node of the cluster started a protect actor with "
                            f"{opts.cpus_per_actor:g} CPU / {opts.gpus_per_actor:g} GPU within "
                            f"{RESOURCE_WAIT_S} s; ask for less or add such nodes") from None
    except Exception as exc:
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise


__all__ = ["protect", "ProtectOptions", "refuse_overlap", "shard_seed", "ShardProtector",
           "StagedProtector", "actor_pool", "commit_step", "read_step", "MODES"]
