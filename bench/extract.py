"""Item 5: extraction throughput. Three measurements on the same webdataset shards of ImageNet-sized
JPEGs (500 × 375, as ImageNet's typical photo), side by side:

- extract: the stage's image path (stages/extract.py, --decode cpu: loader workers decode and transform
  whole shards → model → per-shard staging → the split's zarr arrays). The one-off model build and class
  text embeddings are left out: they do not scale with the images.
- model: the same forward (inference mode, autocast on CUDA, float16 out) on tensors decoded beforehand.
- decode: the same loader without the model: read, decode, resize, crop, normalise.

``of_bound`` says how close the extract path gets to what the other two allow: on a GPU the model
and the decoding workers run in parallel, so the bound is the slower of the two; on CPU they share the
cores, so it is both done one after the other, 1 / (1/model + 1/decode).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import check, print_table, sizes, time_many
from pipeline.images import MAX_PIXELS
from pipeline.models import create_model
from pipeline.runtime import autocast
from stages.extract.run import run_shards
from stages.extract.data import WorkerPixels, make_loader
from stages.prepare.writer import Spec, write_dataset
from store.features import FORMAT
from store.feature_writer import SplitWriter, create_store
from store.shards import load_dataset

DISTINCT = 64  # distinct JPEGs, cycled over the samples: decoding costs the same, generating far less
SIZES = {
    "quick": {"images": 32, "shard_size": 16, "workers": 2, "batch": {"RN50": 16, "ballad-tiny": 32}, "repeat": 2},
    "cpu": {"images": 512, "shard_size": 128, "workers": 2, "batch": {"RN50": 64, "ballad-tiny": 256}, "repeat": 3},
    "cuda": {"images": 4096, "shard_size": 256, "workers": min(16, os.cpu_count() or 1),
             "batch": {"RN50": 256, "ballad-tiny": 256}, "repeat": 3},
}


def jpeg(seed: int, width: int = 500, height: int = 375, grid: tuple[int, int] = (6, 8)) -> bytes:
    """A smooth random colour field (``grid`` random colours, upsampled) with noise: decodes like a photo,
    unlike flat colour or pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (*grid, 3), dtype=np.uint8))
    img = np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.int16)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: Path, images: int, shard_size: int) -> list[tuple[int, str]]:
    pool = [jpeg(i) for i in range(DISTINCT)]
    specs = [Spec(f"img_{i:07d}", i % 10, lambda b=pool[i % DISTINCT]: ("jpg", b)) for i in range(images)]
    write_dataset(out, "jpeg-bench", [f"class {c}" for c in range(10)], {"train": specs}, "bench",
                  shard_size=shard_size)
    return list(enumerate(load_dataset(out).urls("train")))


def decoded_batches(shards, backbone, batch: int, workers: int) -> list[torch.Tensor]:
    """The shards' images through the eval transform as normalised CPU batches: the loader of extract's
    --decode cpu path without the model."""
    pixels, cpu = WorkerPixels(backbone, None), torch.device("cpu")
    return [pixels.ready(b, cpu, False, None, MAX_PIXELS).images for b in make_loader(shards, pixels, batch, workers, False)
            if b.keys]


def extract_once(store: Path, shards, backbone, dev, batch: int, workers: int, on_device: bool = False) -> None:
    """The stage's path for one split into a fresh store (``on_device``: --decode gpu)."""
    shutil.rmtree(store, ignore_errors=True)
    writer = SplitWriter(create_store(store, {"format": FORMAT}), "train", len(shards))
    writer.prepare(True)
    run_shards(writer, shards, backbone, dev, batch, workers, False, on_device=on_device)
    writer.finish(backbone.embed_dim)


def encode_all(model, batches, dev) -> None:
    """Model only: the extract path's forward over ``batches`` decoded beforehand."""
    with torch.inference_mode(), autocast(dev):
        for x in batches:
            model.encode_image(x.to(dev, non_blocking=True)).to(torch.float16)


def measure(name: str, shards, tmp: Path, batch: int, workers: int, device, repeat: int) -> dict:
    dev = torch.device(device)
    backbone = create_model(name, device=dev)
    model = backbone.model.eval()
    store = tmp / f"{name}.zarr"

    def decode():
        return decoded_batches(shards, backbone, batch, workers)

    decoded = decode()

    def model_only():
        encode_all(model, decoded, dev)

    model_only()  # warm-up: decode() above already warmed the loader side
    t = time_many({"extract": lambda: extract_once(store, shards, backbone, dev, batch, workers),
                   "model": model_only, "decode": decode}, device, repeat, warmup=0)
    n = sum(len(x) for x in decoded)
    rate = {k: n / v for k, v in t.items()}
    bound = (min(rate["model"], rate["decode"]) if dev.type == "cuda"
             else 1 / (1 / rate["model"] + 1 / rate["decode"]))
    return {"model": name, "images": n, "batch": batch, "workers": workers, "extract_img_s": rate["extract"],
            "model_img_s": rate["model"], "decode_img_s": rate["decode"],
            "extract_vs_model": rate["extract"] / rate["model"], "extract_vs_decode": rate["extract"] / rate["decode"],
            "of_bound": rate["extract"] / bound}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", size["images"], size["shard_size"])
        rows = [measure(name, shards, Path(tmp), batch, size["workers"], device, size["repeat"])
                for name, batch in size["batch"].items()]
    print_table(f"extraction, images/s, {size['images']} JPEGs 500×375 ({device})", rows)
    summary = [check(f"extract vs model-only forward, {r['model']}", r["extract_vs_model"], 0.9, unit="×")
               for r in rows]
    summary += [check(f"extract vs its bound (model and decode), {r['model']}", r["of_bound"], unit="×")
                for r in rows]
    return {"rows": rows, "summary": summary}
