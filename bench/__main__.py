"""python -m bench [--quick | --check] [--only NAME …] [--device cpu|cuda]

Runs the benchmarks (docs/performance.md describes them), prints a table per benchmark and a summary
of the headline ratios against their targets, and writes one JSON per benchmark to bench/results/
(or to $OUT when set). --check instead runs the --quick subset and compares its ratios with the JSON
recorded there: a PASS or REGRESSED line each, exit status 1 on a regression, nothing written.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from bench.check import TOLERANCE, verdicts

os.environ.setdefault("BALLAD_PROGRESS", "0")  # no progress bars inside timed code

BENCHES = ("phase_b_cached", "phase_b_imagenet", "sweep", "text_truncation", "text_chunks", "extract", "store_read", "scaling", "phase_b_views",
           "max_side", "decode", "reports", "inat_scale")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="the ≤ 5-minute subset (small sizes, extrapolated)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, metavar="NAME", help=f"any of: {', '.join(BENCHES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--check", action="store_true", help="a --quick run whose ratios are compared with the "
                        "last recorded results (bench/results/, or $OUT): PASS or REGRESSED each, exit status 1 on "
                        "a regression; writes no results")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="--check: a ratio regresses when it "
                        "moved the wrong way by more than a factor 1 + this (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); on a "
                        "machine shared with other jobs 1 can be far faster, as 2 threads wait on each other")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by faiss's OpenMP when it loads

    import torch

    logging.basicConfig(level=logging.ERROR)  # open_clip warns at every randomly initialised model
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench.common import machine, print_table, read_result, write_result

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    print("machine:", ", ".join(f"{k}={v}" for k, v in machine(args.device).items()))
    quick = args.quick or args.check
    summary, compared = [], []
    for name in args.only or BENCHES:
        t0 = time.perf_counter()
        result = importlib.import_module(f"bench.{name}").run(quick, args.device)
        result["wall_s"] = time.perf_counter() - t0
        if args.check:
            compared += verdicts(result, read_result(name), args.device, args.tolerance)
            print(f"  [{name}: {result['wall_s']:.0f} s]", flush=True)
        else:
            path = write_result(name, result, args.device, quick)
            print(f"  [{name}: {result['wall_s']:.0f} s → {path}]", flush=True)
        summary += result.get("summary", [])
    if summary:
        print_table("summary", summary, ["what", "value", "target", "met"])
    if not args.check:
        return 0
    print()
    for verdict, line in compared:
        print(f"{verdict:<9} {line}")
    regressed = sum(verdict == "REGRESSED" for verdict, _ in compared)
    passed = sum(verdict == "PASS" for verdict, _ in compared)
    overall = "REGRESSED" if regressed else "PASS" if passed else "NOTHING COMPARED"
    print(f"bench --check: {overall} ({passed} passed, {regressed} regressed, "
          f"{len(compared) - passed - regressed} skipped)")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
