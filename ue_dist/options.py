"""Every command's options, declared once: name, type, default, help, choices.

The command line (``cli.py``) builds its argparse parsers from these declarations
(``add_arguments``), and the job specs (``runtime/jobs.py``) and sweep specs
(``runtime/sweep.py``) check their sections against the same declarations (``check_section``),
so that a default, a range or a choice is written in one place. Ray-free.

One ``Opt`` is one option. Its ``name`` is both the argparse destination and the spec key; the
command-line spelling is ``--NAME`` with dashes unless ``flags`` says otherwise. ``cli`` and
``spec`` say where the option exists: ``fit --run-name`` is command-line only, ``evaluate``'s
``baseline`` is a job-spec key only. Types:

* ``int``, ``float``: numbers; ``low``/``high`` bound them in specs (the runtime checks the
  command line's values, naming the flag);
* ``str``: text, optionally one of ``choices`` (a sequence, or a function returning one, so that
  the registry it comes from stays the one declaration);
* ``bool``: a switch (``store_true``) / a yes-no key;
* ``dict``: settings: ``--set KEY=VALUE`` (repeatable) on the command line, a mapping in a spec;
* ``list``: several values: repeatable / positional ``nargs`` on the command line, a list in a
  spec.

Old spellings (``--gpu``, ``use_gpu``) are ``Alias``es: they keep working for one release and
print one warning line naming the new spelling.
"""
from __future__ import annotations

import argparse
import difflib
import math
import posixpath
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from ue_dist.core.adversarial import AT_METHODS
from ue_dist.core.pgd import NORMS

_UNSET = object()
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Alias:
    """A deprecated spelling of an option: a flag (``--gpu``) or a spec key (``use_gpu``).

    ``value``: the old flag was a switch standing for this value (``--gpu`` = 1 GPU per worker);
    ``convert``: turns the old spec key's value into the new one's (``use_gpu: true`` -> 1).
    """
    old: str
    value: Any = _UNSET
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Opt:
    name: str
    help: str
    type: type = str
    default: Any = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    low: float | None = None
    high: float | None = None
    flags: tuple[str, ...] = ()      # command-line spelling; () = --NAME; positional: see below
    positional: bool = False
    nargs: str | None = None
    metavar: str | None = None
    required: bool = False
    cli: bool = True
    spec: bool = True
    aliases: tuple[Alias, ...] = ()
    # a value that is not one plain type (``--actors N`` or ``MIN:MAX``): ``check(value, where,
    # error)`` refuses a bad one, naming ``where``
    check: Callable[[Any, str, type[Exception]], Any] | None = None

    def valid_choices(self) -> Sequence[Any] | None:
        return self.choices() if callable(self.choices) else self.choices

    @property
    def flag(self) -> str:
        return self.flags[-1] if self.flags else "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: tuple[Opt, ...]
    example: str

    def spec_options(self) -> tuple[Opt, ...]:
        return tuple(o for o in self.options if o.spec)


# lazily imported registries (the one declaration of each set of names) ---------------------------
def _presets() -> Sequence[str]:
    from ue_dist.core.config import PRESETS
    return PRESETS


def _victim_presets() -> Sequence[str]:
    from ue_dist.core.victim import VICTIM_PRESETS
    return tuple(VICTIM_PRESETS)


def _modes() -> Sequence[str]:
    from ue_dist.runtime.protect import MODES
    return MODES


def _subsets() -> Sequence[str]:
    from ue_dist.core.victim import SUBSETS
    return SUBSETS


def _converters() -> Sequence[str]:
    from ue_dist.data.converters import CONVERTERS
    return sorted(CONVERTERS)


def _resize_modes() -> Sequence[str]:
    from ue_dist.data.photo_io import RESIZE_MODES
    return RESIZE_MODES


def _views() -> Sequence[str]:
    from ue_dist.data.views import VIEWS
    return VIEWS


def actor_range(value: Any, where: str, error: type[Exception]) -> tuple[int, int]:
    """``N`` (a fixed pool of N actors) or ``MIN:MAX`` (a pool Ray Data scales between MIN and
    MAX) as ``(min, max)``; anything else is refused, naming ``where``."""
    parts = [] if isinstance(value, bool) else str(value).strip().split(":")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise error(f"{where} must be N or MIN:MAX (whole numbers, e.g. 2 or 1:8), got {value!r}")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1:
        raise error(f"{where} must be >= 1 (a pool needs an actor), got {value!r}")
    if low > high:
        raise error(f"{where} MIN:MAX needs MIN <= MAX, got {value!r}")
    return low, high


def deprecated(old: str, new: str, where: str) -> None:
    """One warning line per old spelling and process (a spec validated twice warns once)."""
    line = (f"{where}: warning: {old} is deprecated, use {new} "
            "(the old spelling will be removed in the next release)")
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


# shared options -------------------------------------------------------------------------------
STORAGE_OPTION = Opt("storage_option", type=list, metavar="KEY=VALUE", spec=False,
                     help="fsspec storage option for every URL (repeatable), e.g. "
                          "endpoint_url=http://127.0.0.1:9000 or anon=true; S3 credentials come "
                          "from the standard AWS variables, profiles or roles")
