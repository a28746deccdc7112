"""Item 13: everything after Phase A at iNaturalist 2018's full size (issue #26), on synthetic features.

iNat's shape: K = 8,142 classes, train counts from 1,000 down to 2, N = 437,513 in all (a shifted power
law c·(i + s)^−a fitted to those three numbers, rounded to exactly N), features D = 768 (ViT-B/16) and
1,024 (RN50), float16 as the store keeps them; 24,426 test rows (3 per class). Each item runs in a fresh
subprocess (``--one``); its memory is the peak resident memory (VmHWM) during the item, reset once the
synthetic inputs are built (peak_mb; base_mb: resident before it, torch and the inputs; input_mb: the
inputs' bytes). The item's own extra memory is peak_mb − base_mb.

1. store: ``write_store`` (bench.data.write) of train + test, bytes on disk, warm read of the train features;
2. one Phase B epoch (``stages.adapter.fit``, the authors' defaults but schedule standard, as
   bench.phase_b_imagenet times it) against its matmul floor (phase_b_imagenet.matmul_step);
3. the class-aware sampler's epoch (``EpochSampler.epoch``) at full N and K;
4. scoring (``adapter_logits`` + ``stages.evaluate.score``) of 24,426 × 8,142 logits, with the six taxonomy
   levels of ``inat_taxonomy`` (taxonomy_s: those levels alone); the report files after it are
   bench.reports' item, not redone here;
5. the sweep (``stages.sweep.sweep``) with one λ and one epoch, extrapolated to 11 λ × 10 epochs;
6. the kNN cache's search (``stages.knn.search``, faiss, exact) + ``cache_logits`` with the test queries.

Full size everywhere (2 CPU cores: one epoch ≈ 2 min, the kNN search ≈ 2 min, all in ≈ 12 min); only the
sweep is extrapolated, from 1 λ × 1 epoch to 11 λ × 10 epochs. ``--quick`` runs the items linear in N at
1/32 of it (same K and D, D = 1,024 only) and extrapolates them linearly (FRACTION).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K, N, MAX_COUNT, MIN_COUNT, TEST_PER_CLASS = 8_142, 437_513, 1_000, 2, 3
DIMS = (768, 1024)
KNN_K = 10  # neighbours per query (the stage's --knn-k; off by default)
FRACTION = {"quick": {"store": 1 / 32, "phase_b": 1 / 32, "sampler": 1 / 32, "evaluate": 1.0, "sweep": 1 / 32,
                      "knn": 1 / 32},
            "cpu": {"store": 1.0, "phase_b": 1.0, "sampler": 1.0, "evaluate": 1.0, "sweep": 1.0, "knn": 1.0},
            "cuda": {"store": 1.0, "phase_b": 1.0, "sampler": 1.0, "evaluate": 1.0, "sweep": 1.0, "knn": 1.0}}
ITEMS = ("store", "phase_b", "sampler", "evaluate", "sweep", "knn")


def inat_counts(k: int = K, n: int = N, top: int = MAX_COUNT, bottom: int = MIN_COUNT) -> np.ndarray:
    """Counts c·(i + s)^−a, i = 0 … k−1, with count[0] = top, count[k−1] = bottom and Σ = n exactly."""
    i = np.arange(k, dtype=np.float64)

    def curve(s):
        a = np.log(top / bottom) / np.log((k - 1 + s) / s)
        return top * (s / (i + s)) ** a

    lo, hi = 1e-3, 1e6  # the sum grows with s (the curve flattens)
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if curve(mid).sum() < n else (lo, mid)
    exact = curve(lo)
    counts = np.clip(np.floor(exact), bottom, top).astype(np.int64)
    order = np.argsort(counts - exact)  # largest remainders first
    j = 0
    while counts.sum() != n:
        c = order[j % k]
        step = 1 if counts.sum() < n else -1
        if bottom <= counts[c] + step <= top and 0 < c < k - 1:
            counts[c] += step
        j += 1
    return counts


def inat_taxonomy(k: int = K) -> dict[str, list[str]]:
    """Names at the six levels, kingdom … genus, for timing: class c's group i levels above the species is
    c // 4**i (genera of 4 species … kingdoms of 4,096), nested as a real taxonomy is."""
    from store.shards import TAXONOMY_LEVELS

    return {level: [f"{level} {c // 4 ** (len(TAXONOMY_LEVELS) - i)}" for c in range(k)]
            for i, level in enumerate(TAXONOMY_LEVELS)}


def scaled_counts(fraction: float) -> np.ndarray:
    """iNat's counts at ``fraction`` of N, same K: each class scaled, at least 1."""
    full = inat_counts()
    return full if fraction >= 1 else np.maximum(1, np.round(full * fraction)).astype(np.int64)


def _reset_peak() -> int:
    """Resident MB now, with the process's peak (VmHWM) reset to it: what follows is the item's own peak."""
    import gc

    from bench.text_chunks import _memory_mb

    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the present VmRSS (Linux ≥ 4.0)
    return _memory_mb()["VmRSS"]


