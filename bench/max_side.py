"""Item 10: what `prepare --max-side S` saves where Phase A and extraction spend their CPU: decoding.

The same photo-like 500 × 375 JPEGs (quality 90, ImageNet's typical photo; ``bench.extract.jpeg``)
are written by the product's writer (``stages.prepare.write_dataset``) as they are and with
``Shrink(S)`` for several S, read back from the shards, and then decoded by the CPU path of the stages
(``store.stream.decode_sample``) through RN50's transforms (224 px: Resize + CenterCrop for
extraction and evaluation, RandomResizedCrop + flip + colour jitter for Phase A), side by side in
interleaved rounds. No weights are needed: the transforms do not depend on them. Also reported: the
bytes stored per image and what writing the shards costs per image (one run of each).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import check, print_table, sizes, time_many

SIZES = {"quick": {"images": 64, "repeat": 3}, "cpu": {"images": 200, "repeat": 5}, "cuda": {"images": 200, "repeat": 5}}
SIDES = (None, 400, 320, 256)  # None: the original bytes, as prepare stores them by default
MODEL = "RN50"


def _shards(out: Path, originals: list[bytes], side: int | None) -> tuple[list[dict], float]:
    """The images as stored with --max-side ``side``, as webdataset sample dicts, and seconds to write them."""
    from stages.prepare.writer import Shrink, Spec, write_dataset
    from store.shards import load_dataset, read_shard

    specs = [Spec(f"img_{i:05d}", i % 10, lambda b=b: ("jpg", b)) for i, b in enumerate(originals)]
    t0 = time.perf_counter()
    write_dataset(out, "max-side-bench", [f"class {c}" for c in range(10)], {"train": specs}, "bench",
                  shard_size=len(specs), shrink=Shrink(side) if side else None)
    seconds = time.perf_counter() - t0
    samples = [{"__key__": s.key, s.ext: s.image, "cls": str(s.label).encode()}
               for url in load_dataset(out).urls("train") for s in read_shard(url)]
    return samples, seconds


def run(quick: bool, device) -> dict:
    from bench.extract import jpeg
    from pipeline.models import create_model
    from store.stream import decode_sample

    size = sizes(SIZES, quick, device)
    backbone = create_model(MODEL)  # random weights: only its transforms are used
    originals = [jpeg(i) for i in range(size["images"])]
    rows, fns = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            label = f"--max-side {side}" if side else "original"
            samples, write_s = _shards(Path(tmp) / label.replace(" ", "_"), originals, side)
            rows.append({"stored": label, "images": len(samples),
                         "kB_per_image": sum(len(s["jpg"]) for s in samples) / len(samples) / 1e3,
                         "write_ms_per_image": 1e3 * write_s / len(samples)})
            for name, transform in (("eval", backbone.eval_transform), ("train", backbone.train_transform)):
                fns[(label, name)] = lambda s=samples, t=transform: [decode_sample(x, t) for x in s]
        t = time_many({f"{a} {b}": fn for (a, b), fn in fns.items()}, "cpu", size["repeat"])
    for row in rows:
        for name in ("eval", "train"):
            ms = 1e3 * t[f"{row['stored']} {name}"] / row["images"]
            row[f"decode_{name}_ms"] = ms
            row[f"{name}_speedup"] = (1e3 * t[f"original {name}"] / rows[0]["images"]) / ms
    print_table(f"decode + {MODEL} transforms ({backbone.image_size} px), ms per 500×375 JPEG, one process", rows)
    summary = [check(f"decode + eval transform, {r['stored']} vs original", r["eval_speedup"], unit="×")
               for r in rows[1:]]
    return {"model": MODEL, "image_size": backbone.image_size, "rows": rows, "summary": summary}