JSON = Opt("json", type=bool, spec=False, help="print the figures as one JSON object")
VERBOSE = Opt("verbose", type=bool, flags=("-v", "--verbose"), spec=False,
              help="show Ray's own log lines and worker output here (default: they go to a log "
                   "file under $UE_DIST_LOG_DIR or ./runs/logs, named at the end)")
METHOD = Opt("method", required=True, help="method name (see `ue-dist methods`)")
PRESET = Opt("preset", default="paper", choices=_presets,
             help="method settings: paper = the papers' settings; quick = sized to try on a "
                  "laptop CPU; imagenet = the paper's ImageNet-subset settings, for 224 x 224 "
                  "inputs (rem; fit with --image-size 224)")
SET = Opt("overrides", type=dict, flags=("--set",), metavar="KEY=VALUE",
          help="override one method setting (repeatable); unknown keys are an error")
VICTIM_PRESET = Opt("victim_preset", default="paper", choices=_victim_presets,
                    help="victim settings: paper = ResNet-18, 100 epochs, SGD 0.1, cosine; quick "
                         "= a small CNN for a laptop CPU; rem, gue, bayes = each paper's own "
                         "protocol (core/victim.py)")
VICTIM_SET = Opt("victim_overrides", type=dict, flags=("--victim-set",), metavar="KEY=VALUE",
                 help="override one victim setting (repeatable); unknown keys are an error")
COMMON = (STORAGE_OPTION, JSON)

# commands -------------------------------------------------------------------------------------
CONVERT = Command("convert", "Convert a dataset into WebDataset shards: OUT/train and OUT/test.", (
    Opt("source", positional=True, metavar="SOURCE", choices=_converters, required=True,
        help="digits | synthetic | cifar10 | cifar100 | imagefolder | numpy | fashion-mnist | idx"),
    Opt("paths", type=list, positional=True, nargs="+", metavar="PATH", spec=False,
        help="digits/synthetic: OUT; cifar10/cifar100/imagefolder: PATH OUT; numpy: X.npy Y.npy "
             "OUT; fashion-mnist: [DIR] OUT (DIR, any fsspec URL, holds the four IDX files; "
             "default: where `apt-get install dataset-fashion-mnist` puts them, "
             "/usr/share/datasets/fashion-mnist); idx: IMAGES LABELS [TEST_IMAGES TEST_LABELS] "
             "OUT (MNIST-format files, .gz or not; one pair is split like numpy). Writes "
             "OUT/train and OUT/test (imagefolder: OUT/test only with --test-fraction or a "
             "PATH holding train/ and test/)"),
    Opt("inputs", type=list, default=(), cli=False,
        help="job specs: the input paths (PATH... without OUT, which is ROOT/data)"),
    Opt("n", type=int, default=5000, low=1, help="synthetic: number of samples"),
    Opt("image_size", type=int, low=1,
        help="resize images to SIZE x SIZE (digits, fashion-mnist, idx default 32; others keep "
             "their size; imagefolder: by --resize-mode)"),
    Opt("labels", default="folders", choices=("folders", "none"),
        help="imagefolder: folders = the first-level subfolder of PATH is the class (images at "
             "any depth below it); none = every image anywhere under PATH, no label (photos)"),
    Opt("test_fraction", type=float, default=0.0, low=0.0, high=1.0,
        help="imagefolder: share of the images held out as OUT/test (seeded by --seed, "
             "stratified by class where it can be); 0 = every image goes to OUT/train (and is "
             "protected) and no OUT/test is written. A PATH with train/ and test/ keeps its split"),
    Opt("resize_mode", choices=_resize_modes,
        help="imagefolder, img2dataset's modes: no = native size (images may differ in size; "
             "the default without --image-size); keep_ratio = the smaller side becomes "
             "--image-size; center_crop = that, then the centre square; border = the longer side "
             "becomes --image-size, padded with black to a square (the default with "
             "--image-size)"),
    Opt("native", type=bool, spec=False,
        help="keep the original size: digits 8x8 (3 channels), fashion-mnist/idx 28x28x1 "
             "grayscale. Without it these grayscale sources become 32x32x3, the CIFAR shape "
             "every victim and method expects"),
    Opt("channels", type=int, metavar="{1,3}", spec=False,
        help="digits, fashion-mnist, idx: 1 (grayscale) or 3 (gray repeated; default, 1 with "
             "--native for fashion-mnist/idx)"),
    Opt("train_images", type=int, low=1,
        help="fashion-mnist, idx: keep only a seeded (--seed), class-balanced subset of N "
             "training images (N // classes per class; keys keep each image's position in the "
             "full split); the test split stays whole. Default: every training image"),
    Opt("shard_size", type=int, default=1000, low=1, help="samples per shard"),
    Opt("seed", type=int, default=0, help="seed of the train/test split (and --train-images)"),
    Opt("overwrite", type=bool, spec=False, help="replace shards already in OUT"),
    *COMMON), "ue-dist convert digits out/digits")

