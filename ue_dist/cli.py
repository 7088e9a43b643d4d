"""``ue-dist``: thin command line. Each command validates its options and calls one runtime function.

Commands that compute figures print them as one JSON object with ``--json``; commands that fit or
train take ``--preset paper|quick`` and ``--set key=value`` and print the settings they used.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None],
                      Callable[[argparse.Namespace], int | None]]] = []


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``ue-dist NAME``: ``configure`` adds its options, the decorated function runs it."""
    def wrap(run: Callable[[argparse.Namespace], int | None]):
        _COMMANDS.append((name, help, configure, run))
        return run
    return wrap


# shared option groups --------------------------------------------------------------------------
def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for every URL (repeatable), e.g. "
                        "endpoint_url=http://127.0.0.1:9000 or anon=true; S3 credentials come "
                        "from the standard AWS variables, profiles or roles")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def add_settings(p: argparse.ArgumentParser) -> None:
    from ue_dist.core.config import PRESETS
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: the papers' settings (default); quick: sized to try on a laptop CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable); unknown keys are an error")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    from ue_dist.data.storage import parse_storage_options
    return parse_storage_options(getattr(args, "storage_option", []))


def emit(args: argparse.Namespace, result: dict[str, Any], text: Callable[[dict], str] | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        print(text(result) if text else json.dumps(result, indent=2, sort_keys=True, default=str))


def print_settings(what: str, settings: dict[str, Any]) -> None:
    """Settings go to stderr so that ``--json`` output stays one object on stdout."""
    print(f"[ue-dist] {what} settings: " + json.dumps(settings, sort_keys=True, default=str),
          file=sys.stderr, flush=True)


# ============================================================================================
# Commands. Each block registers one command; keep blocks small: parse, validate, call runtime.
# ============================================================================================

# --- convert, info (data layer) ---------------------------------------------------------------
def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="digits | synthetic | cifar10 | cifar100 | imagefolder | numpy | "
                        "fashion-mnist | idx")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="digits/synthetic: OUT; cifar10/cifar100/imagefolder: PATH OUT; "
                        "numpy: X.npy Y.npy OUT; fashion-mnist: [DIR] OUT (DIR, any fsspec URL, "
                        "holds the four IDX files; default: where `apt-get install "
                        "dataset-fashion-mnist` puts them, /usr/share/datasets/fashion-mnist); "
                        "idx: IMAGES LABELS [TEST_IMAGES TEST_LABELS] OUT (MNIST-format files, "
                        ".gz or not; one pair is split like numpy). Writes OUT/train and OUT/test")
    p.add_argument("--n", type=int, default=5000, help="synthetic: number of samples (default 5000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to SIZE x SIZE (digits, fashion-mnist, idx default 32; "
                        "others keep their size)")
    p.add_argument("--native", action="store_true",
                   help="keep the original size: digits 8x8 (3 channels), fashion-mnist/idx "
                        "28x28x1 grayscale. Without it these grayscale sources become 32x32x3, "
                        "the CIFAR shape every victim and method expects")
    p.add_argument("--channels", type=int, default=None, metavar="{1,3}",
                   help="digits, fashion-mnist, idx: 1 (grayscale) or 3 (gray repeated; "
                        "default, 1 with --native for fashion-mnist/idx)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    add_storage_options(p)
    add_json(p)


@command("convert", "Convert a dataset into WebDataset shards: OUT/train and OUT/test.",
         _configure_convert)
def _convert(args: argparse.Namespace) -> int:
    from ue_dist.runtime.data_jobs import convert
    result = convert(args.source, args.paths, n=args.n, image_size=args.image_size,
                     native=args.native, channels=args.channels, shard_size=args.shard_size,
                     seed=args.seed, overwrite=args.overwrite,
                     storage_options=storage_options(args))
    emit(args, result, lambda r: "\n".join(
        f"{split}: {r[split]['samples']} samples in {r[split]['shards']} shard(s) -> {r[split]['url']}"
        for split in ("train", "test") if split in r))
    return 0


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="a folder of shards (e.g. OUT/train), any fsspec URL")
    add_storage_options(p)
    add_json(p)


