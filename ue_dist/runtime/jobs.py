"""Declarative job specs: ``ue-dist run jobs/NAME.yaml`` runs convert -> fit -> protect -> evaluate -> sweep.

A spec is a YAML (or JSON) mapping, at a path or any fsspec URL (see ``jobs/digits-quick.yaml``).
The keys of the steps convert, fit, protect and evaluate are the options of the command of the
same name, declared once in ``ue_dist/options.py`` with their defaults and ranges::

    name: digits-quick                  # plain name; Ray Train run names derive from it
    root: ${UE_DIST_ROOT:-../runs}/digits-quick   # where outputs go (a folder or s3://bucket/prefix)
    storage_options: {}                 # fsspec options for every URL (never credentials: those
                                        # come from the AWS variables, profiles or roles)
    convert: {source: digits, inputs: [], shard_size: 300}    # optional; writes ROOT/data/{train,test}
    data: {train: URL, test: URL}       # required unless convert is given
    method: {name: em, preset: quick, overrides: {eps: 8/255}}
    fit: {workers: 1, gpus_per_worker: 0, cpus_per_worker: 1, max_failures: 1}  # state: ROOT/state.pt
    protect: {fraction: 1.0, seed: 0, actors: 2, cpus_per_actor: 0.5}       # to ROOT/protected/train
    evaluate: {victim_preset: quick, victim_overrides: {epochs: 8}, baseline: true}  # optional
    sweep: sweep-digits.yaml            # optional: a sweep spec (path or inline mapping)

Relative paths are relative to the spec file's folder; ``${VAR}`` and ``${VAR:-default}`` are
expanded from the environment. Every step is idempotent, so rerunning a job after a crash
continues it: convert is skipped when its output exists, fit when the state exists (and a
killed fit resumes from its last checkpoint, its run name being ``NAME-fit``), protect skips
committed shards (its ledger), and the sweep resumes from Tune's experiment state. Protect
takes the settings the state was fitted with; the spec's ``method`` preset and overrides are
checked against them, so a state left by an earlier spec whose fitted settings differ (another
eps, arch, ...) is refused by name instead of protecting with settings it was not fitted for
(delete the state to refit). Keys renamed
in this release (``fit.use_gpu``, ``evaluate.preset/overrides/num_cpus/num_gpus``) still work,
with one warning line naming the new key.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

from ue_dist import options as opts
from ue_dist.core.config import SettingsError
from ue_dist.data import storage

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


def _path(value: Any, base: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise JobSpecError(f"{where} must be a path or URL, got {value!r}")
    return opts.resolve_path(value, base)


def _section(value: Any, step: str) -> dict[str, Any]:
    """One step's mapping checked against its command's declared options (``options.py``)."""
    return opts.check_section(value, opts.JOB_STEPS[step], step, JobSpecError)


def _name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise JobSpecError(f"job spec name must be a plain name (letters, digits, . _ -), got {name!r}")
    return name


def _convert_step(value: Any, base: str, root: str) -> dict[str, Any] | None:
    if value is None:
        return None
    conv = _section(value, "convert")
    conv["inputs"] = [_path(p, base, f"convert.inputs[{i}]") for i, p in enumerate(conv["inputs"])]
    conv["out"] = storage.join(root, "data")
    return conv


def _writes_no_test(convert: Mapping[str, Any]) -> bool:
    """convert imagefolder writes OUT/test only with test_fraction > 0 or an input that holds
    train/ and test/ (a local folder is looked at; a URL is assumed to hold them)."""
    if convert.get("source") != "imagefolder" or convert.get("test_fraction"):
        return False
    inputs = convert.get("inputs") or []
    folder = inputs[0] if inputs else None
    return bool(folder) and "://" not in folder and not all(
        os.path.isdir(os.path.join(folder, s)) for s in ("train", "test"))


def _data(value: Any, convert: Mapping[str, Any] | None, base: str) -> dict[str, str]:
    if value is None:
        if convert is None:
            raise JobSpecError("job spec needs data: {train: URL, test: URL} (or a convert step)")
        data = {"train": storage.join(convert["out"], "train"),
                "test": storage.join(convert["out"], "test")}
        if _writes_no_test(convert):
            del data["test"]
        return data
    data = {k: _path(v, base, f"data.{k}") for k, v in _section(value, "data").items()
            if v is not None}
    if "train" not in data:
        raise JobSpecError("data needs train: URL")
    return data


def _method_step(value: Any) -> dict[str, Any]:
    from ue_dist.methods.base import get_method

    method = _section({"name": value} if isinstance(value, str) else value, "method")
    cls = get_method(str(method["name"]))  # unknown names list the valid ones
    overrides = method["overrides"] or {}
    settings = cls(cls.resolve(method["preset"], overrides)).settings  # bad settings fail here
    return {"name": cls.name, "preset": method["preset"], "overrides": overrides,
            "settings": settings, "needs_fit": cls.needs_fit}


def _fit_step(value: Any, base: str, root: str) -> dict[str, Any]:
    fit = _section(value, "fit")
    fit["state"] = (_path(fit["state"], base, "fit.state") if fit["state"]
                    else storage.join(root, "state.pt"))
    return fit


def _protect_step(value: Any, base: str, root: str, data: Mapping[str, str]) -> dict[str, Any]:
    prot = _section(value, "protect")
    prot["dst"] = (_path(prot["dst"], base, "protect.dst") if prot["dst"]
                   else storage.join(root, "protected", "train"))
    storage.refuse_inside(prot["dst"], data["train"], what="protect.dst")
    return prot


def _evaluate_step(value: Any, data: Mapping[str, str]) -> dict[str, Any] | None:
    from ue_dist.core.victim import resolve_victim_settings

    if value is None:
        return None
    ev = _section(value, "evaluate")
    if "test" not in data:
        raise JobSpecError("evaluate needs data.test (the clean test set; convert imagefolder "
                           "writes one with test_fraction > 0)")
    settings = resolve_victim_settings(ev.pop("victim_preset"), ev.pop("victim_overrides") or {})
    return {"settings": settings, **ev}


def _sweep_step(value: Any, base: str, data: Mapping[str, str],
                so: Mapping[str, Any]) -> dict[str, Any] | None:
    from ue_dist.runtime import sweep as sweep_mod

    if value is None:
        return None
    if isinstance(value, str):
        value = sweep_mod.load_spec(_path(value, base, "sweep"), so)
    if not isinstance(value, Mapping):
        raise JobSpecError("sweep must be a path to a sweep spec or an inline mapping")
    # the job's data replace the sweep spec's: one job, one dataset
    sw = {**dict(value), "data": {"train": data["train"], "test": data.get("test")}}
    if so and "storage_options" not in sw:
        sw["storage_options"] = dict(so)
    sweep_mod.validate_spec(sw)  # raises naming the bad key
    return sw


def validate_spec(raw: Mapping[str, Any], base: str = ".") -> dict[str, Any]:
    """Check every key and value (nothing runs); resolve paths against ``base``."""
    spec = opts.check_section(_expand(raw, "job spec"), opts.JOB, "job spec", JobSpecError,
                              nested=False)
    root = _path(spec["root"], base, "root")
    out: dict[str, Any] = {"name": _name(spec["name"]), "root": root,
                           "storage_options": spec["storage_options"] or {}, "base": base}
    out["convert"] = _convert_step(spec["convert"], base, root)
    out["data"] = _data(spec["data"], out["convert"], base)
    out["method"] = _method_step(spec["method"])
    out["fit"] = _fit_step(spec["fit"], base, root)
    out["protect"] = _protect_step(spec["protect"], base, root, out["data"])
    out["evaluate"] = _evaluate_step(spec["evaluate"], out["data"])
    out["sweep"] = _sweep_step(spec["sweep"], base, out["data"], out["storage_options"])
    return out


def load_spec(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read and validate a job spec (YAML or JSON; a path or any fsspec URL); relative paths in
    it are taken from its folder."""
    raw = opts.read_spec(path, "job spec", opts.JOB, JobSpecError, storage_options)
    try:
        spec = validate_spec(raw, base=opts.spec_folder(path))
    except JobSpecError as exc:
        raise JobSpecError(f"job spec {path}: {exc}") from None
    spec["path"] = path if "://" in path else os.path.abspath(path)
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
                                       seed=conv["seed"], labels=conv["labels"],
                                       test_fraction=conv["test_fraction"],
                                       resize_mode=conv["resize_mode"],
                                       train_images=conv["train_images"], storage_options=so)

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
            overrides=method["overrides"], workers=fit["workers"],
            gpus_per_worker=fit["gpus_per_worker"], cpus_per_worker=fit["cpus_per_worker"], storage_path=storage.join(root, "runs"),
            run_name=f"{name}-fit", storage_options=so, max_failures=fit["max_failures"],
            train_fraction=fit["train_fraction"], labels=fit["labels"],
            clusters=fit["clusters"], image_size=fit["image_size"], views=fit["views"],
            progress=say)

    from ue_dist.runtime.protect import protect

    prot = spec["protect"]
    say(f"[ue-dist run {name}] protect {spec['data']['train']} -> {prot['dst']}")
    steps["protect"] = protect(
        method["name"], spec["data"]["train"], prot["dst"], state_url=state_url,
        preset=method["preset"], overrides=method["overrides"], fraction=prot["fraction"],
        seed=prot["seed"], actors=prot["actors"], gpus_per_actor=prot["gpus_per_actor"],
        cpus_per_actor=prot["cpus_per_actor"], batch_size=prot["batch_size"], labels=prot["labels"],
        mode=prot["mode"], joint=prot["joint"], workers=prot["workers"], staged=prot["staged"],
        checkpoint_every=prot["checkpoint_every"],
        storage_options=so, progress=say)

    if spec["evaluate"] is not None:
        steps["evaluate"] = _run_evaluate(spec, say)

    if spec["sweep"] is not None:
        from ue_dist.runtime.sweep import run_sweep

        steps["sweep"] = run_sweep(spec["sweep"], storage.join(root, "sweeps"), progress=say)

    failures = job_failures(steps)
    return {"name": name, "root": root, "state": state_url, "protected": prot["dst"],
            "steps": steps, "failures": failures, "ok": not failures}