EXPORT = Command("export", "Write the images of a folder of shards (e.g. a protected output) "
                 "back as PNG files at their original relative paths, with a manifest.", (
    Opt("dst", positional=True, metavar="DST",
        help="a folder of shards, e.g. the protected output of `protect`; any fsspec URL"),
    Opt("out_dir", positional=True, metavar="OUT_DIR",
        help="the folder to write: each image at the relative path it was converted from "
             "(its json's source_path) with the extension replaced by .png (lossless: a JPEG "
             "would undo the eps bound), KEY.png without one; OUT_DIR/ue-dist-export.json lists "
             "every file (path, key, shard, protected, method, eps, sha256)"),
    Opt("extras", type=bool,
        help="also write each sample's other members (captions KEY.txt, ...) beside its image, "
             "as NAME.EXT (default: images only)"),
    Opt("overwrite", type=bool, help="write into an existing non-empty OUT_DIR"),
    *COMMON), "ue-dist export out/photos-em out/photos-em-png")

PREVIEW = Command("preview", "Compare original and protected images: a PNG grid (original | "
                  "protected | perturbation amplified, grey = unchanged) and per image max |delta| "
                  "in levels, PSNR and SSIM.", (
    Opt("src", positional=True, metavar="SRC", help="the clean shards (protect's SRC)"),
    Opt("dst", positional=True, metavar="DST", help="the protected shards (protect's DST)"),
    Opt("n", type=int, default=16, low=1, help="images: the first N keys of DST also in SRC"),
    Opt("out", metavar="PNG", help="write the grid to this file or URL (default: the table only)"),
    *COMMON), "ue-dist preview out/photos/train out/photos-em --n 8 --out grid.png")

INFO = Command("info", "Describe a folder of shards: shards, samples, image shape, labels, "
               "protected count.", (
    Opt("url", positional=True, metavar="URL",
        help="a folder of shards (e.g. OUT/train), any fsspec URL"),
    *COMMON), "ue-dist info out/digits/train --json")

FIT = Command("fit", "Fit a method (source model, generator or embedding) on Ray Train; write its "
              "state.", (
    replace(METHOD, help="method to fit (see `ue-dist methods`)", spec=False),
    Opt("train", positional=True, metavar="TRAIN_URL", spec=False,
        help="clean training shards, e.g. OUT/train"),
    Opt("state", positional=True, metavar="STATE_URL",
        help="where to write the fitted state (.pt); job specs: default ROOT/state.pt"),
    Opt("workers", type=int, default=1, low=1, help="Ray Train workers (DDP)"),
    Opt("cpus_per_worker", type=float, default=1.0, low=0.01,
        help="CPUs per worker; fractions share a small machine"),
    Opt("gpus_per_worker", type=float, default=0.0, low=0.0,
        help="GPUs per worker (0: CPU workers, gloo); workers with a whole GPU each use NCCL, "
             "workers sharing GPUs (a fraction each) use gloo",
        aliases=(Alias("--gpu", value=1), Alias("use_gpu", convert=lambda v: 1 if v else 0))),
    Opt("storage", spec=False,
        help="run storage for checkpoints (default $UE_DIST_STORAGE or ./runs)"),
    Opt("run_name", spec=False,
        help="run name; rerunning with the same name resumes from its last checkpoint "
             "(default: derived from method, data, state URL and settings)"),
    Opt("max_failures", type=int, default=0, low=-1,
        help="worker failures to survive by restarting from the last checkpoint (-1: any number)"),
    Opt("train_fraction", type=float, default=1.0, low=0.0, high=1.0,
        help="fit on a seeded fraction of TRAIN_URL (the rest is never seen)"),
    Opt("labels", default="given", choices=("given", "cluster"),
        help="the classes the method learns: given (each sample's .cls) or cluster (k-means "
             "pseudo-labels of the pooled pixels, for photos without labels, as Unlearnable "
             "Clusters; the labeller goes into the state and labels every image protect sees)"),
    Opt("clusters", type=int, default=10, low=2, help="pseudo-classes for --labels cluster"),
    Opt("image_size", type=int, low=1, metavar="N",
        help="fit on one N x N view of every image (--views), so shards of mixed sizes (photo "
             "buckets) can be fitted; the state's image shape is then [C, N, N], C = 3 if any "
             "image has colour else 1 (alpha dropped, grey replicated). Default: the images' "
             "own size, which must then be one size"),
    Opt("views", default="crop", choices=_views,
        help="with --image-size: crop = one seeded random N x N crop at the image's own scale "
             "(images smaller than N first scaled up to N), the default because protect "
             "perturbs native-scale tiles of the fitted size, so the model learns on what "
             "those tiles look like; resize = smaller side scaled to N (antialiased), then "
             "the centre N x N"),
    Opt("overwrite", type=bool, spec=False, help="replace an existing STATE_URL"),
    replace(PRESET, spec=False), replace(SET, spec=False), *COMMON),
    "ue-dist fit --method em out/digits/train out/em.pt --preset quick --workers 2 "
    "--cpus-per-worker 0.5")