def _info_text(r: dict) -> str:
    hist = ", ".join(f"{k}:{v}" for k, v in r["label_histogram"].items())
    return (f"{r['url']}\n  shards: {r['shards']}\n  samples: {r['samples']}\n"
            f"  image shape (H, W, C): {tuple(r['image_shape'])}\n  labels: {hist}\n"
            f"  protected: {r['protected']} {r['protected_by_method'] or ''}")


@command("info", "Describe a folder of shards: shards, samples, image shape, labels, protected count.",
         _configure_info)
def _info(args: argparse.Namespace) -> int:
    from ue_dist.data.dataset import dataset_info
    emit(args, dataset_info(args.url, storage_options(args)), _info_text)
    return 0

# --- fit, protect (runtime) -------------------------------------------------------------------
def _method_choices() -> str:
    from ue_dist.methods import method_names
    return ", ".join(method_names())


def _configure_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="method to fit (see `ue-dist methods`)")
    p.add_argument("train", metavar="TRAIN_URL", help="clean training shards, e.g. OUT/train")
    p.add_argument("state", metavar="STATE_URL", help="where to write the fitted state (.pt)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP), default 1")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs per worker; fractions share a small machine (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--storage", default=None,
                   help="run storage for checkpoints (default $UE_DIST_STORAGE or ./runs)")
    p.add_argument("--run-name", default=None,
                   help="run name; rerunning with the same name resumes from its last checkpoint "
                        "(default: derived from method, data, state URL and settings)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="worker failures to survive by restarting from the last checkpoint")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="fit on a seeded fraction of TRAIN_URL (the rest is never seen)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STATE_URL")
    add_settings(p)
    add_storage_options(p)
    add_json(p)


@command("fit", "Fit a method (source model, generator or embedding) on Ray Train; write its state.",
         _configure_fit)
def _fit(args: argparse.Namespace) -> int:
    from ue_dist.methods import build_method
    from ue_dist.runtime.train import fit_method
    method = build_method(args.method, args.preset, args.overrides)
    print_settings(f"fit {args.method} ({args.preset})", method.settings)
    result = fit_method(args.method, args.train, args.state, preset=args.preset,
                        overrides=args.overrides, num_workers=args.workers,
                        use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                        storage_path=args.storage, run_name=args.run_name,
                        storage_options=storage_options(args), max_failures=args.max_failures,
                        train_fraction=args.train_fraction, overwrite=args.overwrite,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    result["settings"] = method.settings
    emit(args, result)
    return 0


@command("methods", "List the registered protection methods with their paper and settings.",
         lambda p: add_json(p))
def _methods(args: argparse.Namespace) -> int:
    from ue_dist.methods import get_method, method_names
    out = {name: {"paper": get_method(name).paper, "needs_fit": get_method(name).needs_fit,
                  "presets": get_method(name).presets} for name in method_names()}
    emit(args, out, lambda r: "\n".join(f"{k:10s} {v['paper']}" for k, v in r.items()))
    return 0

def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder or URL (default out/demo)")
    p.add_argument("--methods", default="em",
                   help="comma-separated methods to demonstrate (default: em)")
    from ue_dist.core.config import PRESETS
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="method settings (default quick: minutes on a laptop CPU)")
    p.add_argument("--victim-preset", choices=PRESETS, default="quick")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one victim setting (repeatable)")
    add_storage_options(p)
    add_json(p)


@command("demo", "The main job on the embedded default: convert digits, fit, protect on Ray, "
         "train victims on clean and protected data, print accuracies, write plots.", _configure_demo)
def _demo(args: argparse.Namespace) -> int:
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.runtime.demo import demo_text, run_demo
    print_settings("victim", resolve_victim_settings(args.victim_preset, args.overrides))
    summary = run_demo(args.out, [m for m in args.methods.split(",") if m], preset=args.preset,
                       victim_preset=args.victim_preset, victim_overrides=args.overrides,
                       storage_options=storage_options(args),
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    emit(args, summary, demo_text)
    return 0


# protect
def _protect_options(p: argparse.ArgumentParser) -> None:
    from ue_dist.runtime.protect import MODES
    p.add_argument("src", metavar="SRC", help="folder/prefix of input shards (*.tar), any fsspec URL")
    p.add_argument("dst", metavar="DST", help="output prefix (not inside SRC); a ledger in "
                                              "DST/_ledger records the committed shards")
    p.add_argument("--method", required=True, help="method name (see `ue-dist fit --help`)")
    p.add_argument("--state", default=None, metavar="URL", help="fitted state from `ue-dist fit`")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="fraction of samples to protect, chosen per key with --seed (default 1)")
    p.add_argument("--seed", type=int, default=0, help="selection and perturbation seed")
    p.add_argument("--actors", type=int, default=1, help="Ray Data actors (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5,
                   help="CPUs per actor, fractional allowed (default 0.5)")
    p.add_argument("--batch-size", type=int, default=256, help="images per perturb call")
    p.add_argument("--mode", choices=MODES, default="incremental",
                   help="incremental (default): skip shards the ledger says are done and whose "
                        "source is unchanged; overwrite: redo every shard; sync: incremental, "
                        "and remove outputs whose source shard is gone")
    p.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                   help="if another run is writing DST, wait up to SECONDS for it (default 0: "
                        "refuse at once)")
    p.add_argument("--watch", action="store_true",
                   help="keep listing SRC and protect new shards as they land (Ctrl-C to stop)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="listing interval with --watch")
    p.add_argument("--max-polls", type=int, default=None, help="stop --watch after N listings")
    p.add_argument("--stop-file", default=None, metavar="URL",
                   help="stop --watch once this file exists")
    add_settings(p)
    add_storage_options(p)
    add_json(p)


@command("protect", "Protect every shard of SRC into DST on Ray Data (resumable, --watch for new "
                    "shards). Exit status 3 when some shards were unreadable and skipped.",
         _protect_options)
def _protect_cmd(args: argparse.Namespace) -> int:
    from ue_dist.runtime.protect import protect

    summary = protect(args.method, args.src, args.dst, state_url=args.state, preset=args.preset,
                      overrides=args.overrides, fraction=args.fraction, seed=args.seed,
                      actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                      cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                      mode=args.mode, watch=args.watch, poll_seconds=args.poll_seconds,
                      max_polls=args.max_polls, stop_file=args.stop_file,
                      storage_options=storage_options(args), wait_for_lease=args.wait_for_lease,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    emit(args, summary)
    if summary["bad_shards"]:
        print(f"ue-dist protect: {len(summary['bad_shards'])} bad shard(s) skipped: " + ", ".join(
            f"{b['shard']} ({b['reason']})" for b in summary["bad_shards"]), file=sys.stderr)
        return 3
    return 0


# --- bayes-error (Bayes method) ---------------------------------------------------------------
def _configure_bayes_error(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", nargs="?", default=None,
                   help="a folder of shards (e.g. OUT/train); omit with --toy")
    p.add_argument("--embedding", metavar="STATE", default=None,
                   help="a fitted bayes state: estimate in its embedding space (default: raw pixels)")
    p.add_argument("--toy", choices=["gaussians", "moons"], default=None,
                   help="gaussians: two 1-D Gaussians vs the analytic Phi(-1); moons: before/after "
                        "Algorithm 2")
    p.add_argument("--n", type=int, default=None, help="toy sample count (gaussians 4000, moons 200)")
    p.add_argument("--eps", default=None, help="moons: L-inf radius of the ascent (default 0.25)")
    p.add_argument("--sigma", default=None,
                   help="kernel bandwidth (default: median distance to the sqrt(n)-th neighbour)")
    add_storage_options(p)
    add_json(p)


def _bayes_error_text(r: dict) -> str:
    if r.get("toy") == "gaussians":
        return (f"gaussians n={r['n']} sigma={r['sigma']:.4g}: estimate {r['estimate']:.4f}, "
                f"analytic Phi(-1) = {r['analytic']:.4f} (|diff| {r['abs_error']:.4f})")
    if r.get("toy") == "moons":
        return (f"moons n={r['n']} eps={r['eps']:.4g} sigma={r['sigma']:.4g}: before {r['before']:.4f}, "
                f"after {r['after']:.4f} (+{100 * r['relative_increase']:.1f}%, "
                f"{'monotone' if r['monotone'] else 'NOT monotone'} over {r['steps']} steps)")
    text = (f"{r['source']} ({r['space']}, n={r['n']}, d={r['dim']}, sigma={r['sigma']:.4g}): "
            f"Bayes error {r['bayes_error']:.4f}")
    if "bayes_error_protected_rows" in r:
        text += (f"; protected rows {r['bayes_error_protected_rows']:.4f}, clean rows "
                 f"{r['bayes_error_clean_rows']:.4f}")
    return text


@command("bayes-error", "Estimate the Bayes error (local posterior averaging) of a dataset or a toy "
         "problem.", _configure_bayes_error)
def _bayes_error(args: argparse.Namespace) -> int:
    from ue_dist.runtime.bayes_joint import bayes_error_report
    result = bayes_error_report(args.url, embedding=args.embedding, toy=args.toy, n=args.n,
                                eps=args.eps, sigma=args.sigma, storage_options=storage_options(args))
    emit(args, result, _bayes_error_text)
    return 0


# --- evaluate, sweep (victims) ----------------------------------------------------------------
def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, metavar="URL", help="training shards (may be partly protected)")
    p.add_argument("--test", required=True, metavar="URL", help="clean test shards")
    p.add_argument("--arch", help="victim architecture (default: the preset's), e.g. small-cnn, "
                                  "resnet18, vgg16, densenet121, mobilenetv2, wrn-34-10")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--adv-eps", metavar="R", help="adversarial-training radius, e.g. 8/255 (0 = standard)")
    p.add_argument("--adv-method", choices=["pgd", "trades"], help="adversarial loss (default pgd)")
    p.add_argument("--defense", help="training-data defence: none, mixup, cutout, cutmix, mean, "
                                     "median, gaussian, jpeg[:quality=Q], grayscale")
    p.add_argument("--seed", type=int, help="victim seed (default 0)")
    p.add_argument("--subset", choices=["all", "clean", "protected"], default="all",
                   help="train on all samples (mixed, default), the clean ones or the protected ones")
    p.add_argument("--ray", action="store_true", help="run the victim as one Ray task")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs for the victim (default 0)")
    add_settings(p)
    add_storage_options(p)
    add_json(p)


def _evaluate_text(r: dict) -> str:
    lines = [f"epoch {e['epoch']:3d}: test accuracy {100 * e['test_acc']:6.2f}%  "
             f"(train loss {e['train_loss']:.4f}, train accuracy {100 * e['train_acc']:.2f}%)"
             for e in r["per_epoch"]]
    lines.append(f"final test accuracy: {100 * r['test_acc']:.2f}% ({r['settings']['arch']}, "
                 f"{r['train_size']} training samples of which {r['protected_in_train']} protected, "
                 f"subset {r['subset']})")
    if r.get("robust_acc") is not None:
        lines.append(f"robust accuracy (PGD-{r['settings']['eval_steps']}, eps "
                     f"{255 * r['robust_eps']:.3g}/255): {100 * r['robust_acc']:.2f}%")
    return "\n".join(lines)


@command("evaluate", "Train one victim on a (possibly protected) training set and print its test "
         "accuracy per epoch.", _configure_evaluate)
def _evaluate(args: argparse.Namespace) -> int:
    from ue_dist.core.config import parse_overrides
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.runtime.evaluate import evaluate

    overrides: dict[str, Any] = dict(parse_overrides(args.overrides))
    for key in ("arch", "epochs", "adv_eps", "adv_method", "defense", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = str(getattr(args, key))
    settings = resolve_victim_settings(args.preset, [f"{k}={v}" for k, v in overrides.items()])
    print_settings(f"victim ({args.preset})", settings)
    result = evaluate(args.train, args.test, settings, args.subset, storage_options(args),
                      use_ray=args.ray, num_gpus=args.gpus)
    emit(args, result, _evaluate_text)
    return 0


def _configure_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="sweep spec (YAML), e.g. jobs/sweep-digits.yaml")
    p.add_argument("--storage", metavar="PATH", help="where the sweep lives (default: "
                   "$UE_DIST_STORAGE or ./runs); rerunning with the same storage resumes it")
    p.add_argument("--check", action="store_true", help="only validate the spec and print it")
    add_storage_options(p)
    add_json(p)


def _sweep_text(r: dict) -> str:
    lines = [f"sweep {r['name']}: {r['completed']}/{r['trials']} trial(s) done"
             + (" (resumed)" if r["resumed"] else "")]
    for e in r["errors"]:
        lines.append(f"  failed: {e}")
    if r.get("best"):
        lines.append(f"  strongest protection: {r['best']['params']} -> victim test accuracy "
                     f"{100 * r['best']['test_acc']:.2f}%")
    for kind, url in r["report"].items():
        lines.append(f"  {kind}: {url}")
    return "\n".join(lines)


@command("sweep", "Ray Tune sweep of victims (method x fraction x architecture x adversarial radius "
         "x defence x seed) or a search over a method's settings; writes a table and plots. "
         "Exit status 3 when trials failed.", _configure_sweep)
def _sweep(args: argparse.Namespace) -> int:
    from ue_dist.runtime.sweep import load_spec, run_sweep, validate_spec

    so = storage_options(args)
    spec = load_spec(args.spec, so)
    if so and "storage_options" not in spec:
        spec["storage_options"] = so
    checked = validate_spec(spec)
    print_settings("victim (sweep)", checked["victim_settings"])
    if args.check:
        from ue_dist.data.storage import mask_secrets
        emit(args, mask_secrets(checked))  # credentials in storage_options are shown as ***
        return 0
    result = run_sweep(spec, args.storage, progress=lambda m: print(m, file=sys.stderr, flush=True))
    emit(args, result, _sweep_text)
    return 3 if result["errors"] else 0


# --- run (job specs) --------------------------------------------------------------------------
def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="job spec (YAML), e.g. jobs/digits-quick.yaml")
    p.add_argument("--check", action="store_true",
                   help="only load and validate the spec (nothing runs); print the resolved spec")
    add_json(p)


