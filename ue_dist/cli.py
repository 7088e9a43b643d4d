"""``ue-dist``: thin command line. Each command validates its options and calls one runtime function.

The options of every command are declared once, in ``ue_dist/options.py`` (the job and sweep
specs are checked against the same declarations); this module builds the parsers from them and
holds what each command runs. Commands that compute figures print them as one JSON object with
``--json``; commands that fit take ``--preset paper|quick`` and ``--set key=value`` (the
method's settings; victims take ``--victim-preset`` and ``--victim-set``) and print the settings
they used; ``protect`` starts from the settings its state was fitted with (``--set`` may change
only the method's protect-time settings).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ue_dist import options as opts
from ue_dist.core.progress import to_stderr

_RUN: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    """Register what ``ue-dist NAME`` runs; its options are ``options.COMMANDS[NAME]``'s."""
    def wrap(run: Callable[[argparse.Namespace], int | None]):
        _RUN[name] = run
        return run
    return wrap


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
@command("convert")
def _convert(args: argparse.Namespace) -> int:
    from ue_dist.runtime.data_jobs import convert
    result = convert(args.source, args.paths, n=args.n, image_size=args.image_size,
                     native=args.native, channels=args.channels, shard_size=args.shard_size,
                     seed=args.seed, overwrite=args.overwrite, labels=args.labels,
                     test_fraction=args.test_fraction, resize_mode=args.resize_mode,
                     train_images=args.train_images, storage_options=storage_options(args))
    emit(args, result, lambda r: "\n".join(
        f"{split}: {r[split]['samples']} samples in {r[split]['shards']} shard(s) -> {r[split]['url']}"
        for split in ("train", "test") if split in r))
    return 0


def _info_text(r: dict) -> str:
    hist = ", ".join(f"{k}:{v}" for k, v in r["label_histogram"].items()) or "none"
    if r.get("unlabelled"):
        hist += f" ({r['unlabelled']} without a label)"
    sizes = r.get("image_shapes", {})
    shape = str(tuple(r["image_shape"])) if r["image_shape"] is not None else \
        f"mixed, {len(sizes)} sizes: " + ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:5]) \
        + (", ..." if len(sizes) > 5 else "")
    return (f"{r['url']}\n  shards: {r['shards']}\n  samples: {r['samples']}\n"
            f"  image shape (H, W, C): {shape}\n  labels: {hist}\n"
            f"  protected: {r['protected']} {r['protected_by_method'] or ''}")


@command("info")
def _info(args: argparse.Namespace) -> int:
    from ue_dist.data.dataset import dataset_info
    emit(args, dataset_info(args.url, storage_options(args)), _info_text)
    return 0

@command("export")
def _export(args: argparse.Namespace) -> int:
    from ue_dist.data.photo_io import export
    result = export(args.dst, args.out_dir, overwrite=args.overwrite, extras=args.extras,
                    storage_options=storage_options(args))
    emit(args, result, lambda r: f"{r['images']} image(s) ({r['protected']} protected), "
                                 f"{r['files']} file(s) -> {r['out']}; manifest {r['manifest']}")
    return 0


@command("preview")
def _preview(args: argparse.Namespace) -> int:
    from ue_dist.data.photo_io import preview, preview_text
    emit(args, preview(args.src, args.dst, args.out, n=args.n,
                       storage_options=storage_options(args)), preview_text)
    return 0