METHODS = Command("methods", "List the registered protection methods: kind, norm, year, whether "
                  "protect needs labels, paper (--json: also presets and protect-time settings).",
                  (JSON,), "ue-dist methods --json")

DEFENCES = Command("defences", "List the victims' defences (core/defenses.py) with their kind, "
                   "parameters and defaults, and paper; select one with `evaluate --defense "
                   "NAME[:k=v,...]` or a sweep's `defenses`.", (JSON,), "ue-dist defences --json")

DEMO = Command("demo", "The main job on the embedded default: convert digits, fit, protect on "
               "Ray, train victims on clean and protected data, print accuracies, write plots.", (
    Opt("out", default="out/demo", help="output folder or URL"),
    Opt("dataset", default="digits", choices=("digits", "fashion-mnist"),
        help="digits: scikit-learn's 1,797 digits (bundled; about 6 minutes here); "
             "fashion-mnist: a seeded, class-balanced 5,000-image subset of Fashion-MNIST's "
             "training set and its whole 10,000-image test set (needs `apt-get install "
             "dataset-fashion-mnist`)"),
    Opt("methods", default="em", help="comma-separated methods to demonstrate"),
    replace(PRESET, default="quick", help="method settings (quick: minutes on a laptop CPU)"),
    replace(VICTIM_PRESET, default="quick"),
    replace(VICTIM_SET, aliases=(Alias("--set"),)),
    *COMMON), "ue-dist demo --methods em,bayes --out out/demo")

PROTECT = Command("protect", "Protect every shard of SRC into DST on Ray Data (resumable, --watch "
                  "for new shards). Exit status 3 when some shards were unreadable and skipped.", (
    Opt("src", positional=True, metavar="SRC", spec=False,
        help="folder/prefix of input shards (*.tar), any fsspec URL"),
    Opt("dst", positional=True, metavar="DST",
        help="output prefix (not inside SRC); a ledger in DST/_ledger records the committed "
             "shards; job specs: default ROOT/protected/train"),
    replace(METHOD, spec=False),
    Opt("state", metavar="URL", spec=False, help="fitted state from `ue-dist fit`"),
    Opt("fraction", type=float, default=1.0, low=0.0, high=1.0,
        help="fraction of samples to protect, chosen per key with --seed"),
    Opt("seed", type=int, default=0, help="selection and perturbation seed"),
    Opt("actors", default=1, metavar="N|MIN:MAX", check=actor_range,
        help="Ray Data actors: N (a fixed pool) or MIN:MAX (a pool Ray Data grows from MIN to "
             "MAX actors while shards wait, e.g. 1:8)"),
    Opt("staged", type=bool,
        help="run each shard as three Ray Data steps: read + decode (CPU tasks), perturb (the "
             "actor pool), PNG encode + write + ledger record (CPU tasks), so the actors only "
             "perturb; the same bytes as without it"),
    Opt("gpus_per_actor", type=float, default=0.0, low=0.0, help="GPUs per actor"),
    Opt("cpus_per_actor", type=float, default=0.5, low=0.01,
        help="CPUs per actor, fractional allowed"),
    Opt("batch_size", type=int, default=256, low=1, help="images per perturb call"),
    Opt("joint", type=bool,
        help="bayes only: optimise all shards of SRC as ONE set (the paper's joint mode: every "
             "sample's embedding all-gathered across --workers Ray Train workers, the "
             "unselected --fraction kept clean in the objective) instead of batch by batch "
             "against the state's clean bank (the default streaming mode)"),
    Opt("workers", type=int, default=2, low=1,
        help="--joint: Ray Train workers (each reads and owns a contiguous part of the shards; "
             "--cpus-per-actor/--gpus-per-actor are per worker)"),
    Opt("checkpoint_every", type=int, default=10, low=0,
        help="--joint: ascent steps between checkpoints in DST/_ue-joint (a crashed or "
             "interrupted run resumes from the last; 0: none)"),
    Opt("labels", default="given", choices=("given", "predict"),
        help="the label a sample is protected with: given (its .cls; a state fitted with "
             "`fit --labels cluster` labels every image by its clusters instead) or predict "
             "(the state's classifier's prediction on the image resized to the fitted size, for "
             "unlabelled photos protected with a state fitted on labelled data: em, rem, tap, "
             "hypo)"),
    Opt("mode", default="incremental", choices=_modes,
        help="incremental: skip shards the ledger says are done and whose source is unchanged; "
             "overwrite: redo every shard; sync: incremental, and remove outputs whose source "
             "shard is gone"),
    Opt("wait_for_lease", type=float, default=0.0, low=0.0, metavar="SECONDS", spec=False,
        help="if another run is writing DST, wait up to SECONDS for it (0: refuse at once)"),
    Opt("watch", type=bool, spec=False,
        help="keep listing SRC and protect new shards as they land (Ctrl-C to stop)"),
    Opt("poll_seconds", type=float, default=30.0, low=0.0, spec=False,
        help="listing interval with --watch"),
    Opt("max_polls", type=int, low=1, spec=False, help="stop --watch after N listings"),
    Opt("stop_file", metavar="URL", spec=False, help="stop --watch once this file exists"),
    replace(PRESET, spec=False, default=None,
            help="protect uses the settings the state was fitted with; --preset is optional: "
                 "its values must agree with the fitted ones, except the method's protect-time "
                 "settings (PGD steps of the final noise, precision; `ue-dist methods --json`), "
                 "which it sets. A method that learns nothing (no --state) takes its settings "
                 "from it (default paper)"),
    replace(SET, spec=False,
            help="change one protect-time setting (repeatable), e.g. steps_u=20; a setting the "
                 "fit fixed (eps, rho_a, arch, seed, ...) is refused unless it equals the "
                 "fitted value"), *COMMON),
    "ue-dist protect --method em --state out/em.pt out/digits/train out/em-protected "
    "--actors 2")

