"""Per-epoch cosine learning rates, shared by Phase A and Phase B.

Both phases anneal the learning rate once per epoch along a cosine to 0 over ``epochs`` epochs. The
authors call ``CosineAnnealingLR(T_max=epochs, eta_min=0).step()`` at the *start* of every epoch, so
their first epoch already runs at lr·(1 + cos(π/T))/2 and the last one at 0 (``authors``, the default).
``standard`` steps the scheduler at the end of each epoch instead: full lr in the first epoch, never 0.
"""
from __future__ import annotations

import math

SCHEDULES = ("authors", "standard")


def epoch_lr(base_lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    done = epoch + 1 if schedule == "authors" else epoch
    return base_lr * (1 + math.cos(math.pi * done / epochs)) / 2
