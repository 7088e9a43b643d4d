"""The protection pipeline, without Ray: select -> seed -> perturb in batches -> epsilon contract ->
metadata -> write -> ledger record.

Two entry points share every step, so that all paths write the same bytes for the same inputs,
state, settings and seed:

* ``protect_shard(config, SRC_SHARD, DST)``: ONE input shard, read and validated whole (a bad
  sample makes it a bad shard: ``{"ok": False, "reason": ...}``), the seeded ``fraction`` of its
  samples chosen per key, torch seeded from (seed, shard name), the chosen samples perturbed in
  batches under the epsilon contract, written atomically under the input's file name in DST,
  then its ledger record (the commit marker). It is three stages in series, ``read_stage`` ->
  ``perturb_stage`` -> ``commit_stage``: the Ray Data actors of ``runtime/protect.py`` call
  ``protect_shard`` once per shard, or with ``--staged`` run the stages as separate steps.
* ``protect_set(config, data, delta, DST)`` and ``finish_set``: a WHOLE set whose perturbation
  is computed elsewhere (the joint Bayes worker group, the sweep's cached protection): the same
  selection, contract and metadata, then the set is written as shards.

``PipelineConfig`` is the per-run configuration (method, state, fraction, seed, batch size,
device, storage options, settings hash); ``open_config`` builds it in a process or actor, reading
the state once and validating it once. ``open_method`` is where a protect run gets its method:
with the settings the state was fitted with, changed only where a setting is declared
protect-time (``Method.for_state``), so the driver and every actor use the same settings.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ue_dist.core.quantize import apply_perturbation
from ue_dist.data import storage
from ue_dist.data.imageset import ImageSet
from ue_dist.data.shards import Sample, ShardError, read_shard, write_shard
from ue_dist.methods.base import (Method, StateError, get_method, read_state_bytes,
                                  state_from_bytes)
from ue_dist.methods.protect import (native_problem, protect_native, protect_uint8, sample_meta,
                                     selected_for_protection)
from ue_dist.runtime import ledger  # Ray-free: the per-shard commit records


@dataclass(frozen=True)
class PipelineConfig:
    """What every shard (or set) of one run is protected with."""

    method: Method
    state: Mapping[str, Any] | None = None  # the fitted state; None: the method learns nothing
    state_url: str | None = None
    loaded: Any = None  # ``method.load(state, device)``; needed to perturb, not to finish a set
    fraction: float = 1.0
    seed: int = 0
    batch_size: int = 256
    labels: str = "given"  # or "predict": the state's classifier labels every sample
    device: torch.device | str = "cpu"
    storage_options: Mapping[str, Any] | None = None
    settings_hash: str | None = None  # written into every ledger record


# the state: read once, validated once ---------------------------------------------------------
def no_state(method: Method) -> dict[str, Any]:
    """What ``load`` gets for a method whose fit learns nothing: its name and settings."""
    return {"method": method.name, "version": 1, "settings": dict(method.settings)}


def read_state(method: Method, state_url: str | None,
               storage_options: Mapping[str, Any] | None = None, *, loadable: bool = False
               ) -> tuple[dict[str, Any] | None, str | None]:
    """``(state, sha256 of its file)``, the file read once and the state validated once (by
    ``check_state``, which remembers the state object). ``loadable``: also materialise it once on
    the CPU (the driver does, before any worker starts). No URL: ``(None, None)``, refused for a
    method that needs a fit."""
    if not state_url:
        if method.needs_fit:
            raise StateError(f"method {method.name!r} needs a fitted state (--state URL); "
                             f"fit one with `ue-dist fit --method {method.name}`")
        return None, None
    raw = read_state_bytes(state_url, storage_options)
    state = state_from_bytes(raw, state_url)
    _check_read(method, state, state_url, loadable)
    return state, hashlib.sha256(raw).hexdigest()


def _check_read(method: Method, state: Mapping[str, Any], state_url: str, loadable: bool) -> None:
    method.check_state(state, None, source=state_url)
    if loadable:
        method.check_loadable(state, source=state_url)


def open_method(method_name: str, state_url: str | None, *, preset: str | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = (),
                storage_options: Mapping[str, Any] | None = None, loadable: bool = False
                ) -> tuple[Method, dict[str, Any] | None, str | None]:
    """``(method, state, sha256 of the state file)`` for protecting with the state at
    ``state_url``: the method takes the settings the state was fitted with, ``overrides`` and
    ``preset`` change only its protect-time settings and must agree with the fitted ones
    (``Method.for_state``). Without a state (a method that learns nothing) the settings are
    ``preset`` (default paper) plus ``overrides``; a method that needs a fit is refused."""
    cls = get_method(method_name)
    if not state_url:
        method = cls(cls.resolve(preset or "paper", overrides))  # bad settings are named first
        return (method, *read_state(method, None, storage_options))
    raw = read_state_bytes(state_url, storage_options)
    state = state_from_bytes(raw, state_url)
    method = cls.for_state(state, overrides, preset, source=state_url)
    _check_read(method, state, state_url, loadable)
    return method, state, hashlib.sha256(raw).hexdigest()


def open_config(method: Method, state_url: str | None, *, device: torch.device | str = "cpu",
                **options: Any) -> PipelineConfig:
    """The configuration of one process or actor: the state read and validated once, loaded
    once on ``device``. ``options``: the other ``PipelineConfig`` fields."""
    state, _ = read_state(method, state_url, options.get("storage_options"))
    loaded = method.load(state if state is not None else no_state(method), device)
    return PipelineConfig(method=method, state=state, state_url=state_url, loaded=loaded,
                          device=device, **options)


def open_protect_config(method_name: str, state_url: str | None, *, preset: str | None = None,
                        overrides: Sequence[str] | Mapping[str, Any] = (),
                        device: torch.device | str = "cpu", **options: Any) -> PipelineConfig:
    """``open_config`` for a protect run: the method from ``open_method`` (the state's
    settings), the state read once, loaded once on ``device``."""
    method, state, _ = open_method(method_name, state_url, preset=preset, overrides=overrides,
                                   storage_options=options.get("storage_options"))
    loaded = method.load(state if state is not None else no_state(method), device)
    return PipelineConfig(method=method, state=state, state_url=state_url, loaded=loaded,
                          device=device, **options)


# the steps ------------------------------------------------------------------------------------
def shard_seed(seed: int, name: str) -> int:
    """The torch seed of one shard: a hash of the run seed and the shard's file name."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random: any randomness in ``perturb`` (random starts, EOT draws)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def perturb_selected(config: PipelineConfig, images: torch.Tensor, labels: torch.Tensor,
                     mask: np.ndarray, seed: int | None = None) -> torch.Tensor:
    """uint8 ``images`` with the ``mask``ed ones perturbed in batches under the epsilon contract;
    ``seed``: seed every generator first (None: the caller's random state)."""
    out = images.clone()
    if mask.any():
        if seed is not None:
            seed_everything(seed)
        idx = torch.from_numpy(np.flatnonzero(mask))
        out[idx] = protect_uint8(config.method, config.loaded, images[idx], labels[idx],
                                 config.device, int(config.batch_size))
    return out


