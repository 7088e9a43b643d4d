"""Victim sweeps and protection searches on Ray Tune.

``run_sweep(spec, storage_path)`` runs one of two experiments, both stored under
``storage_path/NAME`` (Tune's experiment folder, plus ``_cache/``, ``results/`` and ``report/``):

* grid (default): method x protected fraction x architecture x adversarial radius x defence x
  seed x training subset (``all`` = the mixed set, ``clean`` = its unprotected part alone).
  Before any trial starts, every (method, seed) is fitted once and the whole training set
  protected once, both cached in ``_cache/`` (a rerun or a restored sweep reuses them); a trial
  then picks its ``fraction`` of samples with ``selected_for_protection(keys, fraction, seed)``,
  swaps in their protected images, selects its subset and trains one victim.
* search (``search:`` in the spec): random search (``BasicVariantGenerator``) over a method's own
  settings at fixed eps, ``num_samples`` trials, each fitting, protecting and training a victim;
  ``mode=min`` on the victim's accuracy -- the strongest protection. The objective never sees
  the test set: a seeded, per-class ``validation_fraction`` of the training set is held out
  (``validation_split``), trials fit, protect and train on the rest and are scored on the
  held-out clean images (``val_acc``); then the winner alone is fitted on the whole training
  set and its victim tested on the test set (``best.test_acc``; cached beside ``results/``).

Every trial is a Tune function trainable with its own resources (``tune.with_resources``,
fractional CPUs allowed), FIFO scheduling (no early stopping), reporting test accuracy after
every epoch together with a checkpoint of the victim (``runtime/tune_context``), and writing its
full result to ``results/KEY.json``. A trial that fails (a killed worker, a lost node) is
restarted up to ``max_failures`` times and resumes at the epoch after its last checkpoint. A
GPU asked for (``resources_per_trial.gpu``) where no node or torch has one is an error, never a
silent CPU run. An interrupted sweep started
again with the same storage and name resumes (``Tuner.can_restore`` / ``Tuner.restore``):
finished trials are kept, unfinished and errored ones run again.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import re
import sys
import threading
import time
from typing import Any, Callable, Mapping

import torch

from ue_dist import options as opts
from ue_dist.core.config import SettingsError, parse_radius
from ue_dist.core.context import LocalContext
from ue_dist.core.progress import ProgressLine
from ue_dist.core.defenses import parse_defense
from ue_dist.core.models import check_arch
from ue_dist.core.victim import (check_compatible, resolve_victim_settings,
                                 select_subset, train_victim)
from ue_dist.data import storage
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import get_method, method_names, save_state

DATA_KEYS = tuple(o.name for o in opts.DATA)
SPACE_KINDS = ("uniform", "loguniform", "randint", "choice")
_GRID = ("fractions", "subsets", "archs", "adv_eps", "defenses", "seeds")
_SWEEP_KEY_OF = {"arch": "archs", "adv_eps": "adv_eps", "defense": "defenses", "seed": "seeds"}


class SweepError(SettingsError):
    """A sweep spec that cannot be run; the message names the key and the valid choices."""


# spec: its keys, defaults and help are declared in ue_dist/options.py (SWEEP_SPEC) ------------
def _check_method(name: Any, where: str) -> str:
    if name not in method_names():
        raise SweepError(f"unknown method {name!r} in {where}; valid: {', '.join(method_names())}")
    return str(name)


def _data(data: Mapping[str, Any]) -> dict[str, Any]:
    data = opts.check_section(data, opts.DATA, "sweep spec data", SweepError)
    for k in DATA_KEYS:
        if not data.get(k):
            raise SweepError(f"sweep spec data needs {k}: URL")
    return data


def _methods(spec: Mapping[str, Any]) -> list[str]:
    search = spec["search"]
    methods = list(spec["methods"] or ())
    if not methods and search and "method" in search:
        methods = [search["method"]]
    if not methods and not search:
        raise SweepError(f"sweep spec needs methods: [...]; valid: {', '.join(method_names())}")
    return [_check_method(m, "sweep spec methods") for m in methods]


def _method_overrides(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    overrides = spec["method_overrides"] or {}
    for m, over in overrides.items():
        if m not in method_names():
            raise SweepError(f"method_overrides names unknown method {m!r}; valid: "
                             f"{', '.join(method_names())}")
        if not isinstance(over or {}, Mapping):
            raise SweepError(f"method_overrides.{m} must be a mapping of settings")
        get_method(m).resolve(spec["method_preset"], dict(over or {}))  # bad keys fail here
    return {m: dict(v or {}) for m, v in overrides.items()}


def _fraction(f: Any) -> float:
    try:
        f = float(f)
    except (TypeError, ValueError):
        raise SweepError(f"fractions: {f!r} is not a number") from None
    if not 0.0 <= f <= 1.0:
        raise SweepError(f"fractions must lie in [0, 1], got {f}")
    return f


def _subset(s: Any) -> str:
    valid = opts.option(opts.SWEEP_SPEC, "subsets").valid_choices()
    if str(s) not in valid:
        raise SweepError(f"unknown subset {s!r} in sweep spec; valid: {', '.join(valid)}")
    return str(s)


def _arch(a: Any) -> str:
    check_arch(str(a))
    return str(a)


def _seed(s: Any) -> int:
    if not isinstance(s, int) or isinstance(s, bool):
        raise SweepError(f"seeds must be integers, got {s!r}")
    return s


_CHECK_ITEM: dict[str, Callable[[Any], Any]] = {
    "fractions": _fraction, "subsets": _subset, "archs": _arch, "seeds": _seed,
    "adv_eps": lambda e: parse_radius(e, "adv_eps"), "defenses": lambda d: parse_defense(d).spec}


def _grid(spec: Mapping[str, Any], key: str) -> list:
    """One axis of the grid: a list (one value counts as a list of one), each value checked."""
    values = spec[key] if spec[key] is not None else list(_DEFAULTS[key])
    if not values:
        raise SweepError(f"sweep spec: {key} must not be empty")
    return [_CHECK_ITEM[key](v) for v in values]


def _victim_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    over = spec["victim_overrides"] or {}
    for k in _SWEEP_KEY_OF:
        if k in over:
            raise SweepError(f"victim_overrides may not set {k!r}; use the sweep key "
                             f"{_SWEEP_KEY_OF[k]!r}")
    return resolve_victim_settings(spec["victim_preset"], over)


def _resources(value: Any) -> dict[str, float]:
    res = opts.check_section(value or {"cpu": 1}, opts.TRIAL_RESOURCES, "resources_per_trial",
                             SweepError)
    if res["cpu"] <= 0 and res["gpu"] <= 0:
        raise SweepError("resources_per_trial needs cpu > 0 or gpu > 0")
    return res


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value; return the normalised spec (lists, parsed radii)."""
    spec = opts.check_section(spec, opts.SWEEP_SPEC, "sweep spec", SweepError, nested=False)
    out: dict[str, Any] = {"name": str(spec["name"] or "sweep"), "data": _data(spec["data"])}
    if "/" in out["name"] or out["name"].startswith("."):
        raise SweepError(f"sweep name {out['name']!r} must be a plain folder name")
    out["storage_options"] = spec["storage_options"] or {}
    out["method_preset"] = spec["method_preset"]
    out["victim_preset"] = spec["victim_preset"]
    out["methods"] = _methods(spec)
    out["method_overrides"] = _method_overrides(spec)
    for key in _GRID:
        out[key] = _grid(spec, key)
    out["victim_settings"] = _victim_settings(spec)
    out["defence_grid"] = spec["defence_grid"]
    out["train_subset"] = spec["train_subset"]
    out["train_subset_seed"] = int(spec["train_subset_seed"])
    owners = [d for d in out["defenses"] if parse_defense(d).kind == "loss"]
    if owners and any(e > 0 for e in out["adv_eps"]) and out["defence_grid"] == "cross":  # each trial would refuse it: say so now
        raise SweepError(f"sweep spec: defenses {owners} own the training loss and cannot be "
                         "combined with adversarial training (adv_eps > 0); sweep them with "
                         "adv_eps [0] in a separate sweep")
    out["resources"] = _resources(spec["resources_per_trial"])
    out["max_concurrent_trials"] = spec["max_concurrent_trials"]
    out["max_failures"] = spec["max_failures"]
    out["search"] = _validate_search(spec["search"], out) if spec["search"] is not None else None
    return out