BAYES_ERROR = Command("bayes-error", "Estimate the Bayes error (local posterior averaging) of a "
                      "dataset or a toy problem.", (
    Opt("url", positional=True, nargs="?", metavar="URL",
        help="a folder of shards (e.g. OUT/train); omit with --toy"),
    Opt("embedding", metavar="STATE",
        help="a fitted bayes state: estimate in its embedding space (default: raw pixels)"),
    Opt("toy", choices=("gaussians", "moons"),
        help="gaussians: two 1-D Gaussians vs the analytic Phi(-1); moons: before/after "
             "Algorithm 2"),
    Opt("n", type=int, help="toy sample count (default: gaussians 4000, moons 200)"),
    Opt("eps", help="moons: L-inf radius of the ascent (default 0.25)"),
    Opt("sigma", help="kernel bandwidth (default: median distance to the sqrt(n)-th neighbour)"),
    Opt("plot", metavar="PNG",
        help="moons: write the before/after scatter (the Bayes paper's Figure 3) to this file "
             "or URL"),
    *COMMON), "ue-dist bayes-error --toy moons --plot moons.png")

# victim settings that evaluate also takes as flags (merged into its --victim-set)
VICTIM_FLAGS = ("arch", "epochs", "adv_eps", "adv_method", "adv_norm", "defense", "seed")

EVALUATE = Command("evaluate", "Train one victim on a (possibly protected) training set and print "
                   "its test accuracy per epoch.", (
    Opt("train", required=True, metavar="URL", spec=False,
        help="training shards (may be partly protected)"),
    Opt("test", required=True, metavar="URL", spec=False, help="clean test shards"),
    Opt("arch", spec=False,
        help="victim architecture (default: the preset's), e.g. small-cnn, resnet18, vgg16, "
             "densenet121, mobilenetv2, wrn-34-10"),
    Opt("epochs", type=int, spec=False, help="training epochs (default: the preset's)"),
    Opt("adv_eps", metavar="R", spec=False,
        help="adversarial-training radius, e.g. 8/255 (0 = standard)"),
    Opt("adv_method", choices=AT_METHODS, spec=False, help="adversarial loss (default pgd)"),
    Opt("adv_norm", choices=NORMS, spec=False,
        help="ball of adversarial training and robust evaluation (default linf; l2 takes an L2 "
             "--adv-eps, e.g. 0.5)"),
    Opt("defense", spec=False, metavar="NAME[:k=v,...]",
        help="training-data defence, e.g. jpeg:quality=10, bdr:bits=2, noise:eps=8/255, "
             "ueraser:max:repeat=5, ueraser:lite (`ue-dist defences` lists them all)"),
    Opt("seed", type=int, spec=False, help="victim seed (default 0)"),
    Opt("subset", default="all", choices=_subsets,
        help="train on all samples (mixed), the clean ones or the protected ones"),
    Opt("ray", type=bool, spec=False, help="run the victim as one Ray task (job specs always do)"),
    Opt("cpus_per_worker", type=float, default=1.0, low=0.01,
        help="CPUs for the victim's Ray task", aliases=(Alias("num_cpus"),)),
    Opt("gpus_per_worker", type=float, default=0.0, low=0.0, help="GPUs for the victim",
        aliases=(Alias("--gpus"), Alias("num_gpus"))),
    Opt("baseline", type=bool, default=True, cli=False,
        help="job specs: also train a victim on the clean training set"),
    replace(VICTIM_PRESET, aliases=(Alias("--preset"), Alias("preset"))),
    replace(VICTIM_SET, aliases=(Alias("--set"), Alias("overrides"))),
    *COMMON), "ue-dist evaluate --train out/em-protected --test out/digits/test "
              "--victim-preset quick --epochs 8")

SWEEP = Command("sweep", "Ray Tune sweep of victims (method x fraction x architecture x "
                "adversarial radius x defence x seed) or a search over a method's settings; "
                "writes a table and plots. Exit status 3 when trials failed.", (
    Opt("spec", positional=True, metavar="SPEC",
        help="sweep spec (YAML or JSON, any fsspec URL), e.g. jobs/sweep-digits.yaml"),
    Opt("storage", metavar="PATH",
        help="where the sweep lives (default: $UE_DIST_STORAGE or ./runs); rerunning with the "
             "same storage resumes it"),
    Opt("check", type=bool, help="only validate the spec and print it"),
    Opt("report", type=bool,
        help="only write the report of the trials finished so far (no Ray, nothing trains): "
             "for a sweep still running or interrupted; a rerun without it trains the rest"),
    *COMMON), "ue-dist sweep jobs/sweep-digits.yaml --storage runs")