# --- fit, protect (runtime) -------------------------------------------------------------------
@command("fit")
def _fit(args: argparse.Namespace) -> int:
    from ue_dist.methods import build_method
    from ue_dist.runtime.train import fit_method
    method = build_method(args.method, args.preset, args.overrides)
    print_settings(f"fit {args.method} ({args.preset})", method.settings)
    result = fit_method(args.method, args.train, args.state, preset=args.preset,
                        overrides=args.overrides, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                        storage_path=args.storage, run_name=args.run_name,
                        storage_options=storage_options(args), max_failures=args.max_failures,
                        train_fraction=args.train_fraction, labels=args.labels,
                        clusters=args.clusters, image_size=args.image_size, views=args.views,
                        overwrite=args.overwrite, progress=to_stderr)
    result["settings"] = method.settings
    emit(args, result)
    return 0


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from ue_dist.methods import get_method, method_names
    from ue_dist.core.settings import protect_time_keys
    out = {}
    for name in method_names():
        cls = get_method(name)
        out[name] = {"paper": cls.paper, "year": cls.year, "kind": cls.kind,
                     "norm": str(cls.presets.get("paper", {}).get("norm", "linf")),
                     "needs_labels": cls.needs_labels, "needs_fit": cls.needs_fit,
                     "presets": cls.presets, "protect_time": protect_time_keys(cls.declared)}
    width = max(len("method"), *map(len, out))
    emit(args, out, lambda r: "\n".join(
        [f"{'method':{width}s} {'kind':16s} {'norm':4s} {'year':4s} {'labels':6s} paper"] +
        [f"{k:{width}s} {v['kind'] or '-':16s} {v['norm']:4s} {v['year'] or '-'!s:4s} "
         f"{'yes' if v['needs_labels'] else 'no':6s} {v['paper']}" for k, v in r.items()]))
    return 0