def _space_domain(key: str, dom: Any) -> tuple[str, list]:
    """One setting's search domain: ``[choices...]`` or ``{uniform|loguniform|randint|choice: ...}``."""
    where = f"search.space.{key}"
    if isinstance(dom, (list, tuple)):
        kind, args = "choice", list(dom)
    else:
        opts.refuse_unknown(dom, SPACE_KINDS, where, SweepError)
        if len(dom) != 1:
            raise SweepError(f"{where}: give exactly one of {', '.join(SPACE_KINDS)}")
        kind, args = next(iter(dom.items()))
        args = list(args)
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2:
            raise SweepError(f"{where}: {kind} needs [low, high]")
        args = [parse_radius(a, where) for a in args]
        if kind == "randint":
            args = [int(a) for a in args]
        if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            raise SweepError(f"{where}: need 0 <= low < high (low > 0 for loguniform)")
    elif not args:
        raise SweepError(f"{where}: choice needs at least one value")
    return kind, args


def _validate_search(search: Any, out: dict[str, Any]) -> dict[str, Any]:
    search = opts.check_section(search, opts.SEARCH, "search", SweepError)
    method = search["method"]
    if method not in method_names():
        raise SweepError(f"search.method {method!r} unknown; valid: {', '.join(method_names())}")
    defaults = get_method(method).resolve(out["method_preset"], out["method_overrides"].get(method, {}))
    space = search["space"]
    if not space:
        raise SweepError("search.space must map method settings to {uniform|loguniform|randint|"
                         "choice: ...} or a list of choices")
    for key in space:
        if key not in defaults:
            raise SweepError(f"search.space: unknown setting {key!r} of method {method!r}; "
                             f"valid: {', '.join(sorted(defaults))}")
    if search["fraction"] == 0:
        raise SweepError("search.fraction must lie in (0, 1], got 0.0")
    if not 0 < search["validation_fraction"] < 1:
        raise SweepError("search.validation_fraction must lie in (0, 1) (the search is scored "
                         f"on it, never on the test set), got {search['validation_fraction']}")
    return {"method": method, "space": {k: _space_domain(k, d) for k, d in space.items()},
            "num_samples": search["num_samples"], "fraction": search["fraction"],
            "seed": search["seed"], "validation_fraction": search["validation_fraction"]}


