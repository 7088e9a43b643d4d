import math

import pytest
import torch

from helpers import KeepStates
from ue_dist.core.config import SettingsError
from ue_dist.core.context import LocalContext
from ue_dist.core.victim import (VICTIM_PRESETS, check_compatible, resolve_victim_settings,
                                 select_subset, train_victim)
from ue_dist.data.imageset import ImageSet
from ue_dist.data.sources import digits_imageset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return digits_imageset("train"), digits_imageset("test")


def _small(ds, n, step=1):
    return ds.subset(list(range(0, n * step, step)))


def quiet():
    return LocalContext(device="cpu", log=lambda m: None)


def test_presets_have_the_documented_keys():
    need = {"arch", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "augment",
            "adv_eps", "adv_method", "adv_steps", "adv_step_size", "trades_beta", "defense", "seed",
            "eval_robust"}
    for preset in VICTIM_PRESETS.values():
        assert need <= set(preset)
    paper = VICTIM_PRESETS["paper"]
    assert (paper["arch"], paper["lr"], paper["momentum"], paper["weight_decay"], paper["schedule"],
            paper["batch_size"], paper["epochs"]) == ("resnet18", 0.1, 0.9, 5e-4, "cosine", 128, 100)


def test_paper_and_quick_presets_keep_their_values():
    # the per-paper presets added settings; `paper` and `quick` train exactly as before them
    added = {"iterations": 0, "adv_norm": "linf", "adv_step_frac": 0.25, "adv_lr": None}
    common = {"momentum": 0.9, "weight_decay": 5e-4, "milestones": [0.5, 0.75], "augment": True,
              "adv_eps": 0.0, "adv_method": "pgd", "adv_steps": 10, "adv_step_size": None,
              "trades_beta": 6.0, "defense": "none", "seed": 0, "eval_robust": True,
              "eval_eps": None, "eval_steps": 20, "eval_batch_size": 500, "precision": "auto"}
    assert VICTIM_PRESETS["paper"] == {**common, **added, "arch": "resnet18", "epochs": 100,
                                       "batch_size": 128, "lr": 0.1, "schedule": "cosine"}
    assert VICTIM_PRESETS["quick"] == {**common, **added, "arch": "small-cnn", "epochs": 8,
                                       "batch_size": 64, "lr": 0.05, "schedule": "cosine",
                                       "adv_steps": 5, "eval_steps": 10}
    # settings stored before the new ones existed still validate, as they trained
    old = {k: v for k, v in resolve_victim_settings("paper").items() if k not in added}
    assert resolve_victim_settings("paper") == {**old, **added}
    from ue_dist.core.victim import validate_victim_settings
    assert validate_victim_settings(old) == {**old, **added}


def test_each_papers_victim_preset_resolves_to_its_figures():
    rem, gue, bayes = (resolve_victim_settings(p) for p in ("rem", "gue", "bayes"))
    # REM App. A.4: 40,000 iterations, batch 128, SGD 0.1/0.9/5e-4, x0.1 every 16,000; 10 PGD
    # steps of rho_a / 5
    assert (rem["iterations"], rem["epochs"], rem["batch_size"], rem["lr"], rem["momentum"],
            rem["weight_decay"], rem["schedule"]) == (40000, 0, 128, 0.1, 0.9, 5e-4, "step")
    assert [round(m * 40000) for m in rem["milestones"]] == [16000, 32000]
    assert (rem["adv_steps"], rem["adv_step_frac"], rem["adv_method"]) == (10, 0.2, "pgd")
    # GUE: 100 epochs, lr 0.01 (0.1 adversarial), x0.1 at epochs 75 and 90, 10 steps of eps/4
    assert (gue["epochs"], gue["lr"], gue["adv_lr"], gue["momentum"], gue["weight_decay"],
            gue["schedule"]) == (100, 0.01, 0.1, 0.9, 5e-4, "step")
    assert [round(m * 100) for m in gue["milestones"]] == [75, 90]
    assert (gue["adv_steps"], gue["adv_step_frac"], gue["trades_beta"]) == (10, 0.25, 1.0)
    assert gue["batch_size"] == 256  # the authors' evaluation.py
    # Bayes-error paper: 100 epochs, SGD 0.1/0.9/5e-4, cosine
    assert (bayes["epochs"], bayes["lr"], bayes["momentum"], bayes["weight_decay"],
            bayes["schedule"], bayes["iterations"]) == (100, 0.1, 0.9, 5e-4, "cosine", 0)
    # one run length: a preset counted in iterations refuses epochs as well
    with pytest.raises(SettingsError, match="iterations=40000 and epochs=5"):
        resolve_victim_settings("rem", ["epochs=5"])
    assert resolve_victim_settings("rem", ["epochs=5", "iterations=0"])["epochs"] == 5