def _defences_text(r: dict) -> str:
    rows = [("name", "kind", "parameters (defaults)", "paper")]
    rows += [(name, e["kind"], ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in e["params"].items()) or "-", e["paper"])
             for name, e in r.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:{widths[0]}}  {b:{widths[1]}}  {c:{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines + ["", "select one: ue-dist evaluate --defense NAME[:k=v,...] (a mode "
                               "as NAME:MODE[:k=v], e.g. ueraser:max:repeat=5); kind 'training' "
                               "is adversarial training, a victim setting (--adv-eps, "
                               "--adv-method, --adv-norm); --json adds each one's note"])


@command("defences")
def _defences(args: argparse.Namespace) -> int:
    from ue_dist.core.defenses import listing
    emit(args, listing(), _defences_text)
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.runtime.demo import demo_text, run_demo
    print_settings("victim", resolve_victim_settings(args.victim_preset, args.victim_overrides))
    summary = run_demo(args.out, [m for m in args.methods.split(",") if m], preset=args.preset,
                       victim_preset=args.victim_preset, victim_overrides=args.victim_overrides,
                       dataset=args.dataset,
                       storage_options=storage_options(args),
                       progress=to_stderr)
    emit(args, summary, demo_text)
    return 0


@command("protect")
def _protect_cmd(args: argparse.Namespace) -> int:
    from ue_dist.runtime.protect import protect

    summary = protect(args.method, args.src, args.dst, state_url=args.state, preset=args.preset,
                      overrides=args.overrides, fraction=args.fraction, seed=args.seed,
                      actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                      cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                      labels=args.labels, mode=args.mode, watch=args.watch,
                      joint=args.joint, workers=args.workers, staged=args.staged,
                      checkpoint_every=args.checkpoint_every,
                      poll_seconds=args.poll_seconds,
                      max_polls=args.max_polls, stop_file=args.stop_file,
                      storage_options=storage_options(args), wait_for_lease=args.wait_for_lease,
                      progress=to_stderr)
    emit(args, summary)
    if summary["bad_shards"]:
        print(f"ue-dist protect: {len(summary['bad_shards'])} bad shard(s) skipped: " + ", ".join(
            f"{b['shard']} ({b['reason']})" for b in summary["bad_shards"]), file=sys.stderr)
        return 3
    return 0


# --- bayes-error (Bayes method) ---------------------------------------------------------------
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


@command("bayes-error")
def _bayes_error(args: argparse.Namespace) -> int:
    from ue_dist.runtime.bayes_joint import bayes_error_report
    from ue_dist.core.config import SettingsError
    if args.plot and args.toy != "moons":
        raise SettingsError("--plot draws the moons toy's before/after scatter: use it with "
                            "--toy moons")
    result = bayes_error_report(args.url, embedding=args.embedding, toy=args.toy, n=args.n,
                                eps=args.eps, sigma=args.sigma, storage_options=storage_options(args))
    points = result.pop("_points", None)
    if args.plot:
        from ue_dist.data import storage
        from ue_dist.runtime.report import plot_moons
        storage.write_bytes(args.plot, plot_moons(result, **points), storage_options(args))
        result["plot"] = args.plot
    emit(args, result, _bayes_error_text)
    return 0


# --- evaluate, sweep (victims) ----------------------------------------------------------------
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


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from ue_dist.core.config import parse_overrides
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.runtime.evaluate import evaluate

    overrides: dict[str, Any] = dict(parse_overrides(args.victim_overrides))
    for key in opts.VICTIM_FLAGS:
        if getattr(args, key) is not None:
            overrides[key] = str(getattr(args, key))
    settings = resolve_victim_settings(args.victim_preset,
                                       [f"{k}={v}" for k, v in overrides.items()])
    print_settings(f"victim ({args.victim_preset})", settings)
    result = evaluate(args.train, args.test, settings, args.subset, storage_options(args),
                      use_ray=args.ray, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker)
    emit(args, result, _evaluate_text)
    return 0


def _sweep_text(r: dict) -> str:
    lines = [f"sweep {r['name']}: {r['completed']}/{r['trials']} trial(s) done"
             + (" (resumed)" if r["resumed"] else "")]
    for e in r["errors"]:
        lines.append(f"  failed: {e}")
    if r.get("best"):
        best = r["best"]
        lines.append(f"  strongest protection: {best['params']}: victim accuracy "
                     f"{100 * best['val_acc']:.2f}% on the held-out training images, "
                     + (f"{100 * best['test_acc']:.2f}% on the test set (fitted on all of "
                        "the training set)" if "test_acc" in best else "not tested"))
    for kind, url in r["report"].items():
        lines.append(f"  {kind}: {url}")
    return "\n".join(lines)


@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    from ue_dist.runtime.sweep import load_spec, report_sweep, run_sweep, validate_spec

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
    if args.report:
        emit(args, report_sweep(spec, args.storage), _sweep_text)
        return 0
    result = run_sweep(spec, args.storage, progress=to_stderr)
    emit(args, result, _sweep_text)
    return 3 if result["errors"] else 0


# --- train-purifier (the avatar defence's denoiser) --------------------------------------------
@command("train-purifier")
def _train_purifier(args: argparse.Namespace) -> int:
    from ue_dist.runtime.purifier import train_purifier
    result = train_purifier(args.clean, args.out, steps=args.steps, batch_size=args.batch_size,
                            t_max=args.t_max, width=args.width, seed=args.seed,
                            overwrite=args.overwrite, storage_options=storage_options(args),
                            progress=to_stderr)
    emit(args, result)
    return 0


# --- run (job specs) --------------------------------------------------------------------------
@command("run")
def _run_cmd(args: argparse.Namespace) -> int:
    from ue_dist.runtime.jobs import load_spec, printable_spec, run_job

    spec = load_spec(args.spec)
    if args.check:
        emit(args, printable_spec(spec))  # credentials in storage_options are shown as ***
        return 0
    result = run_job(spec, progress=to_stderr)
    emit(args, result)
    if result["failures"]:  # as `ue-dist protect` and `ue-dist sweep` do: exit 3, named
        print(f"ue-dist run: {len(result['failures'])} failure(s): "
              + "; ".join(result["failures"]), file=sys.stderr)
        return 3
    return 0




def build_parser() -> argparse.ArgumentParser:
    """The parsers, derived from ``options.COMMANDS`` (help, defaults, one example each)."""
    # allow_abbrev=False everywhere: otherwise `fit --train X` parses as `--train-fraction X`.
    parser = argparse.ArgumentParser(
        prog="ue-dist", allow_abbrev=False,
        description="Protect image datasets with unlearnable examples (Bayes-error maximisation, "
                    "REM/EM/TAP, GUE), at bucket scale on Ray, and judge the protection by "
                    "training victim models.")
    parser.add_argument("--version", action="version", version="ue-dist 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in opts.COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, allow_abbrev=False,
                           epilog=f"example:\n  {cmd.example}",
                           formatter_class=_Formatter)
        opts.add_arguments(p, (*cmd.options, opts.VERBOSE))
        p.set_defaults(_run=_RUN[name])
    return parser


class _Formatter(argparse.HelpFormatter):
    """Wraps the description and the options' help; keeps the example's line as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line + "\n" for line in text.splitlines()).rstrip("\n")
        return super()._fill_text(text, width, indent)


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
