"""The report files of `evaluate`: metrics.json, per_class.csv, predictions.npz (and per_class.png, plots.py)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.runtime import atomic_path, write_json
from pipeline.shots import shot_groups
from stages.evaluate.plots import plot_per_class


def write_report(out: Path, result: dict, classnames: list[str], train_counts: np.ndarray, keys: np.ndarray,
                 labels: np.ndarray, many: int, few: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result["metrics"])
    write_per_class_csv(out / "per_class.csv", result, classnames, train_counts, many, few)
    with atomic_path(out / "predictions.npz") as tmp, open(tmp, "wb") as f:
        # deflated: at iNaturalist's 24,426 test images the file shrinks 3.6× (docs/performance.md, item 11)
        np.savez_compressed(f, key=keys, label=labels, top5=result["top5"], score=result["scores"])
    plot_per_class(out / "per_class.png", result, train_counts, many, few)


CSV_COLUMNS = ("class_index", "train_count", "test_count", "accuracy", "group", "class")


def write_per_class_csv(path: Path, result: dict, classnames: list[str], train_counts: np.ndarray, many: int,
                        few: int) -> None:
    """One row per class, numbers without units (accuracy in percent, 2 decimals; empty where the split has
    no sample of the class). The name comes last so that ``sort -t, -k4,4n`` still finds the numeric columns
    when a name holds a comma (the csv module quotes it, which ``sort`` does not understand)."""
    group = np.empty(len(train_counts), dtype=object)
    for name, mask in shot_groups(train_counts, many, few).items():
        group[mask] = name
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for c, (name, n, t, a) in enumerate(zip(classnames, train_counts, result["test_counts"], result["per_class"])):
            w.writerow([c, int(n), int(t), "" if np.isnan(a) else f"{a:.2f}", group[c], name])
