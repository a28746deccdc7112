"""Item 8: a Phase B epoch drawing augmented views (`extract --train-views`) against one without.

Both run ``fit`` on the same split and options, timed side by side (interleaved rounds). With views,
every draw gathers its row from the [V·N, D] float16 view matrix instead of the [N, D] float32 features
and casts it after the gather; the target is ≤ 1.1× the step without views. The streamed case (views
beyond memory) reads the V views from a store once per epoch; it is timed on the same data written to
a temporary store.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import data
from bench.common import check, print_table, sizes, time_many
from stages.adapter import TrainConfig, Views, fit

SIZES = {
    "quick": {"n": 16_384, "views": 16, "repeat": 3},
    "cpu": {"n": data.IMAGENET_LT["n"], "views": 16, "repeat": 3},
    "cuda": {"n": data.IMAGENET_LT["n"], "views": 16, "repeat": 5},
}


def run(quick: bool, device) -> dict:
    from store.features import FeatureStore
    from store.feature_writer import write_store

    size = sizes(SIZES, quick, device)
    k, d = data.IMAGENET_LT["classes"], data.IMAGENET_LT["dim"]
    feats, labels, text = data.lt_split(size["n"], k, d)
    feats, labels, text = feats.to(device).float(), labels.to(device), text.to(device)
    noise = torch.Generator(device=device).manual_seed(1)
    stored = torch.stack([(feats + 0.1 * torch.randn(feats.shape, generator=noise, device=device)).half()
                          for _ in range(size["views"])])
    cfg = TrainConfig(epochs=1, schedule="standard", select="last")
    scale = 100.0
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "v.zarr", image={"train": feats.cpu().half().numpy()},
                            labels={"train": labels.cpu().numpy()}, keys=None, text_embeddings=text.cpu().numpy(),
                            classnames=[str(c) for c in range(k)], logit_scale=scale,
                            train_class_counts=np.bincount(labels.cpu().numpy(), minlength=k),
                            views={"train": stored.cpu().numpy()})
        streamed = Views(size["views"], torch.float16, read=lambda v: store.read_views_rows("train", v)[0])
        in_memory = Views(size["views"], torch.float16, stored=stored)
        t = time_many({"no views": lambda: fit(feats, labels, text, scale, cfg),
                       "views in memory": lambda: fit(feats, labels, text, scale, cfg, views=in_memory),
                       "views streamed": lambda: fit(feats, labels, text, scale, cfg, views=streamed)},
                      device, size["repeat"])
        store_bytes = FeatureStore.open(store.path).views_nbytes("train")
    row = {"N": size["n"], "D": d, "K": k, "V": size["views"], "views_GB": round(store_bytes / 1e9, 2),
           **{f"{name}_epoch_s": round(s, 3) for name, s in t.items()},
           "in_memory_ratio": t["views in memory"] / t["no views"], "streamed_ratio": t["views streamed"] / t["no views"]}
    print_table(f"Phase B epoch with and without views ({device})", [row])
    return {"rows": [row], "summary": [
        check("Phase B epoch, views in memory / no views", row["in_memory_ratio"], 1.1, higher_is_better=False,
              unit="×"),
        check("Phase B epoch, views streamed / no views", row["streamed_ratio"], None, higher_is_better=False,
              unit="×")]}
