"""The demo's steps end to end on a few hundred digits: convert, fit (Ray Train), protect
(Ray Data), victims on clean and protected data, figures."""
from __future__ import annotations

import json

import numpy as np

from ue_dist.data.dataset import dataset_info, load_imageset


def test_demo_steps_on_a_few_hundred_samples(tmp_path, ray_local):
    from ue_dist.runtime.demo import demo_text, run_demo

    out = str(tmp_path / "demo")
    # a short EM fit (20 steps, 2 PGD steps of eps/2 that still reach the bound) keeps the test
    # about the demo's plumbing, not the cost of EM's inner loop
    em = ["train_steps=20", "steps_u=2", "step_frac_u=0.5"]
    summary = run_demo(out, ["em"], max_train=300, method_overrides={"em": em},
                       victim_overrides=["epochs=2"], progress=lambda m: None)
    assert set(summary["test_accuracy"]) == {"clean", "em"}
    for acc in summary["test_accuracy"].values():
        assert 0.0 <= acc <= 1.0
    info = dataset_info(summary["protected"]["em"])
    assert info["samples"] == 300 and info["protected"] == 300
    clean = load_imageset(f"{out}/data/train")
    prot = load_imageset(summary["protected"]["em"])
    order = {k: i for i, k in enumerate(prot.keys)}
    idx = [order[k] for k in clean.keys]
    diff = np.abs(prot.images[idx].numpy().astype(int) - clean.images.numpy().astype(int))
    assert diff.max() == 8 and diff.mean() > 1.0  # within 8/255, reaching it, really perturbed
    assert (prot.labels[idx] == clean.labels).all()
    for plot in summary["plots"]:
        with open(plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(f"{out}/demo.json"))["test_accuracy"] == summary["test_accuracy"]
    assert "trained on em-protected data" in demo_text(summary)
