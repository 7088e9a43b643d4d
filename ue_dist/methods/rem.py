"""Error-minimising noise: REM (robust, min-min-max with EOT) and EM (its rho_a = 0 case).

REM -- Fu, He, Liu, Shen, Tao. "Robust Unlearnable Examples: Protecting Data Against Adversarial
Learning", ICLR 2022 (Eq. 5, Algorithm 1, Appendix A.3).
EM -- Huang, Ma, Erfani, Bailey, Wang. "Unlearnable Examples: Making Personal Data
Unexploitable", ICLR 2021 (Eq. 3 of the REM paper).

Threat model: the data owner adds ``delta_u`` with ``|delta_u|_inf <= rho_u`` (= ``eps``) to every
image; the learner trains on the protected set, possibly with standard augmentation and with
PGD adversarial training of radius ``rho_a'``. REM fits a source model ``f'`` by

    min_theta  mean_i  min_{|du_i| <= rho_u}  E_{t ~ T}  max_{|da_i| <= rho_a}
               CE(f'(t(x_i + du_i) + da_i), y_i)                                    (Eq. 5)

alternating, per minibatch (Algorithm 1): ``K_u`` signed PGD-descent steps on ``du`` whose
gradient averages ``J`` EOT views, each view with its own inner PGD ascent (``K_a`` steps on
``da``); then one SGD step on ``t(x + du) + da``. ``perturb`` regenerates ``du`` with the final
model for any batch (argmin of the same objective). The J views run as one ``J x B`` batch.

EM is the same with ``rho_a = 0``, no EOT and no augmentation (noise computed on the images as
they will be stored), optionally stopping once the training accuracy on ``x + du`` passes
``stop_acc`` (Huang et al.'s rule).

Shapes: images ``B x C x H x W`` float in [0, 1], labels ``B`` int64 in ``[0, num_classes)``.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ue_dist.core.adversarial import adversarial_examples
from ue_dist.core.augment import (AugParams, apply_params, resolve_augmentation,
                                  sample_params)
from ue_dist.core.config import SettingsError
from ue_dist.core.context import FitContext
from ue_dist.core.defenses import eot_views
from ue_dist.core.fold import fold_batchnorm, folded_views
from ue_dist.core.models import ARCHITECTURES, build_model
from ue_dist.core.pgd import pgd
from ue_dist.core.training import (Loss, TrainLoop, cpu_state_dict, decay_every_schedule,
                                   uint8_fetch, unwrap)
from ue_dist.core.precision import PRECISIONS, autocast, prepare_model, resolve_precision, upcast
from ue_dist.core.settings import (Setting, choice, count, fraction, non_negative, positive,
                                   positive_int)
from ue_dist.data.imageset import ImageSet
from ue_dist.methods.base import Method, StateError, register

# -------------------------------------------------------------------------------------------------
# the objective of Eq. (5), for one draw of the J transformations
# -------------------------------------------------------------------------------------------------


def _ce_sum(model: nn.Module, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    # logits back to fp32 before the loss (a no-op in fp32; under bf16 autocast the softmax
    # and the sum over the batch keep full precision)
    return lambda z: F.cross_entropy(upcast(model(z)), y, reduction="sum")


def adversarial_loss(model: nn.Module, views: torch.Tensor, y: torch.Tensor, *, rho_a: float,
                     step_a: float, steps_a: int, random_start: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``sum_i CE(f(v_i + da_i*), y_i)`` with ``da*`` from PGD ascent (gradient flows to ``views``).

    The inner maximum is approximated as in the paper: ``da*`` is found with PGD on a detached
    copy and then held fixed, so d/d(views) is the gradient at ``views + da*``.
    """
    if rho_a > 0 and steps_a > 0:
        da = pgd(_ce_sum(model, y), views, eps=rho_a, step_size=step_a, steps=steps_a,
                 maximize=True, random_start=random_start, generator=generator)
        views = views + da
    return _ce_sum(model, y)(views)


