"""AR: class-wise autoregressive perturbations (model-free, L2).

Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein & Jacobs, "Autoregressive Perturbations
for Data Poisoning", NeurIPS 2022; official code github.com/psandovalsegura/autoregressive-poisoning
(``autoregressive.py``: ``ARProcessPerturb3Channel``; ``autoregressive_param_finder.py``: the
coefficient search; ``create_ar_poisons_3channel.py``: the poison).

Threat model: L2. Every image of class ``y`` gets ``eps * N_y`` with ``|N_y|_2 = 1`` over the whole
``C x H x W`` image on the [0, 1] scale (the contract's ``norm = l2`` keeps ``|x' - x|_2 <= eps``
after rounding). Paper / code default for CIFAR-10: ``eps = 1.0`` in L2 (README table; ``--epsilon
1.0 --p_norm 2``); 3 for STL-10.

An AR process per class and channel: a ``3 x 3`` window ``b_c`` whose last entry (the pixel being
generated) is 0 and whose other 8 entries sum to 1. Generation (``generate``): a Gaussian start
signal of ``(H + crop) x (W + crop)``; every entry from row 2 / column 2 on, in raster order, is
replaced by ``sum(b_c * window)`` of its 3 x 3 window ending at it; the first ``crop`` rows and
columns are cut off (code: 36 x 36 cropped by 4 for 32 x 32 images) and the result scaled to
the L2 norm. Hence the invariant a test checks: the filter ``b_c`` with ``-1`` as last entry gives
zero on every 3 x 3 window of the generated noise.

The coefficients come from the authors' greedy search (``autoregressive_param_finder.py``):
draw ``b ~ N(0, 1)`` per channel, zero its last entry, divide by the sum; generate 3 signals
(``36 x 36``, crop 4, L2 1) and reject the candidate if any diverges (raw L2 norm above 50, or
NaN); reject it too if some already accepted process's filter responds to its last signal with
less than 10 (``response = relu(conv2d(signal, filter)).sum()``); accept until ``K`` processes are
found. Defaults of the code: ``--required_nm_response 10 --gen_norm_upper_bound 50``, 3 trials.
The code's poison uses its released CIFAR-10 coefficients (``RANDOM_3C_AR_PARAMS_RNMR_10``, one
outcome of that search): ``coefficients = released`` (both presets; 3 channels, at most 10
classes) takes them, class ``k`` the ``k``-th. ``coefficients = search`` runs the search itself,
seeded (``noise_seed``), at the image size of the data (the thresholds are the code's, set for
32 x 32 x 3; ``max_candidates`` bounds it, the code's 1,000,000). The search is slow on a CPU:
measured here, 20,000 candidates at 32 x 32 x 3 take 97 s and yield 6 of 10 processes.

Differences from the official code: class-wise: the code starts every image's process from its
own random signal (sample-wise noises from class-wise processes); here one noise per class is
generated at ``fit`` and stored, so every shard of a bucket gets the same noise and ``perturb`` is
a lookup by label. The code rounds to the grid with ``mul(255).add(0.5)`` (nearest) after
clamping; the shared contract rounds to nearest and never exceeds ``eps``.

``eps`` is protect-time (the state holds unit-norm noises). Shapes: coefficients ``K x C x 3 x
3``, noises ``K x C x H x W`` float32 (unit L2 each); images ``B x C x H x W``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext
from ue_dist.core.settings import Setting, choice, count, positive, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register
from ue_dist.methods.lsp import scaled_lookup

KERNEL = 3

# The authors' released CIFAR-10 coefficients, the ones their poison uses
# (create_ar_poisons_3channel.py: RANDOM_3C_AR_PARAMS_RNMR_10 from autoregressive_params.py; MIT
# licence, (c) 2022 Pedro Sandoval): one outcome of their search with --required_nm_response 10.
RELEASED_CIFAR10 = (  # autoregressive_params.RANDOM_3C_AR_PARAMS_RNMR_10: class x channel x 3 x 3
    (
        ((0.1561, -0.0710, 0.3743), (-0.1896, 0.0461, 0.6075), (0.0539, 0.0226, 0.0000)),
        ((-0.1016, 0.2193, 0.0472), (0.1401, 0.1561, 0.1171), (0.1742, 0.2476, 0.0000)),
        ((-0.1100, 0.2703, -0.0026), (0.2662, -0.1185, 0.0846), (0.1812, 0.4287, -0.0000)),
    ),
    (
        ((0.2346, 0.2056, -0.0480), (0.4110, 0.7504, 0.1326), (-0.1044, -0.5817, 0.0000)),
        ((-0.0308, -0.1085, 0.3997), (0.2187, 0.1830, 0.3389), (-0.1017, 0.1008, -0.0000)),
        ((0.1246, 0.1667, -0.1518), (0.2985, 0.1346, 0.3185), (0.3805, -0.2716, 0.0000)),
    ),
    (
        ((0.0951, 0.5501, 0.0344), (-0.3431, 0.0767, 0.2239), (0.4602, -0.0972, 0.0000)),
        ((0.1714, 0.1121, 0.1129), (0.3032, 0.2959, 0.0861), (0.2207, -0.3021, 0.0000)),
        ((0.2720, -0.3417, 0.2115), (0.2499, 0.3690, 0.3833), (-0.0282, -0.1158, -0.0000)),
    ),
    (
        ((-0.4241, -0.2694, 0.4091), (0.3998, 0.1572, 0.2683), (0.2700, 0.1892, -0.0000)),
        ((0.1246, 0.3024, 0.2110), (0.0538, 0.1997, 0.3283), (0.0372, -0.2570, 0.0000)),
        ((0.2038, 0.3972, -0.1963), (0.3460, -0.6439, 0.7153), (-0.2826, 0.4605, -0.0000)),
    ),
    (
        ((0.7873, -0.1756, -0.3509), (0.0763, 0.2261, -0.2704), (0.2491, 0.4581, -0.0000)),
        ((0.1287, -0.1655, 0.2488), (0.3811, -0.2307, 0.3019), (-0.0076, 0.3433, -0.0000)),
        ((0.4227, 0.0690, 0.2492), (0.0896, 0.0653, -0.1653), (-0.2349, 0.5043, -0.0000)),
    ),
    (
        ((0.1585, 0.2663, 0.1764), (0.0031, -0.0237, 0.3464), (0.0140, 0.0590, -0.0000)),
        ((0.1632, 0.5094, 0.0321), (0.3935, -0.1807, 0.2110), (-0.3620, 0.2334, -0.0000)),
        ((-0.2474, 0.1092, 0.3928), (0.2808, 0.3912, 0.1211), (-0.0635, 0.0159, 0.0000)),
    ),
    (
        ((0.8886, -0.2459, -0.4169), (-0.4120, -0.1282, 0.6105), (0.2495, 0.4546, -0.0000)),
        ((0.0679, -0.2982, 0.1039), (0.1430, 0.1596, 0.6743), (-0.2002, 0.3496, 0.0000)),
        ((-0.2195, 0.2183, -0.2665), (0.3373, 0.1907, 0.5847), (0.1977, -0.0427, 0.0000)),
    ),
    (
        ((-0.3829, 0.0158, 0.4019), (-0.0688, 0.1206, 0.2481), (0.1416, 0.5238, -0.0000)),
        ((-0.2271, 0.1683, 0.3593), (0.2671, -0.1225, 0.0217), (0.0266, 0.5066, -0.0000)),
        ((0.8539, 0.3682, 0.2899), (0.6635, 0.0130, -0.7025), (-0.1377, -0.3483, 0.0000)),
    ),
    (
        ((0.4482, 0.2220, 0.0598), (0.3965, -0.1148, 0.1683), (-0.3444, 0.1644, 0.0000)),
        ((-0.1463, 0.6120, 0.2203), (0.4039, -0.2832, -0.1290), (0.3369, -0.0146, 0.0000)),
        ((0.3759, 0.2814, 0.1494), (0.1925, 0.0552, 0.1091), (-0.0962, -0.0673, 0.0000)),
    ),
    (
        ((0.3556, 0.3477, -0.6625), (0.1812, 0.2997, -0.2139), (0.5538, 0.1385, 0.0000)),
        ((-0.0297, 0.0780, 0.2486), (0.2246, 0.1931, 0.1349), (0.0079, 0.1426, 0.0000)),
        ((0.2461, 0.1217, 0.1879), (-0.0165, 0.1160, 0.1356), (0.1772, 0.0321, -0.0000)),
    ),
)


def random_coefficients(n: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    """``n x C x 3 x 3`` AR windows as the code draws them: ``N(0, 1)``, last entry 0, the other
    8 entries divided by their sum (so they sum to 1)."""
    b = torch.randn((n, channels, KERNEL, KERNEL), generator=gen)
    b[:, :, -1, -1] = 0
    return b / b.sum(dim=(2, 3), keepdim=True)


def generate(coefficients: torch.Tensor, size: tuple[int, int], crop: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``n`` AR processes (``n x C x 3 x 3``) from Gaussian starts of ``size``; returns the
    cropped signals ``n x C x (H - crop) x (W - crop)`` (unscaled) and their L2 norms ``n``."""
    n, c = coefficients.shape[:2]
    h, w = size
    s = torch.randn((n, c, h, w), generator=gen)
    b = coefficients.to(s.dtype)
    for i in range(h - KERNEL + 1):
        for j in range(w - KERNEL + 1):
            window = s[:, :, i:i + KERNEL, j:j + KERNEL]
            s[:, :, i + KERNEL - 1, j + KERNEL - 1] = (window * b).sum(dim=(2, 3))
    out = s[:, :, crop:, crop:]
    return out, out.flatten(1).norm(dim=1)


