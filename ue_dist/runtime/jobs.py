"""Declarative job specs: ``ue-dist run jobs/NAME.yaml`` runs convert -> fit -> protect -> evaluate -> sweep.

A spec is a YAML mapping (see ``jobs/digits-quick.yaml``)::

    name: digits-quick                  # plain name; Ray Train run names derive from it
    root: ${UE_DIST_ROOT:-../runs}/digits-quick   # where outputs go (a folder or s3://bucket/prefix)
    storage_options: {}                 # fsspec options for every URL (never credentials: those
                                        # come from the AWS variables, profiles or roles)
    convert: {source: digits, inputs: [], shard_size: 300}    # optional; writes ROOT/data/{train,test}
    data: {train: URL, test: URL}       # required unless convert is given
    method: {name: em, preset: quick, overrides: {eps: 8/255}}
    fit: {workers: 1, use_gpu: false, cpus_per_worker: 1, max_failures: 1}   # state: ROOT/state.pt
    protect: {fraction: 1.0, seed: 0, actors: 2, cpus_per_actor: 0.5}       # to ROOT/protected/train
    evaluate: {preset: quick, overrides: {epochs: 8}, baseline: true}       # optional victims
    sweep: sweep-digits.yaml            # optional: a sweep spec (path or inline mapping)

Relative paths are relative to the spec file's folder; ``${VAR}`` and ``${VAR:-default}`` are
expanded from the environment. Every step is idempotent, so rerunning a job after a crash
continues it: convert is skipped when its output exists, fit when the state exists (and a
killed fit resumes from its last checkpoint, its run name being ``NAME-fit``), protect skips
committed shards (its ledger), and the sweep resumes from Tune's experiment state.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

from ue_dist.core.config import SettingsError, check_keys
from ue_dist.data import storage

TOP_KEYS = {
    "name": "job name (plain folder-safe name)",
    "root": "output root URL (data, state, protected shards, runs)",
    "storage_options": "fsspec options for every URL",
    "convert": "{source, inputs, image_size, shard_size, seed, n}",
    "data": "{train: URL, test: URL}",
    "method": "{name, preset, overrides}",
    "fit": "{workers, use_gpu, cpus_per_worker, max_failures, train_fraction, state}",
    "protect": "{dst, fraction, seed, actors, cpus_per_actor, gpus_per_actor, batch_size, mode}",
    "evaluate": "{preset, overrides, subset, baseline, num_cpus, num_gpus}",
    "sweep": "path of a sweep spec, or an inline sweep spec",
}
SECTION_KEYS = {
    "convert": ("source", "inputs", "image_size", "shard_size", "seed", "n"),
    "data": ("train", "test"),
    "method": ("name", "preset", "overrides"),
    "fit": ("workers", "use_gpu", "cpus_per_worker", "max_failures", "train_fraction", "state"),
    "protect": ("dst", "fraction", "seed", "actors", "cpus_per_actor", "gpus_per_actor",
                "batch_size", "mode"),
    "evaluate": ("preset", "overrides", "subset", "baseline", "num_cpus", "num_gpus"),
}
STEPS = ("convert", "fit", "protect", "evaluate", "sweep")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class JobSpecError(SettingsError):
    """A job spec that cannot be run; the message names the key and lists the valid ones."""


# loading ----------------------------------------------------------------------------------------
def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise JobSpecError(f"{where}: environment variable ${{{name}}} is not set "
                               f"(set it, or write ${{{name}:-default}})")
        return _VAR.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _check_keys(got: Any, valid, where: str) -> None:
    check_keys(got, valid, where, JobSpecError)


def _path(value: Any, base: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobSpecError(f"{where} must be a path or URL, got {value!r}")
    if "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base, value))


def _number(section: Mapping[str, Any], key: str, default: Any, where: str, kind=float,
            low: float | None = None, high: float | None = None) -> Any:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobSpecError(f"{where}.{key} must be a number, got {value!r}")
    if kind is int and int(value) != value:
        raise JobSpecError(f"{where}.{key} must be an integer, got {value!r}")
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise JobSpecError(f"{where}.{key} must lie in [{low}, {high}], got {value!r}")
    return value


def validate_spec(raw: Mapping[str, Any], base: str = ".") -> dict[str, Any]:
    """Check every key and value (nothing runs); resolve paths against ``base``."""
    from ue_dist.core.victim import SUBSETS, resolve_victim_settings
    from ue_dist.methods.base import get_method

    _check_keys(raw, TOP_KEYS, "job spec")
    spec = _expand(dict(raw), "job spec")
    for key in ("name", "root", "method"):
        if key not in spec:
            raise JobSpecError(f"job spec needs {key!r} ({TOP_KEYS[key]})")
    name = spec["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise JobSpecError(f"job spec name must be a plain name (letters, digits, . _ -), got {name!r}")
    root = _path(spec["root"], base, "root")
    so = spec.get("storage_options") or {}
    if not isinstance(so, Mapping):
        raise JobSpecError("storage_options must be a mapping of fsspec options")
    out: dict[str, Any] = {"name": name, "root": root, "storage_options": dict(so), "base": base}

    # convert / data
    if spec.get("convert") is not None:
        conv = spec["convert"]
        _check_keys(conv, SECTION_KEYS["convert"], "convert")
        from ue_dist.data.converters import CONVERTERS

        if conv.get("source") not in CONVERTERS:
            raise JobSpecError(f"convert.source {conv.get('source')!r} unknown; valid: "
                               f"{', '.join(sorted(CONVERTERS))}")
        inputs = conv.get("inputs") or []
        if not isinstance(inputs, list):
            raise JobSpecError("convert.inputs must be a list of paths")
        out["convert"] = {
            "source": conv["source"], "inputs": [_path(p, base, f"convert.inputs[{i}]")
                                                 for i, p in enumerate(inputs)],
            "out": storage.join(root, "data"),
            "image_size": _number(conv, "image_size", None, "convert", int, 1),
            "shard_size": _number(conv, "shard_size", 1000, "convert", int, 1),
            "seed": _number(conv, "seed", 0, "convert", int),
            "n": _number(conv, "n", 5000, "convert", int, 1)}
    else:
        out["convert"] = None
    data = spec.get("data")
    if data is None:
        if out["convert"] is None:
            raise JobSpecError("job spec needs data: {train: URL, test: URL} (or a convert step)")
        data = {"train": storage.join(out["convert"]["out"], "train"),
                "test": storage.join(out["convert"]["out"], "test")}
    else:
        _check_keys(data, SECTION_KEYS["data"], "data")
        data = {k: _path(data.get(k), base, f"data.{k}") for k in ("train", "test")
                if data.get(k) is not None}
        if "train" not in data:
            raise JobSpecError("data needs train: URL")
    out["data"] = data

    # method
    method = spec["method"]
    if isinstance(method, str):
        method = {"name": method}
    _check_keys(method, SECTION_KEYS["method"], "method")
    cls = get_method(str(method.get("name")))  # unknown names list the valid ones
    preset = method.get("preset", "paper")
    overrides = dict(method.get("overrides") or {})
    settings = cls(cls.resolve(preset, overrides)).settings  # unknown/bad settings fail here
    out["method"] = {"name": cls.name, "preset": preset, "overrides": overrides,
                     "settings": settings, "needs_fit": cls.needs_fit}

    # fit
    fit = spec.get("fit") or {}
    _check_keys(fit, SECTION_KEYS["fit"], "fit")
    out["fit"] = {
        "workers": _number(fit, "workers", 1, "fit", int, 1),
        "use_gpu": bool(fit.get("use_gpu", False)),
        "cpus_per_worker": _number(fit, "cpus_per_worker", 1.0, "fit", float, 0.01),
        "max_failures": _number(fit, "max_failures", 0, "fit", int, -1),
        "train_fraction": _number(fit, "train_fraction", 1.0, "fit", float, 0.0, 1.0),
        "state": _path(fit["state"], base, "fit.state") if fit.get("state")
        else storage.join(root, "state.pt")}

    # protect
    prot = spec.get("protect") or {}
    _check_keys(prot, SECTION_KEYS["protect"], "protect")
    mode = prot.get("mode", "incremental")
    from ue_dist.runtime.protect import MODES
    if mode not in MODES:
        raise JobSpecError(f"protect.mode must be one of {', '.join(MODES)}, got {mode!r}")
    out["protect"] = {
        "dst": _path(prot["dst"], base, "protect.dst") if prot.get("dst")
        else storage.join(root, "protected", "train"),
        "fraction": _number(prot, "fraction", 1.0, "protect", float, 0.0, 1.0),
        "seed": _number(prot, "seed", 0, "protect", int),
        "actors": _number(prot, "actors", 1, "protect", int, 1),
        "cpus_per_actor": _number(prot, "cpus_per_actor", 0.5, "protect", float, 0.01),
        "gpus_per_actor": _number(prot, "gpus_per_actor", 0, "protect", float, 0),
        "batch_size": _number(prot, "batch_size", 256, "protect", int, 1),
        "mode": mode}
    storage.refuse_inside(out["protect"]["dst"], data["train"], what="protect.dst")

    # evaluate
    ev = spec.get("evaluate")
    if ev is not None:
        _check_keys(ev, SECTION_KEYS["evaluate"], "evaluate")
        if "test" not in data:
            raise JobSpecError("evaluate needs data.test (the clean test set)")
        subset = ev.get("subset", "all")
        if subset not in SUBSETS:
            raise JobSpecError(f"evaluate.subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        out["evaluate"] = {
            "settings": resolve_victim_settings(ev.get("preset", "paper"),
                                                dict(ev.get("overrides") or {})),
            "subset": subset, "baseline": bool(ev.get("baseline", True)),
            "num_cpus": _number(ev, "num_cpus", 1.0, "evaluate", float, 0.01),
            "num_gpus": _number(ev, "num_gpus", 0.0, "evaluate", float, 0)}
    else:
        out["evaluate"] = None

    # sweep
    sw = spec.get("sweep")
    if sw is not None:
        from ue_dist.runtime import sweep as sweep_mod

        if isinstance(sw, str):
            sweep_path = _path(sw, base, "sweep")
            sw = sweep_mod.load_spec(sweep_path, out["storage_options"])
        if not isinstance(sw, Mapping):
            raise JobSpecError("sweep must be a path to a sweep spec or an inline mapping")
        # the job's data replace the sweep spec's: one job, one dataset
        sw = {**dict(sw), "data": {"train": data["train"], "test": data.get("test")}}
        if out["storage_options"] and "storage_options" not in sw:
            sw["storage_options"] = out["storage_options"]
        sweep_mod.validate_spec(sw)  # raises naming the bad key
        out["sweep"] = sw
    else:
        out["sweep"] = None
    return out


def load_spec(path: str) -> dict[str, Any]:
    """Read and validate a job spec file; relative paths are taken from its folder."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise JobSpecError(f"job spec {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"job spec {path!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"job spec {path!r} must be a mapping; valid keys: "
                           f"{', '.join(sorted(TOP_KEYS))}")
    try:
        spec = validate_spec(raw, base=os.path.dirname(os.path.abspath(path)))
    except JobSpecError as exc:
        raise JobSpecError(f"job spec {path}: {exc}") from None
    spec["path"] = os.path.abspath(path)
    return spec