def test_victim_preset_choices_come_from_the_presets():
    from ue_dist import options as opts
    from ue_dist.cli import build_parser

    assert tuple(opts.VICTIM_PRESET.valid_choices()) == tuple(VICTIM_PRESETS)
    assert {"rem", "gue", "bayes"} <= set(VICTIM_PRESETS)
    # method presets are their own list (no victim preset leaks into them)
    assert tuple(opts.PRESET.valid_choices()) == ("paper", "quick", "imagenet")
    args = build_parser().parse_args(["evaluate", "--train", "a", "--test", "b",
                                      "--victim-preset", "rem"])
    assert args.victim_preset == "rem"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--method", "em", "a", "b", "--preset", "rem"])
    for spec in ("SWEEP_SPEC",):
        sweep_opt = opts.option(getattr(opts, spec), "victim_preset")
        assert opts.check_value("gue", sweep_opt, "victim_preset", SettingsError) == "gue"
        with pytest.raises(SettingsError, match="bayes"):
            opts.check_value("nope", sweep_opt, "victim_preset", SettingsError)


def test_a_victim_counted_in_iterations_steps_its_schedule_per_iteration(digits):
    train, test = _small(digits[0], 128), _small(digits[1], 40)
    # 128 samples, batch 32: 4 steps a pass; 10 iterations = passes of 4, 4 and 2 steps;
    # lr x0.1 at iteration 5 (milestone 0.5)
    s = resolve_victim_settings("quick", {"epochs": 0, "iterations": 10, "batch_size": 32,
                                          "schedule": "step", "milestones": [0.5]})

    ctx = KeepStates()
    out = train_victim(train, test, s, ctx)
    assert [r["step"] for r in out["per_epoch"]] == [4, 8, 10]
    assert [r["epoch"] for r in out["per_epoch"]] == [1, 2, 3]
    assert [r["lr"] for r in out["per_epoch"]] == pytest.approx([0.05, 0.005, 0.005])
    # resumed after the first pass, the rest comes out identical
    resumed = quiet()
    resumed.last_state = ctx.states[0]
    again = train_victim(train, test, s, resumed)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(again["per_epoch"]) == strip(out["per_epoch"])


def test_adversarial_step_learning_rate_and_norm_come_from_the_settings(digits, monkeypatch):
    import ue_dist.core.victim as victim

    seen = {}
    real_examples, real_robust = victim.adversarial_examples, victim.robust_accuracy

    def examples(*a, **kw):
        seen.setdefault("attack", (kw["step_size"], kw["norm"]))
        return real_examples(*a, **kw)

    def robust(*a, **kw):
        if kw["eps"] > 0:  # the clean per-epoch evaluation has eps 0
            seen.setdefault("eval", (kw["eps"], kw["norm"]))
        return real_robust(*a, **kw)

    monkeypatch.setattr(victim, "adversarial_examples", examples)
    monkeypatch.setattr(victim, "robust_accuracy", robust)
    train, test = _small(digits[0], 64), _small(digits[1], 20)
    # the GUE preset's adversarial learning rate (0.1, not its standard 0.01), REM's rho_a / 5
    # and an L2 ball of radius 2 (valid only as an L2 radius)
    s = resolve_victim_settings("gue", {"arch": "small-cnn", "epochs": 1, "adv_eps": 2.0,
                                        "adv_norm": "l2", "adv_step_frac": 0.2, "adv_steps": 1,
                                        "eval_steps": 1, "batch_size": 32})
    out = train_victim(train, test, s, quiet())
    assert out["per_epoch"][0]["lr"] == pytest.approx(0.1)
    assert seen["attack"] == (pytest.approx(0.4), "l2")
    assert seen["eval"] == (2.0, "l2") and out["robust_eps"] == 2.0
    standard = train_victim(train, test, {**s, "adv_eps": 0.0}, quiet())
    assert standard["per_epoch"][0]["lr"] == pytest.approx(0.01)
    with pytest.raises(SettingsError, match="adv_eps"):
        resolve_victim_settings("paper", {"adv_eps": 2.0})  # an L-inf radius must be <= 1


