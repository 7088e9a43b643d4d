"""Benchmark of the joint Bayes ascent at n = 60,000 (the size of Fashion-MNIST's training set),
d = 512: seconds per ascent step and peak memory, on Ray Train workers and in one process.

What one step of ``protect --joint`` costs beyond embedding the images: every worker holds its
n / W rows, all-gathers the n x d keys (with gradients), evaluates its rows of the kernel
posterior block by block (memory O(block x n), never n x n) and back-propagates to its own
rows. The points are the embeddings themselves (identity embedding, ``box=None``): the kernel
part is O(n^2 d) and the same whatever network made the embeddings; the network's own cost is
per image (the embedding forward/backward, ``bench.rem``/``bench.victim`` rates) and adds to it.
Each configuration runs 2 ascent steps; peak memory is ``ru_maxrss`` of each process (the worker
processes hold only their part of the work; a fresh subprocess for the single-process run).

``python -m ue_dist.bench.bayes_joint [--n 60000] [--d 512] [--workers 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

STEPS, BLOCK = 2, 1024


def _points(n: int, d: int, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(classes, d, generator=gen)
    return centres[y] * 0.5 + torch.randn(n, d, generator=gen), y


def _ascend(x: torch.Tensor, y: torch.Tensor, sigma: float) -> tuple[list[float], list[float]]:
    from ue_dist.methods.bayes import bayes_pga

    stamps: list[float] = []
    _, history = bayes_pga(lambda t: t, x, y, eps=0.05, step_size=0.01, steps=STEPS,
                           sigma=sigma, num_classes=10, chunk=x.shape[0] + 1,
                           block_size=BLOCK, box=None,
                           on_step=lambda t, beta, delta: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])], history


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: this rank's rows of the points, ``STEPS`` joint ascent steps."""
    from ue_dist.core.distributed import all_gather_no_grad, rank, world_size
    from ue_dist.runtime.ray_env import report_result

    torch.set_num_threads(int(config["threads"]))
    x, y = _points(config["n"], config["d"])
    per = -(-config["n"] // world_size())
    own = slice(rank() * per, min(config["n"], (rank() + 1) * per))
    times, history = _ascend(x[own].clone(), y[own].clone(), config["sigma"])
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    peaks = all_gather_no_grad(peak).tolist()
    report_result({"step_s": times, "beta": history, "peak_rss_mib": [round(p) for p in peaks]})


def _single(n: int, d: int, sigma: float) -> dict[str, Any]:
    x, y = _points(n, d)
    times, history = _ascend(x, y, sigma)
    return {"step_s": times, "beta": history,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run(scale: str = "cpu", n: int = 60000, d: int = 512, workers: int = 2) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ue_dist.core.bayes_error import median_sigma
    from ue_dist.runtime.ray_env import result_metrics

    x, _ = _points(min(n, 4096), d)
    sigma = float(median_sigma(x))
    inputs_mib = n * d * 4 / 2**20
    print(f"n={n}, d={d}: the points are {inputs_mib:.0f} MiB; a dense n x n fp32 matrix would "
          f"be {n * n * 4 / 2**30:.1f} GiB; kernel blocks of {BLOCK} rows "
          f"({BLOCK * n * 4 / 2**20:.0f} MiB each)", flush=True)
    out = subprocess.run([sys.executable, "-m", "ue_dist.bench.bayes_joint", "--child",
                          str(n), str(d), str(sigma)], check=True, capture_output=True, text=True)
    single = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"1 process ({torch.get_num_threads()} threads): "
          f"{[round(t, 1) for t in single['step_s']]} s per step, peak RSS "
          f"{single['peak_rss_mib']} MiB", flush=True)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    try:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            trainer = TorchTrainer(
                worker_loop, train_loop_config={"n": n, "d": d, "sigma": sigma,
                                                "threads": max(1, (os.cpu_count() or 2) // workers)},
                scaling_config=ScalingConfig(num_workers=workers,
                                             resources_per_worker={"CPU": 0.5}),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(storage_path=tmp, name="bench-bayes-joint"))
            t0 = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - t0
            if result.error is not None:
                raise result.error
            metrics = result_metrics(result, "bench bayes_joint")
    finally:
        if started:
            ray.shutdown()
    print(f"{workers} Ray Train workers: {[round(t, 1) for t in metrics.get('step_s', [])]} s per "
          f"step, peak RSS per worker {metrics.get('peak_rss_mib')} MiB, {wall:.0f} s wall incl. "
          f"starting the group; beta {metrics.get('beta')} (1 process: {single['beta']})",
          flush=True)
    return {"n": n, "d": d, "block_rows": BLOCK, "single_process": single,
            f"{workers}_workers": {**metrics, "wall_s": round(wall, 1)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench.bayes_joint",
                                     description=__doc__)
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n, d, sigma = int(args.child[0]), int(args.child[1]), float(args.child[2])
        print(json.dumps(_single(n, d, sigma)))
        return 0
    print(json.dumps(run(n=args.n, d=args.d, workers=args.workers), indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    raise SystemExit(main())
