"""Benchmark of streaming protection: ``protect`` on Ray Data against the bare perturb loop.

The same method, state and images are protected twice in one run: (1) the bare loop
(``protect_uint8`` in this process with one thread, shard by shard with the same batches: what
one actor computes) and (2) ``ue_dist.runtime.protect.protect`` over the same images stored as
shards, with 1 and then 2 actors (1 CPU each). The pipeline adds shard reading/decoding, PNG
encoding, the ledger and Ray Data scheduling; the ratio ``protect / bare`` shows what that costs.
Two figures per run: ``wall`` (the whole call, including starting the actor pool) and ``steady``
(images after the first finished shard divided by the time to the last: the streaming rate once
actors are up). On a shared machine the ratios carry the noise of whatever else runs there.

Method: EM (error-minimising noise, PGD 10 steps on a small CNN) with a briefly trained source
model: the perturbation work is real, the state's quality does not matter for throughput.
``scale="cpu"``: 384 digits images (6 shards of 64), about a minute on 2 cores;
``scale="cifar"``: 10,000 32x32x3 images in shards of 1,000, one GPU per actor when available.
``python -m ue_dist.bench.protect [cpu|cifar]``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

SIZES = {"cpu": (384, 64, 256), "cifar": (10000, 1000, 512)}  # images, shard size, batch size
METHOD, PRESET = "em", "quick"
# a source model trained for a few steps: throughput does not depend on how well it is trained
OVERRIDES = {"train_steps": 3, "log_every": 3, "checkpoint_every": 0, "stop_acc": 0.0}


def _images(n: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    if scale == "cpu":
        from ue_dist.data.sources import digits_arrays

        images, labels = digits_arrays(32)["train"]
        reps = int(np.ceil(n / len(labels)))
        return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]
    gen = np.random.default_rng(0)
    return (gen.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10)


def _pipeline(src: str, dst: str, state: str, actors: int, gpus: float, batch: int) -> dict[str, Any]:
    from ue_dist.runtime.protect import protect

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        if "images/s" in line:
            stamps.append((time.perf_counter(), int(line.split(" shards, ")[1].split()[0])))

    # the state's settings (those of the bare loop's method): protect takes them from the state
    summary = protect(METHOD, src, dst, state_url=state,
                      actors=actors, cpus_per_actor=1.0, gpus_per_actor=gpus, batch_size=batch,
                      mode="overwrite", progress=progress)
    wall = time.perf_counter() - t0
    out = {"actors": actors, "images": summary["images"], "wall_s": round(wall, 2),
           "wall_images_per_s": round(summary["images"] / wall, 1)}
    if len(stamps) >= 2:
        (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
        out["steady_images_per_s"] = round((n_last - n_first) / max(t_last - t_first, 1e-9), 1)
    return out


def run(scale: str = "cpu") -> dict[str, Any]:
    if scale not in SIZES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SIZES)}")
    import ray

    from ue_dist.core.context import LocalContext
    from ue_dist.data.dataset import write_samples
    from ue_dist.data.imageset import ImageSet
    from ue_dist.data.shards import Sample
    from ue_dist.methods.base import build_method, save_state
    from ue_dist.methods.protect import protect_uint8

    n, shard_size, batch = SIZES[scale]
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    images, labels = _images(n, scale)
    tmp = tempfile.mkdtemp(prefix="ue-bench-protect-")
    threads = torch.get_num_threads()
    try:
        src, state = os.path.join(tmp, "src"), os.path.join(tmp, "state.pt")
        write_samples(src, [Sample(f"img-{i:06d}", images[i], int(labels[i]), {})
                            for i in range(n)], shard_size=shard_size, num_classes=10)
        method = build_method(METHOD, PRESET, OVERRIDES)
        train = ImageSet.from_numpy_hwc(images[:128], labels[:128], num_classes=10)
        torch.manual_seed(0)
        state_dict = method.fit(train, LocalContext(device=device, log=lambda m: None))
        save_state(state_dict, state)

        # (1) bare loop: one process, one thread (as one CPU actor), same batches
        torch.set_num_threads(1)
        loaded = method.load(state_dict, device)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(labels).long()
        protect_uint8(method, loaded, x[:batch], y[:batch], device, batch)  # warm-up
        t0 = time.perf_counter()
        for start in range(0, n, shard_size):  # shard by shard, as the actors see them
            protect_uint8(method, loaded, x[start:start + shard_size],
                          y[start:start + shard_size], device, batch)
        if use_gpu:
            torch.cuda.synchronize()
        bare_s = time.perf_counter() - t0
        torch.set_num_threads(threads)
        bare = round(n / bare_s, 1)
        results: dict[str, Any] = {"scale": scale, "method": f"{METHOD} ({PRESET}, PGD 10 steps)",
                                   "images": n, "shards": int(np.ceil(n / shard_size)),
                                   "device": str(device), "bare_images_per_s": bare}
        print(f"bare perturb loop ({device}, 1 thread): {bare} images/s", flush=True)

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
        try:
            for actors in (1, 2):
                r = _pipeline(src, os.path.join(tmp, f"dst{actors}"), state, actors,
                              1.0 if use_gpu else 0.0, batch)
                r["wall_ratio"] = round(r["wall_images_per_s"] / bare, 3)
                if "steady_images_per_s" in r:
                    r["steady_ratio"] = round(r["steady_images_per_s"] / bare, 3)
                results[f"protect_{actors}_actor{'s' if actors > 1 else ''}"] = r
                print(f"protect, {actors} actor(s): wall {r['wall_images_per_s']} images/s "
                      f"(x{r['wall_ratio']} of bare, {r['wall_s']} s incl. actor start), steady "
                      f"{r.get('steady_images_per_s')} images/s (x{r.get('steady_ratio')})",
                      flush=True)
        finally:
            if started_here:
                ray.shutdown()
        same = all(open(os.path.join(tmp, "dst1", f), "rb").read()
                   == open(os.path.join(tmp, "dst2", f), "rb").read()
                   for f in sorted(os.listdir(os.path.join(tmp, "dst1"))) if f.endswith(".tar"))
        results["same_bytes_1_vs_2_actors"] = bool(same)
        print(f"1 and 2 actors wrote the same bytes: {same}", flush=True)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=1))