RUN = Command("run", "Run a job spec end to end: convert -> fit -> protect -> evaluate -> sweep "
              "(every step resumable). Exit status 3 when shards were skipped as unreadable or sweep "
              "trials failed.", (
    Opt("spec", positional=True, metavar="SPEC",
        help="job spec (YAML or JSON, any fsspec URL), e.g. jobs/digits-quick.yaml"),
    Opt("check", type=bool,
        help="only load and validate the spec (nothing runs); print the resolved spec"),
    JSON), "ue-dist run jobs/digits-quick.yaml --check")

TRAIN_PURIFIER = Command("train-purifier", "Train the denoiser of the avatar defence (diffusion "
                         "purification, core/diffusion.py) on clean images the defender has.", (
    Opt("clean", positional=True, metavar="CLEAN_URL",
        help="clean shards to learn from (labels are not used), e.g. OUT/test or clean photos"),
    Opt("out", positional=True, metavar="OUT",
        help="where to write the checkpoint (.pt; any fsspec URL); then `--defense "
             "avatar:model=OUT`"),
    Opt("steps", type=int, default=4000, low=1, help="optimiser steps"),
    Opt("batch_size", type=int, default=64, low=1, help="images per step"),
    Opt("t_max", type=int, default=200, low=1, high=1000,
        help="highest noise level trained (of 1000); purification needs t <= t_max"),
    Opt("width", type=int, default=32, low=8, help="U-Net base width (32: 0.58 M parameters)"),
    Opt("seed", type=int, default=0, help="seed of the initialisation, batches and noise"),
    Opt("overwrite", type=bool, help="replace an existing OUT"),
    *COMMON), "ue-dist train-purifier out/fashion-mnist/test out/purifier.pt --steps 2000")

COMMANDS: dict[str, Command] = {c.name: c for c in (
    CONVERT, INFO, EXPORT, PREVIEW, FIT, METHODS, DEFENCES, DEMO, PROTECT, BAYES_ERROR, EVALUATE,
    SWEEP, RUN, TRAIN_PURIFIER)}

# job specs (runtime/jobs.py): top-level keys and the sections that are not a command's ------------
DATA = (Opt("train", help="training shards URL"), Opt("test", help="clean test shards URL"))
JOB_METHOD = (replace(METHOD, name="name", required=False), PRESET,
              replace(SET, help="{key: value} method settings"))
JOB = (
    Opt("name", required=True, help="job name (plain folder-safe name)"),
    Opt("root", required=True, help="output root URL (data, state, protected shards, runs)"),
    Opt("storage_options", type=dict, help="fsspec options for every URL"),
    Opt("convert", type=dict, help="{" + ", ".join(o.name for o in CONVERT.spec_options()) + "}"),
    Opt("data", type=dict, help="{train: URL, test: URL}"),
    Opt("method", required=True, help="{name, preset, overrides} or a method name"),
    Opt("fit", type=dict, help="{" + ", ".join(o.name for o in FIT.spec_options()) + "}"),
    Opt("protect", type=dict, help="{" + ", ".join(o.name for o in PROTECT.spec_options()) + "}"),
    Opt("evaluate", type=dict, help="{" + ", ".join(o.name for o in EVALUATE.spec_options()) + "}"),
    Opt("sweep", help="path of a sweep spec, or an inline sweep spec"),
)
JOB_STEPS = {"convert": CONVERT.spec_options(), "data": DATA, "method": JOB_METHOD,
             "fit": FIT.spec_options(), "protect": PROTECT.spec_options(),
             "evaluate": EVALUATE.spec_options()}

