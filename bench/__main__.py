"""python -m bench [--quick] [--only NAME …] [--device cpu|cuda]

Runs the benchmarks (docs/performance.md describes them), prints a table per benchmark and a summary
of the headline ratios against their targets, and writes one JSON per benchmark to bench/results/
(or to $OUT when set).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

os.environ.setdefault("BALLAD_PROGRESS", "0")  # no progress bars inside timed code

BENCHES = ("phase_b_cached", "phase_b_imagenet", "sweep", "text_truncation", "extract", "store_read", "scaling", "phase_b_views")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="the ≤ 5-minute subset (small sizes, extrapolated)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, metavar="NAME", help=f"any of: {', '.join(BENCHES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); on a "
                        "machine shared with other jobs 1 can be far faster, as 2 threads wait on each other")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by faiss's OpenMP when it loads

    import torch

    logging.basicConfig(level=logging.ERROR)  # open_clip warns at every randomly initialised model
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench.common import machine, print_table, write_result

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    print("machine:", ", ".join(f"{k}={v}" for k, v in machine(args.device).items()))
    summary = []
    for name in args.only or BENCHES:
        t0 = time.perf_counter()
        result = importlib.import_module(f"bench.{name}").run(args.quick, args.device)
        result["wall_s"] = time.perf_counter() - t0
        path = write_result(name, result, args.device, args.quick)
        print(f"  [{name}: {result['wall_s']:.0f} s → {path}]", flush=True)
        summary += result.get("summary", [])
    if summary:
        print_table("summary", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
