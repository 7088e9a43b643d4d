"""Sweep reports from rows alone (no Ray): pivot tables, which figures a sweep gets, the plots."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from ue_dist.runtime.report import pivot_tables, write_report

# where to keep the figures for a look (REPORT_PNG_DIR=/some/folder pytest tests/test_report.py)
KEEP = os.environ.get("REPORT_PNG_DIR")


def _rows(methods=("clean-ish", "em"), fractions=(0.0, 0.5, 1.0), radii=(0.0,),
          archs=("small-cnn",), seeds=(0, 1), epochs=4):
    rng = np.random.default_rng(0)
    rows = []
    for m in methods:
        for f in fractions:
            for eps in radii:
                for arch in archs:
                    for seed in seeds:
                        acc = 0.9 - (0.6 * f if m == "em" else 0.05 * f) + 0.3 * eps * 255 / 8 * f
                        acc = float(np.clip(acc + rng.normal(0, 0.02), 0, 1))
                        per_epoch = [{"epoch": e + 1, "test_acc": acc * (e + 1) / epochs,
                                      "train_acc": min(1.0, 0.5 + 0.15 * e)}
                                     for e in range(epochs)]
                        rows.append({"method": m, "fraction": f, "subset": "all", "arch": arch,
                                     "adv_eps": eps, "defense": "none", "seed": seed,
                                     "test_acc": acc, "best_acc": acc + 0.01,
                                     "per_epoch": per_epoch})
    return rows


def _look(files, tmp_path):
    for name, path in files.items():
        if path.endswith(".png"):
            with Image.open(path) as img:
                assert img.size[0] > 200 and img.size[1] > 200, name
            if KEEP:
                os.makedirs(KEEP, exist_ok=True)
                os.replace(path, os.path.join(KEEP, os.path.basename(path)))


def test_pivot_is_mean_and_std_over_seeds():
    rows = _rows(fractions=(1.0,), radii=(0.0, 2 / 255), seeds=(0, 1, 2))
    pivots = pivot_tables(rows)
    mean, std, n = (pivots["test_acc"][k] for k in ("mean", "std", "n"))
    for (method, fraction, subset), row in mean.iterrows():
        for (arch, eps, defense), value in row.items():
            accs = [r["test_acc"] for r in rows if r["method"] == method
                    and math.isclose(r["adv_eps"] * 255, eps)]
            assert value == pytest.approx(np.mean(accs))
            assert std.loc[(method, fraction, subset), (arch, eps, defense)] == \
                pytest.approx(np.std(accs, ddof=1))
            assert n.loc[(method, fraction, subset), (arch, eps, defense)] == 3
    assert sorted({eps for _, eps, _ in mean.columns}) == [0.0, 2.0]  # radii in 1/255
    text = pivots["test_acc"]["text"]
    cell = text.loc[("em", 1.0, "all"), ("small-cnn", 0.0, "none")]
    assert "±" in cell and float(cell.split(" ± ")[0]) == pytest.approx(
        100 * mean.loc[("em", 1.0, "all"), ("small-cnn", 0.0, "none")], abs=0.05)
    assert "best_acc" in pivots


def test_fraction_only_sweep_gets_no_radius_or_architecture_panels(tmp_path):
    files = write_report(str(tmp_path), _rows())
    assert {"csv", "markdown", "pivot", "summary_csv", "accuracy_vs_fraction",
            "accuracy_vs_epoch"} <= set(files)
    assert "accuracy_vs_radius" not in files and "architectures" not in files
    pivot = open(files["pivot"]).read()
    assert "| em | 0.5 | all |" in pivot and "Best-epoch" in pivot
    assert "best_acc" in open(files["csv"]).read().splitlines()[0]
    import pandas as pd
    summary = pd.read_csv(files["summary_csv"])
    assert len(summary) == 2 * 3 and set(summary["seeds"]) == {2}
    em = summary[(summary["method"] == "em") & (summary["fraction"] == 1.0)].iloc[0]
    accs = [r["test_acc"] for r in _rows() if r["method"] == "em" and r["fraction"] == 1.0]
    assert em["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert em["best_acc_mean"] == pytest.approx(np.mean(accs) + 0.01)
    _look(files, tmp_path)


def test_radius_and_architecture_sweep_gets_their_plots_not_a_one_point_fraction_plot(tmp_path):
    rows = _rows(fractions=(1.0,), radii=(0.0, 2 / 255, 4 / 255), archs=("small-cnn", "resnet18"))
    files = write_report(str(tmp_path), rows)
    assert {"accuracy_vs_radius", "architectures", "accuracy_vs_epoch"} <= set(files)
    assert "accuracy_vs_fraction" not in files  # one fraction: a panel of single points
    _look(files, tmp_path)


def test_pivot_leaves_out_rows_the_grid_never_filled():
    # a sweep trains fraction 0 once, under its first method's name: the other methods'
    # fraction-0 rows have no trial and no line in the table
    rows = [r for r in _rows(methods=("lsp", "em"), fractions=(0.0, 1.0))
            if not (r["method"] == "em" and r["fraction"] == 0.0)]
    pivots = pivot_tables(rows)
    for value in ("test_acc", "best_acc"):
        assert list(pivots[value]["mean"].index) == [("em", 1.0, "all"), ("lsp", 0.0, "all"),
                                                     ("lsp", 1.0, "all")]