def output_meta(meta: Mapping[str, Any] | None, protected: bool, method: str | None,
                eps: float | None, source: str | None, **extra: Any) -> dict[str, Any]:
    """A sample's input metadata with the protection's written over it."""
    return {**(meta or {}), **sample_meta(bool(protected), method, eps, source, **extra)}


# one shard ------------------------------------------------------------------------------------
def check_samples(config: PipelineConfig, src: str, samples: list[Sample]) -> None:
    """Every image protectable by the state at its own size (``native_problem``: channels, and
    the fitted size for an L2/L0 method), every label within the state's classes: else a bad
    shard."""
    state = config.state
    if state is not None:
        for s in samples:
            h, w, c = s.image.shape
            problem = native_problem(config.method, state, (c, h, w))
            if problem:
                raise ShardError(f"shard {src}, sample {s.key!r}: {problem}")
    if state is not None and ("labeller" in state or config.labels == "predict"):
        return  # pseudo-labels: every sample is labelled by the state, .cls or not
    classes = state.get("num_classes") if state is not None else None
    for s in samples:
        if s.label is None:
            if config.method.needs_labels:
                raise ShardError(f"shard {src}, sample {s.key!r}: no label ({s.key}.cls), and "
                                 f"method {config.method.name!r} perturbs each image toward "
                                 "or away from its label")
            continue
        if isinstance(classes, int) and int(s.label) >= classes:
            raise ShardError(f"shard {src}, sample {s.key!r}: label {int(s.label)} is outside "
                             f"the {classes} classes of the state {config.state_url}")


