"""Sweep reports: the results table (CSV + Markdown), pivot tables and the papers' figures.

* ``pivot.md``: mean ± std over seeds of the final test accuracy, one row per
  (method, protected fraction, subset), one column per (architecture, adversarial radius,
  defence), and the best-epoch accuracy below it; ``summary.csv`` the same in long form (pandas).
* ``accuracy_vs_fraction.png`` (when the sweep has two fractions or more): test accuracy vs
  protected fraction, one solid curve per method for the mixed training set (clean + protected)
  and a dashed one for the clean part alone (the Bayes-error paper's Figure 4); one panel per
  (architecture, adversarial radius, defence).
* ``accuracy_vs_radius.png`` (two adversarial radii or more): test accuracy vs the victim's
  PGD-AT radius, one curve per method (the REM paper's Figures 1 and 8); one panel per
  (architecture, defence, fraction).
* ``accuracy_vs_epoch.png``: train (dashed) and test (solid) accuracy per epoch, one panel per
  method, one colour per setting (the REM paper's Figure 7, the GUE paper's Figure 2: on an
  unlearnable set the training accuracy climbs while the test accuracy stays low).
* ``defence_matrix.md`` / ``defence_matrix.png`` (two victim defences or more, adversarial
  training counted as one): the attack x defence matrix of mean test accuracy, its worst-case
  column (the highest accuracy any defence recovers) and the best attack per defence; a heatmap.
* ``architectures.png`` (two architectures or more): bars per method and architecture.
* ``examples.png``: per method a row of clean images, protected images and their perturbation
  amplified to the full grey range.

Every curve is the mean over the sweep's seeds, with the spread (± one standard deviation)
shaded where there are two seeds or more.

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
           "best_acc", "val_acc", "robust_acc", "train_size", "protected", "epochs", "seconds", "params"]


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


def _spread(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, standard deviation (0 for one value) and count of the finite values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else 0.0, len(vals)


def _curve(ax, xs: Sequence[float], samples: Sequence[Sequence[float]], **style: Any) -> None:
    """Mean of ``samples`` (one list of values per x) in percent, the seed spread shaded."""
    stats = [_spread(v) for v in samples]
    mean = np.array([100 * m for m, _, _ in stats])
    std = np.array([100 * d for _, d, _ in stats])
    line, = ax.plot(xs, mean, **style)
    if any(n > 1 for _, _, n in stats):
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15,
                        linewidth=0)


def _finish(ax, title: str, xlabel: str, ylabel: str = "test accuracy (%)",
            grid_axis: str = "both") -> None:
    """The panel furniture every accuracy plot shares: title, labels, a 0-100 % axis, grid,
    legend."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis=grid_axis)
    ax.legend(fontsize=7)


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
            mixed = subset == "all"
            _curve(ax, xs, [points[x] for x in xs], marker="o" if mixed else "s",
                   markersize=6 if mixed else 8, fillstyle="full" if mixed else "none",
                   linestyle="-" if mixed else "--", color=colours[method], alpha=0.9,
                   label=f"{method} ({'mixed' if mixed else subset + ' part only'})")
        arch, eps, defense = key
        _finish(ax, f"{arch}, {_radius_label(eps)}, defence: {defense}",
                "protected fraction of the training set")
    return _figure_bytes(fig)


