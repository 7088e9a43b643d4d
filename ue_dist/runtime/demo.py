"""The main job on the embedded default: digits -> fit -> protect -> victims -> figures.

Local Ray, local-folder storage, scikit-learn's bundled digits. Each method is fitted on Ray
Train, streamed over the shards on Ray Data, and judged by training a victim on the protected
training set; a victim trained on the clean set is the reference.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from ue_dist import options as opts
from ue_dist.data import storage

DEFAULT_METHODS = tuple(opts.default(opts.DEMO, "methods").split(","))


def run_demo(out: str = opts.default(opts.DEMO, "out"), methods: Sequence[str] = DEFAULT_METHODS,
             *, preset: str = opts.default(opts.DEMO, "preset"),
             victim_preset: str = opts.default(opts.DEMO, "victim_preset"), victim_overrides: Sequence[str] = (),
             method_overrides: Mapping[str, Sequence[str]] | None = None,
             max_train: int | None = None, storage_options: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.methods.base import get_method
    from ue_dist.runtime.evaluate import evaluate
    from ue_dist.runtime.protect import protect
    from ue_dist.runtime.ray_env import ensure_ray
    from ue_dist.runtime.train import fit_method

    for name in methods:
        get_method(name)  # unknown names fail before anything runs
    victim = resolve_victim_settings(victim_preset, victim_overrides)
    out = storage.absolute(out)
    started = time.time()
    data = storage.join(out, "data")
    train_url, test_url = storage.join(data, "train"), storage.join(data, "test")
    _demo_data(data, max_train, storage_options)
    progress(f"[demo] data: {train_url} and {test_url}")
    ensure_ray()

    protected_urls: dict[str, str] = {}
    timings: dict[str, dict[str, float]] = {}
    for name in methods:
        t0 = time.time()
        state_url = storage.join(out, "states", f"{name}.pt")
        # A rerun with the same settings resumes the finished Ray Train run (cheap); changed
        # settings or code get a new run, so a demo never mixes old states with new settings.
        fit_method(name, train_url, state_url, preset=preset,
                   overrides=(method_overrides or {}).get(name, ()), workers=1,
                   storage_path=storage.join(out, "runs"), storage_options=storage_options,
                   overwrite=True, progress=progress)
        t1 = time.time()
        dst = storage.join(out, "protected", name)
        protect(name, train_url, dst, state_url=state_url, preset=preset,
                overrides=(method_overrides or {}).get(name, ()), actors=1, mode="overwrite",
                storage_options=storage_options, progress=progress)
        protected_urls[name] = dst
        timings[name] = {"fit_s": round(t1 - t0, 1), "protect_s": round(time.time() - t1, 1)}
        progress(f"[demo] {name}: fit {timings[name]['fit_s']} s, protect {timings[name]['protect_s']} s")

    progress(f"[demo] training {1 + len(methods)} victims ({victim['arch']}, {victim['epochs']} epochs)")
    jobs = {"clean": train_url, **protected_urls}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(evaluate, url, test_url, victim, "all", storage_options,
                                  use_ray=True, cpus_per_worker=1) for k, url in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}

    accuracy = {k: round(float(r["test_acc"]), 4) for k, r in results.items()}
    # figures: accuracy per epoch, and clean / protected / amplified perturbation per method
    plot_url = _plot_accuracy(results, accuracy, victim, out, storage_options)
    examples_url = _plot_examples(train_url, protected_urls, preset, method_overrides or {}, out,
                                  storage_options)

    summary = {"test_accuracy": accuracy, "victim": {k: victim[k] for k in ("arch", "epochs")},
               "methods": list(methods), "preset": preset, "timings": timings,
               "protected": protected_urls, "plots": [plot_url, examples_url],
               "seconds": round(time.time() - started, 1)}
    storage.write_bytes(storage.join(out, "demo.json"),
                        json.dumps(summary, indent=1).encode(), storage_options)
    return summary


def _demo_data(data: str, max_train: int | None, storage_options) -> None:
    """The digits under ``data`` (once): all of them, or the first ``max_train`` training digits
    and all test digits (a smaller demo, for tests)."""
    from ue_dist.data.converters import write_splits
    from ue_dist.data.sources import digits_arrays
    from ue_dist.runtime.data_jobs import convert

    if storage.exists(storage.join(data, "train", "_dataset.json"), storage_options):
        return
    if max_train is None:
        convert("digits", [data], storage_options=storage_options, shard_size=500)
        return
    splits = digits_arrays()
    x, y = splits["train"]
    write_splits(data, {"train": (x[:max_train], y[:max_train]), "test": splits["test"]},
                 "digits", shard_size=max(1, max_train // 3 + 1),
                 storage_options=storage_options, num_classes=10)


def _plot_accuracy(results: Mapping[str, Any], accuracy: Mapping[str, float],
                   victim: Mapping[str, Any], out: str, storage_options) -> str:
    from ue_dist.runtime.report import _figure_bytes, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, r in results.items():
        ys = [100 * e["test_acc"] for e in r["per_epoch"]]
        ax.plot(range(1, len(ys) + 1), ys, marker="o",
                label=f"{'clean data' if k == 'clean' else k + '-protected data'} ({100 * accuracy[k]:.1f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"victim {victim['arch']} trained on digits", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plot_url = storage.join(out, "demo_accuracy.png")
    storage.write_bytes(plot_url, _figure_bytes(fig), storage_options)
    return plot_url


def _plot_examples(train_url: str, protected_urls: Mapping[str, str], preset: str,
                   method_overrides: Mapping[str, Sequence[str]], out: str, storage_options) -> str:
    from ue_dist.data.dataset import load_imageset
    from ue_dist.methods.base import build_method
    from ue_dist.runtime.report import plot_examples

    clean = load_imageset(train_url, storage_options)
    examples = {}
    for name, url in protected_urls.items():
        prot = load_imageset(url, storage_options)
        order = {k: i for i, k in enumerate(prot.keys)}
        idx = [order[k] for k in clean.keys[:6]]
        examples[name] = {"clean": clean.images[:6].numpy(), "protected": prot.images[idx].numpy(),
                          "eps": build_method(name, preset, method_overrides.get(name, ())).eps}
    examples_url = storage.join(out, "demo_examples.png")
    storage.write_bytes(examples_url, plot_examples(examples), storage_options)
    return examples_url


def demo_text(summary: Mapping[str, Any]) -> str:
    acc = summary["test_accuracy"]
    lines = [f"victim ({summary['victim']['arch']}, {summary['victim']['epochs']} epochs) "
             "test accuracy on the clean digits test set:"]
    lines.append(f"  trained on clean data:        {100 * acc['clean']:.1f}%")
    for name in summary["methods"]:
        lines.append(f"  trained on {name}-protected data: {100 * acc[name]:.1f}%".ljust(10))
    lines.append("plots: " + ", ".join(summary["plots"]))
    lines.append(f"done in {summary['seconds']} s")
    return "\n".join(lines)
