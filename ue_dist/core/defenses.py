"""Defences a victim may apply to its (possibly protected) training data.

Two kinds, named by one string (``"median"``, ``"jpeg:quality=30"``, ``"cutout:size=8"``):

* data pre-processing, applied once to the uint8 training images before training:
  3x3 ``mean``, ``median`` and ``gaussian`` low-pass filters (REM paper, App. D; as the
  REM authors' ``cv2.blur`` / ``cv2.medianBlur`` / ``cv2.GaussianBlur(x, (3, 3), 0)``), ``jpeg``
  re-compression and ``grayscale`` (image shortcut squeezing, Liu et al. 2023);
* batch augmentations, applied to every float training batch and returning soft targets:
  ``mixup`` (Zhang et al. 2017), ``cutout`` (DeVries & Taylor 2017), ``cutmix`` (Yun et al.
  2019) -- the augmentations the GUE paper evaluates against.

Defences touch training data only; the test set stays as it is. Pure torch/kornia/PIL, no Ray.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ue_dist.core.config import SettingsError

#: name -> (kind, default parameters)
DEFENSES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "mean": ("pre", {"size": 3}),
    "median": ("pre", {"size": 3}),
    # sigma 0: OpenCV's kernel for the size, as the REM authors' cv2.GaussianBlur(x, (3, 3), 0)
    "gaussian": ("pre", {"size": 3, "sigma": 0.0}),
    "jpeg": ("pre", {"quality": 10}),
    "grayscale": ("pre", {}),
    "mixup": ("batch", {"alpha": 1.0}),
    "cutmix": ("batch", {"alpha": 1.0}),
    "cutout": ("batch", {"size": 0}),  # 0: half the image side (16 px at 32x32, as in the paper)
}


@dataclass
class Defense:
    name: str
    kind: str  # "none" | "pre" | "batch"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        extra = [f"{k}={v}" for k, v in self.params.items() if v != DEFENSES[self.name][1][k]]
        return self.name + (":" + ",".join(extra) if extra else "")


def defense_names() -> list[str]:
    return sorted(DEFENSES)


def parse_defense(spec: str | None) -> Defense:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``Defense``; bad names/keys are errors."""
    text = "none" if spec in (None, "") else str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in DEFENSES:
        raise SettingsError(f"unknown defense {spec!r}; valid: {', '.join(defense_names())} "
                            "(parameters as name:key=value, e.g. jpeg:quality=30)")
    kind, defaults = DEFENSES[name]
    params = dict(defaults)
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in defaults:
            raise SettingsError(f"defense {name!r}: bad parameter {item!r}; valid keys: "
                                f"{', '.join(sorted(defaults)) or '(none)'}")
        try:
            params[key] = type(defaults[key])(float(value)) if isinstance(defaults[key], int) \
                else type(defaults[key])(value)
        except ValueError:
            raise SettingsError(f"defense {name!r}: {key} must be a number, got {value!r}") from None
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


_PRE: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_filter, "median": median_filter, "gaussian": gaussian_filter,
    "grayscale": lambda x: grayscale(x),
}


def preprocess(defense: Defense | str, images_uint8: torch.Tensor,
               batch_size: int = 1024) -> torch.Tensor:
    """Apply a pre-processing defence to uint8 NCHW images (others pass through unchanged)."""
    d = parse_defense(defense) if isinstance(defense, str) else defense
    if d.kind != "pre":
        return images_uint8
    if d.name == "jpeg":
        return jpeg(images_uint8, d.params["quality"])
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


_BATCH = {"mixup": mixup, "cutmix": cutmix, "cutout": cutout}


def batch_augment(defense: Defense | str, x: torch.Tensor, targets: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a batch defence to float images and soft targets (others pass through)."""
    d = parse_defense(defense) if isinstance(defense, str) else defense
    if d.kind != "batch":
        return x, targets
    return _BATCH[d.name](x, targets, generator=generator, **d.params)