def ar_filter(coefficients: torch.Tensor) -> torch.Tensor:
    """The matching filters: the coefficients with ``-1`` as last entry (``... x C x 3 x 3``)."""
    f = coefficients.clone()
    f[..., -1, -1] = -1
    return f


def response(filters: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The code's ``response``: ``relu(conv2d(signal, filter)).sum()`` per filter (``m x C x 3 x
    3``; channels summed) on one ``C x H x W`` signal; returns ``m`` values."""
    return F.relu(F.conv2d(signal[None], filters)).sum(dim=(0, 2, 3))


def residual(coefficients: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per channel, the AR filter applied to ``noise`` (``K x C x H x W`` with ``K x C x 3 x 3``):
    the part of each entry its window does not predict, zero for a noise the process generated."""
    k, c = coefficients.shape[:2]
    out = F.conv2d(noise.reshape(1, k * c, *noise.shape[2:]),
                   ar_filter(coefficients).reshape(k * c, 1, KERNEL, KERNEL), groups=k * c)
    return out.reshape(k, c, *out.shape[2:])


def find_processes(k: int, channels: int, size: tuple[int, int], crop: int, gen: torch.Generator,
                   trials: int = 3, norm_bound: float = 50.0, min_response: float = 10.0,
                   max_candidates: int = 1_000_000, batch: int = 64
                   ) -> tuple[torch.Tensor, int]:
    """The authors' greedy search for ``k`` separable processes; returns ``k x C x 3 x 3`` and the
    number of candidates drawn. ``SettingsError`` if ``max_candidates`` do not yield ``k``."""
    accepted: list[torch.Tensor] = []
    drawn = 0
    while len(accepted) < k:
        if drawn >= max_candidates:
            raise SettingsError(
                f"ar: found {len(accepted)} of {k} separable AR processes in {drawn} candidates "
                f"(images {channels} x {size[0] - crop} x {size[1] - crop}); raise max_candidates "
                "or lower min_response")
        cand = random_coefficients(batch, channels, gen)
        drawn += batch
        signals, norms = None, []
        for _ in range(trials):
            signals, norm = generate(cand, size, crop, gen)
            norms.append(norm)
        assert signals is not None
        norms_t = torch.stack(norms, dim=1)  # batch x trials
        last = signals / norms_t[:, -1].view(-1, 1, 1, 1)  # the last trial, scaled to L2 1
        stable = torch.isfinite(norms_t).all(dim=1) & (norms_t <= norm_bound).all(dim=1) & \
            torch.isfinite(last).flatten(1).all(dim=1)
        for i in torch.nonzero(stable).flatten().tolist():
            if accepted:
                lowest = float(response(ar_filter(torch.stack(accepted)), last[i]).min())
                if lowest < min_response:
                    continue
            accepted.append(cand[i])
            if len(accepted) == k:
                break
    return torch.stack(accepted), drawn


