"""Per-epoch cosine learning rates, shared by Phase A and Phase B, and the epochs they leave at lr 0.

Both phases anneal the learning rate once per epoch along a cosine to 0 over ``epochs`` epochs. The
authors call ``CosineAnnealingLR(T_max=epochs, eta_min=0).step()`` at the *start* of every epoch, so
their first epoch already runs at lr·(1 + cos(π/T))/2 and the last one at 0 (``authors``, the default).
``standard`` steps the scheduler at the end of each epoch instead: full lr in the first epoch, never 0.

An epoch at lr 0 changes no weight (SGD's step, momentum and weight decay all scale with lr), so a
one-epoch run on the authors' schedule trained nothing and reported success (issue 22). The rule,
once, for both phases' configs: ``check_epochs`` refuses a run in which every epoch is at lr 0, and
``note_zero_lr`` says which epochs are, as one INFO line when training starts. A note, not a warning:
with the authors' schedule that is always the last epoch, on every default run, as the authors' code
does and the help of ``--schedule`` says; a warning there would be noise that teaches users to
ignore warnings. (Pretraining's per-step schedule, stages/pretrain/run.py ``lr_at``, has no such step:
its warm-up starts above 0 and its cosine reaches 0 only after the last step.)
"""
from __future__ import annotations

import logging
import math

from pipeline.options import refuse

log = logging.getLogger("ballad.schedule")
SCHEDULES = ("authors", "standard")


def epoch_lr(base_lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    done = epoch + 1 if schedule == "authors" else epoch
    return base_lr * (1 + math.cos(math.pi * done / epochs)) / 2


def zero_lr_epochs(epochs: int, schedule: str) -> range:
    """The 1-based epochs of ``epochs`` that run at lr 0 (for any base lr > 0). The cosine only falls, so
    they are the last ones, from the first found by bisection: with the authors' schedule the last epoch,
    and in floating point a few more once ``epochs`` nears 10^9 (where 1 + cos(π·(T − 1)/T) rounds to 0)."""
    lo, hi = 0, epochs  # the first 0-based epoch at lr 0 lies in [lo, hi]; ``epochs``: there is none
    while lo < hi:
        mid = (lo + hi) // 2
        if epoch_lr(1.0, mid, epochs, schedule) > 0:
            lo = mid + 1
        else:
            hi = mid
    return range(lo + 1, epochs + 1)


def check_epochs(config) -> None:
    """Refuses ``config`` (Phase A's or Phase B's: fields ``epochs`` and ``schedule``) when no epoch trains."""
    if len(zero_lr_epochs(config.epochs, config.schedule)) == config.epochs:
        refuse(config, "epochs", f"with --schedule {config.schedule} every epoch would run at lr 0 and no weight "
                                 "would change (the authors' schedule keeps the last epoch at lr 0); pass --epochs 2 "
                                 "or more, or --schedule standard")


def note_zero_lr(epochs: int, schedule: str) -> None:
    """One INFO line naming the epochs of a checked run that run at lr 0, if any."""
    zero = zero_lr_epochs(epochs, schedule)
    if zero:
        which = (f"epoch {zero[0]} of {epochs} runs" if len(zero) == 1
                 else f"epochs {zero[0]}–{zero[-1]} of {epochs} run")
        log.info("%s at lr 0, where the cosine has reached 0 (with --schedule authors the last epoch always does, "
                 "as in the authors' code)", which)
