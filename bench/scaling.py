"""Item 7: how cost grows. One cached Phase B epoch against the number of train features N (K = 1,000)
and the number of classes K (N fixed), and kNN queries (stages/knn.py's exact faiss index, built and
searched, against brute force in torch: one chunked matmul and top-k) against N.

A Phase B step costs 4·B·D·(D + K) FLOP (B = 512, D = 1024) and an epoch has ⌊N / B⌋ steps, so the
epoch should grow linearly in N and in D + K; an exact kNN query grows linearly in N.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import data
from bench.common import print_table, sizes, time_many
from bench.phase_b_cached import SCALE
from bench.phase_b_imagenet import step_flops
from stages.adapter import TrainConfig, fit
from stages.evaluate.knn import search

D, K_FIXED, TOPK = 1024, 1000, 10
SIZES = {
    "quick": {"n": [10_000, 30_000, 60_000], "k": [100, 1000, 10_000], "n_for_k": 10_000,
              "knn_n": [10_000, 50_000], "queries": 500, "repeat": 2},
    "cpu": {"n": [10_000, 30_000, 100_000, 300_000, 1_000_000], "k": [100, 300, 1000, 3000, 10_000],
            "n_for_k": data.IMAGENET_LT["n"], "knn_n": [10_000, 100_000, 300_000, 1_000_000], "queries": 1000,
            "repeat": 3},
}
SIZES["cuda"] = SIZES["cpu"]


def epoch_s(feats, labels, text, device) -> float:
    """Seconds of one Phase B epoch through the product's fit()."""
    feats, labels, text = feats.to(device).float(), labels.to(device), text.to(device)
    return time_many({"fit": lambda: fit(feats, labels, text, SCALE, TrainConfig(epochs=1, schedule="standard"))}, device,
                     repeat=1, warmup=0)["fit"]


def torch_knn(db: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 131_072):
    """Exact top-k inner products, chunked over the database so the [Q, N] score matrix never exists whole."""
    best_s = best_i = None
    for start in range(0, len(db), chunk):
        s, i = (queries @ db[start:start + chunk].T).topk(min(k, len(db) - start), dim=1)
        if best_s is not None:
            s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
            i = torch.cat([best_i, i + start], 1).gather(1, j)
        best_s, best_i = s, i
    return best_s, best_i


def scale_n(size, device) -> list[dict]:
    feats, labels, text = data.lt_split(max(size["n"]), K_FIXED, D)  # rows are shuffled: a prefix is a random subset
    epoch_s(feats[:2048], labels[:2048], text, device)  # warm-up
    rows = []
    for n in size["n"]:
        t = epoch_s(feats[:n], labels[:n], text, device)
        rows.append({"N": n, "K": K_FIXED, "epoch_s": t, "us_per_feature": t / n * 1e6,
                     "gflops": step_flops(512, D, K_FIXED) * (n // 512) / t / 1e9})
    return rows


def scale_k(size, device) -> list[dict]:
    rows = []
    for k in size["k"]:
        t = epoch_s(*data.lt_split(size["n_for_k"], k, D), device)
        rows.append({"N": size["n_for_k"], "K": k, "epoch_s": t, "flop_ratio": step_flops(512, D, k) / step_flops(512, D, K_FIXED),
                     "gflops": step_flops(512, D, k) * (size["n_for_k"] // 512) / t / 1e9})
    return rows


def scale_knn(size, device) -> list[dict]:
    feats, _ = data.features(data.lt_counts(max(size["knn_n"]), K_FIXED), D)
    queries = F.normalize(data.features(data.lt_counts(size["queries"], 100), D, split=1)[0].float(), dim=1)
    rows = []
    for n in size["knn_n"]:
        db = F.normalize(feats[:n].float(), dim=1)
        dbd, qd = db.to(device), queries.to(device)
        t = time_many({"faiss": lambda: search(db, queries, TOPK), "torch": lambda: torch_knn(dbd, qd, TOPK)},
                      device, size["repeat"])
        same = (search(db, queries, TOPK)[1] == torch_knn(dbd, qd, TOPK)[1].cpu()).float().mean().item()
        rows.append({"N": n, "queries": len(queries), "k": TOPK, "faiss_s": t["faiss"], "torch_s": t["torch"],
                     "torch_vs_faiss": t["faiss"] / t["torch"], "same_neighbours": same})
    return rows


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    by_n, by_k, knn = scale_n(size, device), scale_k(size, device), scale_knn(size, device)
    print_table(f"Phase B epoch vs N, K = {K_FIXED} ({device})", by_n)
    print_table(f"Phase B epoch vs K, N = {size['n_for_k']} ({device})", by_k)
    print_table(f"kNN, {size['queries']} queries, top-{TOPK}, exact (faiss on CPU; torch on {device})", knn)
    return {"by_n": by_n, "by_k": by_k, "knn": knn}
