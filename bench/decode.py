"""Item 9: where images are decoded (`--decode`, issue #15). Extraction and a Phase A epoch over the
same webdataset shards of 500 × 375 JPEGs (bench/extract.py's), each three ways side by side, in
images/s:

- cpu: `--decode cpu`, the loader workers decode and transform with PIL;
- gpu: `--decode gpu`, the workers only read and draw the augmentation; the device decodes the batch
  (nvJPEG) and transforms it (pipeline/tensor_transforms.py). On a CPU run (``--quick``) the same
  path decodes with libjpeg-turbo in the main process: it shows the path works, not its speed;
- model: the same model work on tensors decoded beforehand, the ceiling both aim at.

Extraction is the stage's own ``run_shards`` (eval transform); the Phase A epoch is the stage's own
``train_batches`` + ``train_step`` + SGD step (train transform: crop, flip, colour jitter) over
⌊N / batch⌋ steps. Random-init open_clip models, no weights.

The transform check compares, on the device, the gpu path's pixels with the PIL path's on the same
images: the eval transform, and the train transform given the same seed (both paths then draw the
same crop, flip and jitter). Reported as mean and max |Δ| in 1/255 units.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from bench.common import check, print_table, sizes, time_many
from bench.extract import decoded_batches, encode_all, extract_once, jpeg, make_shards
from pipeline.models import create_model
from pipeline.text import class_prompts, tokenize_trimmed
from stages.phase_a import Towers, train_step
from stages.phase_a.data import train_batches

SIZES = {
    "quick": {"images": 32, "shard_size": 16, "workers": 2, "batch": 16, "models": ("ballad-tiny", "ballad-tiny-vit"),
              "repeat": 1, "check": 8},
    "cpu": {"images": 256, "shard_size": 64, "workers": 2, "batch": 32, "models": ("RN50", "ViT-B-16"), "repeat": 2,
            "check": 32},
    # 16 shards: every one of 16 workers has its own (Phase A needs as many shards as workers)
    "cuda": {"images": 3072, "shard_size": 192, "workers": min(16, os.cpu_count() or 1), "batch": 256,
             "models": ("RN50", "ViT-B-16"), "repeat": 2, "check": 256},
}
CLASSES = [f"class {c}" for c in range(10)]  # make_shards' labels


def phase_a_epoch(backbone, towers, tokens, opt, urls, dev, batch: int, workers: int, steps: int, decode_on,
                  predecoded=None) -> None:
    """``steps`` Phase A steps: from the shards (``decode_on``: --decode gpu) or from ``predecoded``."""
    if predecoded is None:
        batches = train_batches(urls, backbone.train_transform, seed=0, epoch=0, micro_batch=batch, workers=workers,
                                shuffle_buffer=0, distributed=False, pin_memory=dev.type == "cuda",
                                decode_on=decode_on)
        batches = ((x, y) for _, x, y in batches)
    else:
        batches = iter(predecoded)
    for _ in range(steps):
        x, y = next(batches)
        train_step(towers, tokens, [(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))], 100.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(name: str, shards, tmp: Path, size: dict, device) -> list[dict]:
    dev = torch.device(device)
    batch, workers, repeat = size["batch"], size["workers"], size["repeat"]
    torch.manual_seed(0)
    backbone = create_model(name, device=dev)
    decoded = decoded_batches(shards, backbone, batch, workers)
    n = sum(len(x) for x in decoded)
    store = tmp / f"{name}.zarr"
    model = backbone.model.eval()
    t = time_many({"cpu": lambda: extract_once(store, shards, backbone, dev, batch, workers),
                   "gpu": lambda: extract_once(store, shards, backbone, dev, batch, workers, on_device=True),
                   "model": lambda: encode_all(model, decoded, dev)}, device, repeat, warmup=1)
    rows = [_row(name, "extract", n, batch, workers, t)]

    urls = [url for _, url in shards]
    towers = Towers(backbone.model.train())
    tokens = tokenize_trimmed(backbone.tokenizer, class_prompts(CLASSES)).to(dev)
    opt = torch.optim.SGD([p for p in towers.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    steps = n // batch
    labelled = [(x, torch.arange(len(x)) % len(CLASSES)) for x in decoded]
    t = time_many({"cpu": lambda: phase_a_epoch(backbone, towers, tokens, opt, urls, dev, batch, workers, steps, None),
                   "gpu": lambda: phase_a_epoch(backbone, towers, tokens, opt, urls, dev, batch, workers, steps, dev),
                   "model": lambda: phase_a_epoch(backbone, towers, tokens, opt, urls, dev, batch, workers, steps,
                                                  None, labelled)}, device, repeat, warmup=1)
    rows.append(_row(name, "phase-a epoch", steps * batch, batch, workers, t))
    return rows


def _row(name, what, n, batch, workers, t) -> dict:
    rate = {k: n / v for k, v in t.items()}
    return {"model": name, "work": what, "images": n, "batch": batch, "workers": workers,
            "cpu_img_s": rate["cpu"], "gpu_img_s": rate["gpu"], "model_img_s": rate["model"],
            "gpu_vs_cpu": rate["gpu"] / rate["cpu"], "gpu_vs_model": rate["gpu"] / rate["model"],
            "cpu_vs_model": rate["cpu"] / rate["model"]}


def transform_check(count: int, device) -> dict:
    """The gpu path's pixels against the PIL path's on ``count`` images of bench/extract.py's kind."""
    from PIL import Image

    from pipeline.models import build_transforms
    from pipeline.tensor_transforms import TensorTransform
    from store.stream import Encoded, decode_batch, encode_batch

    dev = torch.device(device)
    train, evaluate = build_transforms(224)
    std = torch.tensor(evaluate.transforms[-1].std).view(3, 1, 1)
    raws = [jpeg(i, *((500, 375) if i % 2 else (375, 500))) for i in range(count)]
    pils = [Image.open(io.BytesIO(r)).convert("RGB") for r in raws]
    keys = [str(i) for i in range(count)]
    _, images = decode_batch(keys, encode_batch([Encoded(r, None) for r in raws]), dev)
    out = {}
    for name, pil_tf in (("eval", evaluate), ("train", train)):
        tensor_tf, want, params = TensorTransform(pil_tf), [], []
        for i, pil in enumerate(pils):
            torch.manual_seed(i)
            want.append(pil_tf(pil))
            torch.manual_seed(i)
            params.append(tensor_tf.draw(pil.size))
        got = tensor_tf(images, params if name == "train" else None).cpu()
        diff = ((got - torch.stack(want)) * std).abs() * 255
        out[f"{name}_mean_abs_255"] = float(diff.mean())
        out[f"{name}_max_abs_255"] = float(diff.max())
        out[f"{name}_p999_abs_255"] = float(diff.flatten().kthvalue(int(diff.numel() * 0.999)).values)
    return {"images": count, **out}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", size["images"], size["shard_size"])
        rows = [row for name in size["models"] for row in measure(name, shards, Path(tmp), size, device)]
    print_table(f"--decode: images/s, {size['images']} JPEGs 500×375 ({device}; gpu = decoded on {device})", rows)
    checked = transform_check(size["check"], device)
    print_table(f"gpu path vs PIL path, |Δ| in 1/255 ({device})", [checked])
    # issue 15's target: extraction and a Phase A step at ≥ 0.8 of their own model-only rate
    summary = [check(f"{r['work']} --decode gpu vs model-only, {r['model']}", r["gpu_vs_model"], 0.8, unit="×")
               for r in rows]
    summary += [check(f"{r['work']} --decode gpu vs cpu, {r['model']}", r["gpu_vs_cpu"], unit="×") for r in rows]
    summary += [check("eval transform, mean |Δ| vs PIL (1/255)", checked["eval_mean_abs_255"], 1.0, False),
                check("train transform, same draws, mean |Δ| vs PIL (1/255)", checked["train_mean_abs_255"], 3.0,
                      False)]
    return {"rows": rows, "transform_check": checked, "summary": summary}
