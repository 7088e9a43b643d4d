"""The main job on the embedded default: digits -> fit -> protect -> victims -> figures.

Local Ray, local-folder storage, scikit-learn's bundled digits (or, with
``dataset="fashion-mnist"``, a seeded class-balanced 5,000-image subset of Fashion-MNIST's
training set and its whole test set). Each method is fitted on Ray Train, streamed over the
shards on Ray Data, and judged by training a victim on the protected training set; a victim
trained on the clean set is the reference.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from ue_dist import options as opts
from ue_dist.data import storage

DEFAULT_METHODS = tuple(opts.default(opts.DEMO, "methods").split(","))
#: Fashion-MNIST training images the demo uses (500 per class): minutes, not an hour, on 2 cores.
FASHION_MNIST_DEMO_TRAIN = 5000
#: How each dataset is named in the demo's lines and plots.
TITLES = {"digits": "digits", "fashion-mnist": "Fashion-MNIST"}


def run_demo(out: str = opts.default(opts.DEMO, "out"), methods: Sequence[str] = DEFAULT_METHODS,
             *, preset: str = opts.default(opts.DEMO, "preset"),
             victim_preset: str = opts.default(opts.DEMO, "victim_preset"),
             dataset: str = opts.default(opts.DEMO, "dataset"), victim_overrides: Sequence[str] = (),
             method_overrides: Mapping[str, Sequence[str]] | None = None,
             max_train: int | None = None, storage_options: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] = print) -> dict[str, Any]:
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.methods.base import get_method
    from ue_dist.runtime.evaluate import evaluate
    from ue_dist.runtime.protect import protect
    from ue_dist.runtime.ray_env import ensure_ray
    from ue_dist.runtime.train import fit_method

    if dataset not in TITLES:
        from ue_dist.core.config import SettingsError

        raise SettingsError(f"--dataset must be one of {', '.join(TITLES)}, got {dataset!r}")
    for name in methods:
        get_method(name)  # unknown names fail before anything runs
    victim = resolve_victim_settings(victim_preset, victim_overrides)
    out = storage.absolute(out)
    started = time.time()
    data = storage.join(out, "data")
    train_url, test_url = storage.join(data, "train"), storage.join(data, "test")
    _demo_data(data, dataset, max_train, storage_options)
    progress(f"[demo] {TITLES[dataset]}: {train_url} and {test_url}")
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
    plot_url = _plot_accuracy(results, accuracy, victim, dataset, out, storage_options)
    examples_url = _plot_examples(train_url, protected_urls, preset, method_overrides or {}, out,
                                  storage_options)

    summary = {"test_accuracy": accuracy, "victim": {k: victim[k] for k in ("arch", "epochs")},
               "methods": list(methods), "preset": preset, "timings": timings,
               "dataset": dataset,
               "protected": protected_urls, "plots": [plot_url, examples_url],
               "seconds": round(time.time() - started, 1)}
    storage.write_bytes(storage.join(out, "demo.json"),
                        json.dumps(summary, indent=1).encode(), storage_options)
    return summary


def _demo_data(data: str, dataset: str, max_train: int | None, storage_options) -> None:
    """The demo's data under ``data`` (once): all the digits, or Fashion-MNIST's demo subset;
    ``max_train`` keeps only the first training images (a smaller demo, for tests). A folder
    holding another dataset's demo is refused, not mixed."""
    import json

    from ue_dist.core.config import SettingsError
    from ue_dist.data.converters import write_splits

    manifest = storage.join(data, "train", "_dataset.json")
    if storage.exists(manifest, storage_options):
        held = json.loads(storage.read_bytes(manifest, storage_options)).get("source")
        if held != dataset:
            raise SettingsError(f"{storage.join(data, 'train')} holds the {held} demo's data, "
                                f"not the {dataset} demo's; pass another --out")
        return
    splits, keys, extra = _demo_arrays(dataset)
    if max_train is not None:
        splits["train"] = tuple(a[:max_train] for a in splits["train"])
        keys = keys and {**keys, "train": keys["train"][:max_train]}
    # three shards for the full digits and a test's few hundred images (so protect has shards
    # to stream), Fashion-MNIST's usual 1,000 per shard
    shard_size = max(1, len(splits["train"][1]) // 3 + 1) if max_train is not None else \
        500 if dataset == "digits" else 1000
    write_splits(data, splits, dataset, shard_size=shard_size, storage_options=storage_options,
                 num_classes=10, keys=keys, extra=extra)


def _demo_arrays(dataset: str) -> tuple[dict[str, Any], dict[str, list[str]] | None, dict]:
    """(splits, keys, manifest extras) of the demo's dataset, 32x32x3 uint8."""
    if dataset == "digits":
        from ue_dist.data.sources import digits_arrays

        return dict(digits_arrays()), None, {}
    from ue_dist.data.converters import (FASHION_MNIST_CLASSES, _image_format, balanced_subset,
                                         fashion_mnist_arrays)

    # native 28x28x1 first (a missing package: the error says how to get it), then only the
    # chosen images are resized to the 32x32x3 every victim takes, as `convert` would
    native, _, _ = fashion_mnist_arrays(image_size=None, channels=1)
    x, y = native["train"]
    chosen = balanced_subset(y, FASHION_MNIST_DEMO_TRAIN, seed=0, what="fashion-mnist demo")
    xt, yt = native["test"]
    # keys name each image's position in the official files
    keys = {"train": [f"fashion-mnist-train-{i:06d}" for i in chosen],
            "test": [f"fashion-mnist-test-{i:06d}" for i in range(len(yt))]}
    return ({"train": (_image_format(x[chosen], 32, 3), y[chosen]),
             "test": (_image_format(xt, 32, 3), yt)}, keys, {"classes": FASHION_MNIST_CLASSES})


def _plot_accuracy(results: Mapping[str, Any], accuracy: Mapping[str, float],
                   victim: Mapping[str, Any], dataset: str, out: str, storage_options) -> str:
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
    ax.set_title(f"victim {victim['arch']} trained on {TITLES[dataset]}", fontsize=10)
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
             f"test accuracy on the clean {TITLES[summary.get('dataset', 'digits')]} test set:"]
    lines.append(f"  trained on clean data:        {100 * acc['clean']:.1f}%")
    for name in summary["methods"]:
        lines.append(f"  trained on {name}-protected data: {100 * acc[name]:.1f}%".ljust(10))
    lines.append("plots: " + ", ".join(summary["plots"]))
    lines.append(f"done in {summary['seconds']} s")
    return "\n".join(lines)
