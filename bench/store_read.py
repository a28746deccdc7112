"""Item 6: reading a train split of the zarr feature store into memory against np.load of the same
array from one .npy file, which is as fast as this machine's storage and memory allow.

ImageNet-LT size (115,846 × 1024 float16, 237 MB), written with store.features.write_store. "warm":
the files are in the page cache, as after a recent write or read (the usual case between pipeline
stages). "cold": their pages are dropped first (fsync + posix_fadvise DONTNEED on each file, which
touches nothing else), so the bytes come from the disk.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import data
from bench.common import check, print_table, sizes, time_many
from store.features import FeatureStore

SIZES = {"quick": {"repeat": 3}, "cpu": {"repeat": 5}, "cuda": {"repeat": 5}}


def evict(*paths: Path) -> None:
    """Drop the files under ``paths`` from the page cache, so the next read comes from the disk."""
    for path in paths:
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    n, k, d = data.IMAGENET_LT["n"], data.IMAGENET_LT["classes"], data.IMAGENET_LT["dim"]
    feats, labels = data.features(data.lt_counts(n, k), d)
    nbytes = feats.numpy().nbytes
    with tempfile.TemporaryDirectory() as tmp:
        store, npy = Path(tmp) / "features.zarr", Path(tmp) / "train.npy"
        data.write(store, {"train": (feats, labels)}, data.text_embeddings(k, d))
        np.save(npy, feats.numpy())
        reads = {"zarr: FeatureStore.features (numpy)": lambda: FeatureStore.open(store).features("train"),
                 f"zarr: → torch float32 on {device}":
                     lambda: FeatureStore.open(store).features("train", device=device, dtype=torch.float32),
                 "np.load of .npy": lambda: np.load(npy)}
        warm = time_many(reads, device, size["repeat"])
        cold = time_many(reads, device, size["repeat"], warmup=0, before=lambda: evict(store, npy))
    rows = [{"read": name, "cache": cache, "s": t[name], "GB_s": nbytes / t[name] / 1e9,
             "vs_np_load": t["np.load of .npy"] / t[name]}
            for cache, t in (("warm", warm), ("cold", cold)) for name in reads]
    print_table(f"feature store reads, {n} × {d} float16 = {nbytes / 1e6:.0f} MB ({device})", rows)
    # Memory- and disk-bound, so they move with the machine's load far more than a compute ratio (warm: 0.31× to
    # 0.60× in five runs at load 3; cold reads hit a disk that a VM's host caches): --check leaves them out.
    summary = [check(f"store read vs np.load, {r['cache']}", r["vs_np_load"], unit="×", compared=False)
               for r in rows if r["read"].startswith("zarr: Feature")]
    return {"rows": rows, "bytes": nbytes, "summary": summary}
