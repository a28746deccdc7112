"""Timing check for Phase B at ImageNet-LT size: 115,846 × 1024 float16 features, 1000 classes.

    python scripts/time_phase_b.py [--epochs 10] [--device cpu|cuda] [--store]

Trains the default adapter (class-balanced, batch 512, SGD lr 0.2) on synthetic long-tailed features
and prints seconds per epoch. ``--store`` also writes the features to a temporary zarr store and
times `train_adapter` end to end (reading the store included). Targets: ≤ 75 s for 10 epochs on
2 CPU cores, ≤ 3 s on one H200.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

N, D, K = 115_846, 1024, 1000


def imagenet_lt_counts() -> np.ndarray:
    """1280 → 5 images per class, Pareto-like, summing to ImageNet-LT's 115,846."""
    raw = 1280 * (np.arange(K) + 1.0) ** -0.75
    counts = np.maximum(5, np.round(raw * (N - 5 * K) / raw.sum())).astype(np.int64)
    counts[0] += N - counts.sum()
    return counts


def matmul_seconds(dev, repeat: int = 20) -> float:
    """Seconds for one step's four products at its shapes (best of three rounds)."""
    x, w, c, g = (torch.randn(s, device=dev) for s in ((512, D), (D, D), (K, D), (512, K)))
    best = float("inf")
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeat):
            x @ w.T, x @ c.T, g @ c, x.T @ x
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store", action="store_true")
    args = parser.parse_args()

    from pipeline.runtime import pick_device
    from stages.adapter import TrainConfig, fit, train_adapter

    dev = pick_device(args.device)
    rng = np.random.default_rng(0)
    counts = imagenet_lt_counts()
    labels = np.repeat(np.arange(K), counts)
    feats = rng.standard_normal((N, D), dtype=np.float32).astype(np.float16)
    text = rng.standard_normal((K, D)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    cfg = TrainConfig(epochs=args.epochs)
    print(f"device {dev}, torch threads {torch.get_num_threads()}, {N} × {D} features, {K} classes")

    f = torch.from_numpy(feats).to(dev).float()
    y = torch.from_numpy(labels).to(dev)
    u = torch.from_numpy(text).to(dev)
    if dev.type == "cuda":
        fit(f, y, u, 100.0, TrainConfig(epochs=1))  # warm-up: CUDA context, kernels, allocator
        torch.cuda.synchronize()
    print(f"matmul floor: {args.epochs * (N // 512) * matmul_seconds(dev):.2f} s "
          "(the step's four matrix products alone)")
    t = time.perf_counter()
    _, losses = fit(f, y, u, 100.0, cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"fit: {args.epochs} epochs in {dt:.2f} s ({dt / args.epochs:.2f} s/epoch), final loss {losses[-1]:.4f}")

    if args.store:
        from store.features import write_store

        with tempfile.TemporaryDirectory() as tmp:
            write_store(f"{tmp}/lt.zarr", image={"train": feats}, labels={"train": labels}, keys=None,
                        text_embeddings=text, classnames=[f"c{i}" for i in range(K)], logit_scale=100.0,
                        train_class_counts=counts)
            t = time.perf_counter()
            train_adapter(f"{tmp}/lt.zarr", f"{tmp}/adapter.pt", cfg, device=str(dev))
            print(f"train_adapter (store read + fit + save): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
