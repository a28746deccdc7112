"""`ballad-pipe pretrain`'s options: ``PretrainConfig``, the one source of their defaults, help and checks.

Kept free of torch so that the command line builds its options from it without importing torch
(``--help`` stays fast). Each field's metadata names its command-line flag (pipeline/options.py), so
the CLI and the checks' error messages use the same names. The defaults are the demo's pretraining
(params.yaml's ``pretrain`` section repeats them; docs/pretraining.md says how they were chosen).
The fields marked ``resumable`` are what a resumed run must share with the run that wrote last.pt
(pipeline/checkpointing.py); the rest may change between attempts.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline import shared_options as shared
from pipeline.checkpointing import resumable
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_finite, check_ints, option, refuse


def default_workers() -> int:
    """Corpus rendering processes by default: the usable cores, at most 4 (a few seconds of work)."""
    return shared.default_workers(4)


@dataclass(frozen=True)
class PretrainConfig:
    """Every option of `ballad-pipe pretrain`: the one source of its flag, default and help (torch-free)."""

    model: str = resumable(option("ballad-tiny", "--model", "Architecture to pretrain: ballad-tiny or any factory "
                                                            "name."))
    out: str = option("checkpoints/pretrain", "--out", "Output directory: final.pt, final.json, last.pt, "
                                                      "dvclive/ (the loss curve).", path="dir")
    corpus_size: int = resumable(option(10000, "--corpus-size", "Captioned images rendered once and looped over."))
    steps: int = resumable(option(700, "--steps", "Optimizer steps."))
    batch_size: int = resumable(option(128, "--batch-size", "Image–caption pairs per step (the contrastive batch)."))
    lr: float = resumable(option(5e-3, "--lr", "Peak AdamW learning rate: linear warm-up, then cosine to 0."))
    warmup: int = resumable(option(30, "--warmup", "Warm-up steps (fewer than --steps)."))
    weight_decay: float = resumable(option(0.1, "--weight-decay", "AdamW weight decay of weight matrices."))
    seed: int = resumable(shared.seed("Seed of the initialisation, the corpus and the batch order."))
    eval_size: int = option(1600, "--eval-size", "Held-out images for the final zero-shot accuracy.")
    save_every: int = option(100, "--save-every", "Write last.pt every N steps (and at the end).")
    workers: int = shared.workers("Processes rendering the corpus (0: this one); the result does not depend on it.",
                                  default_workers, "the usable cores, at most 4")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
    resume: bool = option(False, "--resume", "Continue the run in --out from last.pt (or start one).")

    def check(self) -> None:
        """Every option in range before any work starts: a one-line UserError naming the flag."""
        pair = " (a contrastive batch needs two pairs)"
        check_ints(self, ((name, low, INT_MAX, f"must be a whole number ≥ {low}{pair if name == 'batch_size' else ''}")
                          for name, low in (("corpus_size", 1), ("steps", 1), ("batch_size", 2), ("eval_size", 1),
                                            ("save_every", 1), ("warmup", 0), ("workers", 0))))
        check_ints(self, (shared.SEED_RULE,))
        if self.warmup >= self.steps:
            refuse(self, "warmup", f"must be fewer than --steps {self.steps}")
        if self.batch_size > self.corpus_size:
            refuse(self, "batch_size", f"must be at most --corpus-size {self.corpus_size}")
        check_finite(self, (("lr", self.lr > 0, "must be finite and > 0"),
                            ("weight_decay", self.weight_decay >= 0, "must be finite and ≥ 0")))
        if not isinstance(self.out, str) or not self.out.strip():
            refuse(self, "out", "must be a directory")