# sweep specs (runtime/sweep.py) -----------------------------------------------------------------
SWEEP_SPEC = (
    Opt("name", default="sweep", help="run name (folder under the storage path)"),
    Opt("data", type=dict, required=True, help="{train: URL, test: URL}"),
    Opt("methods", type=list, default=(), help="method names (grid)"),
    replace(PRESET, name="method_preset"),
    Opt("method_overrides", type=dict, help="{METHOD: {key: value}} per-method settings"),
    Opt("bayes_mode", default="streaming", choices=("streaming", "joint"),
        help="how bayes protects the training set: streaming (batch by batch against the "
             "state's clean bank, once for every fraction) or joint (the paper's: the whole set "
             "ascends together, the unprotected part fixed in the objective, so one joint run "
             "per fraction)"),
    Opt("fractions", type=list, default=(1.0,), help="protected fractions in [0, 1]"),
    Opt("subsets", type=list, default=("all", "clean"), choices=("all", "clean"),
        help="all (mixed) and/or clean (clean part only)"),
    Opt("archs", type=list, default=("resnet18",), help="victim architectures"),
    Opt("adv_eps", type=list, default=(0.0,),
        help="adversarial-training radii (0 = standard training)"),
    Opt("defenses", type=list, default=("none",),
        help="victim defences (none, mixup, median, jpeg:quality=10, ...)"),
    Opt("defence_grid", default="cross", choices=("cross", "matrix"),
        help="cross: every adv_eps with every defence; matrix: each defence alone under "
             "standard training, and each adv_eps > 0 alone (no other defence) -- the attack x "
             "defence matrix, one column per defence"),
    Opt("seeds", type=list, default=(0,), help="seeds (protection choice, method fit and victim)"),
    Opt("train_subset", type=int, low=1, help="train on a seeded, class-stratified subset of "
        "this many training images (default: all); the report's train_size says it"),
    Opt("train_subset_seed", type=int, default=0, help="seed of train_subset's choice"),
    VICTIM_PRESET,
    replace(VICTIM_SET, help="{key: value} victim settings"),
    Opt("resources_per_trial", type=dict, help="{cpu: float, gpu: float}"),
    Opt("max_concurrent_trials", type=int, low=1, help="default: as many as resources allow"),
    Opt("max_failures", type=int, default=2, low=-1,
        help="failures per trial (a killed worker, a lost node) survived by restarting the trial "
             "from its last victim-epoch checkpoint (-1: any number, 0: none)"),
    Opt("storage_options", type=dict, help="fsspec options for data and storage URLs"),
    Opt("search", type=dict, help="{method, space, num_samples, fraction, seed}: search a "
                                  "method's settings"),
)
TRIAL_RESOURCES = (Opt("cpu", type=float, default=1.0, low=0.0, help="CPUs per trial"),
                   Opt("gpu", type=float, default=0.0, low=0.0, help="GPUs per trial"))
SEARCH = (
    Opt("method", help="the method whose settings are searched"),
    Opt("space", type=dict, help="{setting: {uniform|loguniform|randint|choice: ...} or [...]}"),
    Opt("num_samples", type=int, default=8, low=1, help="trials"),
    Opt("fraction", type=float, default=1.0, low=0.0, high=1.0, help="protected fraction"),
    Opt("seed", type=int, default=0, help="seed of the random search and of the validation split"),
    Opt("validation_fraction", type=float, default=0.2, low=0.0, high=1.0,
        help="share of each class of the training set held out as the search's objective "
             "(trials fit, protect and train on the rest and are scored on it; only the "
             "winner is tested, on the test set)"),
)


def option(options: Sequence[Opt], name: str) -> Opt:
    """The declaration named ``name`` in ``options``."""
    return next(o for o in options if o.name == name)


def default(command: Command, name: str) -> Any:
    """The declared default of ``command``'s option ``name``: the runtime's keyword arguments
    take their defaults from here, so each default is written once."""
    return option(command.options, name).default