def test_clean_digits_victim_learns(digits):
    train, test = _small(digits[0], 718, step=2), digits[1]
    s = resolve_victim_settings("quick", {"epochs": 3, "augment": False, "batch_size": 32})
    out = train_victim(train, test, s, quiet())
    assert len(out["per_epoch"]) == 3
    assert {"epoch", "test_acc", "train_loss", "train_acc"} <= set(out["per_epoch"][0])
    assert out["per_epoch"][-1]["train_loss"] < out["per_epoch"][0]["train_loss"]
    assert out["test_acc"] > 0.85, out["per_epoch"]
    assert out["robust_acc"] is None  # standard training, no eval_eps
    assert out["images_per_s"] > 0


def test_deterministic_for_a_seed_and_resumes_exactly(digits):
    train, test = _small(digits[0], 256), _small(digits[1], 100)
    s = resolve_victim_settings("quick", {"epochs": 2, "batch_size": 32, "defense": "cutout"})

    ctx = KeepStates()
    a = train_victim(train, test, s, ctx)
    b = train_victim(train, test, s, quiet())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(a["per_epoch"]) == strip(b["per_epoch"])
    # resume from the epoch-1 checkpoint: the second epoch comes out identical
    resumed = quiet()
    resumed.last_state = ctx.states[0]
    seen = []
    c = train_victim(train, test, s, resumed, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [2]
    assert strip(c["per_epoch"]) == strip(a["per_epoch"])
    # another victim on the same context does not pick up the first one's checkpoint
    fresh = []
    other = train_victim(train, test, {**s, "seed": 1}, ctx, on_epoch=fresh.append)
    assert [r["epoch"] for r in fresh] == [1, 2]
    assert strip(other["per_epoch"]) != strip(a["per_epoch"])
    # nor does a victim on other pixels under the same keys and labels (a protected copy)
    altered = ImageSet(255 - train.images, train.labels, train.keys, num_classes=train.num_classes)
    fresh.clear()
    train_victim(altered, test, s, ctx, on_epoch=fresh.append)
    assert [r["epoch"] for r in fresh] == [1, 2]


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_runs_and_reports_robust_accuracy(digits, method):
    train, test = _small(digits[0], 128), _small(digits[1], 60)
    s = resolve_victim_settings("quick", {"epochs": 1, "adv_eps": "8/255", "adv_method": method,
                                          "adv_steps": 2, "eval_steps": 3})
    out = train_victim(train, test, s, quiet())
    assert out["robust_eps"] == pytest.approx(8 / 255)
    assert 0.0 <= out["robust_acc"] <= 1.0
    assert math.isfinite(out["per_epoch"][0]["train_loss"])


@pytest.mark.parametrize("defense", ["mixup", "cutmix", "median", "jpeg:quality=50", "grayscale",
                                     "bdr", "noise:eps=8/255", "ueraser:lite",
                                     "ueraser:max:repeat=2"])
def test_training_with_each_defense_runs(digits, defense):
    train, test = _small(digits[0], 96), _small(digits[1], 40)
    s = resolve_victim_settings("quick", {"epochs": 1, "defense": defense})
    out = train_victim(train, test, s, quiet())
    assert math.isfinite(out["per_epoch"][0]["train_loss"])


def test_a_loss_defence_owns_the_step_and_sees_the_epoch(digits, monkeypatch):
    from ue_dist.core import defenses
    seen = []
    call = defenses.UEraserLoss.__call__

    def spy(self, net, x, y, generator, epoch=0):
        seen.append((epoch, self.views(epoch), tuple(x.shape)))
        return call(self, net, x, y, generator, epoch)

    monkeypatch.setattr(defenses.UEraserLoss, "__call__", spy)
    train, test = _small(digits[0], 64), _small(digits[1], 20)
    s = resolve_victim_settings("quick", {"epochs": 2, "batch_size": 32,
                                          "defense": "ueraser:repeat=2,epochs=1"})
    first = train_victim(train, test, s, quiet())
    # 2 steps per epoch; the max over 2 views in epoch 0, one view after `epochs` = 1
    assert [(e, v) for e, v, _ in seen] == [(0, 2), (0, 2), (1, 1), (1, 1)]
    assert all(shape == (32, 3, 32, 32) for _, _, shape in seen)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    ctx = KeepStates()
    again = train_victim(train, test, s, ctx)  # seeded: kornia's draws too
    assert strip(again["per_epoch"]) == strip(first["per_epoch"])
    # resumed from the epoch-1 checkpoint: the second epoch (one view) comes out identical
    resumed = quiet()
    resumed.last_state = ctx.states[0]
    seen.clear()
    third = train_victim(train, test, s, resumed)
    assert [(e, v) for e, v, _ in seen] == [(1, 1), (1, 1)]
    assert strip(third["per_epoch"]) == strip(first["per_epoch"])
    with pytest.raises(SettingsError, match="owns the training loss"):
        resolve_victim_settings("quick", {"defense": "ueraser:max", "adv_eps": "2/255"})


def test_select_subset():
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    meta = [{"protected": p} for p in (True, False, True, False, False)]
    ds = ImageSet(images, torch.arange(5) % 2, meta=meta)
    assert len(select_subset(ds, "all")) == 5
    assert select_subset(ds, "clean").keys == [ds.keys[i] for i in (1, 3, 4)]
    assert select_subset(ds, "protected").keys == [ds.keys[i] for i in (0, 2)]
    plain = ImageSet(images, torch.arange(5) % 2)  # no flags: everything counts as clean
    assert len(select_subset(plain, "clean")) == 5 and len(select_subset(plain, "protected")) == 0
    with pytest.raises(SettingsError, match="valid: all, clean, protected"):
        select_subset(ds, "dirty")


def test_bad_input_is_a_clear_error(digits):
    train, test = _small(digits[0], 50), _small(digits[1], 20)
    with pytest.raises(SettingsError, match="unknown architecture 'resnet19'.*valid: .*small-cnn"):
        resolve_victim_settings("quick", {"arch": "resnet19"})
    with pytest.raises(SettingsError, match="unknown defense 'blur'.*valid: .*median"):
        resolve_victim_settings("quick", {"defense": "blur"})
    with pytest.raises(SettingsError, match="unknown setting 'epoch'.*valid: .*epochs"):
        resolve_victim_settings("quick", ["epoch=3"])
    with pytest.raises(SettingsError, match="adv_method for victim must be one of pgd, trades"):
        resolve_victim_settings("quick", {"adv_method": "fgsm"})
    with pytest.raises(SettingsError, match="unknown preset"):
        resolve_victim_settings("fast")
    s = resolve_victim_settings("quick", {"epochs": 1})
    only_small = train.subset([i for i in range(len(train)) if train.labels[i] < 5])
    with pytest.raises(SettingsError, match=r"label\(s\) \[5, 6, 7, 8, 9\] that the training set lacks"):
        check_compatible(only_small, test)
    tiny = digits_imageset("test", image_size=16)
    with pytest.raises(SettingsError, match=r"shape \[3, 16, 16\].*\[3, 32, 32\]"):
        train_victim(train, tiny, s, quiet())
    with pytest.raises(SettingsError, match="empty"):
        train_victim(train.subset([]), test, s, quiet())


@pytest.mark.slow
def test_adversarial_training_trades_clean_for_robust_accuracy(digits):
    """PGD-AT and TRADES at 8/255 vs standard training: robust accuracy under PGD-20 rises."""
    train, test = digits
    results = {}
    for name, over in {"standard": {}, "pgd": {"adv_eps": "8/255"},
                       "trades": {"adv_eps": "8/255", "adv_method": "trades"}}.items():
        s = resolve_victim_settings("quick", {"epochs": 10, "eval_eps": "8/255", "eval_steps": 20,
                                              **over})
        results[name] = train_victim(train, test, s, quiet())
        print(name, results[name]["test_acc"], results[name]["robust_acc"])
    std = results["standard"]
    for name in ("pgd", "trades"):
        assert results[name]["robust_acc"] > std["robust_acc"] + 0.15
        assert results[name]["test_acc"] > 0.6


def _ddp_worker(rank, world, port, out_dir):
    import json
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        train = digits_imageset("train").subset(range(101))  # odd size: uneven shards
        test = digits_imageset("test").subset(range(40))
        s = resolve_victim_settings("quick", {"epochs": 2, "batch_size": 32, "adv_eps": "4/255",
                                              "adv_steps": 1, "eval_steps": 1})
        out = train_victim(train, test, s, LocalContext(device="cpu", log=lambda m: None))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"per_epoch": [{k: v for k, v in r.items() if k != "seconds"}
                                     for r in out["per_epoch"]],
                       "robust_acc": out["robust_acc"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s idle, minutes on a loaded machine
def test_two_worker_ddp_training_agrees_across_ranks(tmp_path):
    """Two gloo workers (uneven shards) train one victim: every rank reports the same figures."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0["per_epoch"]) == 2
    assert [e["test_acc"] for e in r0["per_epoch"]] == [e["test_acc"] for e in r1["per_epoch"]]
    assert r0["robust_acc"] == r1["robust_acc"]
    assert r0["per_epoch"][-1]["train_loss"] == pytest.approx(r1["per_epoch"][-1]["train_loss"])
