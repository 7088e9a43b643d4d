"""Train one victim on a (possibly partly protected) dataset and measure it on a test set.

``evaluate`` loads both splits from shard URLs, keeps the requested subset of the training set
(``all`` mixed, ``clean`` = samples not flagged protected, ``protected``), and trains one victim
(``ue_dist.core.victim.train_victim``) either in this process or as one Ray task with its own
CPU/GPU resources.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

import torch

from ue_dist import options as opts
from ue_dist.core.config import SettingsError
from ue_dist.core.context import LocalContext
from ue_dist.core.victim import (SUBSETS, check_compatible, select_subset, train_victim,
                                 validate_victim_settings)


def _evaluate_local(train_url: str, test_url: str, settings: Mapping[str, Any], subset: str,
                    storage_options: Mapping[str, Any] | None, device: str | None,
                    log: Callable[[str], None] | None) -> dict[str, Any]:
    from ue_dist.data.dataset import load_imageset

    train = load_imageset(train_url, storage_options)
    test = load_imageset(test_url, storage_options)
    data = select_subset(train, subset)
    check_compatible(data, test)
    protected = sum(bool((m or {}).get("protected")) for m in data.meta)
    # progress goes to stderr, so that ``--json`` output stays one object on stdout
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ctx = LocalContext(device=device, seed=int(settings["seed"]), log=log)
    result = train_victim(data, test, settings, ctx)
    result.update(subset=subset, train_url=train_url, test_url=test_url,
                  protected_in_train=int(protected), device=str(ctx.device))
    return result


def _declared(name: str) -> Any:
    return opts.default(opts.EVALUATE, name)


def evaluate(train_url: str, test_url: str, settings: Mapping[str, Any],
             subset: str = _declared("subset"), storage_options: Mapping[str, Any] | None = None,
             *, use_ray: bool = False, cpus_per_worker: float = _declared("cpus_per_worker"),
             gpus_per_worker: float = _declared("gpus_per_worker"),
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One victim (``ue-dist evaluate``'s options, ``ue_dist.options.EVALUATE``), in this
    process or, with ``use_ray``, as one Ray task with ``cpus_per_worker``/``gpus_per_worker``.
    Settings are validated in the caller's process before anything runs."""
    num_cpus, num_gpus = float(cpus_per_worker), float(gpus_per_worker)
    settings = validate_victim_settings(settings)
    from ue_dist.data.storage import absolute
    train_url, test_url = absolute(train_url), absolute(test_url)
    if subset not in SUBSETS:
        raise SettingsError(f"unknown subset {subset!r}; valid: {', '.join(SUBSETS)}")
    if not use_ray:
        device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else None
        return _evaluate_local(train_url, test_url, settings, subset, storage_options, device, log)
    import ray

    from ue_dist.runtime.ray_env import ensure_ray

    ensure_ray()

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)
    def _task() -> dict[str, Any]:
        torch.set_num_threads(max(1, int(num_cpus)))
        from ue_dist.runtime.console import worker_print
        tag = "/".join(train_url.rstrip("/").split("/")[-2:])  # e.g. data/train, protected/em
        return _evaluate_local(train_url, test_url, settings, subset, storage_options,
                               "cuda" if num_gpus > 0 else "cpu",
                               lambda message: worker_print(f"{tag}: {message}"))

    return ray.get(_task.remote())
