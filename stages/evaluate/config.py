"""The options of `evaluate`, `sweep`, `neighbors` and `report`: one config dataclass per command, the one
source of each option's flag, default, choices, help and check.

Torch-free, so that the command line builds its options from them without importing torch. The fields
more than one of these commands holds (``--features``, ``--adapter``, ``--split``, the shot-group
thresholds) are made by the functions below, once. ``SweepConfig`` is a ``TrainConfig`` (every Phase B
option keeps its flag, default and check) plus the grid of the settings it varies (stages/evaluate/grid.py).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, replace

from pipeline.errors import UserError
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_choices, check_ints, check_finite, option
from pipeline.shots import FEW, MANY
from stages.adapter.config import TrainConfig
from stages.evaluate.grid import ABLATIONS, Axis, grid_axes

TTA_MODES = ("none", "mean")


def features():
    return option(MISSING, "--features", "Feature store (`ballad-pipe extract`).", path="any")


def adapter():
    return option(None, "--adapter", "Adapter file, or `none` to score the store itself (zero-shot / Phase A).",
                  kind=str)


def split():
    return option("test", "--split", "The split to score.")


def many():
    return option(MANY, "--many-threshold", "Many: more train images than this.")


def few():
    return option(FEW, "--few-threshold", "Few: fewer train images than this.")


def device():
    return option(DEVICE, "--device", DEVICE_HELP)


def check_thresholds(cfg) -> None:
    """The shot-group thresholds (train image counts) in range, before the store is opened."""
    check_ints(cfg, (("many", 0, INT_MAX, None), ("few", 0, INT_MAX, None)))
    if cfg.few > cfg.many:
        raise UserError(f"--few-threshold {cfg.few} exceeds --many-threshold {cfg.many}")


@dataclass(frozen=True)
class EvaluateConfig:
    features: str = features()
    out: str = option(MISSING, "--out", "Report folder, e.g. reports/ballad.", path="dir")
    adapter: str | None = adapter()
    split: str = split()
    many: int = many()
    few: int = few()
    logit_adjust: float = option(0.0, "--logit-adjust", "τ: subtract τ·log(train class prior).")
    knn_k: int = option(0, "--knn-k", "Neighbours in the kNN cache (0: off).")
    knn_alpha: float = option(1.0, "--knn-alpha", "Weight of the cache votes.")
    knn_beta: float = option(5.0, "--knn-beta", "Vote weight exp(−β(1 − cos)), β ≥ 0.")
    knn_gamma: float = option(0.0, "--knn-gamma", "Divide votes by class train count^γ, γ ≥ 0.")
    tta: str = option("none", "--tta", "mean: average the logits over the store's test-time views (extract "
                                       "--test-views); none: the eval-transform feature alone.", TTA_MODES)
    device: str = device()

    def check(self) -> None:
        """Every option in range, before the store is opened: a one-line UserError naming the flag."""
        check_thresholds(self)
        check_ints(self, (("knn_k", 0, INT_MAX, "must be 0 (off) or positive"),))
        check_finite(self, (("knn_alpha", True, "must be a finite number"),
                            ("knn_beta", self.knn_beta >= 0, "must be finite and not negative"),
                            ("knn_gamma", self.knn_gamma >= 0, "must be finite and not negative"),
                            ("logit_adjust", True, "must be a finite number")))
        check_choices(self, ("tta",))


ABLATION_HELP = ("A ready grid: " + "; ".join(f"{name}: {a.what}" for name, a in ABLATIONS.items())
                 + "; none: only --grid and --lambdas. With no axis at all: lambda.")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(TrainConfig):
    """Phase B's options (the values every grid point shares) and the grid: ``--ablation``'s axes, then
    ``--lambdas``, then each ``--grid`` in order; the first axis is the plot's x."""
    features: str = features()
    out: str = option(MISSING, "--out", "Report folder, e.g. reports/sweep.", path="dir")
    grid: tuple[str, ...] = option((), "--grid", "KEY=V1,V2,…: train one adapter per value of the Phase B option "
                                                 "--KEY (repeat for a cartesian product), e.g. --grid "
                                                 "loss=ce,logit-adjusted --grid lambda=0.1,0.2.", multiple=True)
    lambdas: str | None = option(None, "--lambdas", "Comma-separated residual factors: short for --grid lambda=….",
                                 kind=str)
    ablation: str = option("none", "--ablation", ABLATION_HELP, ("none", *ABLATIONS))
    split: str = split()
    many: int = many()
    few: int = few()
    device: str = device()

    def train_config(self, **point) -> TrainConfig:
        """The Phase B config of one grid point: the shared options with ``point``'s fields replaced."""
        return replace(self.train_part(), **point)

    def axes(self) -> list[Axis]:
        """The grid's axes, each value parsed and checked by TrainConfig's own check (one line naming it)."""
        given = [("--ablation", self.ablation)] if self.ablation != "none" else []
        given += [("--lambdas", self.lambdas)] if self.lambdas is not None else []
        given += [("--grid", text) for text in self.grid]
        return grid_axes(given or [("--ablation", "lambda")], self.train_config())

    def check(self) -> None:
        """Every option and every grid value in range, before the store is opened."""
        super().check()
        check_choices(self, ("ablation",))
        check_thresholds(self)
        self.axes()


@dataclass(frozen=True)
class NeighborsConfig:
    features: str = features()
    key: str = option(MISSING, "--key", "Sample key in --split.")
    k: int = option(5, "--k", "Neighbours to list.")
    adapter: str | None = adapter()
    split: str = split()
    device: str = device()

    def check(self) -> None:
        check_ints(self, (("k", 1, INT_MAX, "must be positive"),))


@dataclass(frozen=True)
class ReportConfig:
    reports: str = option("reports", "--reports", "Folder of evaluate outputs.", path="any")
    out: str | None = option(None, "--out", "Also write the table to this Markdown file.", path="file")

    def check(self) -> None:
        """Nothing to check before the reports folder is read."""
