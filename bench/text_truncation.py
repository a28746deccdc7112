"""Item 4: Phase A's text side. Every Phase A step runs all K class prompts through the text tower
with gradients; pipeline/text.py cuts the tokens to the longest prompt instead of CLIP's 77.

Forward + backward of the text tower for the 1,000 ImageNet prompts ("a photo of a {}.", open_clip's
IMAGENET_CLASSNAMES), trimmed vs full context, randomly initialised towers. The outputs and the
gradients of both paths are compared. --quick uses a subset of the prompts that keeps the longest,
so the trimmed length is the full run's; fewer prompts mean smaller matmuls, so its ratio is lower.
"""
from __future__ import annotations

import torch

from bench.common import check, print_table, sizes, time_many
from pipeline.models import create_model
from pipeline.text import class_prompts, encode_text, tokenize_trimmed

# RN50's and ViT-B/16's text towers have the same shape (width 512, 12 layers, 8 heads); --quick times one.
# All 1,000 prompts × 77 tokens with gradients need more than 23 GB of activations, so on CPU the
# prompts go through in chunks (same FLOP, gradients accumulated).
SIZES = {"quick": {"prompts": 64, "towers": ["RN50"], "repeat": 1, "chunk": 64},
         "cpu": {"prompts": 1000, "towers": ["RN50", "ViT-B-16"], "repeat": 1, "chunk": 125},
         "cuda": {"prompts": 1000, "towers": ["RN50", "ViT-B-16"], "repeat": 10, "chunk": 1000}}


def imagenet_prompts(count: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    prompts = class_prompts(IMAGENET_CLASSNAMES)
    if count >= len(prompts):
        return prompts
    longest = max(prompts, key=len)  # also the longest in tokens (18)
    return [longest] + prompts[:: len(prompts) // (count - 1)][: count - 1]


def fwd_bwd(model, encode, tokens, target, chunk: int) -> torch.Tensor:
    """Forward + backward of a fixed linear loss over ``chunk`` prompts at a time (the gradients add up to
    the whole batch's), starting from fresh gradients as after Phase A's zero_grad."""
    model.zero_grad(set_to_none=True)
    outs = []
    for i in range(0, len(tokens), chunk):
        out = encode(tokens[i:i + chunk])
        (out * target[i:i + chunk]).sum().backward()
        outs.append(out.detach())
    return torch.cat(outs)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def measure(name: str, prompts: list[str], device, repeat: int, chunk: int) -> dict:
    backbone = create_model(name, device=device)
    model = backbone.model.train()
    tokens = {"full": backbone.tokenizer(prompts).to(device),
              "trimmed": tokenize_trimmed(backbone.tokenizer, prompts).to(device)}
    encode = {"full": model.encode_text, "trimmed": lambda t: encode_text(model, t)}
    target = torch.randn(len(prompts), backbone.embed_dim, device=device)
    out_f, grad_f = fwd_bwd(model, encode["full"], tokens["full"], target, chunk), grads(model)
    out_t, grad_t = fwd_bwd(model, encode["trimmed"], tokens["trimmed"], target, chunk), grads(model)
    # the comparison above was the warm-up
    t = time_many({p: (lambda p=p: fwd_bwd(model, encode[p], tokens[p], target, chunk)) for p in tokens},
                  device, repeat, warmup=0)
    grad_diff = max((g - grad_t.get(n, torch.zeros_like(g))).abs().max().item() / (g.abs().max().item() or 1)
                    for n, g in grad_f.items())
    return {"tower": name, "prompts": len(prompts), "chunk": chunk, "tokens_full": tokens["full"].shape[1],
            "tokens_trimmed": tokens["trimmed"].shape[1], "full_s": t["full"], "trimmed_s": t["trimmed"],
            "speedup": t["full"] / t["trimmed"], "max_out_diff": (out_f - out_t).abs().max().item(),
            "out_scale": out_f.abs().max().item(), "max_rel_grad_diff": grad_diff}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    prompts = imagenet_prompts(size["prompts"])
    rows = [measure(name, prompts, device, size["repeat"], size["chunk"]) for name in size["towers"]]
    print_table(f"text tower forward + backward, {len(prompts)} ImageNet prompts ({device})", rows)
    summary = [check(f"text tower trimmed vs 77 tokens, {r['tower']}", r["speedup"], 3, unit="×") for r in rows]
    summary += [check(f"text outputs equal (max |Δ| / max |out|), {r['tower']}", r["max_out_diff"] / r["out_scale"],
                      1e-4, False) for r in rows]
    return {"rows": rows, "summary": summary}