def eot_loss(model: nn.Module, xu: torch.Tensor, y: torch.Tensor, params: AugParams,
             eot_samples: int, *, rho_a: float, step_a: float, steps_a: int,
             random_start: bool = True, generator: torch.Generator | None = None,
             batched: bool = True) -> torch.Tensor:
    """``(1/J) sum_j sum_i max_da CE(f(t_j(xu_i) + da), y_i)`` for given transformation parameters.

    ``params`` holds ``J x B`` per-sample draws, view-major (rows ``j*B:(j+1)*B`` are view ``j``).
    ``batched=True`` evaluates all views (and their inner PGD) as one ``J*B`` batch;
    ``batched=False`` loops over ``j`` (the reference form; same value and gradient).
    """
    batch = xu.shape[0]
    if batched:
        views = apply_params(xu.repeat(eot_samples, 1, 1, 1), params)
        return adversarial_loss(model, views, y.repeat(eot_samples), rho_a=rho_a, step_a=step_a,
                                steps_a=steps_a, random_start=random_start,
                                generator=generator) / eot_samples
    total = xu.new_zeros(())
    for j in range(eot_samples):
        views = apply_params(xu, params.slice(j * batch, (j + 1) * batch))
        total = total + adversarial_loss(model, views, y, rho_a=rho_a, step_a=step_a,
                                         steps_a=steps_a, random_start=random_start,
                                         generator=generator)
    return total / eot_samples


def robust_error_minimizing_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                                  eps: float, step_u: float, steps_u: int, rho_a: float = 0.0,
                                  step_a: float = 0.0, steps_a: int = 0, eot_samples: int = 1,
                                  augmentation: str = "none", pad: int = 4,
                                  views: tuple = (),
                                  generator: torch.Generator | None = None,
                                  batched: bool = True, precision: str = "fp32") -> torch.Tensor:
    """``argmin_{|du| <= eps} E_t max_{|da| <= rho_a} CE(f(t(x + du) + da), y)`` by signed PGD.

    Fresh transformations are drawn at every descent step (Algorithm 1, line 11). With
    ``rho_a = 0``, ``eot_samples = 1`` and ``augmentation = "none"`` this is EM's noise.
    ``views``: differentiable defences (``core.defenses.eot_views``) each view may pass through
    before its crop and flip (defence-aware noise).
    ``model`` should be in eval mode (batch statistics would couple the samples).
    ``precision`` (``fp32``/``bf16``/``auto``, ``ue_dist.core.precision``) covers the model
    forwards and the loss only: ``du``, the signed steps and the projection stay fp32, so the
    bound is exact in every precision. The caller chooses the model's memory format.
    """
    batch = x.shape[0]
    precision = resolve_precision(precision, x.device)

    def objective(xu: torch.Tensor) -> torch.Tensor:
        params = sample_params(augmentation, eot_samples * batch, generator, x.device, pad,
                               views)
        with autocast(x.device, precision):
            return eot_loss(model, xu, y, params, eot_samples, rho_a=rho_a, step_a=step_a,
                            steps_a=steps_a, generator=generator, batched=batched)

    with torch.enable_grad():
        return pgd(objective, x, eps=eps, step_size=step_u, steps=steps_u, maximize=False,
                   random_start=True, generator=generator)


# -------------------------------------------------------------------------------------------------
# source-model training shared by REM, EM and TAP
# -------------------------------------------------------------------------------------------------

def batch_generator(seed: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Generator:
    """A generator seeded by the batch's content: the same batch gives the same noise wherever
    and in whatever order it is processed (Ray actors, retries)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    h.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "big") % (2**63))


NoiseFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def source_model_noise(precision: str, noise_kwargs: Mapping[str, Any]) -> NoiseFn:
    """REM's (or EM's) noise for a batch, as the source model's training step computes it."""
    def noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              gen: torch.Generator) -> torch.Tensor:
        return robust_error_minimizing_noise(model, x, y, generator=gen, precision=precision,
                                             **noise_kwargs)
    return noise


