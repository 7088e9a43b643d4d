"""Diffusion purification, the AVATAR defence: diffuse the training images, then denoise them.

Dolatabadi, Erfani & Leckie, "The Devil's Advocate: Shattering the Illusion of Unexploitable
Data using Diffusion Models" (SaTML 2024; AVATAR). The defender trains a denoising diffusion
model on clean data it has, then purifies every (possibly protected) training image before the
victim trains: forward-diffuse it to a small time t* (Gaussian noise far above the attack's
radius), then run the learned reverse process back to t = 0. The protective noise does not
survive; the images' content, which the model learned, does.

As AVATAR and APBench (lafeat/apbench, ``defense/diffusion``, which builds on DiffPure):
the variance-preserving schedule of score_sde with beta(t) linear from 0.1 to 20 over N = 1000
discrete steps, and t* = 60 steps (APBench's ``t=60``). Where this differs, and why:

* the model is this module's small epsilon-prediction U-Net (``DenoiserUNet``) that the defender
  trains here, on CPU if need be (``train_denoiser``; ``ue-dist train-purifier``), not the
  pretrained NCSN++ of score_sde, which cannot be downloaded here. It is trained on the noise
  levels up to ``t_max`` only (default 200): purification never visits higher ones, and a
  small CPU budget is better spent where it is used.
* the reverse process is DDPM's ancestral sampler (Ho et al. 2020; the discrete counterpart of
  the reverse VP-SDE that DiffPure integrates with Euler-Maruyama), optionally on a respaced
  subsequence of ``steps`` timesteps (Nichol & Dhariwal 2021): ``steps = 0`` runs every one of
  the t* steps; fewer trade fidelity for time on a CPU.
* images are mapped to [-1, 1] as the model was trained (APBench passes ``2 x`` of [0, 1]
  images to a centred model; that is not reproduced).

Shapes: images ``B x C x H x W`` float in [0, 1] (any C, H, W); the model predicts the noise of
``x_t`` in [-1, 1]. Pure torch, no Ray.
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: the VP schedule of score_sde / DiffPure: beta(t) from BETA_MIN to BETA_MAX over N steps
N_STEPS, BETA_MIN, BETA_MAX = 1000, 0.1, 20.0
CHECKPOINT_FORMAT = "ue-dist-denoiser-1"


def alphas_cumprod(n: int = N_STEPS, beta_min: float = BETA_MIN,
                   beta_max: float = BETA_MAX) -> torch.Tensor:
    """``abar[t]`` for t = 0..n (``abar[0] = 1``): the signal kept after t forward steps,
    with the discrete betas ``linspace(beta_min / n, beta_max / n, n)`` (float64)."""
    betas = torch.linspace(beta_min / n, beta_max / n, n, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM style), ``B x dim``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DenoiserUNet(nn.Module):
    """Epsilon-prediction U-Net: residual blocks (GroupNorm, SiLU, the timestep's embedding added
    to each) at widths ``width x mult`` per resolution, 2x average-pool down, nearest up to
    each skip's exact size (odd sizes work), skip connections concatenated. ``width = 32``,
    ``mult = (1, 2, 2)``: 0.58 M parameters."""

    def __init__(self, channels: int = 3, width: int = 32, mult: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        if channels < 1 or width < 1 or not mult:
            raise ValueError(f"DenoiserUNet needs channels >= 1, width >= 1 and a mult, got "
                             f"channels={channels}, width={width}, mult={mult}")
        self.channels, self.width, self.mult = int(channels), int(width), tuple(int(m) for m in mult)
        tdim = 4 * width
        self.time = nn.Sequential(nn.Linear(width, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * m for m in self.mult]
        self.down = nn.ModuleList()
        cin = width
        for w in widths:
            self.down.append(_ResBlock(cin, w, tdim))
            cin = w
        self.mid = _ResBlock(cin, cin, tdim)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_ResBlock(cin + w, w, tdim))
            cin = w
        self.out_norm = nn.GroupNorm(_groups(cin), cin)
        self.out = nn.Conv2d(cin, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as "no noise predicted": a stable first step
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(_time_embedding(t, self.width))
        h = self.inp(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2, ceil_mode=True)
        h = self.mid(h, temb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), temb)
        return self.out(F.silu(self.out_norm(h)))


@dataclass
class Denoiser:
    """A trained denoiser: the (EMA) network and the noise levels it was trained on."""
    model: DenoiserUNet
    t_max: int
    image_shape: tuple[int, int, int]
    info: dict[str, Any]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "state_dict": self.model.state_dict(),
                    "channels": self.model.channels, "width": self.model.width,
                    "mult": list(self.model.mult), "t_max": int(self.t_max),
                    "image_shape": list(self.image_shape), "info": dict(self.info)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "denoiser checkpoint") -> "Denoiser":
        try:  # weights_only: a crafted checkpoint cannot run code
            ck = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same message
            raise ValueError(f"{where} is not a denoiser checkpoint written by `ue-dist "
                             f"train-purifier` ({type(exc).__name__}: {exc})") from None
        if not isinstance(ck, Mapping) or ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} is not a denoiser checkpoint written by `ue-dist "
                             f"train-purifier` (format {CHECKPOINT_FORMAT!r} expected)")
        model = DenoiserUNet(int(ck["channels"]), int(ck["width"]), tuple(ck["mult"]))
        model.load_state_dict(ck["state_dict"])
        return cls(model.eval(), int(ck["t_max"]), tuple(int(v) for v in ck["image_shape"]),
                   dict(ck.get("info", {})))


def train_denoiser(images_uint8: torch.Tensor, *, steps: int = 4000, batch_size: int = 64,
                   lr: float = 2e-4, t_max: int = 200, width: int = 32, ema: float = 0.999,
                   seed: int = 0, device: str | torch.device = "cpu",
                   progress: Callable[[int, int, float], None] | None = None) -> Denoiser:
    """Train a ``DenoiserUNet`` on clean uint8 NCHW images with DDPM's simple loss,
    ``|| eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t) ||^2`` for t uniform in
    1..t_max, random horizontal flips (score_sde's ``random_flip``), Adam at ``lr`` (score_sde's
    2e-4) with a linear warm-up over the first 5 % of steps, gradients clipped at norm 1, and an
    EMA of the weights (decay ``ema``) as the returned model. ``progress(step, steps, loss)``."""
    if images_uint8.ndim != 4 or len(images_uint8) == 0:
        raise ValueError(f"train_denoiser needs N x C x H x W uint8 images, got {tuple(images_uint8.shape)}")
    if not 1 <= t_max <= N_STEPS:
        raise ValueError(f"t_max must lie in [1, {N_STEPS}], got {t_max}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenoiserUNet(images_uint8.shape[1], width).to(device)
    shadow = copy.deepcopy(model).eval().requires_grad_(False)
    abar = alphas_cumprod().float().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    n = len(images_uint8)
    loss_avg = float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = images_uint8[idx].to(device).float().div(127.5).sub(1.0)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        t = torch.randint(1, t_max + 1, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        a = abar[t][:, None, None, None]
        loss = F.mse_loss(model(a.sqrt() * x + (1 - a).sqrt() * noise, t), noise)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p, q in zip(shadow.parameters(), model.parameters()):
                p.lerp_(q, 1 - ema)
        value = float(loss.detach())
        loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
        if progress:
            progress(step, steps, loss_avg)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "ema": ema, "seed": seed,
            "train_images": n, "final_loss_ema": loss_avg}
    return Denoiser(shadow.cpu(), t_max, tuple(images_uint8.shape[1:]), info)


def timesteps(t_star: int, steps: int) -> list[int]:
    """The reverse chain's timesteps, ``t_star`` first and 0 last: every step (``steps = 0`` or
    ``>= t_star``) or ``steps`` evenly spaced ones (respacing)."""
    if steps <= 0 or steps >= t_star:
        return list(range(t_star, -1, -1))
    seq = torch.linspace(t_star, 0, steps + 1).round().long().tolist()
    return sorted(set(seq), reverse=True)


@torch.no_grad()
def purify(denoiser: Denoiser, x01: torch.Tensor, *, t_star: int = 60, steps: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffuse float [0, 1] images to ``t_star`` and run DDPM's ancestral sampler back to 0 on
    ``timesteps(t_star, steps)``; returns float [0, 1] images of the same shape."""
    if x01.shape[1:] != torch.Size(denoiser.image_shape):
        raise ValueError(f"the denoiser was trained on {tuple(denoiser.image_shape)} images, "
                         f"got {tuple(x01.shape[1:])}")
    if not 1 <= t_star <= denoiser.t_max:
        raise ValueError(f"t must lie in [1, {denoiser.t_max}] (the levels this denoiser was "
                         f"trained on, its t_max), got {t_star}")
    model = denoiser.model
    dev = next(model.parameters()).device
    abar = alphas_cumprod().to(dev)
    x0 = x01.to(dev).float().mul(2).sub(1)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dev)

    x = abar[t_star].sqrt().float() * x0 + (1 - abar[t_star]).sqrt().float() * randn(x0.shape)
    seq = timesteps(t_star, steps)
    for t, s in zip(seq[:-1], seq[1:]):
        at, as_ = abar[t], abar[s]
        eps = model(x, torch.full((len(x),), t, device=dev, dtype=torch.long))
        x0_hat = ((x - (1 - at).sqrt().float() * eps) / at.sqrt().float()).clamp(-1, 1)
        if s == 0:
            x = x0_hat
            break
        beta = 1 - at / as_  # the respaced step's beta
        c0 = (as_.sqrt() * beta / (1 - at)).float()
        ct = ((1 - beta).sqrt() * (1 - as_) / (1 - at)).float()
        var = ((1 - as_) / (1 - at) * beta).float()
        x = c0 * x0_hat + ct * x + var.sqrt() * randn(x.shape)
    return x.add(1).div(2).clamp(0, 1).to(x01.device)
