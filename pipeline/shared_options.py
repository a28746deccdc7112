"""The options more than one command holds, and their rules, defined once.

Each function returns a fresh dataclass field (pipeline/options.py's ``option``) for a config to hold,
so a choice list, a default or a range exists once however many commands carry it: the seed's range,
Phase A's and Phase B's epoch selection, their schedule, Phase A's and extract's train and eval
transforms (pipeline/transforms.py's registries), and the default number of worker processes.
Torch-free, like every config. The training loss and its parameters are pipeline/losses.py's
(``loss_options``).
"""
from __future__ import annotations

import os
from dataclasses import MISSING

from pipeline.errors import UserError
from pipeline.options import option
from pipeline.schedule import SCHEDULES
from pipeline.transforms import EVAL_TRANSFORMS, TRAIN_TRANSFORMS

# numpy's RandomState (the CIFAR recipe's) and torch's DataLoader generators take seeds below 2**32;
# every command takes the same range, so a seed that works for one stage works for all.
SEED_MAX = 2**32 - 1
SEED_RULE = ("seed", 0, SEED_MAX, "must be a whole number in [0, 2^32)")

SELECTS = ("auto", "best-val", "last")

SCHEDULE_HELP = ("authors: the cosine stepped at the start of each epoch (the first epoch below --lr, the last "
                 "at 0); standard: stepped at its end (the first at --lr, never 0).")


def seed(help: str):
    """``--seed``, default 0, in [0, 2^32) (``SEED_RULE``)."""
    return option(0, "--seed", help)


def schedule():
    """``--schedule``: how the per-epoch cosine is stepped (pipeline/schedule.py)."""
    return option("authors", "--schedule", SCHEDULE_HELP, SCHEDULES)


def select(source: str):
    """``--select``: which epoch's weights the run keeps; ``source`` names where the val split lives."""
    return option("auto", "--select", f"Which epoch's weights to keep. best-val: the best top-1 on {source}'s "
                                      "val split (the authors); last: the last epoch; auto: best-val when "
                                      f"{source} has a val split, else last.", SELECTS)


def train_transform(help: str):
    """``--train-transform``: a recipe of pipeline/transforms.py's ``TRAIN_TRANSFORMS``, default ballad;
    ``help`` says what the command uses it for."""
    return option("ballad", "--train-transform", help + " ballad: the authors' crop (scale 0.5–1, bicubic), flip "
                                                        "and colour jitter; lift: LIFT's crop (0.08–1, bilinear) and "
                                                        "flip; mda: LIFT+'s square crop whose least area rises with "
                                                        "the epoch (--mda-schedule).", tuple(TRAIN_TRANSFORMS))


def eval_transform(help: str):
    """``--eval-transform``: a recipe of pipeline/transforms.py's ``EVAL_TRANSFORMS``, default ballad."""
    return option("ballad", "--eval-transform", help + " ballad: Resize(s, bicubic) + CenterCrop(s), the authors'; "
                                                      "lift: Resize(8s/7, bilinear), LIFT's; lift-plus: Resize(s + "
                                                      "s/7, bicubic), LIFT+'s; test-time views resize to s + 24 "
                                                      "(ballad: s + 24s/224).", tuple(EVAL_TRANSFORMS))


def resolved_select(choice: str, has_val: bool, source: str) -> str:
    """``best-val`` or ``last``: what ``--select choice`` means where ``source`` does (not) hold a val split."""
    if choice == "best-val" and not has_val:
        raise UserError(f"--select best-val: {source} has no val split; pass --select last")
    if choice == "auto":
        return "best-val" if has_val else "last"
    return choice


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(most: int, *, per_rank: bool = False, spare: int = 0) -> int:
    """Worker processes by default: the usable cores (shared among the local ranks when ``per_rank``),
    less ``spare`` for the main process, at least 1 and at most ``most``."""
    cores = usable_cores() // (int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if per_rank else 1)
    return max(1, min(most, cores - spare))


def workers(help: str, factory, show_default: str):
    """``--workers`` with a default computed when the command runs (``factory``, from ``default_workers``)."""
    return option(MISSING, "--workers", help, factory=factory, kind=int, show_default=show_default)