def source_model_loss(noise_fn: NoiseFn | None, *, rho_a: float, step_a: float, steps_a: int,
                      augmentation: str, views: tuple = (), fold: bool = True) -> Loss:
    """Algorithm 1's inner step on a batch: ``t(x + noise_fn(x)) + da`` (noise and ``da`` from
    the model in eval mode, so one sample's noise does not see the others), then CE. With
    defence-aware ``views`` the model trains on them too: in the min-min game the noise is
    made easy for a model that learns from the defended images, as a defended victim does.
    ``fold``: the noise and ``da`` passes run the model with its batch norms folded into the
    convolutions (``core.fold``; refreshed from the current weights at every step), the same
    function with less memory traffic; the training pass itself keeps its batch norms."""
    eval_model = folded_views(fold)

    def loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        model = unwrap(net)
        model.eval()
        frozen = eval_model(model) if noise_fn is not None or (rho_a > 0 and steps_a > 0) \
            else model
        if noise_fn is not None:
            x = x + noise_fn(frozen, x, y, gen)
        x = apply_params(x, sample_params(augmentation, x.shape[0], gen, x.device, views=views))
        if rho_a > 0 and steps_a > 0:
            with torch.enable_grad():
                x = adversarial_examples(frozen, x, y, method="pgd", eps=rho_a,
                                         step_size=step_a, steps=steps_a, generator=gen)
        net.train()
        out = upcast(net(x.detach()))
        return F.cross_entropy(out, y), out

    return loss