def plot_accuracy_vs_radius(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Test accuracy against the victim's PGD-AT radius (x 1/255), one curve per method (and
    subset), one panel per (architecture, defence, protected fraction)."""
    plt = _pyplot()
    panels: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(r["arch"], r.get("defense", "none"), float(r["fraction"]))].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, key in zip(axes[0], keys):
        by = defaultdict(lambda: defaultdict(list))
        for r in panels[key]:
            by[(r["method"], r["subset"])][float(r.get("adv_eps") or 0.0) * 255].append(
                r["test_acc"])
        for (method, subset), points in sorted(by.items()):
            xs = sorted(points)
            mixed = subset == "all"
            _curve(ax, xs, [points[x] for x in xs], marker="o", color=colours[method],
                   linestyle="-" if mixed else "--",
                   label=method if mixed else f"{method} ({subset} part only)")
        arch, defense, fraction = key
        _finish(ax, f"{arch}, defence: {defense}, {fraction:.0%} protected",
                "victim's PGD-AT radius (x 1/255; 0 = standard training)")
    return _figure_bytes(fig)


def plot_accuracy_vs_epoch(rows: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    mixed = [r for r in rows if r.get("subset", "all") == "all" and r.get("per_epoch")]
    methods = sorted({r["method"] for r in mixed}) or ["(none)"]
    several = {k: len({_setting(x)[i] for x in mixed}) > 1 for i, k in
               enumerate(("fraction", "arch", "adv_eps", "defense"))}
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        curves: dict[tuple, list] = defaultdict(list)
        for r in mixed:
            if r["method"] == method:
                curves[_setting(r)].append(r["per_epoch"])
        for i, (setting, runs) in enumerate(sorted(curves.items())):
            n = min(len(run) for run in runs)
            xs = list(range(1, n + 1))
            colour = plt.cm.viridis(i / max(1, len(curves) - 1))
            label = _setting_label(setting, several)
            _curve(ax, xs, [[run[e]["test_acc"] for run in runs] for e in range(n)], marker=".",
                   color=colour, label=label or "test")
            if all("train_acc" in run[0] for run in runs):
                _curve(ax, xs, [[run[e]["train_acc"] for run in runs] for e in range(n)],
                       linestyle="--", color=colour, alpha=0.8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _finish(ax, f"{method}: test (solid) and train (dashed) accuracy", "epoch", "accuracy (%)")
    return _figure_bytes(fig)


def _setting(r: Mapping[str, Any]) -> tuple:
    return (float(r["fraction"]), r["arch"], float(r.get("adv_eps") or 0.0),
            r.get("defense", "none"))


def _setting_label(setting: tuple, several: Mapping[str, bool]) -> str:
    fraction, arch, eps, defense = setting
    parts = [f"fraction {fraction:g}" if several["fraction"] else "",
             arch if several["arch"] else "",
             _radius_label(eps) if several["adv_eps"] else "",
             f"defence {defense}" if several["defense"] else ""]
    return ", ".join(p for p in parts if p)


def plot_architectures(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Grouped bars: test accuracy per method (groups) and victim architecture (bars), mean
    over seeds with the standard deviation as error bars; one panel per (radius, defence,
    fraction, subset)."""
    plt = _pyplot()
    panels: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(float(r.get("adv_eps") or 0.0), r.get("defense", "none"), float(r["fraction"]),
                r["subset"])].append(r)
    keys = sorted(panels)
    archs = sorted({r["arch"] for r in rows})
    n_methods = len({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.6, 1.5 + n_methods * 0.5 * len(archs))
                                                    * len(keys), 3.8), squeeze=False)
    width = 0.8 / len(archs)
    for ax, key in zip(axes[0], keys):
        methods = sorted({r["method"] for r in panels[key]})
        for j, arch in enumerate(archs):
            stats = [_spread(r["test_acc"] for r in panels[key]
                             if r["method"] == m and r["arch"] == arch) for m in methods]
            ax.bar([i + (j - (len(archs) - 1) / 2) * width for i in range(len(methods))],
                   [100 * m for m, _, _ in stats], width, yerr=[100 * d for _, d, _ in stats],
                   capsize=2, label=arch, color=plt.cm.tab10(j % 10))
        eps, defense, fraction, subset = key
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
        _finish(ax, f"{_radius_label(eps)}, defence: {defense}, {fraction:.0%} protected"
                + ("" if subset == "all" else f", {subset} part only"), "", grid_axis="y")
        ax.legend(fontsize=7, title="victim", title_fontsize=7)
    return _figure_bytes(fig)