@register
class Autoregressive(Method):
    name = "ar"
    kind, year, needs_labels = "model-free", 2022, True
    paper = ("Sandoval-Segura et al., Autoregressive Perturbations for Data Poisoning, "
             "NeurIPS 2022")
    presets = {
        # the code's CIFAR-10 poison: L2 1.0, 36 x 36 cropped by 4, the released coefficients;
        # the search's defaults (used with coefficients=search)
        "paper": {"eps": 1.0, "norm": "l2", "coefficients": "released", "crop": 4, "trials": 3,
                  "norm_bound": 50.0, "min_response": 10.0, "max_candidates": 1_000_000,
                  "noise_seed": 0},
        # model-free and instant: the paper's, with a search (if asked for) of minutes at most
        "quick": {"eps": 1.0, "norm": "l2", "coefficients": "released", "crop": 4, "trials": 3,
                  "norm_bound": 50.0, "min_response": 10.0, "max_candidates": 20_000,
                  "noise_seed": 0},
    }
    needs_fit = True
    declared = {
        "eps": Setting("radius", "L2 radius of the class noise over the whole image ([0, 1] "
                       "scale; paper: 1.0 on CIFAR, 3.0 on STL-10)", protect_time=True),
        "norm": choice("l2", help="the bound is L2 (the contract enforces it after rounding)"),
        "coefficients": choice("released", "search", help="the authors' released CIFAR-10 "
                               "processes (3 channels, <= 10 classes) or run their search"),
        "crop": count("rows/columns generated and cut off before the noise (paper: 4)"),
        "trials": positive_int("signals generated per candidate to test its stability (3)"),
        "norm_bound": positive("a candidate whose raw signal exceeds this L2 norm diverges (50)"),
        "min_response": Setting("float", "lowest response of an accepted filter to a new "
                                "candidate's signal (10)", low=0),
        "max_candidates": positive_int("most AR windows drawn by the search (code: 1,000,000)"),
        "noise_seed": Setting("seed", "draws the coefficients and the class noises"),
    }

    def _size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        crop = int(self.settings["crop"])
        return shape[1] + crop, shape[2] + crop

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        s = self.settings
        gen = torch.Generator().manual_seed(int(s["noise_seed"]))
        k, shape = int(train.num_classes), tuple(train.image_shape)
        if min(shape[1:]) + int(s["crop"]) < KERNEL:
            raise SettingsError(f"ar: images {list(shape)} are too small for a 3 x 3 process")
        size, crop = self._size(shape), int(s["crop"])
        if s["coefficients"] == "released":
            if shape[0] != 3 or k > len(RELEASED_CIFAR10):
                raise SettingsError(
                    f"ar: the released coefficients are for 3 channels and at most "
                    f"{len(RELEASED_CIFAR10)} classes, the data have {shape[0]} and {k}; use "
                    "--set coefficients=search")
            coefficients, drawn = torch.tensor(RELEASED_CIFAR10[:k]), 0
        else:
            coefficients, drawn = find_processes(
                k, shape[0], size, crop, gen, trials=int(s["trials"]),
                norm_bound=float(s["norm_bound"]), min_response=float(s["min_response"]),
                max_candidates=int(s["max_candidates"]))
        noises = torch.empty((k, *shape))
        for cls in range(k):  # one noise per class; a diverging start is drawn again
            for _ in range(100):
                noise, norm = generate(coefficients[cls:cls + 1], size, crop, gen)
                if bool(torch.isfinite(noise).all()) and 0 < float(norm) <= float(s["norm_bound"]):
                    break
            else:
                raise SettingsError(f"ar: the process of class {cls} diverged 100 times")
            noises[cls] = noise[0] / norm
        ctx.log(f"ar: {k} AR processes ({drawn} candidates drawn), noises of shape {list(shape)}, "
                f"L2 eps={self.eps:.4f}")
        return self.new_state(train, coefficients=coefficients.float(), noises=noises.float())

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        noises = state.get("noises")
        if not isinstance(noises, torch.Tensor) or noises.ndim != 4:
            raise StateError("ar state has no K x C x H x W 'noises' tensor")
        if not isinstance(state.get("coefficients"), torch.Tensor):
            raise StateError("ar state has no 'coefficients' tensor")
        return noises.to(device).float()

    def perturb(self, loaded: torch.Tensor, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return scaled_lookup(loaded, images, labels, self.eps, self.name)
