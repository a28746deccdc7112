"""Item 3: an 11-value λ sweep from the cache (the real `sweep` stage: read the store once, train and
score 11 adapters) against 11 BALLAD-style Phase B runs.

Both sides' per-epoch times are measured side by side in this run (item 1's measurement, RN50). The
cached sweep itself is run for ``epochs`` epochs per λ; with fewer than 10, its total is extrapolated
by adding the missing epochs at the measured per-epoch time. The BALLAD-style total is always
extrapolated: 11 × (10 epochs + one pass of the test images through the tower for scoring).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench import data
from bench.common import check, print_table, sizes
from bench.phase_b_cached import epoch_times
from pipeline.models import create_model
from stages.adapter import TrainConfig
from stages.evaluate.sweep import sweep

LAMBDAS = [i / 10 for i in range(11)]
EPOCHS = 10
SIZES = {
    "quick": {"n": 16_384, "test_per_class": 5, "epochs": 1, "micro": 16, "text_prompts": 8, "repeat": 2},
    "cpu": {"n": data.IMAGENET_LT["n"], "test_per_class": 50, "epochs": 2, "micro": 64, "text_prompts": 64,
            "repeat": 3},
    "cuda": {"n": data.IMAGENET_LT["n"], "test_per_class": 50, "epochs": EPOCHS, "micro": 512, "text_prompts": 1000,
             "repeat": 3},
}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    k = data.IMAGENET_LT["classes"]
    backbone = create_model("RN50", device=device)
    train = data.features(data.lt_counts(size["n"], k), backbone.embed_dim)
    test = data.features(np.full(k, size["test_per_class"]), backbone.embed_dim, split=1)
    text = data.text_embeddings(k, backbone.embed_dim)
    per_epoch = epoch_times(backbone, *train, text, size["micro"], size["text_prompts"], device, size["repeat"])
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "features.zarr"
        data.write(store, {"train": train, "test": test}, text)
        t0 = time.perf_counter()
        sweep(store, Path(tmp) / "sweep", LAMBDAS, TrainConfig(epochs=size["epochs"], schedule="standard"),
              device=device)  # timed only; --quick's one epoch needs lr > 0
        measured = time.perf_counter() - t0
    missing = len(LAMBDAS) * (EPOCHS - size["epochs"])
    cached = measured + missing * per_epoch["cached_epoch_s"]
    tower_per_image = per_epoch["ballad_step_s"] / per_epoch["step_images"]
    ballad = len(LAMBDAS) * (EPOCHS * per_epoch["ballad_epoch_s"] + len(test[1]) * tower_per_image)
    row = {"N": size["n"], "K": k, "test": len(test[1]), "lambdas": len(LAMBDAS),
           "cached_sweep_s": cached, "cached": "measured" if not missing else
           f"measured {size['epochs']} epoch(s)/λ ({measured:.1f} s) + {missing} epochs extrapolated",
           "ballad_sweep_s": ballad, "ballad": "extrapolated", "speedup": ballad / cached,
           "cached_epoch_s": per_epoch["cached_epoch_s"], "ballad_epoch_s": per_epoch["ballad_epoch_s"]}
    print_table(f"λ sweep, {len(LAMBDAS)} values × {EPOCHS} epochs, RN50 features ({device})",
                [{c: row[c] for c in ("N", "K", "cached_sweep_s", "cached", "ballad_sweep_s", "ballad", "speedup")}])
    return {"rows": [row], "summary": [check("λ sweep cached vs BALLAD-style, RN50", row["speedup"], unit="×")]}