def train_source_model(method: Method, train: ImageSet, ctx: FitContext,
                       noise_fn: NoiseFn | None, *, rho_a: float = 0.0, step_a: float = 0.0,
                       steps_a: int = 0, augmentation: str = "none",
                       stop_acc: float = 0.0, extra_state: Mapping[str, Any] | None = None,
                       stop_check: Callable[[nn.Module], float] | None = None,
                       views: tuple = ()) -> dict[str, Any]:
    """SGD on ``t(x + noise_fn(x)) + da`` (Algorithm 1, lines 6-20); returns the method's state.

    ``noise_fn(model, x, y, generator)`` gives ``du`` (None: clean training, TAP); ``rho_a > 0``
    adds PGD adversarial examples; ``stop_acc > 0`` stops once the mean training accuracy of the
    last ``log_every`` steps reaches it, or, given ``stop_check(model)`` (this worker's accuracy
    on its part of the training set, averaged over the workers here), once that does. ``train_steps`` steps of the shared training loop
    (``core.training``: batches from epochs of a seeded permutation, DDP over ``ctx``'s
    workers, lr ``lr * lr_decay ** (step // lr_decay_every)``); every ``checkpoint_every``
    steps a resumable state goes to ``ctx.report``, and ``ctx.resume()`` continues from the
    last one. ``precision`` (default fp32) runs the model step and the PGD-AT forwards under
    bf16 autocast with a channels_last model; ``noise_fn`` chooses its own precision.
    """
    s = method.settings
    if len(train) == 0:
        raise SettingsError(f"method {method.name!r}: the training set is empty")
    channels, height, _ = train.image_shape
    seed = int(s["seed"]) + int(ctx.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical initial weights on every worker
        model = build_model(s["arch"], int(train.num_classes), channels, height)
    loop = TrainLoop(model, ctx, n=len(train), batch_size=int(s["batch_size"]), seed=seed,
                     lr=float(s["lr"]), momentum=float(s["momentum"]),
                     weight_decay=float(s["weight_decay"]), precision=s["precision"],
                     schedule=decay_every_schedule(s["lr_decay_every"], s["lr_decay"]),
                     schedule_per="step")
    done = _resume_source_model(method, loop, train, ctx)
    if done is not None:
        return done
    fetch = uint8_fetch(train.images, train.labels, ctx.device)
    loss = source_model_loss(noise_fn, rho_a=rho_a, step_a=step_a, steps_a=steps_a,
                             augmentation=augmentation, views=views)
    total, log_every = int(s["train_steps"]), max(1, int(s["log_every"]))
    ckpt_every = int(s["checkpoint_every"])

    def state_now(resumable: bool, **more: Any) -> dict[str, Any]:
        payload: dict[str, Any] = dict(model=cpu_state_dict(loop.model), fit_step=loop.step, **more)
        if resumable:  # the model is stored once, beside the loop's other state
            payload["loop"] = {k: v for k, v in loop.state_dict().items() if k != "model"}
        return method.new_state(train, **payload, **(extra_state or {}))

    stopped, metrics = False, {}
    bar = ctx.progress(f"[{method.name}] source-model steps", total)
    bar.start(loop.step)
    while loop.step < total and not stopped:
        lr = loop.lr
        loop.train_step(fetch, loss)
        step = loop.step
        logged = step % log_every == 0 or step == total
        if logged:
            metrics = {"step": step, "lr": lr, **loop.take_metrics()}
            # the same decision on every worker: the accuracy is averaged over all of them
            if stop_acc > 0 and stop_check is not None:
                metrics["stop_acc_measured"] = ctx.all_reduce_mean(stop_check(loop.model))
            stopped = stop_acc > 0 and metrics.get("stop_acc_measured",
                                                   metrics["train_acc"]) >= stop_acc
            bar.update(step, f"lr {lr:.4g} · loss {metrics['train_loss']:.4f} · "
                       f"acc {metrics['train_acc']:.3f}")
            if stopped:
                what = ("accuracy on the noisy training set" if stop_check is not None
                        else "train accuracy")
                bar.note(f"[{method.name}] step {step}: {what} "
                         f"{metrics.get('stop_acc_measured', metrics['train_acc']):.3f} "
                         f">= stop_acc {stop_acc}; source model done")
        if ckpt_every > 0 and step % ckpt_every == 0 and step < total and not stopped:
            ctx.report(metrics if logged else {"step": step}, state_now(resumable=True))
        elif logged:
            ctx.report(metrics)
    final = state_now(resumable=False, fit_done=True, fit_stopped_early=bool(stopped),
                      fit_metrics={k: float(v) for k, v in metrics.items()})
    ctx.report({**metrics, "done": True}, final)
    return final


def _resume_source_model(method: Method, loop: TrainLoop, train: ImageSet,
                         ctx: FitContext) -> dict[str, Any] | None:
    """Continue from the context's checkpoint; the final state if that run had finished."""
    ckpt = ctx.resume()
    if ckpt is None:
        return None
    method.check_state(ckpt, train.image_shape, source="checkpoint")
    if ckpt.get("fit_done"):  # the run had already finished (or stopped early)
        return dict(ckpt)
    if "loop" not in ckpt:
        ctx.log(f"{method.name}: the checkpoint predates the shared training loop; starting over")
        return None
    loop.load_state_dict({**ckpt["loop"], "model": ckpt["model"]})
    ctx.log(f"{method.name}: resuming source-model training at step {loop.step}")
    return None


# -------------------------------------------------------------------------------------------------
# the methods
# -------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A fitted source model, ready for ``perturb`` (eval mode, no parameter gradients)."""

    model: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)
    _folded: nn.Module | None = field(default=None, repr=False)

    @property
    def folded(self) -> nn.Module:
        """``model`` with its batch norms folded into its convolutions (``core.fold``; the same
        function, less memory traffic), made once: for perturb's eval-mode gradient passes."""
        if self._folded is None:
            self._folded = fold_batchnorm(self.model)
        return self._folded


_TRAIN_KEYS = ("arch", "train_steps", "batch_size", "lr", "momentum", "weight_decay",
               "lr_decay_every", "lr_decay")


