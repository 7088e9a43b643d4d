"""Closed-form infinite-width kernels (NNGP and NTK) and the NTK mean predictor of gradient
descent on MSE, in pure torch: the surrogate of NTGA (``ue_dist.methods.ntga``).

The architectures are NTGA's official surrogates (lionelmessi6410/ntga ``generate_attack.py``,
``models/dnn_infinite.py``, ``models/cnn_infinite.py``; neural-tangents 0.3.3 ``stax``), in the
NTK parameterisation with ``W_std = sqrt(1.76)``, ``b_std = sqrt(0.18)``:

* ``fnn``: 5 x (Dense + Erf) on the flattened image, no read-out layer (the kernel of the last
  Erf layer is the kernel the official code regresses the one-hot labels with).
* ``cnn``: 2 x (Conv 5x5, stride 2, SAME padding + ReLU), Flatten, Dense, Dense, Dense (no
  nonlinearity between the three Dense layers, as in the official code).

Recursions (``q``: a pre-activation variance, ``k``: the covariance of two inputs). Dense and
Conv: ``K' = W_std^2 * mean(K) + b_std^2`` (mean over the input features, or over the
``k x k`` patch at the same offset for both inputs), ``Theta' = K' + W_std^2 * mean(Theta)``;
the input kernel is ``x . x' / d`` (over channels for a conv input). Nonlinearity ``phi``:
``K <- E[phi(u) phi(v)]``, ``Theta <- Theta * E[phi'(u) phi'(v)]`` with ``(u, v)`` Gaussian of
covariance ``[[q1, k], [k, q2]]``:

* Erf: ``(2/pi) asin(2k / sqrt((1+2q1)(1+2q2)))`` and ``(4/pi) / sqrt((1+2q1)(1+2q2) - 4k^2)``;
* ReLU (arc-cosine, order 1 and 0): ``sqrt(q1 q2) (sin th + (pi - th) cos th) / (2 pi)`` and
  ``(pi - th) / (2 pi)`` with ``cos th = k / sqrt(q1 q2)``.

A convolutional network without pooling only needs the covariances of the two images at the
same spatial position (a conv applies the same offsets to both inputs, and Flatten + Dense
averages the diagonal), so the CNN state per pair of images is an ``H x W`` map, not
``(HW)^2``. Kernels are computed in float64 (the official code enables ``jax_enable_x64``), in
tiles of ``block x block`` image pairs; with autograd on, every tile is checkpointed so the
memory of a backward stays that of one tile. All of it is differentiable w.r.t. the inputs.

The predictor is neural-tangents' ``predict.gradient_descent_mse`` (infinite width, so the
outputs at ``t = 0`` are 0): ``f_test(t) = Theta_ts Theta_reg^-1 (I - exp(-t Theta_reg / N)) y``
with ``N = y.numel()`` (their normalisation) and ``Theta_reg = Theta + diag_reg * tr(Theta)/n *
I`` (their relative regulariser); ``t = None`` is ``t = inf`` (a Cholesky solve). The matrix
exponential and a linear solve replace their eigendecomposition: the same function of the same
matrix, but torch's ``eigh`` backward divides by eigenvalue gaps, ``matrix_exp``'s does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: the official code's initial standard deviations (generate_attack.py: sqrt(1.76), sqrt(0.18))
W_STD = math.sqrt(1.76)
B_STD = math.sqrt(0.18)
ACTIVATIONS = ("erf", "relu")
# arccos / sqrt(1 - c^2) are clamped this far inside [-1, 1]: c = 1 exactly (an image with
# itself) then has a zero, not an infinite, gradient; the value moves by ~1e-6 at most
_EDGE = 1e-12


@dataclass(frozen=True)
class Architecture:
    """A stack of layers: ``("dense",)``, ``("conv", size, stride)``, ``("erf",)``,
    ``("relu",)``, ``("flatten",)``; Dense and Conv with ``w_std`` / ``b_std`` (NTK
    parameterisation)."""

    layers: tuple[tuple, ...]
    w_std: float = W_STD
    b_std: float = B_STD

    @property
    def spatial(self) -> bool:
        """Whether the input is an image (a conv layer comes before any flatten)."""
        for layer in self.layers:
            if layer[0] == "conv":
                return True
            if layer[0] in ("dense", "flatten"):
                return False
        return False


def fnn(depth: int = 5, activation: str = "erf", readout: int = 0, w_std: float = W_STD,
        b_std: float = B_STD) -> Architecture:
    """``depth`` x (Dense + activation), then ``readout`` Dense layers (official: 5, erf, 0)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    return Architecture((("dense",), (activation,)) * depth + (("dense",),) * readout,
                        w_std, b_std)