def _run_evaluate(spec: Mapping[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """The evaluate step: a victim on the protected training set (and on the clean one with
    ``baseline``)."""
    from ue_dist.runtime.evaluate import evaluate

    ev, name = spec["evaluate"], spec["name"]
    runs = {"protected": spec["protect"]["dst"]}
    if ev["baseline"]:
        runs = {"clean": spec["data"]["train"], **runs}
    out = {}
    for label, train_url in runs.items():
        say(f"[ue-dist run {name}] evaluate: {ev['settings']['arch']} victim on the {label} "
            f"training set")
        result = evaluate(train_url, spec["data"]["test"], ev["settings"], ev["subset"],
                          spec["storage_options"], use_ray=True,
                          cpus_per_worker=ev["cpus_per_worker"],
                          gpus_per_worker=ev["gpus_per_worker"])
        out[label] = {k: v for k, v in result.items() if k != "per_epoch"}
        say(f"[ue-dist run {name}] evaluate: {label} -> test accuracy {result.get('test_acc')}")
    return out


def job_failures(steps: Mapping[str, Any]) -> list[str]:
    """What makes a job that ran to its end not ok (``ue-dist run`` exits 3): shards skipped as
    unreadable, sweep trials that failed."""
    out = [f"protect: bad shard {b['shard']} ({b['reason']})"
           for b in steps["protect"]["bad_shards"]]
    out += [f"sweep: trial {e}" for e in (steps.get("sweep") or {}).get("errors", ())]
    return out


__all__ = ["JobSpecError", "STEPS", "job_failures", "load_spec", "printable_spec", "run_job",
           "validate_spec"]
