"""Benchmark of streaming protection: ``protect`` on Ray Data against its parts.

For each method (EM quick: error-minimising noise, PGD 10 steps on a small CNN; GUE quick: one
generator pass), the same state and images are measured in one run: (1) the bare perturb loop
(``protect_uint8`` in this process with one thread, shard by shard with the same batches: what
one actor computes); (2) PNG encoding on its own (``encode_png`` of every image, one thread:
the part of a shard's write that ``--staged`` moves out of the actors); (3)
``ue_dist.runtime.protect.protect`` over the same images stored as shards: today's one-step
path and ``--staged``, each with 1 and then 2 actors (1 CPU each). Two figures per run:
``wall`` (the whole call, including starting the actor pool) and ``steady`` (images after the
first finished shard divided by the time to the last: the streaming rate once actors are up),
and each one's ratio to the bare loop. Peak RSS: the driver's (``ru_maxrss``) and each Ray
worker process started or put to work during a run: its ``VmHWM`` (the kernel's high-water mark
over the process's life; Ray may reuse an idle worker), read from /proc every 0.1 s, by process
title (``MapWorker(...)`` = an actor). Every run must write
the same bytes (checked). On a shared machine the ratios carry the noise of whatever else runs
there.

The states are fitted briefly: the perturbation work is real, their quality does not matter for
throughput. ``scale="cpu"``: 384 digits images (6 shards of 64); ``scale="cifar"``: 10,000
random 32x32x3 images in shards of 1,000, one GPU per actor when available; ``--data
fashion-mnist``: the Fashion-MNIST training set (60,000 images, as ``convert fashion-mnist``
writes them: 32x32x3) in shards of 1,000; ``--images N``: the first N of them only.
``python -m ue_dist.bench.protect [cpu|cifar] [--data fashion-mnist] [--methods em,gue]
[--images N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

from ue_dist.bench.flops import bench_device

SIZES = {"small": (64, 32, 32), "cpu": (384, 64, 256), "cifar": (10000, 1000, 512)}  # images, shard size, batch
PRESET = "quick"
# states fitted for a few steps: throughput does not depend on how well they are trained
OVERRIDES = {"em": {"train_steps": 3, "log_every": 3, "checkpoint_every": 0, "stop_acc": 0.0},
             "gue": {"epochs": 1}}
RUNS = (("one-step", 1), ("staged", 1), ("one-step", 2), ("staged", 2))


def _images(n: int, scale: str, data: str) -> tuple[np.ndarray, np.ndarray]:
    if data == "fashion-mnist":
        from ue_dist.data.converters import (_image_format, fashion_mnist_files,
                                             idx_pair)

        _, files = fashion_mnist_files()
        images, labels = idx_pair(*files["train"], what="fashion-mnist")
        return _image_format(images, 32, 3), labels  # what `convert fashion-mnist` writes
    if scale == "cpu":
        from ue_dist.data.sources import digits_arrays

        images, labels = digits_arrays(32)["train"]
        reps = int(np.ceil(n / len(labels)))
        return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]
    gen = np.random.default_rng(0)
    return (gen.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10)


class _PeakRss:
    """The high-water RSS (MiB) of each Ray worker process, by its title, sampled from /proc."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, float]] = {}
        # a previous run's actors may still be exiting: only processes new to this run count
        self._before = set(self._ray_pids())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _ray_pids() -> dict[int, str]:
        out = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue  # the process ended meanwhile
                if title.startswith("ray::") and "IDLE" not in title:
                    out[int(pid)] = title
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            for pid, title in self._ray_pids().items():
                if pid in self._before:
                    continue
                try:
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
                except (OSError, StopIteration, ValueError):
                    continue  # the process ended meanwhile
                old = self.peaks.get(pid, ("", 0.0))
                self.peaks[pid] = (title if "MapWorker" in title or not old[0] else old[0],
                                   max(old[1], hwm / 1024))

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def actors(self) -> list[float]:
        return sorted((round(mb, 1) for title, mb in self.peaks.values()
                       if "MapWorker" in title), reverse=True)

    def tasks(self) -> float | None:
        mbs = [mb for title, mb in self.peaks.values() if "MapWorker" not in title]
        return round(max(mbs), 1) if mbs else None