def cnn(depth: int = 2, size: int = 5, stride: int = 2, dense: int = 3, w_std: float = W_STD,
        b_std: float = B_STD) -> Architecture:
    """``depth`` x (Conv ``size`` x ``size``, ``stride``, SAME + ReLU), Flatten, ``dense`` Dense
    layers (official CIFAR/MNIST surrogate: 2, 5, 2, 3)."""
    return Architecture((("conv", size, stride), ("relu",)) * depth + (("flatten",),)
                        + (("dense",),) * dense, w_std, b_std)


def surrogate(name: str) -> Architecture:
    """The official surrogate ``fnn`` or ``cnn``."""
    if name == "fnn":
        return fnn()
    if name == "cnn":
        return cnn()
    raise ValueError(f"unknown surrogate {name!r}; valid: fnn, cnn")


# -- the recursions on one tile ------------------------------------------------------------------
def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) of JAX / TF ``SAME`` padding (the extra one goes after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_mean(a: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Mean over each ``size x size`` patch (zero padded SAME, the padding counted) of the
    last two axes: what a conv layer does to the same-position covariances."""
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    ph, pw = same_padding(h, size, stride), same_padding(w, size, stride)
    flat = F.pad(a.reshape(-1, 1, h, w), (pw[0], pw[1], ph[0], ph[1]))
    out = F.avg_pool2d(flat, size, stride)
    return out.reshape(*lead, *out.shape[-2:])


def _acos(c: torch.Tensor) -> torch.Tensor:
    return torch.acos(c.clamp(-1 + _EDGE, 1 - _EDGE))


def _layer(layer: tuple, arch: Architecture, k12, q1, q2, ntk):
    """One layer on the state: cross covariance ``k12`` (``n1 x n2 [x H x W]``), variances
    ``q1`` (``n1 [x H x W]``), ``q2``, and the NTK (same shape as ``k12``)."""
    kind = layer[0]
    wv, bv = arch.w_std ** 2, arch.b_std ** 2
    if kind in ("dense", "conv"):
        if kind == "conv":
            size, stride = layer[1], layer[2]
            k12, q1, q2, ntk = (_conv_mean(a, size, stride) for a in (k12, q1, q2, ntk))
        k12, q1, q2 = wv * k12 + bv, wv * q1 + bv, wv * q2 + bv
        return k12, q1, q2, k12 + wv * ntk
    if kind == "flatten":  # Flatten + the next Dense: the mean of the same-position entries
        return k12.mean((-2, -1)), q1.mean((-2, -1)), q2.mean((-2, -1)), ntk.mean((-2, -1))
    # a nonlinearity: q1 / q2 broadcast against the n1 x n2 tile
    s1, s2 = q1.unsqueeze(1), q2.unsqueeze(0)
    if kind == "erf":
        d1, d2 = 1 + 2 * s1, 1 + 2 * s2
        prod = d1 * d2
        dot = 4 / (math.pi * torch.sqrt(prod - 4 * k12 ** 2))
        k12 = (2 / math.pi) * torch.asin((2 * k12 / torch.sqrt(prod)).clamp(-1, 1))
        q1 = (2 / math.pi) * torch.asin(2 * q1 / (1 + 2 * q1))
        q2 = (2 / math.pi) * torch.asin(2 * q2 / (1 + 2 * q2))
        return k12, q1, q2, ntk * dot
    if kind == "relu":
        norm = torch.sqrt(s1 * s2)
        cos = (k12 / norm).clamp(-1 + _EDGE, 1 - _EDGE)
        theta = _acos(cos)
        dot = (math.pi - theta) / (2 * math.pi)
        k12 = norm * (torch.sqrt(1 - cos ** 2) + (math.pi - theta) * cos) / (2 * math.pi)
        return k12, q1 / 2, q2 / 2, ntk * dot
    raise ValueError(f"unknown layer {layer!r}")


def _input_state(x1: torch.Tensor, x2: torch.Tensor, spatial: bool):
    if spatial:  # N x C x H x W: covariances at the same position, averaged over channels
        c = x1.shape[1]
        k12 = torch.einsum("achw,bchw->abhw", x1, x2) / c
        q1, q2 = (x1 ** 2).sum(1) / c, (x2 ** 2).sum(1) / c
    else:
        x1, x2 = x1.flatten(1), x2.flatten(1)
        d = x1.shape[1]
        k12 = x1 @ x2.T / d
        q1, q2 = (x1 ** 2).sum(1) / d, (x2 ** 2).sum(1) / d
    return k12, q1, q2, torch.zeros_like(k12)


def _tile(x1: torch.Tensor, x2: torch.Tensor, arch: Architecture) -> torch.Tensor:
    state = _input_state(x1, x2, arch.spatial)
    for layer in arch.layers:
        state = _layer(layer, arch, *state)
    k12, _, _, ntk = state
    if k12.ndim != 2:
        raise ValueError("the architecture must end in a flat output (add a flatten)")
    return torch.stack((k12, ntk))


def kernels(x1: torch.Tensor, x2: Optional[torch.Tensor], arch: Architecture,
            block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nngp, ntk)``, each ``n1 x n2`` float64, between images ``x1`` (``n1 x C x H x W``, or
    ``n1 x d`` for an FNN) and ``x2`` (None: ``x1`` itself, symmetrised exactly), computed in
    ``block x block`` tiles (checkpointed when autograd records, so a backward holds one tile's
    intermediates at a time)."""
    same = x2 is None
    x1 = x1.to(torch.float64)
    x2 = x1 if same else x2.to(torch.float64)
    record = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)
    rows = []
    for i in range(0, len(x1), block):
        row = []
        for j in range(0, len(x2), block):
            a, b = x1[i:i + block], x2[j:j + block]
            row.append(checkpoint(_tile, a, b, arch, use_reentrant=False) if record
                       else _tile(a, b, arch))
        rows.append(torch.cat(row, dim=2))
    out = torch.cat(rows, dim=1)
    if same:
        out = (out + out.transpose(1, 2)) / 2
    return out[0], out[1]


# -- gradient-descent MSE training in function space ---------------------------------------------
def regularised(k_train: torch.Tensor, diag_reg: float) -> torch.Tensor:
    """``K + diag_reg * tr(K) / n * I`` (neural-tangents' relative diagonal regulariser)."""
    n = k_train.shape[0]
    scale = diag_reg * torch.diagonal(k_train).sum() / n
    return k_train + scale * torch.eye(n, dtype=k_train.dtype, device=k_train.device)


def gd_mse_weights(k_train: torch.Tensor, y_train: torch.Tensor, t: Optional[float] = None,
                   diag_reg: float = 1e-4, learning_rate: float = 1.0) -> torch.Tensor:
    """``A = K_reg^-1 (I - exp(-lr t K_reg / N)) y`` (``n x k``), so that the mean prediction at
    training time ``t`` of a test point is ``K(test, train) @ A``; ``t = None`` or inf: ``K_reg^-1
    y``. ``N = y.numel()``, neural-tangents' normalisation of the MSE gradient flow."""
    k = regularised(k_train, diag_reg)
    y = y_train.to(k.dtype)
    if t is None or math.isinf(t):
        return torch.cholesky_solve(y, torch.linalg.cholesky(k))
    decay = torch.linalg.matrix_exp(-k * (learning_rate * float(t) / y.numel()))
    return torch.linalg.solve(k, y - decay @ y)


def gd_mse_predict(k_train: torch.Tensor, y_train: torch.Tensor, k_test_train: torch.Tensor,
                   t: Optional[float] = None, diag_reg: float = 1e-4,
                   learning_rate: float = 1.0) -> torch.Tensor:
    """The infinite network's mean test outputs after training on MSE for time ``t``
    (neural-tangents ``gradient_descent_mse(k_train, y, lr, diag_reg)(t, 0., 0., k_test_train)``)."""
    return k_test_train @ gd_mse_weights(k_train, y_train, t, diag_reg, learning_rate)


def one_hot(labels: torch.Tensor, num_classes: int, dtype=torch.float64) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).to(dtype)


def block_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                  num_classes: int, arch: Architecture, t: Optional[float] = None,
                  diag_reg: float = 1e-4, block: int = 256) -> torch.Tensor:
    """Mean NTK outputs on ``x_test`` after training on (``x_train``, labels ``y_train``)."""
    _, k_train = kernels(x_train, None, arch, block)
    _, k_test = kernels(x_test, x_train, arch, block)
    return gd_mse_predict(k_train, one_hot(y_train, num_classes), k_test, t, diag_reg)
