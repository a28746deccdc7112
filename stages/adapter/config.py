"""Phase B's options: ``TrainConfig``, the one source of their defaults, choices, help and checks.

Kept free of torch so that the command line builds its options from it without importing torch
(``ballad-pipe --help`` stays fast). Each field's metadata (pipeline/options.py) names its command-line
flag, so the CLI, the checks' error messages and the adapter file's config all use the same names. The
defaults are the authors' code; every departure is a choice here. The options Phase A shares (seed,
schedule, select) come from pipeline/shared_options.py; the samplers from stages/adapter/samplers.py's
registry; the loss and its parameters from pipeline/losses.py's (``loss_options``).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from pipeline import shared_options as shared
from pipeline.errors import UserError
from pipeline.losses import check_loss, loss_options
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_choices, check_finite, check_ints, option
from pipeline.schedule import check_epochs
from stages.adapter.samplers import SAMPLERS

FORMS = ("linear", "relu")
POSITIONS = ("visual", "text", "both")
VIEWS = ("auto", "all", "none")


@dataclass(frozen=True)
@loss_options
class TrainConfig:
    lam: float = option(0.2, "--lambda", "Residual factor λ in [0, 1]: f* = λ·A(f) + (1 − λ)·f.")
    epochs: int = option(10, "--epochs", "Training epochs.")
    lr: float = option(0.2, "--lr", "SGD learning rate, annealed per epoch along a cosine to 0 (--schedule).")
    batch_size: int = option(512, "--batch-size", "Samples per step; an epoch is ⌊N / batch⌋ steps.")
    sampler: str = option("class-aware", "--sampler", "Phase B sampling (paper Table 8); class-aware: the authors' "
                                                      "ClassAwareSampler.", tuple(SAMPLERS))
    form: str = option("linear", "--form", "linear: W f (the authors' code); relu: ReLU(Wᵀf + b) (paper Eq. 5).",
                       FORMS)
    position: str = option("visual", "--position", "Which embeddings the adapter refines (paper Table 6).",
                           POSITIONS)
    seed: int = shared.seed("Seed of the adapter's initialisation and of the sampler.")
    momentum: float = option(0.9, "--momentum", "SGD momentum, in [0, 1).")
    weight_decay: float = option(5e-4, "--weight-decay", "SGD weight decay, ≥ 0.")
    schedule: str = shared.schedule()
    select: str = shared.select("the store")
    views: str = option("auto", "--views",
                        "all: every draw takes a random one of the sample's augmented train views (`extract "
                        "--train-views`), as the authors augment every draw; none: the eval-transform feature; "
                        "auto: all when the store has views, else none.", VIEWS)

    def check(self) -> None:
        """Every option in range, before any work starts: a one-line UserError naming the flag."""
        check_ints(self, (("epochs", 1, INT_MAX, "must be a whole number ≥ 1"),
                          ("batch_size", 1, INT_MAX, "must be a whole number ≥ 1"), shared.SEED_RULE))
        check_finite(self, (("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
                            ("lr", self.lr > 0, "must be finite and > 0"),
                            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
                            ("weight_decay", self.weight_decay >= 0, "must be finite and ≥ 0")))
        check_choices(self, ("sampler", "form", "position", "schedule", "select", "views"))
        check_loss(self)
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
        """``best-val`` or ``last`` (pipeline/shared_options.py): ``auto`` is ``best-val`` exactly when
        ``source`` has complete validation features."""
        return shared.resolved_select(self.select, has_val, source)

    def train_part(self) -> TrainConfig:
        """The Phase B settings alone (a command's config extends this one with its inputs and outputs):
        what the adapter file records and what training reads."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(TrainConfig):
    """`ballad-pipe adapter`'s options: the Phase B settings, the store it trains from, the file it writes."""
    features: str = option(MISSING, "--features", "Feature store (`ballad-pipe extract`).", path="any")
    out: str = option(MISSING, "--out", "Adapter file, e.g. models/adapter.pt.", path="file")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
