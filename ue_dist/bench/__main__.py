"""``python -m ue_dist.bench [--gpu] [--scale small|cpu|cifar] [--device auto|cpu|cuda] [--only a,b]
[--json FILE] [--threads N]``: the benchmark suite.

``--gpu`` is the one command for a machine with a GPU: CIFAR-sized work (``--scale cifar``) on
CUDA (``--device cuda``, refused where torch sees none), sized for under 10 minutes on one
recent GPU (an estimate from the FLOP counts: no GPU was lent to this project's development). It prints the matmul and 3x3
convolution peaks measured in the same run and, for every stage, images/s, its FLOPs and its
share of that peak; the REM part projects full CIFAR-10 REM at the paper's settings from it.
``--scale small`` is a smoke run of the code (seconds; the tests use it), not a measurement.

Each part (``ue_dist/bench/<part>.py``) has ``run(scale) -> dict`` that prints its figures and
ratios as it goes; this runs them in one process, one after another, so ratios compare runs made
under the same conditions, and prints one JSON object at the end.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

from ue_dist.bench.flops import DEVICE_ENV, DEVICES

PARTS = ("bayes", "rem", "gue", "victim", "protect")


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench", description=__doc__,
                                     allow_abbrev=False)
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU benchmark: --scale cifar --device cuda")
    parser.add_argument("--scale", choices=["small", "cpu", "cifar"], default=None,
                        help="small: a smoke run (seconds); cpu (default): minutes on a laptop "
                             "CPU; cifar: CIFAR-size work for a GPU")
    parser.add_argument("--device", choices=list(DEVICES), default=None,
                        help="auto (default): CUDA when torch sees one; cpu; cuda")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a shared machine 1 "
                             "avoids oversubscription, which distorts every ratio")
    args = parser.parse_args(argv)
    import ue_dist  # noqa: F401
    import torch

    if args.gpu:
        for flag, value, wanted in (("--scale", args.scale, "cifar"),
                                    ("--device", args.device, "cuda")):
            if value not in (None, wanted):
                parser.error(f"--gpu runs {flag} {wanted}; it cannot be combined with "
                             f"{flag} {value}")
        args.scale, args.device = "cifar", "cuda"
    args.scale, args.device = args.scale or "cpu", args.device or "auto"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"{'--gpu' if args.gpu else '--device cuda'}: torch {torch.__version__} "
                     "sees no CUDA device (a CPU build, or no GPU/driver visible); install a "
                     "CUDA torch on a GPU machine, or run without it for the CPU figures")
    os.environ[DEVICE_ENV] = args.device  # the parts, their subprocesses and Ray actors
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    parts = [p for p in (args.only.split(",") if args.only else PARTS) if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    results: dict = {"machine": machine(), "scale": args.scale, "device": args.device}
    print(f"# ue_dist benchmark, scale={args.scale}, device={args.device}, "
          f"{json.dumps(results['machine'])}", flush=True)
    t_all = time.perf_counter()
    for part in parts:
        module = importlib.import_module(f"ue_dist.bench.{part}")
        print(f"\n## {part}", flush=True)
        t0 = time.perf_counter()
        results[part] = module.run(args.scale)
        results[part]["_seconds"] = round(time.perf_counter() - t0, 1)
    results["_seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(results, indent=1, sort_keys=True, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print("\n" + text)
    print(f"# {len(parts)} part(s) in {results['_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
