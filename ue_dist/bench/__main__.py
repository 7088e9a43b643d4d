"""``python -m ue_dist.bench [--scale cpu|cifar] [--only a,b] [--json FILE] [--threads N]``: the
benchmark suite.

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
    parser = argparse.ArgumentParser(prog="python -m ue_dist.bench", description=__doc__)
    parser.add_argument("--scale", choices=["cpu", "cifar"], default="cpu",
                        help="cpu: minutes on a laptop CPU; cifar: CIFAR-size work for a GPU")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a shared machine 1 "
                             "avoids oversubscription, which distorts every ratio")
    args = parser.parse_args(argv)
    import ue_dist  # noqa: F401

    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    parts = [p for p in (args.only.split(",") if args.only else PARTS) if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    results: dict = {"machine": machine(), "scale": args.scale}
    print(f"# ue_dist benchmark, scale={args.scale}, {json.dumps(results['machine'])}", flush=True)
    for part in parts:
        module = importlib.import_module(f"ue_dist.bench.{part}")
        print(f"\n## {part}", flush=True)
        t0 = time.perf_counter()
        results[part] = module.run(args.scale)
        results[part]["_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=1, sort_keys=True, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
