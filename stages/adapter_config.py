"""Phase B's options: ``TrainConfig``, the one source of their defaults, choices, help and checks.

Kept free of torch so that the command line builds its options from it without importing torch
(``ballad-pipe --help`` stays fast). Each field's metadata (pipeline/options.py) names its command-line
flag, so the CLI, the checks' error messages and the adapter file's config all use the same names. The
defaults are the authors' code; every departure is a choice here.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.options import INT_MAX, check_choices, check_finite, check_ints, option
from pipeline.schedule import SCHEDULES, check_epochs

SAMPLERS = ("class-aware", "class-balanced", "sqrt", "instance", "progressive")
FORMS = ("linear", "relu")
POSITIONS = ("visual", "text", "both")
SELECTS = ("auto", "best-val", "last")
LOSSES = ("ce", "logit-adjusted")
VIEWS = ("auto", "all", "none")


@dataclass(frozen=True)
class TrainConfig:
    lam: float = option(0.2, "--lambda", "Residual factor λ in [0, 1]: f* = λ·A(f) + (1 − λ)·f.")
    epochs: int = option(10, "--epochs", "Training epochs.")
    lr: float = option(0.2, "--lr", "SGD learning rate, annealed per epoch along a cosine to 0 (--schedule).")
    batch_size: int = option(512, "--batch-size", "Samples per step; an epoch is ⌊N / batch⌋ steps.")
    sampler: str = option("class-aware", "--sampler",
                          "Phase B sampling (paper Table 8); class-aware: the authors' ClassAwareSampler.", SAMPLERS)
    form: str = option("linear", "--form", "linear: W f (the authors' code); relu: ReLU(Wᵀf + b) (paper Eq. 5).",
                       FORMS)
    position: str = option("visual", "--position", "Which embeddings the adapter refines (paper Table 6).",
                           POSITIONS)
    seed: int = option(0, "--seed", "Seed of the adapter's initialisation and of the sampler.")
    momentum: float = option(0.9, "--momentum", "SGD momentum, in [0, 1).")
    weight_decay: float = option(5e-4, "--weight-decay", "SGD weight decay, ≥ 0.")
    schedule: str = option("authors", "--schedule",
                           "authors: the cosine stepped at the start of each epoch (first epoch below the full lr, "
                           "last at 0); standard: stepped at the end (full lr first, never 0).", SCHEDULES)
    select: str = option("auto", "--select",
                         "Which epoch's weights to keep. best-val: the best top-1 on the store's val split "
                         "(the authors); last: the last epoch; auto: best-val when the store has a complete "
                         "val split, else last.", SELECTS)
    loss: str = option("ce", "--loss", "ce: cross-entropy (the authors); logit-adjusted: cross-entropy of the "
                                       "logits + τ·log(train class prior), in training only (LIFT).", LOSSES)
    la_tau: float = option(1.0, "--la-tau", "τ of --loss logit-adjusted, ≥ 0.")
    views: str = option("auto", "--views",
                        "all: every draw takes a random one of the sample's augmented train views (`extract "
                        "--train-views`), as the authors augment every draw; none: the eval-transform feature; "
                        "auto: all when the store has views, else none.", VIEWS)

    def check(self) -> None:
        """Every option in range, before any work starts: a one-line UserError naming the flag."""
        check_ints(self, (("epochs", 1, INT_MAX, "must be a whole number ≥ 1"),
                          ("batch_size", 1, INT_MAX, "must be a whole number ≥ 1"),
                          ("seed", 0, INT_MAX, "must be a whole number in [0, 2^63)")))
        check_finite(self, (("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
                            ("lr", self.lr > 0, "must be finite and > 0"),
                            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
                            ("weight_decay", self.weight_decay >= 0, "must be finite and ≥ 0"),
                            ("la_tau", self.la_tau >= 0, "must be finite and ≥ 0")))
        check_choices(self, ("sampler", "form", "position", "schedule", "select", "loss", "views"))
        check_epochs(self)

    def resolved_views(self, num_views: int, source: str = "the feature store") -> str:
        """``all`` or ``none``: ``auto`` is ``all`` exactly when the train split has augmented views."""
        if self.views == "all" and not num_views:
            raise UserError(f"--views all: {source} has no augmented train views; extract them with "
                            "`ballad-pipe extract … --train-views V` or pass --views none")
        if self.views == "auto":
            return "all" if num_views else "none"
        return self.views

    def resolved_select(self, has_val: bool, source: str = "the feature store") -> str:
        """``best-val`` or ``last``: ``auto`` is ``best-val`` exactly when validation features exist."""
        if self.select == "best-val" and not has_val:
            raise UserError(f"--select best-val: no complete 'val' split in {source}; extract it "
                            "(`ballad-pipe extract … --splits val`) or pass --select last")
        if self.select == "auto":
            return "best-val" if has_val else "last"
        return self.select