def printable_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` as ``ue-dist run --check`` prints it: the values of secret-looking keys (key,
    secret, token, password, session, credential, in any nesting: ``storage_options.secret``,
    ``client_kwargs.aws_session_token``, an inline sweep's options) and URL passwords are
    ``***``. The spec itself is unchanged (running it still uses the real values)."""
    return storage.mask_secrets(dict(spec))


# running ----------------------------------------------------------------------------------------
def _has_shards(url: str, so: Mapping[str, Any]) -> bool:
    from ue_dist.data.shards import list_shards

    try:
        return bool(list_shards(url, so))
    except storage.StorageError:
        return False


def run_job(spec: Mapping[str, Any], progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a validated spec step by step; returns ``{"name", "steps": {step: result}, "ok"}``."""
    if "base" not in spec:  # a raw mapping: validate it (relative paths from the current folder)
        spec = validate_spec(spec)
    so = spec["storage_options"]
    name, root = spec["name"], spec["root"]
    storage.check_writable_root(root, so)
    steps: dict[str, Any] = {}
    say = progress

    conv = spec["convert"]
    if conv is not None:
        if _has_shards(spec["data"]["train"], so):
            say(f"[ue-dist run {name}] convert: {spec['data']['train']} already holds shards; skipped")
            steps["convert"] = {"skipped": True, "out": conv["out"]}
        else:
            from ue_dist.runtime.data_jobs import convert

            say(f"[ue-dist run {name}] convert {conv['source']} -> {conv['out']}")
            steps["convert"] = convert(conv["source"], [*conv["inputs"], conv["out"]], n=conv["n"],
                                       image_size=conv["image_size"], shard_size=conv["shard_size"],
                                       seed=conv["seed"], storage_options=so)

    method, fit = spec["method"], spec["fit"]
    state_url = fit["state"]
    if not method["needs_fit"]:
        state_url = None
        steps["fit"] = {"skipped": True, "reason": f"method {method['name']} learns nothing"}
    elif storage.exists(state_url, so):
        say(f"[ue-dist run {name}] fit: state {state_url} exists; skipped (delete it to refit)")
        steps["fit"] = {"skipped": True, "state": state_url}
    else:
        from ue_dist.runtime.train import fit_method

        say(f"[ue-dist run {name}] fit {method['name']} ({method['preset']}) -> {state_url}")
        steps["fit"] = fit_method(
            method["name"], spec["data"]["train"], state_url, preset=method["preset"],
            overrides=method["overrides"], num_workers=fit["workers"], use_gpu=fit["use_gpu"],
            cpus_per_worker=fit["cpus_per_worker"], storage_path=storage.join(root, "runs"),
            run_name=f"{name}-fit", storage_options=so, max_failures=fit["max_failures"],
            train_fraction=fit["train_fraction"], progress=say)

    from ue_dist.runtime.protect import protect

    prot = spec["protect"]
    say(f"[ue-dist run {name}] protect {spec['data']['train']} -> {prot['dst']}")
    steps["protect"] = protect(
        method["name"], spec["data"]["train"], prot["dst"], state_url=state_url,
        preset=method["preset"], overrides=method["overrides"], fraction=prot["fraction"],
        seed=prot["seed"], actors=prot["actors"], gpus_per_actor=prot["gpus_per_actor"],
        cpus_per_actor=prot["cpus_per_actor"], batch_size=prot["batch_size"], mode=prot["mode"],
        storage_options=so, progress=say)

    ev = spec["evaluate"]
    if ev is not None:
        from ue_dist.runtime.evaluate import evaluate

        runs = {"protected": prot["dst"]}
        if ev["baseline"]:
            runs = {"clean": spec["data"]["train"], **runs}
        steps["evaluate"] = {}
        for label, train_url in runs.items():
            say(f"[ue-dist run {name}] evaluate: {ev['settings']['arch']} victim on the {label} "
                f"training set")
            result = evaluate(train_url, spec["data"]["test"], ev["settings"], ev["subset"], so,
                              use_ray=True, num_cpus=ev["num_cpus"], num_gpus=ev["num_gpus"])
            steps["evaluate"][label] = {k: v for k, v in result.items() if k != "per_epoch"}
            say(f"[ue-dist run {name}] evaluate: {label} -> test accuracy "
                f"{result.get('test_acc')}")

    if spec["sweep"] is not None:
        from ue_dist.runtime.sweep import run_sweep

        steps["sweep"] = run_sweep(spec["sweep"], storage.join(root, "sweeps"), progress=say)

    ok = not steps["protect"]["bad_shards"]
    return {"name": name, "root": root, "state": state_url, "protected": prot["dst"],
            "steps": steps, "ok": ok}


__all__ = ["JobSpecError", "STEPS", "load_spec", "printable_spec", "run_job", "validate_spec"]
