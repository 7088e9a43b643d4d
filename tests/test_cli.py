"""The command line: flags are never abbreviated (a mistyped flag is an error, not another flag)."""
from __future__ import annotations

import pytest

from ue_dist.cli import build_parser


@pytest.mark.parametrize("argv, unknown", [
    (["fit", "--method", "em", "--train", "0.5", "TRAIN", "STATE"], "--train"),
    (["protect", "--meth", "em", "SRC", "DST"], "--meth"),
    (["evaluate", "--train", "T", "--test", "U", "--adv", "2/255"], "--adv"),
])
def test_abbreviated_flags_are_refused(argv, unknown, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert unknown in capsys.readouterr().err


def test_full_flags_still_parse():
    args = build_parser().parse_args(["fit", "--method", "em", "--train-fraction", "0.5", "T", "S"])
    assert args.train_fraction == 0.5 and args.train == "T"


# the parsers are derived from ue_dist/options.py: the options every command had before --------
BEFORE = {  # option strings of each command before the declarations moved to options.py
    "convert": "--channels --image-size --json --n --native --overwrite --seed --shard-size "
               "--storage-option --verbose -v",
    "info": "--json --storage-option --verbose -v",
    "fit": "--cpus-per-worker --gpu --json --max-failures --method --overwrite --preset --run-name "
           "--set --storage --storage-option --train-fraction --verbose --workers -v",
    "methods": "--json --verbose -v",
    "defences": "--json --verbose -v",
    "demo": "--json --methods --out --preset --set --storage-option --verbose --victim-preset -v",
    "protect": "--actors --batch-size --cpus-per-actor --fraction --gpus-per-actor --json "
               "--max-polls --method --mode --poll-seconds --preset --seed --set --state "
               "--stop-file --storage-option --verbose --wait-for-lease --watch -v",
    "bayes-error": "--embedding --eps --json --n --plot --sigma --storage-option --toy --verbose "
                   "-v",
    "evaluate": "--adv-eps --adv-method --arch --defense --epochs --gpus --json --preset --ray "
                "--seed --set --storage-option --subset --test --train --verbose -v",
    "sweep": "--check --json --storage --storage-option --verbose -v",
    "run": "--check --json --verbose -v",
}


def _subparsers():
    import argparse

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_before_is_still_accepted():
    subs = _subparsers()
    assert set(BEFORE) <= set(subs)  # commands added since (export, preview) are new
    for name, flags in BEFORE.items():
        have = {s for a in subs[name]._actions for s in a.option_strings}
        assert set(flags.split()) <= have, (name, set(flags.split()) - have)


def test_defaults_are_the_same_as_before():
    args = build_parser().parse_args(["protect", "--method", "em", "S", "D"])
    assert (args.fraction, args.seed, args.actors, args.gpus_per_actor, args.cpus_per_actor,
            args.batch_size, args.mode, args.wait_for_lease, args.poll_seconds, args.preset) == \
        (1.0, 0, 1, 0.0, 0.5, 256, "incremental", 0.0, 30.0, None)  # None: the state's settings
    args = build_parser().parse_args(["fit", "--method", "em", "T", "S"])
    assert (args.workers, args.cpus_per_worker, args.gpus_per_worker, args.max_failures,
            args.train_fraction, args.preset, args.overrides) == (1, 1.0, 0, 0, 1.0, "paper", [])
    args = build_parser().parse_args(["convert", "digits", "OUT"])
    assert (args.n, args.shard_size, args.seed, args.image_size) == (5000, 1000, 0, None)
    args = build_parser().parse_args(["evaluate", "--train", "T", "--test", "U"])
    assert (args.victim_preset, args.subset, args.gpus_per_worker, args.cpus_per_worker) == \
        ("paper", "all", 0.0, 1.0)
    args = build_parser().parse_args(["demo"])
    assert (args.out, args.methods, args.preset, args.victim_preset) == \
        ("out/demo", "em", "quick", "quick")


@pytest.mark.parametrize("old, new", [
    (["fit", "--method", "em", "--gpu", "T", "S"],
     ["fit", "--method", "em", "--gpus-per-worker", "1", "T", "S"]),
    (["evaluate", "--train", "T", "--test", "U", "--gpus", "0.5", "--preset", "quick",
      "--set", "epochs=2", "--set", "lr=0.1"],
     ["evaluate", "--train", "T", "--test", "U", "--gpus-per-worker", "0.5", "--victim-preset",
      "quick", "--victim-set", "epochs=2", "--victim-set", "lr=0.1"]),
    (["demo", "--set", "epochs=2"], ["demo", "--victim-set", "epochs=2"]),
])
def test_deprecated_spellings_work_and_warn_once(old, new, capsys):
    from ue_dist import options

    options._WARNED.clear()
    before, after = build_parser().parse_args(old), build_parser().parse_args(new)
    assert vars(before) == vars(after)
    err = capsys.readouterr().err.strip().splitlines()
    renamed = [s for s in old if s in ("--gpu", "--gpus", "--preset", "--set")]
    assert len(err) == len(set(renamed))  # one line per old spelling, however often it is used
    for line in err:
        assert line.startswith(f"ue-dist {old[0]}: warning: --") and "is deprecated, use --" in line
    build_parser().parse_args(old)
    assert capsys.readouterr().err == ""


def test_deprecated_spellings_are_hidden_and_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--gpus-per-worker" in out and "--gpu " not in out and "--gpu\n" not in out
    assert "(default: 1.0)" in out and "(default: paper)" in out
    assert "example:\n  ue-dist fit --method" in out
    for name in BEFORE:
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        assert f"example:\n  ue-dist {name}" in capsys.readouterr().out, name


def test_set_means_the_method_settings_and_victim_set_the_victim_settings():
    args = build_parser().parse_args(["protect", "--method", "em", "--set", "eps=4/255", "S", "D"])
    assert args.overrides == ["eps=4/255"]
    args = build_parser().parse_args(["evaluate", "--train", "T", "--test", "U",
                                      "--victim-set", "epochs=1"])
    assert args.victim_overrides == ["epochs=1"] and not hasattr(args, "overrides")


# defences: the listing, and evaluate --defense accepts every one of them ----------------------
def test_defences_lists_every_defence_with_kind_parameters_and_paper(capsys):
    import json

    from ue_dist.cli import main
    from ue_dist.core.defenses import DEFENSES, TRAINING_DEFENSES
    assert main(["defences", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(DEFENSES) | set(TRAINING_DEFENSES)
    for name, entry in DEFENSES.items():
        assert out[name] == {"kind": entry.kind, "params": entry.params, "paper": entry.paper,
                             "note": entry.note}
    assert out["bdr"]["params"] == {"bits": 2} and "Image Shortcut Squeezing" in out["bdr"]["paper"]
    assert out["ueraser-max"]["params"]["repeat"] == 5
    assert out["pgd-at"]["kind"] == "training" and "--adv-norm" in out["pgd-at"]["note"]
    assert main(["defences"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["name", "kind", "parameters", "(defaults)", "paper"]
    rows = {line.split()[0]: line.split() for line in text[1:] if line.strip()}
    assert rows["bdr"][1:3] == ["pre", "bits=2"] and rows["ueraser-max"][1] == "loss"
    assert rows["noise"][2] == "eps=0.03137,dist=uniform"


SPECS = {"none": "none", "mean": "mean:size=5", "median": "median",
         "gaussian": "gaussian:sigma=0.8",
         "jpeg": "jpeg:quality=30", "grayscale": "grayscale", "bdr": "bdr:bits=3",
         "mixup": "mixup:alpha=0.5", "cutmix": "cutmix", "cutout": "cutout:size=8",
         "noise": "noise:eps=4/255,dist=gaussian", "ueraser": "ueraser:epochs=10",
         "ueraser-max": "ueraser:max:repeat=5", "ueraser-lite": "ueraser:lite",
         "avatar": "avatar:model=/checkpoints/purifier.pt,t=30,steps=10"}


def _evaluate_settings(monkeypatch, argv):
    """``ue-dist evaluate ARGV``'s victim settings, as handed to the runtime (nothing trains)."""
    from ue_dist.cli import main
    from ue_dist.runtime import evaluate as runtime
    got = {}

    def fake(train, test, settings, *args, **kwargs):
        got.update(settings)
        return {"settings": settings}

    monkeypatch.setattr(runtime, "evaluate", fake)
    code = main(["evaluate", "--train", "T", "--test", "U", "--victim-preset", "quick", "--json",
                 *argv])
    return code, got


def test_evaluate_accepts_every_defence_by_name_with_parameters(monkeypatch, capsys):
    from ue_dist.core.defenses import DEFENSES, parse_defense
    assert set(SPECS) == set(DEFENSES)  # a new defence gets a line here
    for name, spec in SPECS.items():
        for argv in (["--defense", spec], ["--victim-set", f"defense={spec}"]):
            code, settings = _evaluate_settings(monkeypatch, argv)
            assert code == 0 and settings["defense"] == spec, (name, argv)
            assert parse_defense(settings["defense"]).name == name
    capsys.readouterr()
    code, _ = _evaluate_settings(monkeypatch, ["--defense", "ueraser:fast"])
    assert code == 2 and "unknown mode 'fast'" in capsys.readouterr().err
    code, _ = _evaluate_settings(monkeypatch, ["--defense", "pgd-at"])
    assert code == 2 and "--adv-eps" in capsys.readouterr().err


def test_evaluate_reaches_l2_adversarial_training_from_flags(monkeypatch):
    code, s = _evaluate_settings(monkeypatch, ["--adv-eps", "0.5", "--adv-norm", "l2",
                                               "--adv-method", "trades"])
    assert code == 0 and (s["adv_eps"], s["adv_norm"], s["adv_method"]) == (0.5, "l2", "trades")
    code, s = _evaluate_settings(monkeypatch, ["--victim-set", "adv_norm=l2", "--adv-eps", "0.25"])
    assert code == 0 and (s["adv_eps"], s["adv_norm"]) == (0.25, "l2")


def test_methods_lists_kind_norm_year_and_labels(capsys):
    import json

    from ue_dist.cli import main
    from ue_dist.methods.base import method_names

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["method", "kind", "norm", "year", "labels"]
    rows = {line.split()[0]: line.split()[1:5] for line in lines[1:]}
    assert rows["ops"] == ["model-free", "l0", "2023", "yes"]
    assert rows["lsp"][:2] == ["model-free", "l2"] and rows["gue"][3] == "no"
    assert main(["methods", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(method_names()) <= set(out)
    assert out["ar"]["norm"] == "l2" and out["em"]["kind"] == "error-minimising"
    assert out["tap"]["year"] == 2021 and out["gue-at"]["needs_labels"] is False