# the command line -----------------------------------------------------------------------------
class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling: warns once (naming the new one), then does what the new one does."""

    def __init__(self, option_strings, dest, *, new: str, value: Any = _UNSET,
                 append: bool = False, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if value is not _UNSET else None, **kwargs)
        self.new, self.value, self.append = new, value, append

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.new if self.value is _UNSET else f"{self.new} {self.value}"
        deprecated(option_string, new, parser.prog)
        if self.value is not _UNSET:
            values = self.value
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def help_text(opt: Opt) -> str:
    """The help line, with the default where there is one."""
    if opt.default is None or opt.default is False or opt.default == () or opt.type is dict:
        return opt.help
    return f"{opt.help} (default: {opt.default})"


def _argparse_kwargs(opt: Opt) -> dict[str, Any]:
    kw: dict[str, Any] = {"help": help_text(opt)}
    if opt.metavar:
        kw["metavar"] = opt.metavar
    if opt.type is bool:
        kw["action"] = "store_true"
    elif opt.type in (dict, list) and not opt.positional:
        kw.update(action="append", default=[])
    else:
        if opt.type in (int, float):
            kw["type"] = opt.type
        if opt.nargs:
            kw["nargs"] = opt.nargs
        if opt.choices is not None:
            kw["choices"] = list(opt.valid_choices())
        if not opt.positional:
            kw["default"] = opt.default
    if opt.required and not opt.positional:
        kw["required"] = True
    if opt.positional and opt.nargs == "?":
        kw["default"] = opt.default
    return kw


def add_arguments(parser: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
    """Add the command-line options of ``opts`` (and their hidden deprecated spellings)."""
    for opt in opts:
        if not opt.cli:
            continue
        kw = _argparse_kwargs(opt)
        if opt.positional:
            parser.add_argument(opt.name, **kw)
        else:
            parser.add_argument(*(opt.flags or (opt.flag,)), dest=opt.name, **kw)
        for alias in opt.aliases:
            if alias.old.startswith("-"):
                extra = {k: kw[k] for k in ("type", "choices", "metavar")
                         if k in kw and alias.value is _UNSET}
                parser.add_argument(alias.old, dest=opt.name, action=_DeprecatedAlias,
                                    new=opt.flag, value=alias.value, help=argparse.SUPPRESS,
                                    append=kw.get("action") == "append",
                                    default=argparse.SUPPRESS, **extra)


# specs ------------------------------------------------------------------------------------------
def refuse_unknown(got: Any, valid: Sequence[str], where: str, error: type[Exception],
                   spellings: Mapping[str, str] | None = None) -> None:
    """``got`` must be a mapping whose keys are all in ``valid``; a typo names the close key
    (``spellings`` maps other spellings, e.g. a command-line flag's, to their key)."""
    if not isinstance(got, Mapping):
        raise error(f"{where} must be a mapping with keys: {', '.join(sorted(valid))}")
    unknown = sorted(set(got) - set(valid), key=str)
    if unknown:
        key = str(unknown[0]).lstrip("-").replace("-", "_")
        close = [spellings[key]] if key in (spellings or {}) else \
            difflib.get_close_matches(key, list(valid), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise error(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
                    f"valid keys: {', '.join(sorted(valid))}{hint}")


def _renamed(section: Mapping[str, Any], opts: Sequence[Opt], where: str) -> dict[str, Any]:
    """``section`` with deprecated keys renamed to the new ones (one warning each)."""
    out = dict(section)
    for opt in opts:
        for alias in opt.aliases:
            if alias.old.startswith("-") or alias.old not in out:
                continue
            value = out.pop(alias.old)
            deprecated(f"key {alias.old!r} in {where}", repr(opt.name), "ue-dist")
            if opt.name not in out:
                out[opt.name] = alias.convert(value) if alias.convert else value
    return out


def _number(value: Any, opt: Opt, where: str, error: type[Exception]) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a number, got {value!r}")
    if opt.type is int and int(value) != value:
        raise error(f"{where} must be an integer, got {value!r}")
    value = opt.type(value)
    if not math.isfinite(value):  # NaN passes every comparison; no option means infinity
        raise error(f"{where} must be a finite number, got {value!r}")
    low, high = opt.low, opt.high
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"lie in [{low}, {high}]" if high is not None else f"be >= {low}"
        raise error(f"{where} must {bound}, got {value!r}")
    return value


def check_value(value: Any, opt: Opt, where: str, error: type[Exception]) -> Any:
    """One spec value, checked against its declaration (``where`` names it in errors)."""
    if value is None:
        return None
    if opt.check is not None:
        opt.check(value, where, error)
        return value
    if opt.type in (int, float):
        value = _number(value, opt, where, error)
    elif opt.type is bool:
        value = bool(value)
    elif opt.type is dict and not isinstance(value, Mapping):
        raise error(f"{where} must be a mapping, got {value!r}")
    elif opt.type is list and not isinstance(value, (list, tuple)):
        value = [value]  # one value is a list of one
    choices = opt.valid_choices()
    if choices is not None and opt.type is not list and value not in choices:
        raise error(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_section(section: Any, opts: Sequence[Opt], where: str, error: type[Exception], *,
                  nested: bool = True) -> dict[str, Any]:
    """A spec mapping checked against ``opts``: deprecated keys renamed (with a warning), unknown
    keys refused (naming the key, ``where`` and the close name), values typed and range-checked,
    defaults filled in; ``dict`` values come back as plain dicts (``None`` where absent and
    without a default), ``list`` values as lists.
    Values are named ``WHERE.KEY`` in errors (``KEY`` alone with ``nested=False``)."""
    opts = [o for o in opts if o.spec]
    if section is None:
        section = {}
    if isinstance(section, Mapping):
        section = _renamed(section, opts, where)
    flags = {o.flag.lstrip("-").replace("-", "_"): o.name for o in opts if o.cli}
    refuse_unknown(section, [o.name for o in opts], where, error, flags)
    out: dict[str, Any] = {}
    for opt in opts:
        if opt.required and section.get(opt.name) is None:
            raise error(f"{where} needs {opt.name!r} ({opt.help})")
        name = f"{where}.{opt.name}" if nested else opt.name
        value = check_value(section.get(opt.name, opt.default), opt, name, error)
        if opt.type in (dict, list) and value is not None:
            value = dict(value) if opt.type is dict else list(value)
        out[opt.name] = value
    return out


def read_spec(url: str, what: str, opts: Sequence[Opt], error: type[Exception],
              storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping from a path or any fsspec URL; ``what`` names it in errors."""
    import yaml

    from ue_dist.data import storage

    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise error(f"{what} {url!r} does not exist") from None
    try:
        spec = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise error(f"{what} {url!r} is not valid YAML or JSON: {why}") from None
    if not isinstance(spec, Mapping):
        raise error(f"{what} {url!r} must be a mapping; valid keys: "
                    f"{', '.join(sorted(o.name for o in opts))}")
    return dict(spec)


def spec_folder(url: str) -> str:
    """The folder of a spec file (local: absolute), against which its relative paths resolve."""
    import os

    if "://" in url:
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))


def resolve_path(value: str, base: str) -> str:
    """``value`` as written if absolute or a URL, else joined to ``base`` (a folder or URL)."""
    import os

    if "://" in value or os.path.isabs(value):
        return value
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.normpath(posixpath.join(rest, value))
    return os.path.normpath(os.path.join(base, value))
