"""Item 12: Phase A's text side at iNaturalist's K (``--text-chunk``; issue #26). Every Phase A step runs
all K class prompts through the text tower with gradients, so its activations grow with K (iNaturalist
2018: K = 8,142, 8× ImageNet-LT); ``--text-chunk N`` bounds them by N prompts for the same gradients.

One ``train_step`` (stages/phase_a.py) of ViT-B/16's text tower at random init over K iNaturalist-style
prompts ("a photo of a Quercus agrifolia.": seeded Latin-looking binomials), with and without chunks.
The image tower is replaced by the identity on 64 random image features, so the step is the text side
alone, at the trimmed length of all 8,142 prompts. Each setting runs in a fresh process, whose peak
resident memory (VmHWM, reset after the model is built) less its memory before the step is the step's
own peak (on CUDA: torch's peak allocated memory less the allocated memory before); the time is that
step's wall time, including the first allocation of the gradients, as in a run's first step.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time

from bench.common import check, print_table, sizes, sync

SIZES = {"quick": {"ks": [64], "chunks": [None, 16]},
         "cpu": {"ks": [256, 512, 1024], "chunks": [None, 64, 256]},
         "cuda": {"ks": [1024, 2048, 8142], "chunks": [None, 64, 256, 1024]}}
INAT_K = 8142
BATCH = 64  # image features per step

_SYLLABLES = ("a", "ae", "an", "ar", "ca", "ce", "chi", "co", "cus", "da", "de", "di", "do", "dro", "er", "ga", "gi",
              "la", "le", "li", "lo", "ly", "ma", "me", "mi", "na", "ne", "no", "on", "pha", "phy", "pi", "ra", "re",
              "ri", "ro", "sa", "si", "ster", "ta", "te", "ti", "to", "tri", "va", "vi", "xe", "za")
_ENDINGS = ("a", "us", "um", "is", "ii", "ae", "ensis", "oides", "ata", "ella")


def inat_prompts(k: int, seed: int = 0) -> list[str]:
    """K prompts "a photo of a Genus species." of pseudo-Latin binomials (genus 2–4 syllables, epithet 1–3
    and an ending), seeded: 9–17 tokens (mean 12.3 over 8,142) with CLIP's tokenizer, as iNaturalist's
    scientific names give ("a photo of a Quercus agrifolia." is 11)."""
    rng = random.Random(seed)

    def word(lo, hi):
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi)))

    return [f"a photo of a {word(2, 4).capitalize()} {word(1, 3)}{rng.choice(_ENDINGS)}." for _ in range(k)]


def _memory_mb() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) // 1024 for key in ("VmRSS", "VmHWM")}


def one(k: int, chunk: int | None, device: str) -> dict:
    """One step in this process: its seconds and its peak memory above the memory before it (MB): resident
    memory on a CPU, torch's allocated memory on CUDA."""
    import gc

    import open_clip
    import torch

    from pipeline.text import tokenize_trimmed
    from stages.phase_a import Towers, train_step

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", device=device)  # random init, no download
    model.visual = torch.nn.Identity()  # the step's images are image features: only the text side is measured
    towers = Towers(model, text_chunk=chunk)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    prompts = inat_prompts(INAT_K)
    longest = int(tokenizer(prompts).ne(0).sum(1).argmax())
    # the first K - 1 and the longest of all: every K is trimmed to the full run's length (17 tokens)
    tokens = tokenize_trimmed(tokenizer, [prompts[longest], *prompts[: k - 1]] if longest >= k else prompts[:k])
    tokens = tokens.to(device)
    x = torch.randn(BATCH, model.text_projection.shape[1], device=device)
    y = torch.randint(0, k, (BATCH,), device=device)
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) // 2**20
    else:
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the present VmRSS (Linux ≥ 4.0)
        before = _memory_mb()["VmRSS"]
    sync(device)
    t0 = time.perf_counter()
    train_step(towers, tokens, [(x, y)], 100.0)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) // 2**20 if cuda else _memory_mb()["VmHWM"]
    return {"K": k, "chunk": chunk or "none", "tokens": tokens.shape[1], "step_s": round(seconds, 2),
            "peak_mb": peak - before}


def run(quick: bool, device) -> dict:
    size = sizes(SIZES, quick, device)
    rows = []
    for k in size["ks"]:
        for chunk in size["chunks"]:
            if chunk is None or chunk < k:
                proc = subprocess.run([sys.executable, "-m", "bench.text_chunks", "--one", str(k), str(chunk),
                                       str(device)], capture_output=True, text=True, check=True)
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    print_table(f"one Phase A step's text side, ViT-B/16 text tower, {BATCH} image features ({device})", rows)
    whole = [r for r in rows if r["chunk"] == "none"]
    # The whole-K peak grows linearly with K; a line through the two largest K extrapolates it.
    (k0, m0), (k1, m1) = [(r["K"], r["peak_mb"]) for r in whole[-2:]] if len(whole) > 1 else [(0, 0)] * 2
    per_prompt = (m1 - m0) / (k1 - k0) if k1 > k0 else None
    biggest = max(size["ks"])
    smallest_chunk = min(r["peak_mb"] for r in rows if r["K"] == biggest and r["chunk"] != "none")
    whole_biggest = next(r for r in whole if r["K"] == biggest)
    summary = [check(f"peak memory, K = {biggest}: whole / smallest chunk", whole_biggest["peak_mb"] / smallest_chunk,
                     None, unit="×", compared=False)]
    if per_prompt is not None:
        summary.append(check(f"whole-K peak extrapolated to K = {INAT_K} (MB)", m1 + per_prompt * (INAT_K - k1)))
    return {"rows": rows, "mb_per_prompt": per_prompt, "summary": summary}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        k, chunk = int(sys.argv[2]), None if sys.argv[3] == "None" else int(sys.argv[3])
        print(json.dumps(one(k, chunk, sys.argv[4])))
    else:
        from bench.__main__ import main

        sys.exit(main(["--only", "text_chunks", *sys.argv[1:]]))
