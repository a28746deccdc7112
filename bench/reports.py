"""Item 11: `evaluate`'s report files at iNaturalist 2018's size, K = 8,142 classes, N = 24,426 test images.

A synthetic result as ``stages.evaluate.score`` returns it (top-5 classes int64 and their probabilities
float32, per-class accuracy at 3 test images per class, train counts log-spaced from 1,000 down to 2 as
iNaturalist's are), written by ``stages.evaluate.write_report`` and by each of its parts (binning, plot,
CSV, npz), timed in interleaved rounds; peak memory of one whole report as tracemalloc sees it (Python
and numpy allocations; matplotlib's C++ canvas, 2 MB at 960 × 540 px, is outside it; the process's peak
RSS would be the synthetic 24,426 × 8,142 logits', not the report's). Also the
bytes of predictions.npz deflated (``np.savez_compressed``, as written) against stored (``np.savez``,
before). Runs in seconds: ``--quick`` uses the same sizes.
"""
from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import check, print_table, time_many

K, PER_CLASS, MAX_COUNT, MIN_COUNT = 8_142, 3, 1_000, 2
REPEAT = 3


def synthetic_result(k: int = K, per_class: int = PER_CLASS, seed: int = 0):
    """(result dict as ``score`` returns it, train counts, keys, labels): accuracy rising with log train count."""
    from stages.evaluate.score import score

    import torch

    rng = np.random.default_rng(seed)
    counts = np.round(np.geomspace(MAX_COUNT, MIN_COUNT, k)).astype(np.int64)
    labels = np.repeat(np.arange(k), per_class)
    hit = rng.random(len(labels)) < np.clip(0.25 + 0.1 * np.log(counts), 0, 1)[labels]
    logits = torch.from_numpy(rng.standard_normal((len(labels), k), dtype=np.float32))
    logits[torch.from_numpy(np.flatnonzero(hit)), torch.from_numpy(labels[hit])] += 6
    keys = np.array([f"test/{i:08d}" for i in range(len(labels))])
    return score(logits, labels, counts), counts, keys, labels


def run(quick: bool, device) -> dict:
    from stages.evaluate import accuracy_bins, plot_per_class, write_per_class_csv, write_report

    result, counts, keys, labels = synthetic_result()
    names = [f"Genus{c} species{c}, var. \"{c}\"" for c in range(K)]  # commas and quotes: the CSV quotes them
    correct = np.rint(result["per_class"] * result["test_counts"] / 100)
    arrays = dict(key=keys, label=labels, top5=result["top5"], score=result["scores"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fns = {"binning": lambda: accuracy_bins(counts, result["test_counts"], correct),
               "plot": lambda: plot_per_class(out / "per_class.png", result, counts, 100, 20),
               "csv": lambda: write_per_class_csv(out / "per_class.csv", result, names, counts, 100, 20),
               "npz deflated": lambda: np.savez_compressed(out / "deflated.npz", **arrays),
               "npz stored": lambda: np.savez(out / "stored.npz", **arrays),
               "whole report": lambda: write_report(out / "report", result, names, counts, keys, labels, 100, 20)}
        seconds = time_many(fns, "cpu", REPEAT)
        tracemalloc.start()
        write_report(out / "traced", result, names, counts, keys, labels, 100, 20)
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sizes = {name: (out / f"{name}.npz").stat().st_size for name in ("deflated", "stored")}
        files = {p.name: p.stat().st_size for p in (out / "report").iterdir()}
    rows = [{"step": name, "ms": 1e3 * s} for name, s in seconds.items()]
    print_table(f"report files, K = {K:,}, N = {len(labels):,}", rows)
    print_table("bytes", [{"file": f, "bytes": n} for f, n in {**files, "predictions.npz stored (np.savez)":
                                                                 sizes["stored"]}.items()])
    ratio = sizes["stored"] / sizes["deflated"]
    return {"k": K, "n": len(labels), "seconds": seconds, "bytes": files, "npz_stored_bytes": sizes["stored"],
            "heap_peak_bytes": heap_peak, "rows": rows,
            "summary": [check("predictions.npz stored / deflated bytes", ratio, unit="×"),
                        check("whole report at K = 8,142", seconds["whole report"], 10.0, higher_is_better=False,
                              unit=" s"),
                        check("report heap peak", heap_peak / 2**20, unit=" MiB")]}


if __name__ == "__main__":  # python -m bench.reports [runner options]: the runner with this item alone
    import sys

    from bench.__main__ import main

    sys.exit(main(["--only", "reports", *sys.argv[1:]]))