def load_spec(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a sweep spec (YAML or JSON; a path or any fsspec URL); ``validate_spec`` checks it."""
    return opts.read_spec(path, "sweep spec", opts.SWEEP_SPEC, SweepError, storage_options)


_DEFAULTS = {o.name: o.default for o in opts.SWEEP_SPEC}


# caching fitted states and protected images ------------------------------------------------------
def _digest(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def method_settings(spec: Mapping[str, Any], method: str, seed: int,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    over = dict(spec["method_overrides"].get(method, {}))
    over.update(extra or {})
    settings = get_method(method).resolve(spec["method_preset"], over)
    key = get_method(method).seed_key()
    if key is not None and key not in over:
        settings[key] = int(seed)  # each sweep seed gets its own fit
    return settings


def fit_and_protect(method: str, settings: Mapping[str, Any], train: ImageSet,
                    device: str | torch.device = "cpu",
                    joint: tuple[float, int] | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """Fit ``method`` on ``train`` and protect every training image (uint8, same order).

    One method instance fits and protects, so the noise is computed with exactly the settings
    written into the state (what ``ue-dist protect`` takes from a state, ``Method.for_state``).
    ``joint=(fraction, seed)`` (bayes, ``bayes_mode: joint``): the whole set ascends together
    with the samples that ``(fraction, seed)`` leaves clean fixed in the objective, as
    ``protect --joint`` does; only the selected samples come back changed."""
    import numpy as np

    from ue_dist.core.quantize import apply_perturbation
    from ue_dist.methods.protect import selected_for_protection
    from ue_dist.pipeline import PipelineConfig, perturb_selected

    m = get_method(method)(dict(settings))
    key = get_method(method).seed_key()
    seed = int(settings[key]) if key is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = m.fit(train, LocalContext(device=device, seed=seed, log=lambda msg: None))
    loaded = m.load(state, device)
    if joint is not None:
        chosen = selected_for_protection(train.keys, float(joint[0]), int(joint[1]))
        delta, _ = m.perturb_jointly(loaded, train.float_images().to(device), train.labels,
                                     fixed=torch.from_numpy(~chosen).to(device))
        return state, torch.from_numpy(apply_perturbation(train.images, delta.cpu(), **m.bound()))
    config = PipelineConfig(method=m, state=state, loaded=loaded, device=device)
    every = np.ones(len(train), dtype=bool)  # a trial picks its fraction later (``mix``)
    return state, perturb_selected(config, train.images, train.labels, every)


def _cache_urls(root: str, method: str, digest: str) -> tuple[str, str]:
    base = storage.join(root, "_cache", f"{method}-{digest}")
    return base + ".state.pt", base + ".protected.pt"


def _save_tensor(url: str, tensor: torch.Tensor, storage_options) -> None:
    buf = io.BytesIO()
    torch.save({"images": tensor}, buf)
    storage.write_bytes(url, buf.getvalue(), storage_options)


def _load_tensor(url: str, storage_options) -> torch.Tensor:
    return torch.load(io.BytesIO(storage.read_bytes(url, storage_options)), weights_only=True)["images"]


def prepare(method: str, settings: Mapping[str, Any], train: ImageSet, root: str,
            storage_options=None, device: str = "cpu",
            joint: tuple[float, int] | None = None) -> tuple[str, str]:
    """Fit + protect once, cached by (method, settings[, joint fraction and seed]); returns the
    two cache URLs."""
    digest = _digest([method, dict(settings), train.image_shape, len(train), train.keys[:3]]
                     + ([{"joint": list(joint)}] if joint is not None else []))
    state_url, images_url = _cache_urls(root, method, digest)
    if storage.exists(state_url, storage_options) and storage.exists(images_url, storage_options):
        return state_url, images_url
    state, protected = fit_and_protect(method, settings, train, device, joint=joint)
    _save_tensor(images_url, protected, storage_options)
    save_state(state, state_url, storage_options)  # written last: its presence marks the pair done
    return state_url, images_url


def cache_fraction(spec: Mapping[str, Any], method: str, fraction: float) -> float | None:
    """The fraction a cached protection is specific to: None (every fraction shares one)
    unless bayes is protected jointly (the fixed part enters the objective)."""
    joint = method == "bayes" and spec.get("bayes_mode", "streaming") == "joint"
    return float(fraction) if joint else None


def cache_key(spec: Mapping[str, Any], method: str, seed: int, fraction: float | None) -> str:
    """The sweep's cache entry of (method, seed[, joint fraction])."""
    joint = cache_fraction(spec, method, fraction) if fraction is not None else None
    return f"{method}:{seed}" + (f":joint{joint:g}" if joint is not None else "")


def mix(train: ImageSet, protected: torch.Tensor, fraction: float, seed: int,
        method: str | None, eps: float | None) -> ImageSet:
    """``train`` with the seeded ``fraction`` of samples swapped for their protected images."""
    from ue_dist.methods.protect import selected_for_protection
    from ue_dist.pipeline import finish_set

    return finish_set(train, protected, selected_for_protection(train.keys, fraction, seed),
                      method, eps)


# the trial -------------------------------------------------------------------------------------
def validation_split(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(rest, held_out)``: a seeded ``fraction`` of each class held out (at least one image of
    a class with two or more), both in the training set's order."""
    gen = torch.Generator().manual_seed(int(seed))
    held: list[int] = []
    for c in torch.unique(train.labels).tolist():
        idx = torch.nonzero(train.labels == c).flatten()
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held += idx[torch.randperm(len(idx), generator=gen)[:k]].tolist()
    held_set = set(held)
    rest = [i for i in range(len(train)) if i not in held_set]
    return train.subset(rest), train.subset(sorted(held))


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config with a matrix grid's pairs unpacked: ``victim_defence`` as ``adv_eps``,
    ``defense``; ``method_fraction`` as ``method``, ``fraction``."""
    out = dict(config)
    if "victim_defence" in out:
        out["adv_eps"], out["defense"] = out.pop("victim_defence")
    if "method_fraction" in out:
        out["method"], out["fraction"] = out.pop("method_fraction")
    return out


def trial_key(config: Mapping[str, Any]) -> str:
    config = flat_config(config)
    if config.get("mode") == "search":
        return "search-" + _digest(sorted(config.items()))
    eps = config["adv_eps"]
    # a defence's parameters may hold a path (avatar:model=/x/p.pt): the key is one file name
    defence = _UNSAFE_IN_KEY.sub("_", config["defense"].replace(":", "_").replace("=", ""))
    return (f"{config['method']}-f{config['fraction']:g}-{config['subset']}-{config['arch']}-"
            f"at{eps * 255:.3g}-{defence}-s{config['seed']}")


_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._,+-]")


def _result_url(root: str, key: str) -> str:
    return storage.join(root, "results", key + ".json")


def trial_inputs(config: Mapping[str, Any], train: ImageSet, job: Mapping[str, Any],
                 device: str = "cpu") -> tuple[dict[str, Any], ImageSet, dict[str, Any]]:
    """``(row, data, victim)`` of one trial: its result row so far, the training set it trains
    on (its fraction protected, its subset) and its victim settings."""
    so = job["storage_options"]
    config = flat_config(config)
    search = job.get("search")
    method = search["method"] if search else config["method"]
    fraction = search["fraction"] if search else float(config["fraction"])
    seed = int(config["seed"])
    subset = config.get("subset", "all")
    row: dict[str, Any] = {"key": trial_key(config), "method": method, "fraction": fraction,
                           "subset": subset, "arch": config["arch"],
                           "adv_eps": float(config["adv_eps"]), "defense": config["defense"],
                           "seed": seed}
    if search:
        params = {k: config[k] for k in search["space"]}
        row["params"] = json.dumps(params, sort_keys=True)
        settings = method_settings(job["spec"], method, seed, params)
        _, protected = fit_and_protect(method, settings, train, device)
    elif fraction > 0:
        cached = job["cache"][cache_key(job["spec"], method, seed, fraction)]
        protected, settings = _load_tensor(cached["images"], so), cached["settings"]
    else:
        protected, settings = train.images, {"eps": None}
    data = select_subset(mix(train, protected, fraction, seed, method, settings.get("eps")), subset)
    row["protected"] = int(sum(bool(m.get("protected")) for m in data.meta))
    row["train_size"] = len(data)
    victim = dict(job["victim_settings"], arch=config["arch"], adv_eps=float(config["adv_eps"]),
                  defense=config["defense"], seed=seed)
    row["epochs"] = int(victim["epochs"])
    return row, data, victim


def _trial(config: dict[str, Any], *, train: ImageSet, test: ImageSet, job: dict[str, Any]) -> None:
    from ray import tune

    from ue_dist.runtime.ray_env import gpu_device
    from ue_dist.runtime.tune_context import TuneTrialContext

    torch.set_num_threads(max(1, int(job["resources"]["cpu"])))
    so = job["storage_options"]
    key = trial_key(config)
    out_url = _result_url(job["root"], key)
    if storage.exists(out_url, so):  # finished before an interruption: report, do not retrain
        done = json.loads(storage.read_bytes(out_url, so))
        tune.report({"test_acc": done[_metric(job)], "epoch": done.get("epochs", 0),
                     "cached": True})
        return
    if job["before_trial"] is not None:
        job["before_trial"](key)
    started = time.time()
    device = gpu_device(job["resources"]["gpu"], "resources_per_trial.gpu")
    row, data, victim = trial_inputs(config, train, job, device)
    if len(data) == 0:  # e.g. the clean part of a fully protected set: nothing to train on
        row.update(test_acc=math.nan, best_acc=math.nan, robust_acc=None, per_epoch=[],
                   seconds=0.0, skipped=True)
    else:
        hook = job.get("after_epoch")
        # each epoch: one tune.report carrying the victim's checkpoint; a restarted trial
        # (FailureConfig) resumes from the last one at the next epoch
        ctx = TuneTrialContext(device, int(config["seed"]),
                               after_report=(lambda record: hook(key, record)) if hook else None)
        result = train_victim(data, test, victim, ctx)
        # the final epoch's accuracy is the protection's figure; the best epoch is what a victim
        # with a clean validation set could stop at (the papers report one or the other)
        best = max((e["test_acc"] for e in result["per_epoch"]), default=result["test_acc"])
        if job.get("search"):  # ``test`` is the held-out part of the training set here
            row.update(val_acc=result["test_acc"], best_val_acc=best)
        else:
            row.update(test_acc=result["test_acc"], best_acc=best)
        row.update(robust_acc=result["robust_acc"], robust_eps=result["robust_eps"],
                   per_epoch=result["per_epoch"], images_per_s=result["images_per_s"])
    row["seconds"] = time.time() - started
    row["finished_at"] = time.time()
    storage.write_bytes(out_url, json.dumps(row, default=str).encode(), so)
    tune.report({"test_acc": row[_metric(job)], "done": True, "epoch": row["epochs"]})


def _metric(job: Mapping[str, Any]) -> str:
    """The row's name for the victim's accuracy on its evaluation set. Tune's metric is always
    ``test_acc`` (the victim's per-epoch reports name it so): in a search the victim's
    evaluation set is the held-out validation split, and the row calls it ``val_acc``."""
    return "val_acc" if job.get("search") else "test_acc"


def _winner(params: dict[str, Any], *, train: ImageSet, test: ImageSet,
            job: dict[str, Any]) -> dict[str, Any]:
    """The search's winner, fitted on the whole training set, its victim on the test set: the
    inputs of a search trial (``trial_inputs``) with the winner's settings and all the data."""
    from ue_dist.runtime.ray_env import gpu_device

    torch.set_num_threads(max(1, int(job["resources"]["cpu"])))
    spec = job["spec"]
    config = {**params, "mode": "search", "arch": spec["archs"][0],
              "adv_eps": float(spec["adv_eps"][0]), "defense": spec["defenses"][0],
              "seed": int(spec["seeds"][0])}
    device = gpu_device(job["resources"]["gpu"], "resources_per_trial.gpu")
    row, data, victim = trial_inputs(config, train, job, device)
    result = train_victim(data, test, victim, LocalContext(device=device, seed=config["seed"],
                                                           log=lambda m: None))
    return {"params": params, "test_acc": result["test_acc"],
            "best_acc": max(e["test_acc"] for e in result["per_epoch"]),
            "train_size": row["train_size"], "arch": config["arch"], "seed": config["seed"]}


# the sweep -------------------------------------------------------------------------------------
def defence_settings(spec: Mapping[str, Any]) -> list[tuple[float, str]]:
    """The (adversarial radius, defence) pairs the victims train under: the product for
    ``defence_grid: cross``; for ``matrix`` each defence under standard training, then each
    radius > 0 with no other defence (adversarial training as one more column)."""
    if spec.get("defence_grid", "cross") == "cross":
        return [(e, d) for e in spec["adv_eps"] for d in spec["defenses"]]
    return ([(0.0, d) for d in spec["defenses"]]
            + [(e, "none") for e in spec["adv_eps"] if e > 0])


def method_fractions(spec: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The (method, protected fraction) rows: every pair, except that a matrix trains its clean
    row (fraction 0: the same data whatever the method) once, under the first method's name."""
    pairs = [(m, f) for f in spec["fractions"] for m in spec["methods"]]
    if spec.get("defence_grid", "cross") == "matrix":
        pairs = [(m, f) for m, f in pairs if f > 0 or m == spec["methods"][0]]
    return pairs


def _param_space(spec: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"arch": tune.grid_search(spec["archs"]),
                             "seed": tune.grid_search(spec["seeds"])}
    if spec.get("defence_grid", "cross") == "cross":  # the keys of the sweeps made before matrix
        space.update(adv_eps=tune.grid_search(spec["adv_eps"]),
                     defense=tune.grid_search(spec["defenses"]))
    else:
        space["victim_defence"] = tune.grid_search([list(p) for p in defence_settings(spec)])
    search = spec["search"]
    if search is None and spec.get("defence_grid", "cross") == "matrix":
        space.update(method_fraction=tune.grid_search([list(p) for p in method_fractions(spec)]),
                     subset=tune.grid_search(spec["subsets"]))
        return space
    if search is None:
        space.update(method=tune.grid_search(spec["methods"]),
                     fraction=tune.grid_search(spec["fractions"]),
                     subset=tune.grid_search(spec["subsets"]))
        return space
    space["mode"] = "search"
    for key, (kind, args) in search["space"].items():
        space[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                      "randint": tune.randint}[kind](*args) if kind != "choice" else tune.choice(args)
    return space


def _examples(train: ImageSet, cache: Mapping[str, Any], so, n: int = 6) -> dict[str, Any]:
    out = {}
    for key, entry in cache.items():
        method, seed = key.split(":")
        if method in out:
            continue
        protected = _load_tensor(entry["images"], so)
        idx = _spread(train, n)
        out[method] = {"clean": train.images[idx].numpy(), "protected": protected[idx].numpy(),
                       "eps": entry["settings"].get("eps")}
    return out


def _spread(train: ImageSet, n: int) -> list[int]:
    """One sample per class first (so a grid shows different classes), then the rest in order."""
    seen, idx = set(), []
    for i, y in enumerate(train.labels.tolist()):
        if y not in seen:
            seen.add(y)
            idx.append(i)
        if len(idx) == n:
            break
    return idx


def _error_line(result) -> str:
    """``KEY: last line of the error`` (Ray's first line only names the actor)."""
    lines = [ln for ln in str(result.error).strip().splitlines() if ln.strip()]
    key = trial_key(result.config) if result.config else "?"
    return f"{key}: {(lines[-1] if lines else type(result.error).__name__)[:300]}"


_SPEC_IDENTITY = ("data", "methods", "method_preset", "method_overrides", "fractions", "subsets",
                  "archs", "adv_eps", "defenses", "seeds", "victim_settings", "search")
#: keys that joined the identity later: part of it only when set, so older sweeps still resume
_SPEC_IDENTITY_IF_SET = {"defence_grid": "cross", "train_subset": None, "train_subset_seed": 0}


#: the grid's axes: a spec whose only change is more values on these extends the sweep
_GRID_AXES = ("methods", "fractions", "subsets", "archs", "adv_eps", "defenses", "seeds")


def _extends(old: Mapping[str, Any], new: Mapping[str, Any], changed: list[str]) -> bool:
    """Whether ``new`` only adds values to ``old``'s grid axes (every old trial is in it)."""
    def values(spec, k):
        return [json.dumps(v, sort_keys=True, default=str) for v in spec.get(k) or ()]
    return all(k in _GRID_AXES and set(values(old, k)) <= set(values(new, k)) for k in changed)


def _check_same_spec(spec: Mapping[str, Any], root: str, so, resumed: bool,
                     write: bool = True) -> bool:
    """A sweep resumes only with the spec it started with (Tune would keep the old grid), or
    with one that adds values to its grid axes (more seeds, methods, defences...): returns True
    for such an extension, which the caller runs as a new grid whose finished trials are read
    back from their results instead of trained. ``write``: record ``spec`` as the sweep's."""
    url = storage.join(root, "_cache", "spec.json")
    identity = {k: spec[k] for k in _SPEC_IDENTITY}
    if spec.get("bayes_mode", "streaming") != "streaming":  # older sweeps keep their identity
        identity["bayes_mode"] = spec["bayes_mode"]
    identity.update({k: spec[k] for k, unset in _SPEC_IDENTITY_IF_SET.items()
                     if spec.get(k, unset) != unset})
    mine = json.dumps(identity, sort_keys=True, default=str)
    extended = False
    if resumed and storage.exists(url, so):
        before = storage.read_bytes(url, so).decode()
        if before != mine:
            old, new = json.loads(before), json.loads(mine)
            changed = sorted(k for k in new if old.get(k) != new.get(k))
            extended = spec["search"] is None and _extends(old, new, changed)
            if not extended:
                raise SweepError(
                    f"sweep {spec['name']!r} in {root} was started with a different spec "
                    f"(changed: {', '.join(changed)}); use another name or storage path to run "
                    "the new one, or the original spec to resume (adding values to "
                    f"{', '.join(_GRID_AXES)} extends it)")
    if write:
        storage.write_bytes(url, mine.encode(), so)
    return extended


def _new_tuner(spec: Mapping[str, Any], trainable: Any, path: str, fs: Any) -> Any:
    """A fresh Tuner: the grid (FIFO, every point once) or the random search (mode min)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    search = spec["search"]
    tune_config = tune.TuneConfig(
        metric="test_acc" if search else None, mode="min" if search else None,
        scheduler=FIFOScheduler(),
        num_samples=search["num_samples"] if search else 1,
        search_alg=BasicVariantGenerator(random_state=search["seed"]) if search else None,
        max_concurrent_trials=spec["max_concurrent_trials"])
    # a failed trial (a killed worker, a lost node) restarts from its last epoch checkpoint
    run_config = tune.RunConfig(
        name=spec["name"], storage_path=path, storage_filesystem=fs, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    return tune.Tuner(trainable, param_space=_param_space(spec), tune_config=tune_config,
                      run_config=run_config)


def trial_count(spec: Mapping[str, Any]) -> int:
    """How many trials the validated ``spec`` runs (the grid, times the search's samples)."""
    n = len(spec["archs"]) * len(defence_settings(spec)) * len(spec["seeds"])
    if spec["search"] is None:
        return n * len(method_fractions(spec)) * len(spec["subsets"])
    return n * int(spec["search"]["num_samples"])


class _TrialProgress:
    """While Tune runs (``verbose=0``): a progress line as trials finish, counted from the
    result files the trials write (so a resumed sweep counts the ones done before it)."""

    def __init__(self, root: str, so, total: int, say: Callable[[str], None],
                 poll_seconds: float = 5.0) -> None:
        self.url, self.so, self.poll = storage.join(root, "results"), so, poll_seconds
        self.line = ProgressLine("[sweep] trials", total, say)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ue-dist-sweep-progress", daemon=True)

    def count(self) -> int:
        try:
            return sum(1 for name in storage.ls(self.url, self.so) if str(name).endswith(".json"))
        except (FileNotFoundError, storage.StorageError):  # none yet, or a slow listing
            return 0

    def _run(self) -> None:
        self.shown = self.count()
        self.line.start(self.shown)
        while not self.stop.wait(self.poll):
            self._show(self.count())

    def _show(self, done: int) -> None:
        if done != self.shown:
            self.shown = done
            self.line.update(done)

    def __enter__(self) -> "_TrialProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        done = self.count()
        if done == self.line.total:  # the last trial finished between two polls
            self._show(done)


def _summary(spec: Mapping[str, Any], grid: Any, root: str, so, train: ImageSet,
             cache: Mapping[str, Any], resumed: bool) -> dict[str, Any]:
    """The finished trials' rows (from ``results/``), the report files and, for a search, the best."""
    from ue_dist.runtime.report import write_report

    errors = [_error_line(r) for r in grid if r.error is not None]
    rows = []
    for r in grid:
        if r.error is not None or not r.config:
            continue
        url = _result_url(root, trial_key(r.config))
        if storage.exists(url, so):
            rows.append(json.loads(storage.read_bytes(url, so)))
    examples = _examples(train, cache, so) if cache else None
    files = write_report(storage.join(root, "report"), rows, examples, so)
    summary: dict[str, Any] = {"name": spec["name"], "storage": root, "trials": len(grid),
                               "completed": len(rows), "errors": errors, "resumed": resumed,
                               "report": files,
                               "rows": [{k: v for k, v in r.items() if k != "per_epoch"} for r in rows]}
    if spec["search"] is not None and rows:
        best = min((r for r in rows if not math.isnan(r["val_acc"])), key=lambda r: r["val_acc"],
                   default=None)
        summary["best"] = best and {"params": json.loads(best["params"]), "val_acc": best["val_acc"]}
    return summary


def _check_trial_resources(spec: Mapping[str, Any], progress: Callable[[str], None]) -> None:
    """A trial no node can host: an error on a Ray started here (no GPU on this machine, say),
    a note on a cluster (its autoscaler may add such a node; Tune waits)."""
    from ue_dist.runtime.ray_env import check_resources

    res = spec["resources"]
    if not check_resources({"CPU": res["cpu"], "GPU": res["gpu"]},
                           "one sweep trial (resources_per_trial)"):
        progress(f"[ue-dist] sweep {spec['name']}: no node offers {res['cpu']:g} CPU"
                 + (f" and {res['gpu']:g} GPU" if res["gpu"] > 0 else "")
                 + " per trial yet; the trials wait for the cluster to add one")


def _fit_all(spec: Mapping[str, Any], train: ImageSet, root: str, so,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Fit and protect every (method, seed) once, in parallel Ray tasks, before any trial
    starts; ``{"METHOD:SEED": {"state", "images", "settings"}}`` in the spec's order."""
    import ray

    from ue_dist.runtime.ray_env import gpu_device, user_error_in

    res = spec["resources"]

    @ray.remote(num_cpus=res["cpu"], num_gpus=res["gpu"])
    def _prep(method, settings, train_ref, joint):
        torch.set_num_threads(max(1, int(res["cpu"])))
        device = gpu_device(res["gpu"], "resources_per_trial.gpu")
        return prepare(method, settings, train_ref, root, so, device, joint=joint)

    todo = {}
    train_ref = ray.put(train)
    for method in spec["methods"]:
        for seed in spec["seeds"]:
            settings = method_settings(spec, method, seed)
            # streaming: one protection serves every fraction; joint: one per fraction
            for fraction in sorted({cache_fraction(spec, method, f)
                                    for f in spec["fractions"] if f > 0}):
                joint = (fraction, int(seed)) if fraction is not None else None
                todo[cache_key(spec, method, seed, fraction)] = (
                    settings, _prep.remote(method, settings, train_ref, joint))
    progress(f"[ue-dist] sweep {spec['name']}: fitting/protecting {len(todo)} (method, seed) "
             f"pair(s) (cached in {storage.join(root, '_cache')})")
    line = ProgressLine("[sweep] fits", len(todo), progress)
    pending = {ref: (key, settings) for key, (settings, ref) in todo.items()}
    cache: dict[str, Any] = {}
    while pending:  # as each finishes, not in submission order
        [ref], _ = ray.wait(list(pending), num_returns=1)
        key, settings = pending.pop(ref)
        try:
            state_url, images_url = ray.get(ref)
        except Exception as exc:  # e.g. a GPU asked for where torch has none: exit 2, not 1
            user = user_error_in(exc)
            if user is not None:
                raise user from None
            raise
        cache[key] = {"state": state_url, "images": images_url, "settings": settings}
        line.update(len(todo) - len(pending))
    return {key: cache[key] for key in todo}  # the spec's order, whichever finished first


def _test_winner(params: dict[str, Any], train: ImageSet, test: ImageSet, job: dict[str, Any],
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """The winner's test accuracy, computed once (a Ray task with a trial's resources) and
    kept in ``winner-DIGEST.json`` beside ``results/`` for a rerun."""
    import ray

    root, so = job["root"], job["storage_options"]
    url = storage.join(root, f"winner-{_digest(sorted(params.items()))}.json")
    if storage.exists(url, so):
        return json.loads(storage.read_bytes(url, so))
    progress(f"[ue-dist] search: testing the winner {json.dumps(params, sort_keys=True)} "
             "(fitted on the whole training set)")
    res = job["resources"]
    task = ray.remote(num_cpus=res["cpu"], num_gpus=res["gpu"], max_retries=1)(_winner)
    out = ray.get(task.remote(params, train=train, test=test,
                              job={k: v for k, v in job.items()
                                   if k not in ("before_trial", "after_epoch")}))
    storage.write_bytes(url, json.dumps(out, default=str).encode(), so)
    return out


def report_sweep(spec: Mapping[str, Any], storage_path: str | None = None) -> dict[str, Any]:
    """The report of the trials of ``spec`` finished so far, without running any (no Ray): for
    a sweep still running elsewhere or interrupted, whose rerun would train the rest first.
    A search's winner is not tested here."""
    from ue_dist.runtime.ray_env import default_storage
    from ue_dist.runtime.report import write_report

    spec = validate_spec(spec)
    so = spec["storage_options"]
    storage_path = storage_path or default_storage()
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    root = storage.join(storage_path, spec["name"])
    if not storage.exists(storage.join(root, "_cache", "spec.json"), so):
        raise SweepError(f"no sweep {spec['name']!r} under {storage_path!r} (nothing has run "
                         "there yet: `ue-dist sweep SPEC --storage PATH` starts it)")
    _check_same_spec(spec, root, so, resumed=True, write=False)
    try:
        names = sorted(n for n in storage.ls(storage.join(root, "results"), so)
                       if str(n).endswith(".json"))
    except FileNotFoundError:
        names = []
    rows = [json.loads(storage.read_bytes(storage.join(root, "results", posixpath.basename(
        str(n))), so)) for n in names]
    files = write_report(storage.join(root, "report"), rows, None, so)
    return {"name": spec["name"], "storage": root, "trials": trial_count(spec),
            "completed": len(rows), "errors": [], "resumed": False, "report": files,
            "rows": [{k: v for k, v in r.items() if k != "per_epoch"} for r in rows]}


def run_sweep(spec: Mapping[str, Any], storage_path: str | None = None,
              progress: Callable[[str], None] = print,
              before_trial: Callable[[str], None] | None = None,
              after_epoch: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep described by ``spec``; returns the rows and the report files.

    Hooks, run in each trial's process (instrumentation, fault injection; they must be
    picklable): ``before_trial(key)`` before it trains (an exception fails that trial as any
    error would), ``after_epoch(key, record)`` after each victim epoch's report, once its
    checkpoint is saved."""
    from ray import tune

    from ue_dist.data.dataset import load_imageset
    from ue_dist.runtime.ray_env import default_storage, ensure_ray, pyarrow_filesystem

    spec = validate_spec(spec)
    so = spec["storage_options"]
    storage_path = storage_path or default_storage()
    if "://" not in storage_path:  # Tune runs trials in their own working directory
        storage_path = os.path.abspath(storage_path)
    storage.check_writable_root(storage_path, so)
    for k in DATA_KEYS:
        storage.refuse_inside(storage_path, spec["data"][k], what="sweep storage")
    root = storage.join(storage_path, spec["name"])
    train = load_imageset(spec["data"]["train"], so)
    test = load_imageset(spec["data"]["test"], so)
    check_compatible(train, test)
    if spec["train_subset"] and spec["train_subset"] < len(train):
        full = len(train)
        _, train = validation_split(train, spec["train_subset"] / full, spec["train_subset_seed"])
        progress(f"[ue-dist] sweep {spec['name']}: a seeded, class-stratified subset of "
                 f"{len(train)} of the {full} training images (train_subset "
                 f"{spec['train_subset']}, seed {spec['train_subset_seed']})")
    ensure_ray()
    _check_trial_resources(spec, progress)
    fs, path = pyarrow_filesystem(storage_path, so)
    exp_path = storage.join(path, spec["name"]) if fs is not None else os.path.join(path, spec["name"])
    resumed = bool(tune.Tuner.can_restore(exp_path, storage_filesystem=fs))
    extended = _check_same_spec(spec, root, so, resumed)
    cache = _fit_all(spec, train, root, so, progress) if spec["search"] is None else {}
    trial_train, trial_test = train, test
    if spec["search"] is not None:  # the objective is a held-out part of the training set
        trial_train, trial_test = validation_split(train, spec["search"]["validation_fraction"],
                                                   spec["search"]["seed"])
        progress(f"[ue-dist] search {spec['name']}: trials fit and train on {len(trial_train)} "
                 f"training images and are scored on {len(trial_test)} held out; the test set "
                 "is used for the winner only")

    job = {"root": root, "storage_options": so, "resources": spec["resources"], "cache": cache,
           "victim_settings": spec["victim_settings"], "search": spec["search"], "spec": spec,
           "before_trial": before_trial, "after_epoch": after_epoch}
    trainable = tune.with_resources(tune.with_parameters(_trial, train=trial_train,
                                                         test=trial_test, job=job),
                                    {"cpu": spec["resources"]["cpu"], "gpu": spec["resources"]["gpu"]})
    if extended:
        # Tune restores only the grid it started with: a new grid, in which every trial that
        # finished before returns its stored result (an unfinished one starts over)
        progress(f"[ue-dist] sweep {spec['name']}: extending the sweep in {root} to "
                 f"{trial_count(spec)} trials; the finished ones are kept, not retrained")
        tuner = _new_tuner(spec, trainable, path, fs)
    elif resumed:
        progress(f"[ue-dist] sweep {spec['name']}: resuming the interrupted sweep in {root}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = _new_tuner(spec, trainable, path, fs)
    # Tune prints its experiment table to stdout even with verbose=0: keep stdout for --json
    with contextlib.redirect_stdout(sys.stderr), _TrialProgress(root, so, trial_count(spec),
                                                                progress):
        grid = tuner.fit()
    summary = _summary(spec, grid, root, so, train, cache, resumed)
    if spec["search"] is not None and summary.get("best"):
        summary["best"].update(_test_winner(summary["best"]["params"], train, test, job, progress))
    progress(f"[ue-dist] sweep {spec['name']}: {summary['completed']}/{len(grid)} trial(s) done"
             + (f", {len(summary['errors'])} failed" if summary["errors"] else "")
             + f"; report in {storage.join(root, 'report')}")
    return summary
