"""Defences a victim may apply to its (possibly protected) training data.

Three kinds, named by one string (``"median"``, ``"jpeg:quality=30"``, ``"ueraser:max:repeat=5"``);
``DEFENSES`` is the registry (name -> kind, default parameters, paper), listed by
``ue-dist defences``:

* ``pre``: data pre-processing, applied once to the uint8 training images before training:
  3x3 ``mean``, ``median`` and ``gaussian`` low-pass filters (REM paper, App. D; as the
  REM authors' ``cv2.blur`` / ``cv2.medianBlur`` / ``cv2.GaussianBlur(x, (3, 3), 0)``), ``jpeg``
  re-compression, ``grayscale`` and ``bdr`` bit-depth reduction (image shortcut squeezing, Liu
  et al. 2023), and ``avatar``, diffusion purification with a denoiser the defender trained
  on clean data (Dolatabadi et al. 2023; ``core/diffusion.py``);
* ``batch``: augmentations applied to every float training batch, returning soft targets:
  ``mixup`` (Zhang et al. 2017), ``cutout`` (DeVries & Taylor 2017), ``cutmix`` (Yun et al.
  2019) -- the augmentations the GUE paper evaluates against -- and ``noise``, random noise of a
  stated radius (the random-noise baseline);
* ``loss``: defences that own the step's loss, because it depends on several augmented views
  of the batch: ``ueraser``, ``ueraser-max``, ``ueraser-lite`` (Qin et al. 2023). A loss
  defence is an object called as ``(net, x, y, generator, epoch) -> (loss, logits)``
  (``defense_loss``); the victim's loss hands it the crop/flip-augmented batch.

A name may carry a mode after a colon: ``NAME:MODE[:k=v,...]`` is ``NAME-MODE[:k=v,...]`` where
that is registered (``ueraser:max:repeat=5`` = ``ueraser-max:repeat=5``). Adversarial training
(PGD-AT, TRADES, in the L-inf or L2 ball) is not a data defence but a victim setting
(``adv_eps``, ``adv_method``, ``adv_norm``; ``ue-dist evaluate --adv-eps 0.5 --adv-norm l2``);
``TRAINING_DEFENSES`` names them for the listing, and ``parse_defense`` points there.

Defences touch training data only; the test set stays as it is. Pure torch/kornia/PIL, no Ray.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ue_dist.core.config import SettingsError, parse_radius
from ue_dist.core.precision import upcast


class Entry(NamedTuple):
    """One registered defence: its kind, default parameters and the paper it comes from."""
    kind: str  # "none" | "pre" | "batch" | "loss"
    params: dict[str, Any]
    paper: str
    note: str = ""


_ISS = "Liu, Zhao, Larson: Image Shortcut Squeezing, ICML 2023"
_UERASER = ("Qin et al.: Learning the Unlearnable: Adversarial Augmentations Suppress "
            "Unlearnable Example Attacks, 2023")
_UE_AUG = ("PlasmaBrightness + PlasmaContrast (p=plasma_p) + ChannelShuffle (p=0.5) + "
           "TrivialAugment (kornia), after crop/flip")

#: name -> Entry(kind, default parameters, paper, note)
DEFENSES: dict[str, Entry] = {
    "none": Entry("none", {}, "no defence"),
    "mean": Entry("pre", {"size": 3}, "Fu et al.: Robust Unlearnable Examples, ICLR 2022, App. D",
                  "box blur (cv2.blur)"),
    "median": Entry("pre", {"size": 3}, "Fu et al.: Robust Unlearnable Examples, ICLR 2022, "
                    "App. D", "median blur (cv2.medianBlur)"),
    # sigma 0: OpenCV's kernel for the size, as the REM authors' cv2.GaussianBlur(x, (3, 3), 0)
    "gaussian": Entry("pre", {"size": 3, "sigma": 0.0}, "Fu et al.: Robust Unlearnable "
                      "Examples, ICLR 2022, App. D", "Gaussian blur; sigma 0 = OpenCV's kernel"),
    "jpeg": Entry("pre", {"quality": 10}, _ISS, "JPEG re-compression at quality"),
    "grayscale": Entry("pre", {}, _ISS, "luminance in every channel"),
    # bits 2: APBench's util.aug_train (transforms.RandomPosterize(bits=2, p=1)); the ISS code
    # takes --bdr BITS with no default
    "bdr": Entry("pre", {"bits": 2}, _ISS + " (BDR; APBench's bits=2)",
                 "bit-depth reduction: keep the top `bits` bits (torchvision posterize)"),
    "mixup": Entry("batch", {"alpha": 1.0}, "Zhang et al.: mixup, ICLR 2018"),
    "cutmix": Entry("batch", {"alpha": 1.0}, "Yun et al.: CutMix, ICCV 2019"),
    # 0: half the image side (16 px at 32x32, as in the paper)
    "cutout": Entry("batch", {"size": 0}, "DeVries & Taylor: Cutout, 2017",
                    "size 0 = half the image side"),
    "noise": Entry("batch", {"eps": 8 / 255, "dist": "uniform"}, "random-noise baseline "
                   "(APBench-style matrices)", "fresh noise per batch: uniform in [-eps, eps] "
                   "(L-inf radius eps) or gaussian N(0, eps^2); clipped to [0, 1]"),
    # the three variants of the UEraser paper; defaults from lafeat/apbench (train.py and
    # defense/ueraser.py) and lafeat/ueraser (LSP/cifar_train.py, EM/QuickStart.ipynb)
    "ueraser": Entry("loss", {"repeat": 5, "epochs": 50, "plasma_p": 1.0}, _UERASER,
                     "max per-sample loss over `repeat` draws for the first `epochs` epochs, "
                     "then one draw: " + _UE_AUG),
    "ueraser-max": Entry("loss", {"repeat": 5, "epochs": 0, "plasma_p": 1.0}, _UERASER,
                         "max per-sample loss over `repeat` draws, every epoch (epochs 0 = "
                         "all): " + _UE_AUG),
    "ueraser-lite": Entry("loss", {"plasma_p": 1.0}, _UERASER, "one draw per step: " + _UE_AUG),
    # t=60 of 1,000 steps: APBench's defense/diffusion (args.t); steps 0 = all t of them
    "avatar": Entry("pre", {"model": "", "t": 60, "steps": 0, "seed": 0},
                    "Dolatabadi, Erfani & Leckie: The Devil's Advocate: Shattering the Illusion "
                    "of Unexploitable Data using Diffusion Models (AVATAR), SaTML 2024",
                    "diffusion purification: diffuse to t of 1000 VP steps, DDPM's reverse chain "
                    "back (`steps` respaced ones, 0 = all) with the denoiser at model=PATH|URL "
                    "(`ue-dist train-purifier`; core/diffusion.py)"),
}

#: adversarial training: victim settings, not data defences (listed by `ue-dist defences`)
TRAINING_DEFENSES: dict[str, Entry] = {
    "pgd-at": Entry("training", {"adv_norm": "linf", "adv_steps": 10, "adv_step_frac": 0.25},
                    "Madry et al.: Towards Deep Learning Models Resistant to Adversarial "
                    "Attacks, ICLR 2018", "victim setting: --adv-eps R [--adv-norm linf|l2] "
                    "(--adv-method pgd; core/adversarial.py)"),
    "trades": Entry("training", {"adv_norm": "linf", "adv_steps": 10, "trades_beta": 6.0},
                    "Zhang et al.: TRADES, ICML 2019", "victim setting: --adv-eps R "
                    "--adv-method trades [--adv-norm linf|l2] (core/adversarial.py)"),
}
NOISE_DISTS = ("uniform", "gaussian")


@dataclass
class Defense:
    name: str
    kind: str  # "none" | "pre" | "batch" | "loss"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        extra = [f"{k}={v}" for k, v in self.params.items() if v != DEFENSES[self.name].params[k]]
        return self.name + (":" + ",".join(extra) if extra else "")


def defense_names() -> list[str]:
    return sorted(DEFENSES)


def _value(name: str, key: str, default: Any, value: str) -> Any:
    value = value.strip()
    try:
        if isinstance(default, int):
            return int(float(value))
        if isinstance(default, float):  # radii may be fractions: noise:eps=8/255
            return parse_radius(value, key) if "/" in value else float(value)
        return type(default)(value)
    except (ValueError, SettingsError):
        raise SettingsError(f"defense {name!r}: {key} must be a number, got {value!r}") from None


def parse_defense(spec: str | None) -> Defense:
    """``"name"``, ``"name:key=value,key=value"`` or ``"name:mode:key=value,..."`` (= the
    registered ``name-mode``) -> ``Defense``; bad names, modes and keys are errors."""
    text = "none" if spec in (None, "") else str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    head, colon, tail = rest.partition(":")
    modes = sorted(n[len(name) + 1:] for n in DEFENSES if n.startswith(name + "-"))
    if modes and head.strip() and "=" not in head and "," not in head:  # ueraser:max[:repeat=5]
        mode = f"{name}-{head.strip().lower()}"
        if mode not in DEFENSES:
            raise SettingsError(f"defense {name!r}: unknown mode {head.strip()!r}; valid modes: "
                                f"{', '.join(modes) or '(none)'} (parameters as "
                                f"{name}:key=value)")
        name, rest = mode, tail
    elif colon:
        raise SettingsError(f"defense {spec!r}: parameters are name:key=value,key=value (one "
                            "colon; name:mode:key=value for a mode)")
    if name in TRAINING_DEFENSES:
        raise SettingsError(f"{name!r} is adversarial training, a victim setting, not a data "
                            f"defence: {TRAINING_DEFENSES[name].note} (`ue-dist defences`)")
    if name not in DEFENSES:
        raise SettingsError(f"unknown defense {spec!r}; valid: {', '.join(defense_names())} "
                            "(parameters as name:key=value, e.g. jpeg:quality=30; "
                            "`ue-dist defences` lists them)")
    kind, defaults = DEFENSES[name].kind, DEFENSES[name].params
    params = dict(defaults)
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in defaults:
            raise SettingsError(f"defense {name!r}: bad parameter {item!r}; valid keys: "
                                f"{', '.join(sorted(defaults)) or '(none)'}")
        params[key] = _value(name, key, defaults[key], value)
    _check_params(name, params)
    return Defense(name, kind, params)


def _check_params(name: str, p: dict[str, Any]) -> None:
    if name in ("mean", "median", "gaussian") and (p["size"] < 1 or p["size"] % 2 == 0):
        raise SettingsError(f"defense {name!r}: size must be an odd positive integer, got {p['size']}")
    if name == "gaussian" and not p["sigma"] >= 0:
        raise SettingsError(f"defense 'gaussian': sigma must be >= 0 (0: OpenCV's sigma for the "
                            f"size), got {p['sigma']}")
    if name == "jpeg" and not 1 <= p["quality"] <= 95:
        raise SettingsError(f"defense 'jpeg': quality must lie in [1, 95], got {p['quality']}")
    if name in ("mixup", "cutmix") and not p["alpha"] > 0:
        raise SettingsError(f"defense {name!r}: alpha must be > 0, got {p['alpha']}")
    if name == "cutout" and p["size"] < 0:
        raise SettingsError(f"defense 'cutout': size must be >= 0, got {p['size']}")
    if name == "avatar":
        _check_avatar(p)
    if name == "bdr" and not 1 <= p["bits"] <= 8:
        raise SettingsError(f"defense 'bdr': bits must lie in [1, 8], got {p['bits']}")
    if name == "noise":
        if not 0 <= p["eps"] <= 1:
            raise SettingsError(f"defense 'noise': eps must lie in [0, 1] (the [0, 1] pixel "
                                f"scale, e.g. 8/255), got {p['eps']}")
        if p["dist"] not in NOISE_DISTS:
            raise SettingsError(f"defense 'noise': dist must be one of {', '.join(NOISE_DISTS)}, "
                                f"got {p['dist']!r}")
    if name.startswith("ueraser"):
        if p.get("repeat", 1) < 1:
            raise SettingsError(f"defense {name!r}: repeat must be >= 1, got {p['repeat']}")
        if p.get("epochs", 0) < 0:
            raise SettingsError(f"defense {name!r}: epochs must be >= 0 (0: every epoch), got "
                                f"{p['epochs']}")
        if not 0 <= p["plasma_p"] <= 1:
            raise SettingsError(f"defense {name!r}: plasma_p must lie in [0, 1], got "
                                f"{p['plasma_p']}")


def _check_avatar(p: dict[str, Any]) -> None:
    import os

    if not p["model"]:
        raise SettingsError("defense 'avatar' needs model=PATH: a denoiser checkpoint (train one "
                            "on clean images with `ue-dist train-purifier CLEAN_URL OUT.pt`)")
    if "://" not in p["model"]:  # trials may run in another working directory
        p["model"] = os.path.abspath(p["model"])
    if p["t"] < 1:
        raise SettingsError(f"defense 'avatar': t must be >= 1 (diffusion steps of 1000), got "
                            f"{p['t']}")
    if p["steps"] < 0:
        raise SettingsError(f"defense 'avatar': steps must be >= 0 (0: all t), got {p['steps']}")


def avatar(images_uint8: torch.Tensor, model: str, t: int = 60, steps: int = 0, seed: int = 0,
           batch_size: int = 256) -> torch.Tensor:
    """AVATAR's purification of uint8 NCHW images with the denoiser checkpoint at ``model``
    (``core.diffusion.purify``), seeded; quantised back to uint8."""
    from ue_dist.core.diffusion import Denoiser, purify
    from ue_dist.data import storage

    try:
        raw = storage.read_bytes(model)
    except FileNotFoundError:
        raise SettingsError(f"defense 'avatar': model {model!r} does not exist (train one with "
                            "`ue-dist train-purifier CLEAN_URL OUT.pt`)") from None
    try:
        denoiser = Denoiser.from_bytes(raw, f"defense 'avatar': model {model!r}")
        gen = torch.Generator().manual_seed(int(seed))
        out = []
        for start in range(0, len(images_uint8), batch_size):
            x = images_uint8[start:start + batch_size].float().div(255.0)
            y = purify(denoiser, x, t_star=int(t), steps=int(steps), generator=gen)
            out.append(y.mul(255.0).round().to(torch.uint8))
    except ValueError as exc:
        raise SettingsError(f"defense 'avatar': {exc}") from None
    return torch.cat(out) if out else images_uint8.clone()


# pre-processing (float [0,1] NCHW in, same out) ---------------------------------------------------
def mean_filter(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    import kornia
    return kornia.filters.box_blur(x, (size, size), border_type="reflect")


def median_filter(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    import kornia
    return kornia.filters.median_blur(x, (size, size))


# OpenCV's fixed kernels for sigma <= 0 and an odd size <= 7 (getGaussianKernel's
# small_gaussian_tab): cv2.GaussianBlur(x, (3, 3), 0) filters with [1/4, 1/2, 1/4], not with the
# sigma = 0.3 * ((3 - 1) * 0.5 - 1) + 0.8 = 0.8 its documentation states ([0.239, 0.522, 0.239]).
_CV2_FIXED = {1: (1.0,), 3: (0.25, 0.5, 0.25), 5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
              7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125)}


def gaussian_kernel1d(size: int, sigma: float = 0.0) -> torch.Tensor:
    """The 1-D kernel cv2.getGaussianKernel(size, sigma) builds: for ``sigma <= 0`` its fixed
    kernel (size <= 7) or ``sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8``; else exp(-x^2 / 2s^2)."""
    if sigma <= 0 and size in _CV2_FIXED:
        return torch.tensor(_CV2_FIXED[size])
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).float()


def gaussian_filter(x: torch.Tensor, size: int = 3, sigma: float = 0.0) -> torch.Tensor:
    """Separable Gaussian blur with cv2's default border (BORDER_REFLECT_101 = torch 'reflect')."""
    import kornia
    k = gaussian_kernel1d(size, sigma).to(x)[None]
    return kornia.filters.filter2d_separable(x, k, k, border_type="reflect")


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luminance repeated over the channels (the model keeps its input width)."""
    if x.shape[1] == 1:
        return x
    import kornia
    return kornia.color.rgb_to_grayscale(x).expand_as(x).contiguous()


def jpeg(images_uint8: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """Re-encode every uint8 NCHW image as JPEG at ``quality`` (PIL) and decode it again."""
    out = torch.empty_like(images_uint8)
    for i, img in enumerate(images_uint8.permute(0, 2, 3, 1).numpy()):
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(pil.mode))
        out[i] = torch.from_numpy(dec.reshape(img.shape).copy()).permute(2, 0, 1)
    return out


def bdr(images_uint8: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Bit-depth reduction of uint8 images to ``bits`` bits: ``x & ~(2^(8-bits) - 1)``, i.e.
    ``floor(x / 2^(8-bits)) * 2^(8-bits)`` (levels 0, 64, 128, 192 at 2 bits). This is
    torchvision's ``posterize``, which ISS (``transforms.RandomPosterize(bits=bdr, p=1)``) and
    APBench (``bits=2``) apply to the uint8 training images; not ``round(x (2^b - 1)) / (2^b -
    1)``, whose levels would include 255."""
    mask = (0xFF << (8 - int(bits))) & 0xFF
    return images_uint8 & mask