def _schedule(arch: str, steps: int, batch: int, every: int) -> dict[str, Any]:
    return {"arch": arch, "train_steps": steps, "batch_size": batch, "lr": 0.1, "momentum": 0.9,
            "weight_decay": 5e-4, "lr_decay_every": every, "lr_decay": 0.1}


_SOURCE_MODEL: dict[str, Setting] = {
    "eps": Setting("radius", "L-inf radius of the noise on the [0, 1] scale", high=1),
    "arch": choice(*sorted(ARCHITECTURES), help="source-model architecture"),
    "train_steps": positive_int("SGD steps of the source model"),
    "batch_size": positive_int("global batch, split over the workers"),
    "lr": positive("initial learning rate"),
    "momentum": non_negative(), "weight_decay": non_negative(),
    "lr_decay_every": positive_int("steps between learning-rate decays"),
    "lr_decay": non_negative("factor of each decay"),
    "seed": Setting("seed", "weights, batch order and noise draws"),
    "log_every": count("steps between log lines"),
    "checkpoint_every": count("steps between resumable checkpoints (0: none)"),
    # protect may change how the final noise is computed, never what the model was fitted for
    "precision": choice(*PRECISIONS, help="autocast of the model forwards", protect_time=True),
}
_NOISE: dict[str, Setting] = {
    "steps_u": positive_int("PGD descent steps on the noise (K_u)", protect_time=True),
    "step_frac_u": positive("noise step size as a fraction of eps", protect_time=True),
    "stop_acc": fraction("stop once the training accuracy reaches it (0: off)", above=None),
}
_AUGMENTATION = choice("auto", "crop-flip", "flip", "none", help="EOT / training augmentation")


def eot_defences_setting(protect_time: bool) -> Setting:
    """The defence-aware EOT views of a method's noise (``core.defenses.eot_view``); fixed by
    the fit where the fit itself computes noise (REM, EM), protect-time where it does not."""
    return Setting("list", "victims' pre-processing defences the noise is optimised through as "
                   "EOT views, each drawn as often as the plain image (e.g. jpeg,grayscale,"
                   "bdr:bits=2,median,ueraser-lite; `ue-dist defences`); empty: none",
                   protect_time=protect_time, legacy=((),))


