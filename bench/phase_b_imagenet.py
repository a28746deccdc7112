"""Item 2: Phase B at ImageNet-LT size (115,846 × 1024 float16 features, 1,000 classes, 10 epochs,
batch 512) through the product's training function, against the machine's matmul rate.

The floor is the same step's four matmuls alone (forward x·Wᵀ and e·Tᵀ, backward g·T for the
embedding and gᵀ·x for W; no gradient flows to the fixed classifier or to the features), timed at the
same shapes: whatever the product spends above it is sampling, gathering, normalising, the loss and
the optimiser.
"""
from __future__ import annotations

import torch

from bench import data
from bench.common import check, print_table, sizes, time_many
from bench.phase_b_cached import SCALE
from stages.adapter import TrainConfig, fit

EPOCHS = 10  # the paper's Phase B
TARGET_S = {"cpu": 75.0, "cuda": 3.0}
SIZES = {"quick": {"epochs": 1}, "cpu": {"epochs": EPOCHS}, "cuda": {"epochs": EPOCHS}}


def step_flops(batch: int, dim: int, classes: int) -> int:
    """FLOP of one adapter step: two forward and two backward matmuls, 2·m·n·k each."""
    return 2 * (2 * batch * dim * dim) + 2 * (2 * batch * dim * classes)


def matmul_step(batch: int, dim: int, classes: int, device):
    """The adapter step's four matmuls, nothing else."""
    x, w, e = (torch.randn(batch, dim, device=device), torch.randn(dim, dim, device=device),
               torch.randn(batch, dim, device=device))
    t, g = torch.randn(classes, dim, device=device), torch.randn(batch, classes, device=device)

    def step():
        x @ w.T, e @ t.T, g @ t, e.T @ x
    return step


def profile(fn, top: int = 6) -> list[dict]:
    """The ``top`` operators by self CPU time over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in events[:top]]


def run(quick: bool, device) -> dict:
    size, dev = sizes(SIZES, quick, device), torch.device(device)
    n, k, d = data.IMAGENET_LT["n"], data.IMAGENET_LT["classes"], data.IMAGENET_LT["dim"]
    feats, labels, text = data.lt_split(n, k, d)
    feats, labels, text = feats.to(device).float(), labels.to(device), text.to(device)  # as train_adapter loads them
    cfg = TrainConfig(epochs=size["epochs"], schedule="standard")  # timed only; --quick's one epoch needs lr > 0
    steps = max(1, n // cfg.batch_size) * EPOCHS
    mm = matmul_step(cfg.batch_size, d, k, device)
    per_step = time_many({"matmuls": lambda: [mm() for _ in range(20)]}, device, repeat=5)["matmuls"] / 20
    sub = 20 * cfg.batch_size  # 20 steps show where a step's time goes; also the warm-up of fit()

    def warm_up():
        fit(feats[:sub], labels[:sub], text, SCALE, TrainConfig(epochs=1, schedule="standard"))

    if dev.type == "cpu":
        ops = profile(warm_up)
    else:  # fit() captures a CUDA graph there, which torch.profiler does not reliably survive (pytorch#75504)
        warm_up()
        ops = []
    wall = time_many({"fit": lambda: fit(feats, labels, text, SCALE, cfg)}, device, repeat=1, warmup=0)["fit"]
    wall10 = wall * EPOCHS / cfg.epochs
    flop = step_flops(cfg.batch_size, d, k) * steps
    row = {"N": n, "D": d, "K": k, "epochs_run": cfg.epochs, "wall_10_epochs_s": wall10,
           "wall": "measured" if cfg.epochs == EPOCHS else f"extrapolated from {cfg.epochs} epochs",
           "achieved_gflops": flop / wall10 / 1e9, "matmul_gflops": flop / (per_step * steps) / 1e9,
           "floor_10_epochs_s": per_step * steps, "of_floor": per_step * steps / wall10, "steps": steps}
    print_table(f"Phase B at ImageNet-LT size, {EPOCHS} epochs ({device})",
                [{c: row[c] for c in ("N", "K", "wall_10_epochs_s", "wall", "achieved_gflops", "matmul_gflops",
                                      "floor_10_epochs_s", "of_floor")}])
    if ops:
        print_table("where the time goes: top operators over 20 steps", ops)
    summary = [check(f"Phase B ImageNet-LT 10 epochs, {dev.type}", wall10, TARGET_S[dev.type], False, " s")]
    return {"rows": [row], "profile": ops, "summary": summary}
