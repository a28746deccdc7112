"""Item 1: one cached Phase B epoch against one BALLAD-style epoch on the same N.

BALLAD-style is what the official code does in Phase B: every step pushes its batch of images
through the frozen image tower, then takes the adapter step. The images are pre-decoded random
tensors at the model's input size, so no decoding is charged to that side. Its epoch time is
extrapolated from a few timed steps of ``micro`` images: per-step time × 512 / micro × ⌊N / 512⌋
(the tower's cost is linear in the batch). The official code also runs the frozen text tower on all
K prompts (77 tokens) at every step: "with text" adds that, timed on ``text_prompts`` of the 1,000
ImageNet prompts and scaled to K. The target is checked on the image tower alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import data
from bench.common import check, print_table, sizes, time_many
from bench.text_truncation import imagenet_prompts
from pipeline.models import create_model
from pipeline.runtime import autocast
from stages.adapter import Adapter, CosineCrossEntropy, TrainConfig, fit

SCALE = 100.0  # CLIP's logit scale, as in the official code
SIZES = {
    "quick": {"n": 16_384, "micro": {"RN50": 16, "ballad-tiny": 512}, "text_prompts": 8, "repeat": 3},
    "cpu": {"n": data.IMAGENET_LT["n"], "micro": {"RN50": 64, "ballad-tiny": 512}, "text_prompts": 64, "repeat": 5},
    "cuda": {"n": data.IMAGENET_LT["n"], "micro": {"RN50": 512, "ballad-tiny": 512}, "text_prompts": 1000,
             "repeat": 5},
}


def ballad_step(backbone, num_classes: int, micro: int, device):
    """One BALLAD-style step on ``micro`` images: frozen tower (eval, no grad), then the adapter step.

    The adapter step is fit()'s (stages/adapter.py) without its CUDA graph; fit() has no hook for a
    tower, so it is repeated here.
    """
    tower = backbone.model.to(device).eval()
    size = backbone.image_size
    images = torch.randn(micro, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (micro,), device=device)
    adapter = Adapter(backbone.embed_dim, SCALE).to(device)
    with torch.no_grad():
        weights = adapter.classifier(F.normalize(torch.randn(num_classes, backbone.embed_dim, device=device), dim=1))
    cfg = TrainConfig()
    opt = torch.optim.SGD(adapter.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=True)

    def step():
        with torch.no_grad(), autocast(torch.device(device)):
            feats = tower.encode_image(images).float()
        loss = CosineCrossEntropy.apply(adapter.adapt(feats), weights, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def text_step(backbone, prompts: int, device):
    """The official code's text side of a Phase B step: ``prompts`` prompts through the frozen text tower."""
    tokens = backbone.tokenizer(imagenet_prompts(prompts)).to(device)
    model = backbone.model.eval()

    def step():
        with torch.no_grad(), autocast(torch.device(device)):
            model.encode_text(tokens)
    return step


def epoch_times(backbone, feats, labels, text, micro: int, text_prompts: int, device, repeat: int) -> dict:
    """Cached and BALLAD-style epoch seconds on the train split (feats, labels, text), timed side by side."""
    feats, labels, text = feats.to(device).float(), labels.to(device), text.to(device)
    cfg = TrainConfig(epochs=1, schedule="standard")
    t = time_many({"cached": lambda: fit(feats, labels, text, SCALE, cfg),
                   "step": ballad_step(backbone, len(text), micro, device),
                   "text": text_step(backbone, text_prompts, device)}, device, repeat)
    steps = max(1, len(labels) // cfg.batch_size)
    ballad = t["step"] * cfg.batch_size / micro * steps
    with_text = ballad + t["text"] * len(text) / text_prompts * steps
    return {"model": backbone.name, "N": len(labels), "D": backbone.embed_dim, "K": len(text),
            "cached_epoch_s": t["cached"], "ballad_step_s": t["step"], "step_images": micro,
            "ballad_epoch_s": ballad, "ballad_epoch": f"extrapolated from {micro}-image steps × {steps} steps",
            "speedup": ballad / t["cached"], "text_s": t["text"], "text_prompts": text_prompts,
            "with_text_epoch_s": with_text, "speedup_with_text": with_text / t["cached"]}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    rows = []
    for name, micro in size["micro"].items():
        backbone = create_model(name, device=device)
        split = data.lt_split(size["n"], data.IMAGENET_LT["classes"], backbone.embed_dim)
        rows.append(epoch_times(backbone, *split, micro, size["text_prompts"], device, size["repeat"]))
    print_table(f"Phase B epoch, cached vs BALLAD-style ({device})",
                [{c: r[c] for c in ("model", "N", "D", "K", "cached_epoch_s", "ballad_epoch_s", "speedup",
                                    "with_text_epoch_s", "speedup_with_text")} for r in rows])
    print("  BALLAD-style epochs are extrapolated from timed steps (see JSON: ballad_epoch)")
    summary = [check(f"Phase B cached vs BALLAD-style, {r['model']}", r["speedup"], 500, unit="×")
               for r in rows if r["model"] == "RN50"]
    return {"rows": rows, "summary": summary}
