"""Sweep reports: the results table (CSV + Markdown) and the papers' figures as PNG.

* ``accuracy_vs_fraction.png``: test accuracy vs protected fraction, one solid curve per method
  for the mixed training set (clean + protected) and a dashed one for the clean part alone
  (the Bayes-error paper's Figure 4); one panel per (architecture, adversarial radius, defence).
* ``accuracy_vs_epoch.png``: test accuracy per epoch (the GUE paper's Figure 2), one panel per
  method, one curve per protected fraction (mixed data).
* ``examples.png``: per method a row of clean images, protected images and their perturbation
  amplified to the full grey range.

No Ray here: the rows are plain dicts (one per victim), files go through fsspec URLs.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ue_dist.data import storage

COLUMNS = ["method", "fraction", "subset", "arch", "adv_eps", "defense", "seed", "test_acc",
           "robust_acc", "train_size", "protected", "epochs", "seconds", "params"]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def table_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    cols = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)] or list(columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _radius_label(eps: Any) -> str:
    eps = float(eps or 0.0)
    return "standard" if eps == 0 else f"AT {eps * 255:.3g}/255"


def plot_accuracy_vs_fraction(rows: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    panels: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(r["arch"], float(r.get("adv_eps") or 0.0), r.get("defense", "none"))].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        by = defaultdict(lambda: defaultdict(list))
        for r in panels[key]:
            by[(r["method"], r["subset"])][float(r["fraction"])].append(r["test_acc"])
        methods = sorted({m for m, _ in by})
        colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        for (method, subset), points in sorted(by.items()):
            xs = sorted(points)
            ys = [_mean(points[x]) for x in xs]
            mixed = subset == "all"
            ax.plot(xs, [100 * y for y in ys], marker="o" if mixed else "s",
                    markersize=6 if mixed else 8, fillstyle="full" if mixed else "none",
                    linestyle="-" if mixed else "--", color=colours[method], alpha=0.9,
                    label=f"{method} ({'mixed' if mixed else subset + ' part only'})")
        arch, eps, defense = key
        ax.set_title(f"{arch}, {_radius_label(eps)}, defence: {defense}", fontsize=9)
        ax.set_xlabel("protected fraction of the training set")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _figure_bytes(fig)


def plot_accuracy_vs_epoch(rows: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    mixed = [r for r in rows if r.get("subset", "all") == "all" and r.get("per_epoch")]
    methods = sorted({r["method"] for r in mixed}) or ["(none)"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        curves = defaultdict(list)
        for r in mixed:
            if r["method"] == method:
                label = f"fraction {float(r['fraction']):g}"
                if float(r.get("adv_eps") or 0) > 0 or r.get("defense", "none") != "none" or \
                        len({x["arch"] for x in mixed}) > 1:
                    label += f", {r['arch']}, {_radius_label(r.get('adv_eps'))}, {r.get('defense')}"
                curves[label].append([e["test_acc"] for e in r["per_epoch"]])
        for i, (label, runs) in enumerate(sorted(curves.items())):
            n = min(len(c) for c in runs)
            ys = np.mean([c[:n] for c in runs], axis=0) * 100
            ax.plot(range(1, n + 1), ys, marker=".", label=label, color=plt.cm.viridis(i / max(1, len(curves) - 1)))
        ax.set_title(f"{method}: test accuracy during training", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _figure_bytes(fig)


def plot_examples(examples: Mapping[str, Mapping[str, Any]], n: int = 6) -> bytes:
    """``examples[method] = {"clean": uint8 NCHW, "protected": uint8 NCHW, "eps": float}``."""
    plt = _pyplot()
    methods = sorted(examples)
    rows = max(1, len(methods)) * 3
    fig, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.35 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for m_i, method in enumerate(methods):
        ex = examples[method]
        clean = np.asarray(ex["clean"])[:n].astype(np.float64)
        prot = np.asarray(ex["protected"])[:n].astype(np.float64)
        eps = float(ex.get("eps") or 0) or max(1.0, np.abs(prot - clean).max()) / 255.0
        delta = (prot - clean) / 255.0
        amplified = np.clip(0.5 + delta / (2 * eps), 0, 1)  # +-eps -> full grey range
        for j in range(min(n, len(clean))):
            for k, (img, title) in enumerate(((clean[j] / 255, "clean"), (prot[j] / 255, "protected"),
                                              (amplified[j], "perturbation (amplified)"))):
                ax = axes[3 * m_i + k, j]
                hwc = np.transpose(img, (1, 2, 0))
                ax.imshow(hwc[..., 0] if hwc.shape[2] == 1 else hwc, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                if j == 0:
                    ax.set_title(f"{method}: {title}", fontsize=7, loc="left")
    return _figure_bytes(fig)


def plot_search(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Victim test accuracy against each searched setting (one panel per setting)."""
    import json

    plt = _pyplot()
    params = [json.loads(r["params"]) if isinstance(r["params"], str) else dict(r["params"])
              for r in rows]
    names = sorted({k for p in params for k in p})
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(p[name], r["test_acc"]) for p, r in zip(params, rows) if name in p]
        xs = [x * 255 if "eps" in name or name.startswith("rho") else x for x, _ in pts]
        ax.scatter(xs, [100 * y for _, y in pts])
        best = min(range(len(pts)), key=lambda i: pts[i][1])
        ax.scatter([xs[best]], [100 * pts[best][1]], color="red", label="strongest protection")
        ax.set_xlabel(name + (" (x 1/255)" if "eps" in name or name.startswith("rho") else ""))
        ax.set_ylabel("victim test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    method = rows[0].get("method", "")
    fig.suptitle(f"search over {method} settings (lower = stronger protection)", fontsize=9)
    return _figure_bytes(fig)


def write_report(out_url: str, rows: Sequence[Mapping[str, Any]],
                 examples: Mapping[str, Mapping[str, Any]] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 columns: Sequence[str] = COLUMNS) -> dict[str, str]:
    """Write ``results.csv``, ``results.md`` and the PNG figures under ``out_url``."""
    rows = sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in
                                            ("method", "arch", "adv_eps", "defense", "subset",
                                             "fraction", "seed")))
    files = {"csv": storage.join(out_url, "results.csv"), "markdown": storage.join(out_url, "results.md")}
    storage.write_bytes(files["csv"], table_csv(rows, columns).encode(), storage_options)
    storage.write_bytes(files["markdown"], table_markdown(rows, columns).encode(), storage_options)
    good = [r for r in rows if r.get("test_acc") is not None and not math.isnan(float(r["test_acc"]))]
    if good and not any(r.get("params") for r in good):  # a search has one fixed fraction
        files["accuracy_vs_fraction"] = storage.join(out_url, "accuracy_vs_fraction.png")
        storage.write_bytes(files["accuracy_vs_fraction"], plot_accuracy_vs_fraction(good),
                            storage_options)
    if any(r.get("per_epoch") for r in good):
        files["accuracy_vs_epoch"] = storage.join(out_url, "accuracy_vs_epoch.png")
        storage.write_bytes(files["accuracy_vs_epoch"], plot_accuracy_vs_epoch(good), storage_options)
    if good and any(r.get("params") for r in good):
        files["search"] = storage.join(out_url, "search.png")
        storage.write_bytes(files["search"], plot_search([r for r in good if r.get("params")]),
                            storage_options)
    if examples:
        files["examples"] = storage.join(out_url, "examples.png")
        storage.write_bytes(files["examples"], plot_examples(examples), storage_options)
    return files
