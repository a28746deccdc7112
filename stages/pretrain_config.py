"""`ballad-pipe pretrain`'s options: ``PretrainConfig``, the one source of their defaults, help and checks.

Kept free of torch so that the command line builds its options from it without importing torch
(``--help`` stays fast). Each field's metadata names its command-line flag (pipeline/options.py), so
the CLI and the checks' error messages use the same names. The defaults are the demo's pretraining
(params.yaml's ``pretrain`` section repeats them; docs/pretraining.md says how they were chosen).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_finite, check_ints, option, refuse

SEED_MAX = 2**32 - 1


def default_workers() -> int:
    """Corpus rendering processes by default: the machine's cores, at most 4 (a few seconds of work)."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class PretrainConfig:
    """Every option of `ballad-pipe pretrain`: the one source of its flag, default and help (torch-free)."""

    model: str = option("ballad-tiny", "--model", "Architecture to pretrain: ballad-tiny or any factory name.")
    out: str = option("checkpoints/pretrain", "--out", "Output directory: final.pt, final.json, last.pt, "
                                                      "dvclive/ (the loss curve).", path="dir")
    corpus_size: int = option(10000, "--corpus-size", "Captioned images rendered once and looped over.")
    steps: int = option(700, "--steps", "Optimizer steps.")
    batch_size: int = option(128, "--batch-size", "Image–caption pairs per step (the contrastive batch).")
    lr: float = option(5e-3, "--lr", "Peak AdamW learning rate: linear warm-up, then cosine to 0.")
    warmup: int = option(30, "--warmup", "Warm-up steps (fewer than --steps).")
    weight_decay: float = option(0.1, "--weight-decay", "AdamW weight decay of weight matrices.")
    seed: int = option(0, "--seed", "Seed of the initialisation, the corpus and the batch order.")
    eval_size: int = option(1600, "--eval-size", "Held-out images for the final zero-shot accuracy.")
    save_every: int = option(100, "--save-every", "Write last.pt every N steps (and at the end).")
    workers: int = option(None, "--workers", "Processes rendering the corpus (0: this one); the result does not "
                                             "depend on it.", factory=default_workers, kind=int,
                          show_default="the cores, at most 4")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
    resume: bool = option(False, "--resume", "Continue the run in --out from last.pt (or start one).")

    def check(self) -> None:
        """Every option in range before any work starts: a one-line UserError naming the flag."""
        pair = " (a contrastive batch needs two pairs)"
        check_ints(self, ((name, low, INT_MAX, f"must be a whole number ≥ {low}{pair if name == 'batch_size' else ''}")
                          for name, low in (("corpus_size", 1), ("steps", 1), ("batch_size", 2), ("eval_size", 1),
                                            ("save_every", 1), ("warmup", 0), ("workers", 0), ("seed", 0))))
        if self.seed > SEED_MAX:
            refuse(self, "seed", f"must be a whole number in [0, {SEED_MAX}]")
        if self.warmup >= self.steps:
            refuse(self, "warmup", f"must be fewer than --steps {self.steps}")
        if self.batch_size > self.corpus_size:
            refuse(self, "batch_size", f"must be at most --corpus-size {self.corpus_size}")
        check_finite(self, (("lr", self.lr > 0, "must be finite and > 0"),
                            ("weight_decay", self.weight_decay >= 0, "must be finite and ≥ 0")))
        if not isinstance(self.out, str) or not self.out.strip():
            refuse(self, "out", "must be a directory")