@command("run", "Run a job spec end to end: convert -> fit -> protect -> evaluate -> sweep "
                "(every step resumable). Exit status 3 when shards were skipped as unreadable.",
         _run_options)
def _run_cmd(args: argparse.Namespace) -> int:
    from ue_dist.runtime.jobs import load_spec, printable_spec, run_job

    spec = load_spec(args.spec)
    if args.check:
        emit(args, printable_spec(spec))  # credentials in storage_options are shown as ***
        return 0
    result = run_job(spec, progress=lambda m: print(m, file=sys.stderr, flush=True))
    emit(args, result)
    return 0 if result["ok"] else 3




def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: otherwise `fit --train X` parses as `--train-fraction X`.
    parser = argparse.ArgumentParser(
        prog="ue-dist", allow_abbrev=False,
        description="Protect image datasets with unlearnable examples (Bayes-error maximisation, "
                    "REM/EM/TAP, GUE), at bucket scale on Ray, and judge the protection by "
                    "training victim models.")
    parser.add_argument("--version", action="version", version="ue-dist 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, configure, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        configure(p)
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's own log lines and worker output here (default: they go to "
                            "a log file under $UE_DIST_LOG_DIR or ./runs/logs, named at the end)")
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ue_dist.errors import UserError
    from ue_dist.runtime import console
    if not args.verbose:
        console.quiet(console.default_log_path(args.command))
    try:
        code = args._run(args)
    except UserError as exc:
        print(f"ue-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if console.log_path():
            print(f"[ue-dist] Ray's own log lines: {console.log_path()} (-v shows them here)",
                  file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
