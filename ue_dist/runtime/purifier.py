"""``ue-dist train-purifier``: the avatar defence's denoiser, trained on the defender's clean
images (core/diffusion.py has the model, the training loss and the purification). One process;
the torch threads are the machine's."""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ue_dist.core.config import SettingsError
from ue_dist.core.progress import ProgressLine


def train_purifier(clean_url: str, out: str, *, steps: int = 4000, batch_size: int = 64,
                   t_max: int = 200, width: int = 32, seed: int = 0, overwrite: bool = False,
                   storage_options: Mapping[str, Any] | None = None,
                   progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train a denoiser on every image under ``clean_url`` and write its checkpoint to ``out``
    (whole or not at all). Returns the training figures."""
    from ue_dist.core.diffusion import train_denoiser
    from ue_dist.data import storage
    from ue_dist.data.dataset import load_imageset

    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("t_max", t_max, 1), ("width", width, 8)):
        if value < low:
            raise SettingsError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if t_max > 1000:
        raise SettingsError(f"--t-max must be <= 1000 (the schedule's steps), got {t_max}")
    storage.refuse_inside(out, clean_url)
    if storage.exists(out, storage_options) and not overwrite:
        raise SettingsError(f"{out!r} exists; pass --overwrite to replace it")
    clean = load_imageset(clean_url, storage_options, require_labels=False)
    bar = ProgressLine("denoiser steps", steps, say=progress or (lambda _m: None))
    started = time.perf_counter()
    denoiser = train_denoiser(clean.images, steps=steps, batch_size=batch_size, t_max=t_max,
                              width=width, seed=seed,
                              progress=lambda i, n, loss: bar.update(i, f"loss {loss:.4f}"))
    seconds = time.perf_counter() - started
    denoiser.info.update({"clean": clean_url, "seconds": round(seconds, 1)})
    with storage.atomic_write(out, storage_options) as f:
        f.write(denoiser.to_bytes())
    return {"out": out, "clean": clean_url, "images": len(clean), "image_shape":
            list(denoiser.image_shape), "steps": steps, "batch_size": batch_size, "t_max": t_max,
            "width": width, "seed": seed, "parameters": sum(p.numel() for p in
                                                             denoiser.model.parameters()),
            "final_loss_ema": denoiser.info["final_loss_ema"], "seconds": round(seconds, 1),
            "images_per_s": round(steps * batch_size / seconds, 1),
            "use": f"--defense avatar:model={out}"}