def _pipeline(method: str, src: str, dst: str, state: str, actors: int, staged: bool,
              gpus: float, batch: int) -> dict[str, Any]:
    from ue_dist.runtime.protect import protect

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        found = re.search(r"· (\d+) images ·", line)  # ProgressLine: "... 3/6 · 192 images · ..."
        if found:
            stamps.append((time.perf_counter(), int(found.group(1))))

    # the state's settings (those of the bare loop's method): protect takes them from the state
    with _PeakRss() as rss:
        summary = protect(method, src, dst, state_url=state, actors=actors, staged=staged,
                          cpus_per_actor=1.0, gpus_per_actor=gpus, batch_size=batch,
                          mode="overwrite", progress=progress)
    wall = time.perf_counter() - t0
    out = {"actors": actors, "staged": staged, "images": summary["images"],
           "wall_s": round(wall, 2), "wall_images_per_s": round(summary["images"] / wall, 1),
           "actor_peak_rss_mb": rss.actors(), "other_worker_peak_rss_mb": rss.tasks()}
    if len(stamps) >= 2:
        (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
        out["steady_images_per_s"] = round((n_last - n_first) / max(t_last - t_first, 1e-9), 1)
    return out


def _shard_bytes(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read()
            for f in sorted(os.listdir(folder)) if f.endswith(".tar")}


def _one_method(name: str, tmp: str, src: str, images: np.ndarray, labels: np.ndarray,
                shard_size: int, batch: int, device: torch.device) -> dict[str, Any]:
    from ue_dist.core.context import LocalContext
    from ue_dist.data.imageset import ImageSet
    from ue_dist.data.shards import encode_png
    from ue_dist.methods.base import build_method, save_state
    from ue_dist.methods.protect import protect_uint8

    n, threads = len(labels), torch.get_num_threads()
    state = os.path.join(tmp, f"{name}.pt")
    method = build_method(name, PRESET, OVERRIDES[name])
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    bare = round(n / (time.perf_counter() - t0), 1)
    # (2) PNG encoding alone, one thread
    t0 = time.perf_counter()
    for image in images:
        encode_png(image)
    png = round(n / (time.perf_counter() - t0), 1)
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"bare_images_per_s": bare, "png_encode_images_per_s": png}
    print(f"[{name}] bare perturb loop ({device}, 1 thread): {bare} images/s; PNG encoding "
          f"alone: {png} images/s", flush=True)

    # (3) the pipeline: each path with 1 and 2 actors
    first = None
    for path, actors in RUNS:
        dst = os.path.join(tmp, f"{name}-{path}-{actors}")
        r = _pipeline(name, src, dst, state, actors, path == "staged",
                      1.0 if device.type == "cuda" else 0.0, batch)
        r["wall_ratio"] = round(r["wall_images_per_s"] / bare, 3)
        if "steady_images_per_s" in r:
            r["steady_ratio"] = round(r["steady_images_per_s"] / bare, 3)
        written = _shard_bytes(dst)
        first = written if first is None else first
        r["same_bytes_as_first_run"] = written == first
        shutil.rmtree(dst, ignore_errors=True)
        out[f"{path}_{actors}_actor{'s' if actors > 1 else ''}"] = r
        print(f"[{name}] {path}, {actors} actor(s): wall {r['wall_images_per_s']} images/s "
              f"(x{r['wall_ratio']} of bare, {r['wall_s']} s incl. actor start), steady "
              f"{r.get('steady_images_per_s')} images/s (x{r.get('steady_ratio')}); actor peak "
              f"RSS {r['actor_peak_rss_mb']} MiB; same bytes: {r['same_bytes_as_first_run']}",
              flush=True)
    for actors in (1, 2):
        suffix = f"{actors}_actor{'s' if actors > 1 else ''}"
        staged, plain = out[f"staged_{suffix}"], out[f"one-step_{suffix}"]
        out[f"staged_over_one_step_{suffix}_wall"] = round(
            staged["wall_images_per_s"] / plain["wall_images_per_s"], 3)
        print(f"[{name}] staged / one-step, {actors} actor(s), wall: "
              f"x{out[f'staged_over_one_step_{suffix}_wall']}", flush=True)
    for path in ("one-step", "staged"):
        key = f"{path}_2_over_1_actors_wall"
        out[key] = round(out[f"{path}_2_actors"]["wall_images_per_s"]
                         / out[f"{path}_1_actor"]["wall_images_per_s"], 3)
        print(f"[{name}] {path}, 2 / 1 actors, wall: x{out[key]}", flush=True)
    return out


def run(scale: str = "cpu", data: str = "generated", methods: tuple[str, ...] = ("em", "gue"),
        limit: int = 0) -> dict[str, Any]:
    if scale not in SIZES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SIZES)}")
    if data not in ("generated", "fashion-mnist"):
        raise ValueError(f"--data must be generated or fashion-mnist, got {data!r}")
    unknown = sorted(set(methods) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"--methods: {', '.join(unknown)} not benchmarked; valid: "
                         f"{', '.join(OVERRIDES)}")
    import ray

    from ue_dist.data.dataset import write_samples
    from ue_dist.data.shards import Sample

    n, shard_size, batch = SIZES[scale]
    if data == "fashion-mnist":
        shard_size = 1000
    device = bench_device()
    images, labels = _images(n, scale, data)
    if limit:  # the first N (Fashion-MNIST's are in no class order)
        images, labels = images[:int(limit)], labels[:int(limit)]
    n = len(labels)
    tmp = tempfile.mkdtemp(prefix="ue-bench-protect-")
    results: dict[str, Any] = {"scale": scale, "data": data, "images": n,
                               "shards": int(np.ceil(n / shard_size)), "device": str(device),
                               "cpus": os.cpu_count(),
                               "load_average_at_start": os.getloadavg()}
    try:
        src = os.path.join(tmp, "src")
        write_samples(src, [Sample(f"img-{i:06d}", images[i], int(labels[i]), {})
                            for i in range(n)], shard_size=shard_size, num_classes=10)
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
        try:
            for name in methods:
                results[name] = _one_method(name, tmp, src, images, labels, shard_size, batch,
                                            device)
        finally:
            if started_here:
                ray.shutdown()
        # ru_maxrss is in KiB on Linux
        results["driver_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        results["load_average_at_end"] = os.getloadavg()
        print(f"driver peak RSS {results['driver_peak_rss_mb']} MiB; load average "
              f"{results['load_average_at_start']} -> {results['load_average_at_end']}",
              flush=True)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench.protect")
    parser.add_argument("scale", nargs="?", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--data", default="generated", choices=("generated", "fashion-mnist"),
                        help="fashion-mnist: the 60,000 training images instead of the scale's")
    parser.add_argument("--methods", default="em,gue", help="comma-separated: em, gue")
    parser.add_argument("--images", type=int, default=0,
                        help="only the first N images (0: all); EM's 60,000 on 2 cores take "
                             "about half an hour per one-actor run")
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"--images must be >= 0, got {args.images}")
    return run(args.scale, args.data, tuple(m for m in args.methods.split(",") if m), args.images)


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(json.dumps(main(), indent=1))