def source_model(state: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The state's classifier with its weights, in eval mode, without parameter gradients."""
    channels, height, _ = (int(v) for v in state["image_shape"])
    model = build_model(state["settings"]["arch"], int(state["num_classes"]), channels, height)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise StateError(f"state weights do not fit {state['settings']['arch']!r}: {exc}") from None
    return model.to(device).eval().requires_grad_(False)


class SourceModelMethod(Method):
    """Shared parts of methods whose state is one trained classifier (REM, EM, TAP)."""

    predicts = True
    #: state entries besides the model that ``perturb`` needs (``LoadedModel.extra``)
    state_extras: ClassVar[tuple[str, ...]] = ()

    @torch.no_grad()
    def predict(self, loaded: "LoadedModel", images: torch.Tensor) -> torch.Tensor:
        return loaded.model(images.to(loaded.device, torch.float32)).argmax(1).cpu()

    def validate_settings(self) -> None:
        super().validate_settings()
        eot_views(self.settings.get("eot_defences", ()))  # unknown or unusable names: by name
        if self.eps >= 1:
            raise SettingsError(f"eps must be < 1 (images are on the [0, 1] scale), got {self.eps}")

    def _augmentation(self, image_size: int) -> str:
        return resolve_augmentation(str(self.settings.get("augmentation", "none")), image_size)  # EM: none

    # state ------------------------------------------------------------------------------------
    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        super().check_state(state, image_shape, source)
        if not isinstance(state.get("model"), Mapping):
            raise StateError(f"{source} has no source-model weights ('model')")
        arch = state.get("settings", {}).get("arch")
        if arch not in ARCHITECTURES:
            raise StateError(f"{source} names an unknown architecture {arch!r}")
        shape = state.get("image_shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
            raise StateError(f"{source} has no valid image_shape (got {shape!r})")

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> LoadedModel:
        self.check_state(state)
        device = torch.device(device)
        model = source_model(state, device)
        prepare_model(model, device, str(self.settings["precision"]))
        channels, height, width = (int(v) for v in state["image_shape"])
        return LoadedModel(model, (channels, height, width), int(state["num_classes"]), device,
                           {k: state[k] for k in self.state_extras if k in state})

    def _inputs(self, loaded: LoadedModel, images: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or tuple(images.shape[1:]) != loaded.image_shape:
            raise StateError(f"the state was fitted on images of shape {list(loaded.image_shape)} "
                             f"(C,H,W), got a batch of shape {list(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"need one label per image, got {tuple(labels.shape)} labels for "
                             f"{images.shape[0]} images")
        x = images.detach().to(loaded.device, torch.float32)
        y = labels.detach().to(loaded.device, torch.long)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= loaded.num_classes):
            raise StateError(f"labels must lie in [0, {loaded.num_classes}) for this state, got "
                             f"range [{int(y.min())}, {int(y.max())}]")
        return x, y


@register
class REM(SourceModelMethod):
    """Robust error-minimising noise (Fu et al., ICLR 2022); see the module docstring."""

    name = "rem"
    kind, year, needs_labels = "error-minimising", 2022, True
    paper = ("Fu et al., Robust Unlearnable Examples: Protecting Data Against Adversarial "
             "Learning, ICLR 2022")
    presets = {
        # Appendix A.3.1 / Table 5 (CIFAR): ResNet-18, 5,000 SGD steps, batch 128, lr 0.1 x0.1
        # every 2,000; rho_u = 8/255, K_u = 10 steps of rho_u/5; rho_a = 4/255, K_a = 10 steps of
        # rho_a/5; EOT over the training augmentation with J = 5.
        "paper": {"eps": 8 / 255, "rho_a": 4 / 255, **_schedule("resnet18", 5000, 128, 2000),
                  "steps_u": 10, "step_frac_u": 0.2, "steps_a": 10, "step_frac_a": 0.2,
                  "eot_samples": 5, "augmentation": "auto", "stop_acc": 0.0, "seed": 0,
                  "log_every": 50, "checkpoint_every": 500, "precision": "fp32",
                  "eot_defences": []},
        # digits-sized: a small CNN, 150 steps of 32, shorter PGD (4 x rho_u/2, 2 x 3rho_a/4), J = 2
        "quick": {"eps": 8 / 255, "rho_a": 2 / 255, **_schedule("small-cnn", 150, 32, 100),
                  "steps_u": 4, "step_frac_u": 0.5, "steps_a": 2, "step_frac_a": 0.75,
                  "eot_samples": 2, "augmentation": "auto", "stop_acc": 0.0, "seed": 0,
                  "log_every": 25, "checkpoint_every": 50, "precision": "fp32",
                  "eot_defences": []},
        # Appendix A.3.1 / Table 5 (ImageNet subset, the first 100 classes): ResNet-18, 3,000
        # SGD iterations of batch 128, momentum 0.9, weight decay 5e-4, lr 0.1 x0.1 every 1,200;
        # rho_u = 8/255 with rho_a = 4/255 (Tables 1-2, Fig. 6); K_u = 7 steps of rho_u/4,
        # K_a = 10 steps of rho_a/5 (Table 5's REM row); EOT over the training augmentation
        # with J = 4. An iteration is one minibatch, which is what train_steps and
        # lr_decay_every count. Not keys of this method, so not in the preset:
        # * the 224 x 224 input is the data's: fit with `--image-size 224` (or shards that
        #   size); at 224 the source model has the ImageNet stem (7x7 stride-2 conv + 3x3
        #   max-pool, core/models.py: inputs > 64 px);
        # * the paper's ImageNet augmentation is random crop, resize to 224, flip; "auto" at
        #   224 is crop-flip (4-pixel pad, random crop, flip), the nearest kind core/augment.py
        #   has, and the pixel rescaling to [-0.5, 0.5] is the models' Normalize layer.
        # The authors' scripts/in-mini/gen_rem.sh uses 7 steps of rho_a/4 for K_a instead
        # (--set steps_a=7 --set step_frac_a=0.25); A.4's "8 steps of rho_a/4" is the
        # victim's adversarial training (core/victim.py), not the source model's.
        "imagenet": {"eps": 8 / 255, "rho_a": 4 / 255, **_schedule("resnet18", 3000, 128, 1200),
                     "steps_u": 7, "step_frac_u": 0.25, "steps_a": 10, "step_frac_a": 0.2,
                     "eot_samples": 4, "augmentation": "auto", "stop_acc": 0.0, "seed": 0,
                     "log_every": 50, "checkpoint_every": 500, "precision": "fp32",
                     "eot_defences": []},
    }

    declared = {**_SOURCE_MODEL, **_NOISE,
                "eot_defences": eot_defences_setting(protect_time=False),
                "rho_a": Setting("radius", "PGD-AT radius of the source model (0: off)"),
                "steps_a": count("PGD ascent steps on da (K_a)", protect_time=True),
                "step_frac_a": positive("da step size as a fraction of rho_a", protect_time=True),
                "eot_samples": positive_int("EOT views per descent step (J)", protect_time=True),
                "augmentation": _AUGMENTATION}

    def validate_settings(self) -> None:
        super().validate_settings()
        rho_a = float(self.settings["rho_a"])
        if rho_a > 0 and int(self.settings["steps_a"]) < 1:
            raise SettingsError(f"steps_a must be >= 1 when rho_a > 0 (method {self.name!r})")
        if rho_a >= self.eps:
            warnings.warn(
                f"rho_a={rho_a:.5g} >= rho_u=eps={self.eps:.5g}: with an adversarial radius at "
                "least as large as the noise radius, the inner max can undo any defensive "
                "noise, so min_du max_da loss >= the clean loss (REM paper, Sec. 4.1) and the "
                "noise cannot suppress learning; use rho_a < eps", stacklevel=3)

    # the objective's settings --------------------------------------------------------------
    def noise_kwargs(self, image_size: int) -> dict[str, Any]:
        s = self.settings
        rho_a = float(s.get("rho_a", 0.0))
        return {"eps": self.eps, "step_u": self.eps * float(s["step_frac_u"]),
                "steps_u": int(s["steps_u"]), "rho_a": rho_a,
                "step_a": rho_a * float(s.get("step_frac_a", 0.2)),
                "steps_a": int(s.get("steps_a", 0)) if rho_a > 0 else 0,
                "eot_samples": int(s.get("eot_samples", 1)),
                "augmentation": self._augmentation(image_size),
                "views": eot_views(s.get("eot_defences", ()))}

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        kw = self.noise_kwargs(train.image_shape[1])
        noise = source_model_noise(str(self.settings["precision"]), kw)
        # model step on t(x + du) + da (Algorithm 1, lines 17-19)
        return train_source_model(self, train, ctx, noise, rho_a=kw["rho_a"], step_a=kw["step_a"],
                                  steps_a=kw["steps_a"], augmentation=kw["augmentation"],
                                  stop_acc=float(self.settings["stop_acc"]), views=kw["views"])

    def perturb(self, loaded: LoadedModel, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        x, y = self._inputs(loaded, images, labels)
        if len(x) == 0:
            return torch.zeros_like(images, dtype=torch.float32)
        gen = batch_generator(int(self.settings["seed"]), x, y)
        delta = robust_error_minimizing_noise(loaded.folded, x, y, generator=gen,
                                              precision=str(self.settings["precision"]),
                                              **self.noise_kwargs(loaded.image_shape[1]))
        return delta.to(images.device)


@register
class EM(REM):
    """Error-minimising noise (Huang et al., ICLR 2021): REM with rho_a = 0, without EOT, on the
    un-augmented images; optional stop once training accuracy on x + delta >= ``stop_acc``:
    measured on the last ``log_every`` batches (``stop_on=batches``, cheap), or, as Huang et
    al.'s ``perturbation.py`` does for sample-wise noise, on the whole training set with its
    noise regenerated by the current model (``stop_on=train_set``; one PGD pass over the set at
    every ``log_every``-th step, each worker over its shard)."""

    name = "em"
    kind, year, needs_labels = "error-minimising", 2021, True
    paper = "Huang et al., Unlearnable Examples: Making Personal Data Unexploitable, ICLR 2021"
    presets = {
        # REM paper's reproduction (Appendix A.3.2): Table 5 PGD (10 steps of rho_u/5), the same
        # source-model schedule as REM; stop_acc=0.99 gives Huang et al.'s stopping rule.
        "paper": {"eps": 8 / 255, **_schedule("resnet18", 5000, 128, 2000),
                  "steps_u": 10, "step_frac_u": 0.2, "stop_acc": 0.0, "stop_on": "batches",
                  "seed": 0, "log_every": 50, "checkpoint_every": 500, "precision": "fp32",
                  "eot_defences": []},
        # digits-sized: small CNN, at most 200 steps of 32, Huang et al.'s stop at 99% accuracy
        "quick": {"eps": 8 / 255, **_schedule("small-cnn", 200, 32, 100),
                  "steps_u": 10, "step_frac_u": 0.2, "stop_acc": 0.99, "stop_on": "batches",
                  "seed": 0, "log_every": 25, "checkpoint_every": 50, "precision": "fp32",
                  "eot_defences": []},
    }

    declared = {**_SOURCE_MODEL, **_NOISE,
                "eot_defences": eot_defences_setting(protect_time=False),
                # states fitted before this setting existed measured on the batches
                "stop_on": choice("batches", "train_set", legacy=("batches",),
                                  help="where stop_acc is measured: the last log_every batches, "
                                       "or the whole training set with its current noise")}

    def validate_settings(self) -> None:
        SourceModelMethod.validate_settings(self)  # no rho_a: nothing of REM's to cross-check

    def noise_kwargs(self, image_size: int) -> dict[str, Any]:
        return {"eps": self.eps, "step_u": self.eps * float(self.settings["step_frac_u"]),
                "steps_u": int(self.settings["steps_u"]), "rho_a": 0.0, "step_a": 0.0,
                "steps_a": 0, "eot_samples": 1, "augmentation": "none",
                "views": eot_views(self.settings.get("eot_defences", ()))}

    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        if self.settings["stop_on"] != "train_set" or not float(self.settings["stop_acc"]) > 0:
            return super().fit(train, ctx)
        kw = self.noise_kwargs(train.image_shape[1])
        s = self.settings
        mine = ctx.shard_indices(len(train)) if ctx.distributed else torch.arange(len(train))
        noise = source_model_noise(str(s["precision"]), kw)

        def accuracy_on_noisy_set(model: nn.Module) -> float:
            was_training = model.training
            model.eval()
            correct = 0
            for start in range(0, len(mine), int(s["batch_size"])):
                idx = mine[start:start + int(s["batch_size"])]
                x = train.images[idx].to(ctx.device).float().div_(255.0)
                y = train.labels[idx].to(ctx.device)
                delta = noise(model, x, y, batch_generator(int(s["seed"]), x, y))
                with torch.no_grad():
                    correct += int((model(x + delta).argmax(1) == y).sum())
            model.train(was_training)
            return correct / max(1, len(mine))

        return train_source_model(self, train, ctx, noise, stop_acc=float(s["stop_acc"]),
                                  views=kw["views"],
                                  stop_check=accuracy_on_noisy_set)