def plot_moons(result: Mapping[str, Any], before: np.ndarray, after: np.ndarray,
               labels: np.ndarray) -> bytes:
    """The Bayes paper's Figure 3: the two-moons points before and after the ascent (Algorithm
    2), coloured by class, each point's move drawn as a thin line, the estimates in the titles."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.0), sharex=True, sharey=True,
                             layout="constrained")
    colours = np.array([plt.cm.tab10(0), plt.cm.tab10(1)])[np.asarray(labels) % 2]
    for ax, pts, title in ((axes[0], before, f"before: Bayes error {result['before']:.3f}"),
                           (axes[1], after, f"after {result['steps']} ascent steps: "
                                            f"{result['after']:.3f}")):
        if pts is after:
            for a, b in zip(before, after):
                ax.plot([a[0], b[0]], [a[1], b[1]], color="0.7", linewidth=0.5, zorder=1)
        ax.scatter(pts[:, 0], pts[:, 1], c=colours, s=12, zorder=2)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(f"two moons, n = {result['n']}, L-inf radius {result['eps']:g}, "
                 f"bandwidth {result['sigma']:.3g}", fontsize=9)
    return _figure_bytes(fig)


PIVOT_INDEX = ["method", "fraction", "subset"]
PIVOT_COLUMNS = ["arch", "adv_eps", "defense"]


def pivot_tables(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """pandas pivots of the rows: ``mean``, ``std`` and ``n`` (seeds) of ``test_acc`` (and of
    ``best_acc`` where the rows carry it), indexed by method / fraction / subset, one column per
    architecture / adversarial radius (x 1/255) / defence; ``text`` joins them as "mean ± std"
    in percent, ready for Markdown."""
    import pandas as pd

    frame = pd.DataFrame([{**{k: r.get(k) for k in PIVOT_INDEX + PIVOT_COLUMNS},
                           "test_acc": r.get("test_acc"), "best_acc": r.get("best_acc")}
                          for r in rows])
    frame["adv_eps"] = (frame["adv_eps"].fillna(0).astype(float) * 255).round(3)
    frame["defense"] = frame["defense"].fillna("none")
    out: dict[str, Any] = {}
    for value in ("test_acc", "best_acc"):
        if frame[value].notna().any():
            grouped = frame.pivot_table(index=PIVOT_INDEX, columns=PIVOT_COLUMNS, values=value,
                                        aggfunc=["mean", "std", "count"], dropna=False)
            # dropna=False keeps the grid's empty cells; a row with none filled (a method's
            # fraction-0 row, trained once under another method's name) is left out
            keep = grouped["mean"].notna().any(axis=1)
            grouped = grouped[keep]
            mean, std, n = grouped["mean"], grouped["std"].fillna(0.0), grouped["count"]
            text = (mean * 100).map(lambda v: "" if pd.isna(v) else f"{v:.1f}") \
                + (std * 100).map(lambda v: f" ± {v:.1f}")
            text = text.where(n > 1, (mean * 100).map(lambda v: "" if pd.isna(v) else f"{v:.1f}"))
            out[value] = {"mean": mean, "std": std, "n": n, "text": text.where(mean.notna(), "")}
    return out


def summary_frame(rows: Sequence[Mapping[str, Any]]):
    """One row per setting (method, fraction, subset, arch, radius x 1/255, defence): mean, std
    and number of seeds of the final and of the best-epoch test accuracy (long form, for pandas
    or a spreadsheet)."""
    import pandas as pd

    frame = pd.DataFrame([{**{k: r.get(k) for k in PIVOT_INDEX + PIVOT_COLUMNS},
                           "test_acc": r.get("test_acc"), "best_acc": r.get("best_acc")}
                          for r in rows])
    frame["adv_eps"] = (frame["adv_eps"].fillna(0).astype(float) * 255).round(3)
    frame["defense"] = frame["defense"].fillna("none")
    stats = frame.groupby(PIVOT_INDEX + PIVOT_COLUMNS).agg(
        test_acc_mean=("test_acc", "mean"), test_acc_std=("test_acc", "std"),
        seeds=("test_acc", "count"), best_acc_mean=("best_acc", "mean"),
        best_acc_std=("best_acc", "std"))
    return stats.reset_index().rename(columns={"adv_eps": "adv_eps_255"})


def _pivot_markdown(text) -> str:
    columns = [f"{arch}, {'standard' if eps == 0 else f'AT {eps:g}/255'}, {defense}"
               for arch, eps, defense in text.columns]
    lines = ["| method | fraction | subset | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for (method, fraction, subset), row in text.iterrows():
        lines.append(f"| {method} | {fraction:g} | {subset} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _defence_label(eps: Any, defense: Any) -> str:
    defense = defense or "none"
    if float(eps or 0.0) == 0:
        return defense
    return f"PGD-AT {float(eps) * 255:.3g}/255" + ("" if defense == "none" else f" + {defense}")


def defence_matrix(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The attack x defence matrix (APBench's leaderboard form) of the rows that train on the
    whole (mixed) training set: mean test accuracy over seeds, one row per (method, protected
    fraction), one column per victim defence (adversarial training is a column of its own),
    ``worst case`` = the highest accuracy any defence recovers; ``best_attack`` per defence =
    the protected row with the lowest accuracy. None when the rows have one defence or none.
    One matrix per victim architecture: the first one's (``arch``)."""
    import pandas as pd

    rows = [r for r in rows if r.get("subset", "all") == "all"]
    if not rows:
        return None
    arch = sorted({r["arch"] for r in rows})[0]
    frame = pd.DataFrame([{"method": r["method"], "fraction": float(r["fraction"]),
                           "defence": _defence_label(r.get("adv_eps"), r.get("defense")),
                           "test_acc": r.get("test_acc")} for r in rows if r["arch"] == arch])
    # no defence first, then the data defences by name, adversarial training last
    order = sorted(set(frame["defence"]), key=lambda d: (d != "none", d.startswith("PGD-AT"), d))
    if len(order) < 2:
        return None
    mean = frame.pivot_table(index=["method", "fraction"], columns="defence", values="test_acc",
                             aggfunc="mean")[order]
    seeds = int(frame.groupby(["method", "fraction", "defence"]).size().min())
    mean["worst case"] = mean[order].max(axis=1)
    protected = mean[mean.index.get_level_values("fraction") > 0]
    best = {d: (f"{protected[d].idxmin()[0]}", float(protected[d].min()))
            for d in order + ["worst case"] if protected[d].notna().any()}
    return {"arch": arch, "mean": mean, "defences": order, "best_attack": best, "seeds": seeds}


