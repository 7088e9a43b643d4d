"""NTGA: neural tangent generalization attacks.

Yuan & Wu, "Neural Tangent Generalization Attacks", ICML 2021; official code
github.com/lionelmessi6410/ntga (JAX + neural-tangents 0.3.3: ``generate_attack.py``,
``attacks/projected_gradient_descent.py``, ``attacks/fast_gradient_method.py``,
``models/dnn_infinite.py``, ``models/cnn_infinite.py``); the REM paper's NTGA baseline (Fu et al.,
ICLR 2022, App. A.3.2 and Table 5).

Threat model: the data owner adds ``delta`` with ``|delta|_inf <= eps`` to every image (paper:
8/255 on CIFAR, 0.3 on MNIST); clean labels. The surrogate is an ensemble of infinitely wide
networks: the mean output of gradient-descent MSE training for time ``t`` of the infinite network,
``f_V = Theta(V, X) Theta(X, X)^-1 (I - exp(-t Theta(X, X) / N)) Y`` (``ue_dist.core.ntk``). NTGA
perturbs a block ``X`` of training images so that this predictor, trained on ``X + delta``,
fails on clean held-out images ``V``: signed PGD ascent of ``CE(f_V, y_V)`` (summed over ``V``),
``delta`` starting at 0 (B-NTGA: one block at a time, the blocks independent).

Here ``fit`` learns nothing: it draws, seeded, the target set ``V`` (``target_size`` clean
training images and their labels; the official code's validation split) and stores it in the
state. ``perturb(loaded, images, labels)`` treats the batch it is given as one block, so the
pipeline's ``--batch-size`` is the block size: ``ue-dist protect --batch-size 4000`` gives the
REM paper's CIFAR block (the official default is 512); the default 256 is a smaller block (a
weaker, cheaper attack). Deterministic: no random start, and the same block, state and settings
give the same delta. Shapes: images ``B x C x H x W`` float in [0, 1], labels ``B`` int64;
target images ``T x C x H x W`` uint8 in the state.

Follows the official code: the surrogates (``fnn``: 5 x Dense + Erf, the default and the REM
paper's; ``cnn``: 2 x Conv 5x5 stride 2 + ReLU, Flatten, 3 x Dense; ``W_std = sqrt(1.76)``,
``b_std = sqrt(0.18)``, NTK parameterisation, inputs ``x / 255`` unnormalised), the NTK (not the
NNGP) in both kernels of the predictor, ``t = 64`` (``--t`` default), ``diag_reg = 1e-4``
relative to the mean trace, ``fx_0 = 0``, one-hot labels, the cross-entropy loss on the
validation set with its true labels, 10 iterations of step ``eps / 10 * 1.1`` (REM Table 5: rho/10
x 1.1, K = 10 on CIFAR; rho/8 x 1.1, K = 8 on their ImageNet subset), clipping to [0, 1], float64.

Differs: (1) the official ``projected_gradient_descent`` calls ``fast_gradient_method`` with the
clean block and ``eps`` on every iteration (not the running ``adv_x`` and ``eps_iter``), so its
10 iterations all return the same one-step FGSM of size ``eps`` taken at the clean block; this
class runs the iterated PGD its arguments describe (REM Table 5's ``alpha``, ``K``). The
official behaviour is ``--set steps=1 step_frac=1``. (2) The target set is drawn from the data
being protected, and is itself protected (the official code leaves its 10,000 validation images
out of the poisoned set); its size is ``target_size`` (official 10,000). (3) The predictor uses a
matrix exponential and a solve instead of an eigendecomposition (the same function;
``core/ntk.py``). (4) Blocks are the pipeline's batches of the shard's order, not slices of one
seeded shuffle of the training set (the official loop also leaves the last ``train_size mod
block`` images unpoisoned; here a short last batch is a smaller block).

``t`` is in neural-tangents' units: the flow is ``exp(-t Theta / N)`` with ``N = block x
classes``, so a smaller block trains further at the same ``t``; the ``quick`` preset keeps the
paper's ``t / N`` for blocks of 256 (``t = 4``). Measured on the digits (1,437 training images at
32 x 32, blocks of 256, 24-epoch quick small-CNN victims, clean 98.9 %): ``t = inf`` 98.3 %,
``t = 64`` 80.3 % (one block of all 1,437: 79.7 %), ``t = 8`` 70.6 %, ``t = 4`` 66.4 %, ``t = 1``
64.2 %; the official one-step FGSM (``steps=1 step_frac=1``) at ``t = 4`` 63.1 %. It weakens the
victim but does not make the digits unlearnable (tests/test_ntga.py, slow).

Cost: the FNN kernel is one Gram matrix of the flattened images and a scalar recursion per pair
(a block of 256 at 32 x 32, 10 steps, 200 targets: ~2 s on one CPU thread). The CNN keeps an
``H/2 x W/2`` map per pair of images (a tile holds ``tile^2 x H W / 4`` float64 values per
intermediate): one such block took 200 s and 2.2 GB at ``tile = 64``; lower ``tile`` for it
(``tile = 2000``, the paper preset's, is for the FNN). Not measured on a GPU here.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ue_dist.core import ntk
from ue_dist.core.context import FitContext
from ue_dist.core.pgd import pgd
from ue_dist.core.settings import Setting, choice, positive, positive_int
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register

LOSSES = ("cross-entropy", "mse")


def ntga_loss(x_block: torch.Tensor, y_block: torch.Tensor, x_target: torch.Tensor,
              y_target: torch.Tensor, num_classes: int, arch: ntk.Architecture,
              t: float | None, diag_reg: float, loss: str = "cross-entropy",
              tile: int = 256) -> torch.Tensor:
    """The official ``adv_loss``: train the infinite network's NTK predictor on the block
    (``x_block``, labels ``y_block``) for time ``t``, and score it on the target set."""
    _, k_train = ntk.kernels(x_block, None, arch, tile)
    _, k_target = ntk.kernels(x_target, x_block, arch, tile)
    out = ntk.gd_mse_predict(k_train, ntk.one_hot(y_block, num_classes), k_target, t, diag_reg)
    if loss == "cross-entropy":  # -sum(log_softmax(f) * onehot), as utils_jax.cross_entropy_loss
        return F.cross_entropy(out, y_target.long(), reduction="sum")
    return 0.5 * ((out - ntk.one_hot(y_target, num_classes, out.dtype)) ** 2).mean()


@register
class NTGA(Method):
    """Neural tangent generalization attack (Yuan & Wu, ICML 2021); see the module docstring."""

    name = "ntga"
    kind, year, needs_labels = "error-maximising", 2021, True
    paper = "Yuan & Wu, Neural Tangent Generalization Attacks, ICML 2021"
    presets = {
        # official generate_attack.py (CIFAR-10, FNN) with the REM paper's Table 5 PGD; the
        # block is the pipeline's --batch-size (4000 in REM App. A.3.2)
        "paper": {"eps": 8 / 255, "steps": 10, "step_frac": 0.11, "surrogate": "fnn", "t": 64.0,
                  "diag_reg": 1e-4, "loss": "cross-entropy", "target_size": 10000,
                  "tile": 2000, "seed": 0},
        # a 200-image target set, and t = 4: for the default block of 256 (N = 2,560 outputs)
        # the t / N of the paper's t = 64 at block 4,000 (N = 40,000); the digits in ~15 s
        "quick": {"eps": 8 / 255, "steps": 10, "step_frac": 0.11, "surrogate": "fnn", "t": 4.0,
                  "diag_reg": 1e-4, "loss": "cross-entropy", "target_size": 200,
                  "tile": 256, "seed": 0},
    }
    # the fit only draws the target set: everything about the attack is protect-time
    declared = {
        "eps": Setting("radius", "L-inf radius of the noise on the [0, 1] scale", high=1,
                       protect_time=True),
        "steps": positive_int("PGD steps on each block", protect_time=True),
        "step_frac": positive("PGD step size as a fraction of eps", protect_time=True),
        "surrogate": choice("fnn", "cnn", help="the infinite network: 5 x Dense+Erf, or 2 x "
                            "Conv+ReLU then 3 x Dense", protect_time=True),
        "t": Setting("float", "training time of the NTK predictor (none: infinity)", above=0,
                     optional=True, protect_time=True),
        "diag_reg": positive("diagonal regulariser of Theta(X, X), relative to its mean "
                             "diagonal", protect_time=True),
        "loss": choice(*LOSSES, help="what the attack ascends on the target set",
                       protect_time=True),
        "target_size": positive_int("clean training images drawn as the target set"),
        "tile": positive_int("image pairs per side of a kernel tile (memory, not the "
                             "result)", protect_time=True),
        "seed": Setting("seed", "draws the target set"),
    }

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        if len(train) == 0:
            raise StateError("NTGA needs at least one training image for its target set")
        gen = torch.Generator().manual_seed(int(self.settings["seed"]))
        size = min(int(self.settings["target_size"]), len(train))
        index = torch.randperm(len(train), generator=gen)[:size].sort().values
        ctx.log(f"ntga: target set of {size} of {len(train)} training images "
                f"(surrogate {self.settings['surrogate']}, t={self.settings['t']})")
        return self.new_state(train, target_images=train.images[index].clone(),
                              target_labels=train.labels[index].clone(), target_index=index)

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
        images, labels = state.get("target_images"), state.get("target_labels")
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise StateError("ntga state has no uint8 T x C x H x W 'target_images'")
        if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
            raise StateError("ntga state has no 'target_labels' of one label per target image")
        k = int(state["num_classes"])
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise StateError(f"ntga state's target labels lie outside [0, {k})")
        return {"x": images.to(device).to(torch.float64).div_(255.0), "y": labels.to(device).long(),
                "num_classes": k}

    def perturb(self, loaded: Mapping[str, Any], images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros_like(images, dtype=torch.float32)
        s, k = self.settings, int(loaded["num_classes"])
        if int(labels.max()) >= k or int(labels.min()) < 0:
            raise StateError(f"label {int(labels.max())} outside the state's {k} classes")
        arch = ntk.surrogate(s["surrogate"])
        x_target, y_target = loaded["x"].to(images.device), loaded["y"].to(images.device)
        t = None if s["t"] is None else float(s["t"])

        def loss(z: torch.Tensor) -> torch.Tensor:
            return ntga_loss(z, labels, x_target, y_target, k, arch, t, float(s["diag_reg"]),
                             s["loss"], int(s["tile"]))

        with torch.enable_grad():
            delta = pgd(loss, images.float(), eps=self.eps,
                        step_size=self.eps * float(s["step_frac"]), steps=int(s["steps"]),
                        maximize=True, random_start=False)
        return delta.float()