_PRE: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_filter, "median": median_filter, "gaussian": gaussian_filter,
    "grayscale": lambda x: grayscale(x),
}


# the pre-processing defences as differentiable EOT views (defence-aware protection) -------------
def jpeg_differentiable(x: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """JPEG at ``quality`` as a differentiable function of float [0, 1] images (kornia's
    differentiable codec: the rounding of the DCT coefficients by a smooth approximation);
    1-channel images are coded as gray RGB and averaged back."""
    import kornia
    channels = x.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"the differentiable JPEG view takes 1- or 3-channel images, got {channels}")
    rgb = x.expand(-1, 3, -1, -1) if channels == 1 else x
    q = torch.full((x.shape[0],), float(quality), device=x.device, dtype=x.dtype)
    out = kornia.enhance.jpeg_codec_differentiable(rgb, q)
    return out.mean(1, keepdim=True) if channels == 1 else out


def bdr_straight_through(x: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """``bdr`` on the stored uint8 value of each pixel, forward exact, backward the identity (a
    straight-through estimator: the quantiser's own gradient is zero almost everywhere)."""
    step = 2 ** (8 - int(bits))
    q = torch.floor(torch.round(x * 255) / step) * step / 255
    return x + (q - x).detach()


EOT_VIEW_KINDS = ("pre",)
# UEraser is a loss defence, but what its loss draws from is a distribution of augmentations of
# one image: a view (one fresh draw per call; -Max's maximum over draws is the defender's
# training rule, which an expectation over the same draws stands in for)
AUGMENTATION_VIEWS = ("ueraser", "ueraser-max", "ueraser-lite")
# a diffusion chain per view and step, and a checkpoint the protector does not have
NOT_EOT_VIEWS = ("avatar",)


def eot_view(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The defence ``spec`` (``jpeg``, ``jpeg:quality=30``, ``bdr:bits=3``, ``grayscale``,
    ``median``, ``mean``, ``gaussian``, ``ueraser``) as a differentiable map of float
    ``B x C x H x W`` images in [0, 1]: what an EOT expectation over the victims' defences draws
    from. The pre-processing defences and UEraser's augmentation (random, ``ueraser_view``) can
    be views; a batch augmentation or another loss is not a function of one image."""
    try:
        d = parse_defense(spec)
    except SettingsError as exc:
        raise SettingsError(f"eot_defences: {exc}") from None
    if d.kind == "none":
        raise SettingsError("eot_defences: 'none' is no view; leave the list empty for none")
    valid = ", ".join(sorted(n for n, e in DEFENSES.items()
                             if (e.kind in EOT_VIEW_KINDS or n in AUGMENTATION_VIEWS)
                             and n not in NOT_EOT_VIEWS))
    if d.name in AUGMENTATION_VIEWS:
        return ueraser_view(float(d.params["plasma_p"]))
    if d.kind not in EOT_VIEW_KINDS:
        raise SettingsError(f"eot_defences: {spec!r} is a {d.kind} defence; only the "
                            f"pre-processing defences and UEraser's augmentation can be EOT "
                            f"views ({valid})")
    if d.name in NOT_EOT_VIEWS:
        raise SettingsError(f"eot_defences: {d.name!r} (diffusion purification) is no EOT view: "
                            f"it runs a diffusion chain with the defender's own model; views: "
                            f"{valid}")
    p = dict(d.params)
    if d.name == "jpeg":
        return lambda x: jpeg_differentiable(x, int(p["quality"]))
    if d.name == "bdr":
        return lambda x: bdr_straight_through(x, int(p["bits"]))
    fn = _PRE[d.name]
    return lambda x: fn(x, **p)


def ueraser_view(plasma_p: float = 1.0, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """UEraser's augmentation (``ueraser_pipeline``) as an EOT view: a fresh draw per call from
    a generator of its own (seeded, so a fit in one process repeats its draws). kornia's plasma
    and contrast operations pass gradients to the input, some TrivialAugment operations do not
    (6 of 60 draws on random 8-image batches gave a zero input gradient): those samples' noise
    does not move in that step."""
    draws = UEraserLoss(repeat=1, plasma_p=plasma_p)
    generator = torch.Generator().manual_seed(int(seed))
    return lambda x: draws.augment(x, generator)


def eot_views(specs: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """``eot_view`` of each spec of a method's ``eot_defences`` setting (a list of specs)."""
    if isinstance(specs, str):
        specs = [v for v in specs.split(",") if v.strip()]
    return tuple(eot_view(str(v)) for v in specs or ())


def preprocess(defense: Defense | str, images_uint8: torch.Tensor,
               batch_size: int = 1024) -> torch.Tensor:
    """Apply a pre-processing defence to uint8 NCHW images (others pass through unchanged)."""
    d = parse_defense(defense) if isinstance(defense, str) else defense
    if d.kind != "pre":
        return images_uint8
    if d.name == "jpeg":
        return jpeg(images_uint8, d.params["quality"])
    if d.name == "bdr":
        return bdr(images_uint8, d.params["bits"])
    if d.name == "avatar":
        return avatar(images_uint8, **d.params)
    fn = _PRE[d.name]
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = images_uint8[start:start + batch_size].float().div(255.0)
        y = fn(x, **d.params).clamp(0, 1)
        out.append(y.mul(255.0).round().to(torch.uint8))
    return torch.cat(out) if out else images_uint8.clone()


# batch augmentations (float batch + soft targets) -----------------------------------------------
def _beta(alpha: float, generator: torch.Generator | None) -> float:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _box(h: int, w: int, area: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A box of about ``area`` * h * w pixels with a uniform random centre, clipped at the border."""
    ch = int(round(h * float(np.sqrt(area))))
    cw = int(round(w * float(np.sqrt(area))))
    cy = int(torch.randint(0, h, (1,), generator=generator).item())
    cx = int(torch.randint(0, w, (1,), generator=generator).item())
    return (max(cy - ch // 2, 0), min(cy + ch - ch // 2, h),
            max(cx - cw // 2, 0), min(cx + cw - cw // 2, w))


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    lam = _beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(x: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    lam = _beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = _box(h, w, 1.0 - lam, generator)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the pasted area decides the label weight
    return out, lam * targets + (1 - lam) * targets[perm]


def cutout(x: torch.Tensor, targets: torch.Tensor, size: int = 0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero one ``size`` x ``size`` square per image (centre uniform, clipped at the border)."""
    b, _, h, w = x.shape
    size = size or max(1, min(h, w) // 2)
    cy = torch.randint(0, h, (b,), generator=generator).to(x.device).view(b, 1, 1)
    cx = torch.randint(0, w, (b,), generator=generator).to(x.device).view(b, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= cy - size // 2) & (rows < cy - size // 2 + size) & \
             (cols >= cx - size // 2) & (cols < cx - size // 2 + size)
    return x.masked_fill(inside.unsqueeze(1), 0.0), targets


def noise(x: torch.Tensor, targets: torch.Tensor, eps: float = 8 / 255, dist: str = "uniform",
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add fresh random noise to every pixel of the batch, then clip to [0, 1]: ``uniform`` in
    [-eps, eps] (the same L-inf ball as the protection's radius), or ``gaussian`` with standard
    deviation eps. Drawn on the CPU from ``generator`` (the same numbers on any device)."""
    shape = tuple(x.shape)
    if dist == "gaussian":
        n = torch.randn(shape, generator=generator) * eps
    else:
        n = (torch.rand(shape, generator=generator) * 2 - 1) * eps
    return (x + n.to(x.device, x.dtype)).clamp(0, 1), targets


_BATCH = {"mixup": mixup, "cutmix": cutmix, "cutout": cutout, "noise": noise}


def batch_augment(defense: Defense | str, x: torch.Tensor, targets: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a batch defence to float images and soft targets (others pass through)."""
    d = parse_defense(defense) if isinstance(defense, str) else defense
    if d.kind != "batch":
        return x, targets
    return _BATCH[d.name](x, targets, generator=generator, **d.params)


# loss defences (own the step's loss) ------------------------------------------------------------
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def ueraser_pipeline(channels: int, plasma_p: float = 1.0) -> torch.nn.Module:
    """UEraser's augmentation as the authors build it with kornia (lafeat/apbench
    ``defense/ueraser.py`` and lafeat/ueraser ``EM/QuickStart.ipynb``): RandomPlasmaBrightness
    (roughness 0.3-0.7, intensity 0.5-1.0), RandomPlasmaContrast (roughness 0.3-0.7), both with
    probability ``plasma_p`` (1.0 there; lafeat/ueraser's ``ueraser.py`` module uses 0.5), then
    RandomChannelShuffle (p 0.5) and TrivialAugment with kornia's default policy. On one-channel
    images the channel shuffle is the identity and is left out."""
    import kornia.augmentation as K
    ops: list[Any] = [
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False,
                                 p=float(plasma_p), keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=float(plasma_p)),
    ]
    if channels > 1:
        ops.append(K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True))
    ops.append(K.auto.TrivialAugment())
    return K.AugmentationSequential(*ops)


def kornia_augment(pipeline: torch.nn.Module) -> Augment:
    """Run a kornia pipeline reproducibly from ``generator``: kornia draws from torch's global
    generators, so they are seeded from ``generator`` inside ``fork_rng`` (the caller's global
    state is untouched, and a resumed run draws what the uninterrupted run drew). Runs in fp32
    outside any autocast region; the output is clipped to [0, 1]."""
    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        cuda = x.device.type == "cuda"
        with torch.random.fork_rng(devices=[x.device] if cuda else []), \
                torch.autocast(x.device.type, enabled=False):
            torch.manual_seed(seed)
            out = pipeline(x.float())
        return out.clamp(0, 1).to(x.dtype)

    return augment


class UEraserLoss:
    """UEraser (Qin et al. 2023): train on the MAXIMUM per-sample cross-entropy over ``repeat``
    augmented views of the batch (each a fresh draw of the augmentation over the whole batch,
    one forward each) for the first ``epochs`` epochs (0: every epoch), then on one view per
    step; the mean over the batch of those maxima is the step's loss, the last view's logits
    feed the accuracy meter. This is the authors' loop (lafeat/apbench ``train.py``: 5 views,
    ``--repeat_epoch`` 0 for -Lite, 50 for UEraser, 300 -- every epoch -- for -Max; lafeat/ueraser
    ``LSP/cifar_train.py``: ``--repeats 5``, max for the first 50 epochs in 'standard' mode).
    ``repeat = 1`` is UEraser-Lite. ``augment(x, generator)`` is the view distribution (default:
    ``ueraser_pipeline``), replaceable for tests."""

    def __init__(self, repeat: int = 5, epochs: int = 0, plasma_p: float = 1.0,
                 augment: Augment | None = None) -> None:
        self.repeat, self.epochs, self.plasma_p = int(repeat), int(epochs), float(plasma_p)
        self._augment = augment
        self._pipelines: dict[int, Augment] = {}

    def views(self, epoch: int) -> int:
        """How many views a step of ``epoch`` (0-based, completed epochs) takes."""
        return self.repeat if self.epochs == 0 or epoch < self.epochs else 1

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self._augment is not None:
            return self._augment(x, generator)
        c = int(x.shape[1])
        if c not in self._pipelines:
            self._pipelines[c] = kornia_augment(ueraser_pipeline(c, self.plasma_p))
        return self._pipelines[c](x, generator)

    def __call__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        losses, logits = [], None
        for _ in range(self.views(epoch)):
            logits = upcast(net(self.augment(x, generator)))
            losses.append(F.cross_entropy(logits, y, reduction="none"))
        return torch.stack(losses).max(dim=0).values.mean(), logits


def defense_loss(defense: Defense | str) -> UEraserLoss:
    """The loss object of a ``loss`` defence."""
    d = parse_defense(defense) if isinstance(defense, str) else defense
    if d.kind != "loss":
        raise SettingsError(f"defense {d.name!r} is a {d.kind!r} defence, not a loss defence")
    p = d.params
    return UEraserLoss(repeat=p.get("repeat", 1), epochs=p.get("epochs", 0),
                       plasma_p=p["plasma_p"])


def listing() -> dict[str, dict[str, Any]]:
    """Every defence (and the adversarial-training victim settings) for ``ue-dist defences``."""
    out = {name: {"kind": e.kind, "params": dict(e.params), "paper": e.paper, "note": e.note}
           for name, e in sorted(DEFENSES.items())}
    out.update({name: {"kind": e.kind, "params": dict(e.params), "paper": e.paper,
                       "note": e.note} for name, e in TRAINING_DEFENSES.items()})
    return out
