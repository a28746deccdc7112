"""Shot groups: BALLAD's (OLTR's) many / medium / few split of the classes by train count.

The one definition every report uses (evaluate, sweep, Phase A's per-epoch accuracy): many > 100 train
images, few < 20, medium in between (paper §4.1, the authors' ``shot_acc``). A group's accuracy is the
mean of its classes' accuracies, over the classes the evaluated split holds.
"""
from __future__ import annotations

import numpy as np

MANY, FEW = 100, 20


def shot_groups(train_counts, many: int = MANY, few: int = FEW) -> dict[str, np.ndarray]:
    """group name → boolean mask over the classes."""
    counts = np.asarray(train_counts)
    is_many, is_few = counts > many, counts < few
    return {"many": is_many, "medium": ~is_many & ~is_few, "few": is_few}


def group_means(per_class: np.ndarray, tested: np.ndarray, train_counts, many: int = MANY,
                few: int = FEW) -> dict[str, float | None]:
    """group → mean of ``per_class`` over its ``tested`` classes; None for a group with none."""
    return {name: float(per_class[mask & tested].mean()) if (mask & tested).any() else None
            for name, mask in shot_groups(train_counts, many, few).items()}