def _peak_mb() -> int:
    """Peak resident MB since the last _reset_peak (VmHWM)."""
    from bench.text_chunks import _memory_mb

    return _memory_mb()["VmHWM"]


def one(item: str, dim: int, fraction: float, device: str) -> dict:
    """Item ``item`` at feature width ``dim`` and ``fraction`` of N, in this process."""
    import torch

    from bench import data
    from bench.common import time_many

    counts = scaled_counts(fraction)
    out = {"item": item, "D": dim, "K": K, "fraction": fraction, "N": int(counts.sum())}
    if item == "sampler":
        from stages.adapter.samplers import EpochSampler

        labels = torch.from_numpy(np.repeat(np.arange(K), counts))
        base = _reset_peak()
        gen = torch.Generator().manual_seed(0)
        samplers = {name: EpochSampler(name, labels, K, 512, gen) for name in ("class-aware", "instance")}
        t = time_many({name: (lambda s=s: s.epoch(0, 10)) for name, s in samplers.items()}, repeat=5)
        t0 = time.perf_counter()
        EpochSampler("class-aware", labels, K, 512, gen)
        return {**out, "s": t["class-aware"], "instance_s": t["instance"], "init_s": time.perf_counter() - t0,
                "input_mb": labels.numel() * 8 / 2**20, "base_mb": base, "peak_mb": _peak_mb()}
    if item == "evaluate":
        from stages.adapter import Adapter, embed_all
        from stages.evaluate.score import adapter_logits, score, taxonomy_accuracy

        feats, labels = data.features(np.full(K, TEST_PER_CLASS), dim, split=1)
        text = data.text_embeddings(K, dim)
        model = Adapter(dim, 100.0).eval()
        base = _reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = adapter_logits(model, embed_all(model, feats.float()), text)
        t_logits = time.perf_counter() - t0
        taxonomy = inat_taxonomy()
        t0 = time.perf_counter()
        pred = score(logits, labels.numpy(), counts, taxonomy=taxonomy)["top5"][:, 0]
        t_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        taxonomy_accuracy(pred, labels.numpy(), taxonomy)
        return {**out, "N": len(labels), "s": t_logits + t_score, "logits_s": t_logits, "score_s": t_score,
                "taxonomy_s": time.perf_counter() - t0, "logits_mb": logits.numel() * 4 / 2**20,
                "input_mb": feats.numel() * 2 / 2**20, "base_mb": base, "peak_mb": _peak_mb()}
    train = data.features(counts, dim)
    text = data.text_embeddings(K, dim)
    input_mb = train[0].numel() * 2 / 2**20
    if item == "store":
        from store.features import FeatureStore

        test = data.features(np.full(K, TEST_PER_CLASS), dim, split=1)
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            path = Path(tmp) / "features.zarr"
            base = _reset_peak()
            t0 = time.perf_counter()
            data.write(path, {"train": train, "test": test}, text)
            write_s = time.perf_counter() - t0
            write_peak = _peak_mb()
            nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            train_bytes = sum(p.stat().st_size for p in (path / "train").rglob("*") if p.is_file()) \
                if (path / "train").is_dir() else None
            del train
            read = time_many({"read": lambda: FeatureStore.open(path).features("train")}, repeat=3)["read"]
        return {**out, "s": write_s, "write_s": write_s, "read_s": read, "disk_bytes": nbytes,
                "train_disk_bytes": train_bytes, "raw_bytes": int(counts.sum() + K * TEST_PER_CLASS) * dim * 2,
                "input_mb": input_mb, "base_mb": base, "write_peak_mb": write_peak, "peak_mb": _peak_mb()}
    if item == "phase_b":
        from bench.phase_b_cached import SCALE
        from bench.phase_b_imagenet import matmul_step, step_flops
        from stages.adapter import TrainConfig, fit

        feats, labels = train[0].float(), train[1]  # as train_adapter loads them
        del train
        cfg = TrainConfig(epochs=1, schedule="standard")  # the authors' defaults; one epoch needs lr > 0
        steps = max(1, len(labels) // cfg.batch_size)
        mm = matmul_step(cfg.batch_size, dim, K, device)
        per_step = time_many({"mm": lambda: [mm() for _ in range(5)]}, repeat=3)["mm"] / 5
        sub = 5 * cfg.batch_size
        fit(feats[:sub], labels[:sub], text, SCALE, cfg)  # warm-up
        base = _reset_peak()
        t0 = time.perf_counter()
        fit(feats, labels, text, SCALE, cfg)
        wall = time.perf_counter() - t0
        flop = step_flops(cfg.batch_size, dim, K) * steps
        return {**out, "s": wall, "steps": steps, "floor_s": per_step * steps, "of_floor": per_step * steps / wall,
                "achieved_gflops": flop / wall / 1e9, "matmul_gflops": flop / (per_step * steps) / 1e9,
                "input_mb": feats.numel() * 4 / 2**20, "base_mb": base, "peak_mb": _peak_mb()}
    if item == "sweep":
        from stages.adapter import TrainConfig
        from stages.evaluate.sweep import sweep

        test = data.features(np.full(K, TEST_PER_CLASS), dim, split=1)
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            path = Path(tmp) / "features.zarr"
            data.write(path, {"train": train, "test": test}, text)
            del train, test
            base = _reset_peak()
            t0 = time.perf_counter()
            sweep(path, Path(tmp) / "sweep", [0.2], TrainConfig(epochs=1, schedule="standard"), device=device)
            wall = time.perf_counter() - t0
        return {**out, "s": wall, "lambdas": 1, "epochs": 1, "input_mb": input_mb, "base_mb": base,
                "peak_mb": _peak_mb()}
    if item == "knn":
        from stages.evaluate.knn import cache_logits, search

        db = torch.nn.functional.normalize(train[0].float(), dim=1)
        labels = train[1]
        del train
        queries = torch.nn.functional.normalize(data.features(np.full(K, TEST_PER_CLASS), dim, split=1)[0].float(),
                                                dim=1)
        base = _reset_peak()
        t0 = time.perf_counter()
        sims, idx = search(db, queries, KNN_K)
        t_search = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache_logits(sims, idx, labels, torch.from_numpy(counts), 5.0, 0.0)
        t_votes = time.perf_counter() - t0
        return {**out, "Q": len(queries), "knn_k": KNN_K, "s": t_search + t_votes, "search_s": t_search,
                "votes_s": t_votes, "input_mb": (db.numel() + queries.numel()) * 4 / 2**20, "base_mb": base,
                "peak_mb": _peak_mb()}
    raise ValueError(item)


def child(item: str, dim: int, fraction: float, device: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.inat_scale", "--one", item, str(dim), repr(fraction), device],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"item": item, "D": dim, "fraction": fraction, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_size(r: dict, phase_b: dict | None, evaluate: dict | None) -> dict:
    """The item's full-size seconds (and how they were got)."""
    f, s, x = r["fraction"], r["s"], N / r["N"]  # x: the full N over the N measured (rounding moves it off 1/f)
    if r["item"] == "sweep":
        # measured: read + 1 epoch + scoring at fraction f; full: 11 λ × (10 epochs at full N + scoring)
        epoch = phase_b["s"] * N / phase_b["N"] if phase_b else s * x
        score_s = evaluate["s"] if evaluate else 0.0
        per_lambda = 10 * epoch + score_s
        return {"full_s": per_lambda, "full_sweep_11_s": 11 * per_lambda,
                "how": f"measured 1 λ × 1 epoch at {f:g} N ({s:.1f} s); full = 10 × (item 2's epoch / "
                       f"{phase_b['N'] if phase_b else r['N']} × {N}) + item 4's scoring, per λ; × 11 λ"}
    if f >= 1 or r["item"] == "evaluate":
        return {"full_s": s, "how": "measured at full size"}
    return {"full_s": s * x, "how": f"measured at {f:g} N ({r['N']:,} rows), × {x:.3f} (linear in N)"}


def run(quick: bool, device) -> dict:
    from bench.common import check, print_table, sizes

    fractions = sizes(FRACTION, quick, device)
    dims = DIMS[-1:] if quick else DIMS
    rows = []
    for item in ITEMS:
        for dim in dims if item != "sweep" else DIMS[-1:]:
            t0 = time.perf_counter()
            rows.append(child(item, dim, fractions[item], str(device)))
            print(f"  {item} D={dim}: {time.perf_counter() - t0:.0f} s  {rows[-1]}", flush=True)
    for r in rows:
        if "error" in r:
            continue
        pb = next((x for x in rows if x["item"] == "phase_b" and x["D"] == r["D"] and "error" not in x), None)
        ev = next((x for x in rows if x["item"] == "evaluate" and x["D"] == r["D"] and "error" not in x), None)
        r.update(full_size(r, pb, ev))
    print_table(f"iNaturalist 2018 size after Phase A, K = {K:,}, N = {N:,} ({device})",
                [{c: r.get(c, "") for c in ("item", "D", "N", "fraction", "s", "full_s", "peak_mb", "of_floor")}
                 for r in rows])
    summary = [check(f"iNat Phase B epoch D={r['D']}, of matmul floor", r["of_floor"], 0.8, unit="×")
               for r in rows if r["item"] == "phase_b" and "of_floor" in r]
    return {"counts": {"K": K, "N": N, "max": MAX_COUNT, "min": MIN_COUNT}, "rows": rows, "summary": summary}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])))
    else:
        from bench.__main__ import main

        sys.exit(main(["--only", "inat_scale", *sys.argv[1:]]))