@dataclass
class ProtectedShard:
    """One shard between its perturb and commit stages: the output samples, which of them were
    chosen, and how many of the chosen inputs were already protected (their metadata says so)."""

    samples: list[Sample]
    mask: np.ndarray
    already_protected: int = 0


def read_stage(config: PipelineConfig, src: str) -> list[Sample]:
    """Stage 1 (CPU): read and decode shard ``src`` whole; a bad sample raises ``ShardError``."""
    return read_shard(src, config.storage_options)


def perturb_stage(config: PipelineConfig, src: str, samples: list[Sample]) -> ProtectedShard:
    """Stage 2 (the loaded state): check the samples, choose the seeded ``fraction`` per key,
    perturb the chosen ones; a sample the state cannot protect raises ``ShardError``."""
    check_samples(config, src, samples)
    mask = selected_for_protection([s.key for s in samples], config.fraction, config.seed)
    already = sum(1 for s, p in zip(samples, mask) if p and (s.meta or {}).get("protected"))
    return ProtectedShard(protect_samples(config, src, samples, mask), mask, already)


def commit_stage(config: PipelineConfig, src: str, dst_url: str, shard: ProtectedShard,
                 fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Stage 3 (CPU): PNG-encode and write the shard, then its ledger record; the result row."""
    commit_shard(config, src, dst_url, shard.samples, shard.mask, fingerprint)
    return {"ok": True, "count": len(shard.samples), "protected": int(shard.mask.sum()),
            "already_protected": shard.already_protected}


def bad_shard(exc: ShardError) -> dict[str, Any]:
    """The result row of a bad shard (no record written; a rerun retries it)."""
    return {"ok": False, "reason": str(exc)}


def protect_shard(config: PipelineConfig, src: str, dst_url: str,
                  fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Protect the shard ``src`` into ``dst_url`` under its own name and commit it: the three
    stages in series (``runtime/protect.py --staged`` runs them as separate Ray Data steps).

    Returns ``{"ok": True, "count", "protected", "already_protected"}``, or ``{"ok": False,
    "reason"}`` for a bad shard (no record written; a rerun retries it)."""
    try:
        shard = perturb_stage(config, src, read_stage(config, src))
        return commit_stage(config, src, dst_url, shard, fingerprint)
    except ShardError as exc:
        return bad_shard(exc)


def sample_labels(config: PipelineConfig, samples: list[Sample]) -> torch.Tensor:
    """The label each sample is protected with: its pseudo-label where the state was fitted on
    clusters (``fit --labels cluster``: the state's labeller, whatever the sample's .cls), else
    its own label, -1 for none (only a method that ignores labels gets one: check_samples)."""
    labeller = config.state.get("labeller") if config.state is not None else None
    if labeller is not None:
        from ue_dist.core.pseudolabels import assign
        return assign(labeller, [torch.from_numpy(np.array(s.image)).permute(2, 0, 1)
                                 for s in samples])
    if config.labels == "predict":
        return predicted_labels(config, samples)
    return torch.tensor([-1 if s.label is None else int(s.label) for s in samples],
                        dtype=torch.long)


def predicted_labels(config: PipelineConfig, samples: list[Sample]) -> torch.Tensor:
    """The state's classifier's label for each sample: the image (colour channels) resized to
    the fitted size (antialiased bilinear; the classifier saw that size), in batches."""
    import torch.nn.functional as F

    from ue_dist.core.pseudolabels import as_channels

    channels, height, width = (int(v) for v in config.state["image_shape"])
    out = []
    for start in range(0, len(samples), int(config.batch_size)):
        views = []
        for s in samples[start:start + int(config.batch_size)]:
            x = as_channels(torch.from_numpy(np.array(s.image)).permute(2, 0, 1)[None]
                            .float() / 255, channels)
            if x.shape[2:] != (height, width):
                x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                  align_corners=False).clamp_(0, 1)
            views.append(x)
        out.append(config.method.predict(config.loaded, torch.cat(views)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def protect_samples(config: PipelineConfig, src: str, samples: list[Sample],
                    mask: np.ndarray) -> list[Sample]:
    """The output samples of shard ``src``: the ``mask``ed ones perturbed at their own size
    (``protect_native``: tiles of the fitted size), torch seeded from (seed, shard name), every
    one's metadata saying whether it is protected."""
    labels = sample_labels(config, samples)
    images = [s.image for s in samples]
    chosen = np.flatnonzero(mask)
    if len(chosen):
        seed_everything(shard_seed(config.seed, ledger.shard_name(src)))
        done = protect_native(config.method, config.loaded,
                              [torch.from_numpy(np.require(images[i], requirements="W"))
                               .permute(2, 0, 1) for i in chosen],
                              labels[torch.from_numpy(chosen)], config.state, config.device,
                              int(config.batch_size))
        for i, image in zip(chosen, done):
            images[i] = image.permute(1, 2, 0).contiguous().numpy()
    method = config.method
    return [Sample(key=s.key, image=images[i], label=s.label, extra=dict(s.extra),
                   meta=output_meta(s.meta, mask[i], method.name, method.eps, src))
            for i, s in enumerate(samples)]


def commit_shard(config: PipelineConfig, src: str, dst_url: str, samples: list[Sample],
                 mask: np.ndarray, fingerprint: Mapping[str, Any] | None = None) -> str:
    """Write the output shard atomically under its input's name, then its ledger record (the
    commit marker, written last); returns the output URL."""
    name = ledger.shard_name(src)
    dst_shard = storage.join(dst_url, name)
    info = write_shard(dst_shard, samples, config.storage_options)
    method = config.method
    ledger.write_record(dst_url, {
        "shard": name, "source": src, "output": dst_shard, "count": int(info["count"]),
        "sha256": info["sha256"], "bytes": int(info["bytes"]), "method": method.name,
        "eps": method.eps, "settings_hash": config.settings_hash,
        "protected": int(mask.sum()), "source_fingerprint": dict(fingerprint or {}),
        "samples": [{"key": s.key, "protected": bool(p)} for s, p in zip(samples, mask)],
    }, config.storage_options)
    return dst_shard


# a whole set ----------------------------------------------------------------------------------
def finish_set(data: ImageSet, protected: torch.Tensor, mask: np.ndarray, method: str | None,
               eps: float | None, sources: Sequence[str | None] | None = None,
               **extra: Any) -> ImageSet:
    """``data`` with the ``mask``ed samples swapped for their ``protected`` uint8 images (one per
    sample, contract applied) and every sample's metadata saying whether it is protected, by
    ``method`` at ``eps``. ``sources``: each sample's source shard (default: none)."""
    mask = np.asarray(mask, dtype=bool)
    images = data.images.clone()
    idx = torch.from_numpy(np.flatnonzero(mask))
    images[idx] = protected[idx]
    sources = sources if sources is not None else [None] * len(data)
    meta = [output_meta(data.meta[i], mask[i], method, eps, sources[i], **extra)
            for i in range(len(data))]
    return ImageSet(images, data.labels, list(data.keys), meta, data.num_classes)


def protect_set(config: PipelineConfig, data: ImageSet, delta: torch.Tensor, dst_url: str, *,
                mask: np.ndarray | None = None, shard_size: int = 1000,
                **extra: Any) -> tuple[ImageSet, list[str]]:
    """Apply the epsilon contract to ``delta`` (float, one per sample), keep it on the selected
    samples (``mask``, default: the run's seeded fraction), write the set as shards of
    ``shard_size`` under ``dst_url``; returns the protected set and the shard URLs. Each sample
    keeps its ``source_shard``; ``extra`` goes into every sample's metadata."""
    from ue_dist.data.dataset import write_imageset

    if mask is None:
        mask = selected_for_protection(data.keys, config.fraction, config.seed)
    method = config.method
    protected = torch.from_numpy(apply_perturbation(data.images, delta, **method.bound()))
    sources = [(m or {}).get("source_shard") for m in data.meta]
    out = finish_set(data, protected, mask, method.name, method.eps, sources, **extra)
    shards = write_imageset(dst_url, out, shard_size=shard_size,
                            storage_options=config.storage_options)
    return out, shards


__all__ = ["PipelineConfig", "ProtectedShard", "bad_shard", "check_samples", "commit_shard",
           "commit_stage", "finish_set", "no_state", "open_config", "open_method",
           "open_protect_config", "output_meta", "perturb_selected", "perturb_stage",
           "protect_samples", "protect_set", "protect_shard", "read_stage", "read_state",
           "seed_everything", "shard_seed"]