def defence_matrix_markdown(matrix: Mapping[str, Any]) -> str:
    mean, cols = matrix["mean"], list(matrix["mean"].columns)
    lines = [f"Test accuracy (%), {matrix['arch']} victims, mean over {matrix['seeds']}+ seed(s); "
             "worst case = the highest accuracy any defence recovers (lower protects better)\n",
             "| method | protected | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (method, fraction), row in mean.iterrows():
        cells = ["" if _missing(v) else f"{100 * v:.1f}" for v in row]
        name = "clean" if fraction == 0 else method  # fraction 0: the data of no method
        lines.append(f"| {name} | {fraction:g} | " + " | ".join(cells) + " |")
    best = matrix["best_attack"]
    lines.append("| **best attack** | | " + " | ".join(
        f"{best[c][0]} ({100 * best[c][1]:.1f})" if c in best else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _missing(value: Any) -> bool:
    return value is None or math.isnan(float(value))


def plot_defence_matrix(matrix: Mapping[str, Any]) -> bytes:
    """Heatmap of the matrix: attacks down, defences across, accuracy in each cell."""
    plt = _pyplot()
    mean = matrix["mean"]
    values = mean.to_numpy(dtype=float) * 100
    labels = ["clean" if f == 0 else f"{m}, {f:.0%} protected" if f < 1 else m
              for m, f in mean.index]
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * values.shape[1], 0.9 + 0.42 * values.shape[0]))
    image = ax.imshow(values, cmap="RdYlGn_r", vmin=0, vmax=100, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(values.shape[1]), list(mean.columns), rotation=40, ha="right")
    ax.set_yticks(range(values.shape[0]), labels)
    ax.set_title(f"clean test accuracy (%) of {matrix['arch']} victims: attack x defence")
    fig.colorbar(image, ax=ax, fraction=0.03)
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
    """The search's objective (victim accuracy on the held-out validation images) against each
    searched setting (one panel per setting)."""
    import json

    plt = _pyplot()
    params = [json.loads(r["params"]) if isinstance(r["params"], str) else dict(r["params"])
              for r in rows]
    names = sorted({k for p in params for k in p})
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(p[name], r.get("val_acc", r.get("test_acc"))) for p, r in zip(params, rows)
               if name in p]
        xs = [x * 255 if "eps" in name or name.startswith("rho") else x for x, _ in pts]
        ax.scatter(xs, [100 * y for _, y in pts])
        best = min(range(len(pts)), key=lambda i: pts[i][1])
        ax.scatter([xs[best]], [100 * pts[best][1]], color="red", label="strongest protection")
        _finish(ax, "", name + (" (x 1/255)" if "eps" in name or name.startswith("rho") else ""),
                "victim accuracy on held-out training images (%)")
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
    def scored(r: Mapping[str, Any]) -> bool:  # a search's trials are scored on validation
        value = r.get("val_acc" if r.get("params") else "test_acc")
        return value is not None and not math.isnan(float(value))

    good = [r for r in rows if scored(r)]
    search = any(r.get("params") for r in good)
    if good and not search:
        pivots = pivot_tables(good)
        text = pivots["test_acc"]["text"]
        files["pivot"] = storage.join(out_url, "pivot.md")
        storage.write_bytes(files["pivot"], (
            "Final test accuracy (%), mean ± std over seeds\n\n" + _pivot_markdown(text)
            + ("\nBest-epoch test accuracy (%)\n\n" + _pivot_markdown(pivots["best_acc"]["text"])
               if "best_acc" in pivots else "")).encode(), storage_options)
        files["summary_csv"] = storage.join(out_url, "summary.csv")
        storage.write_bytes(files["summary_csv"], summary_frame(good).to_csv(
            index=False).encode(), storage_options)

        matrix = defence_matrix(good)
        if matrix is not None:
            files["defence_matrix"] = storage.join(out_url, "defence_matrix.md")
            storage.write_bytes(files["defence_matrix"],
                                defence_matrix_markdown(matrix).encode(), storage_options)
            files["defence_matrix_png"] = storage.join(out_url, "defence_matrix.png")
            storage.write_bytes(files["defence_matrix_png"], plot_defence_matrix(matrix),
                                storage_options)

    def distinct(key: str) -> int:
        return len({float(r.get(key) or 0.0) if key != "arch" else r[key] for r in good})

    plots = (("accuracy_vs_fraction", plot_accuracy_vs_fraction, distinct("fraction") > 1),
             ("accuracy_vs_radius", plot_accuracy_vs_radius, distinct("adv_eps") > 1),
             ("architectures", plot_architectures, distinct("arch") > 1))
    for name, plot, wanted in plots:
        if good and not search and wanted:
            files[name] = storage.join(out_url, f"{name}.png")
            storage.write_bytes(files[name], plot(good), storage_options)
    if any(r.get("per_epoch") for r in good):
        files["accuracy_vs_epoch"] = storage.join(out_url, "accuracy_vs_epoch.png")
        storage.write_bytes(files["accuracy_vs_epoch"], plot_accuracy_vs_epoch(good), storage_options)
    if search:
        files["search"] = storage.join(out_url, "search.png")
        storage.write_bytes(files["search"], plot_search([r for r in good if r.get("params")]),
                            storage_options)
    if examples:
        files["examples"] = storage.join(out_url, "examples.png")
        storage.write_bytes(files["examples"], plot_examples(examples), storage_options)
    return files
