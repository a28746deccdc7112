"""The plots: per_class.png of `evaluate` (accuracy binned by train count) and sweep.png of `sweep`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.runtime import atomic_path
from pipeline.shots import FEW, MANY
from stages.evaluate.grid import setting


MAX_BINS = 16
CLASSES_PER_BIN = 5  # fewer bins when K is small, so that a bin's mean is over more than one or two classes


def accuracy_bins(train_counts: np.ndarray, test_counts: np.ndarray, correct: np.ndarray, many: int = MANY,
                  few: int = FEW, max_bins: int = MAX_BINS) -> dict[str, np.ndarray]:
    """Test-weighted accuracy of the tested classes in log-spaced bins of train count, for a plot that stays
    readable at iNaturalist's 8,142 classes, where one dot per class (accuracy 0, 1/3, 2/3 or 1 at 3 test
    images) is a smear.

    Bin i holds the classes with ``lo[i] <= max(train count, 1) < hi[i]`` (integers: a count on an edge
    falls in the bin it opens; 0 shares the first bin, a log axis has no 0). The interior edge nearest
    (in log) to each group boundary, ``few`` and ``many + 1``, is moved onto it, so no bin mixes two
    shot groups. Bins without a tested class are left out. Per bin: ``classes`` (tested ones),
    ``images`` (their test samples), ``accuracy`` = Σ correct / Σ test samples in percent, and a 95 %
    interval of it, ``low``/``high``, with the classes as the sampled units (the ratio estimator's
    standard error, Σ_c (correct_c − p·n_c)² · C/(C−1) / (Σ n)²): the images of one class share its
    difficulty, so an interval over images alone would be too narrow. NaN with one class in the bin.
    """
    counts = np.maximum(np.asarray(train_counts), 1)
    tested = np.asarray(test_counts) > 0
    counts, n, hits = counts[tested], np.asarray(test_counts)[tested], np.asarray(correct, dtype=float)[tested]
    if not len(counts):
        return {k: np.zeros(0) for k in ("lo", "hi", "classes", "images", "accuracy", "low", "high")}
    lo, hi = counts.min(), counts.max() + 1
    bins = int(np.clip(len(counts) // CLASSES_PER_BIN, 1, max_bins))
    edges = np.unique(np.round(np.geomspace(lo, hi, bins + 1)).astype(int))
    for boundary in (few, many + 1):
        if len(edges) > 2 and lo < boundary < hi:
            nearest = 1 + np.argmin(np.abs(np.log(edges[1:-1] / boundary)))
            edges[nearest] = boundary
    edges = np.unique(edges)
    which = np.searchsorted(edges, counts, side="right") - 1
    m = len(edges) - 1
    classes = np.bincount(which, minlength=m)
    images = np.bincount(which, weights=n, minlength=m)
    correct_sum = np.bincount(which, weights=hits, minlength=m)
    keep = classes > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = correct_sum / images
        resid = np.bincount(which, weights=(hits - p[which] * n) ** 2, minlength=m)
        se = np.sqrt(resid * classes / (classes - 1)) / images
    se[classes < 2] = np.nan
    acc = 100 * p
    return {"lo": edges[:-1][keep], "hi": edges[1:][keep], "classes": classes[keep], "images": images[keep],
            "accuracy": acc[keep], "low": np.clip(acc - 196 * se, 0, 100)[keep],
            "high": np.clip(acc + 196 * se, 0, 100)[keep]}


DOTS_UP_TO = 300  # classes: below this, each class's dot is still readable behind the bins


def plot_per_class(path: Path, result: dict, train_counts: np.ndarray, many: int, few: int) -> None:
    """Binned accuracy against train count (log), shot-group boundaries and group accuracies marked. With
    few classes (the demo's 30) each class is drawn as a faint dot too: there a bin holds a handful of
    classes and the dots show which one pulls it down; at thousands they would only add an unreadable smear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metrics"]
    test_counts = result["test_counts"]
    tested = test_counts > 0
    correct = np.rint(np.nan_to_num(result["per_class"]) * test_counts / 100)  # back to counts: exact
    b = accuracy_bins(train_counts, test_counts, correct, many, few)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(train_counts) <= DOTS_UP_TO:
        ax.scatter(np.maximum(train_counts[tested], 1), result["per_class"][tested], s=8, alpha=0.25,
                   color="grey", label="one class")
    centre = np.sqrt(b["lo"] * (b["hi"] - 1))  # geometric middle of the integers in the bin
    ax.hlines(b["accuracy"], b["lo"] - 0.5, b["hi"] - 0.5, color="C0", linewidth=2)
    ax.errorbar(centre, b["accuracy"], yerr=[b["accuracy"] - b["low"], b["high"] - b["accuracy"]], fmt="o",
                color="C0", capsize=3, label="bin: test-weighted accuracy, 95 % interval")
    for x, y, c in zip(centre, np.where(np.isnan(b["high"]), b["accuracy"], b["high"]), b["classes"]):
        ax.annotate(f"{c}", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7,
                    color="C0")
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    # a group boundary between integers: few is count < few, many is count > many
    for x in (few - 0.5, many + 0.5):
        if x > 0:  # --few-threshold 0: no few group, and no line a log axis could place
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
    lo, hi = max(1, int(np.maximum(train_counts, 1).min())), int(train_counts.max()) + 1
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.1, hi * 1.1)
    ax.set_ylim(-2, 109)
    regions = (("few", f"< {few}", lo, few - 0.5), ("medium", f"{few}–{many}", few - 0.5, many + 0.5),
               ("many", f"> {many}", many + 0.5, hi))
    for name, rule, a, z in regions:
        a, z = max(a, lo / 1.1), min(z, hi * 1.1)
        if a < z:
            ax.text(np.sqrt(a * z), 104, f"{name} ({rule}): {fmt(m[name])} %", ha="center", fontsize=8)
    ax.set_xlabel("train images of the class (log; bins, classes per bin above each point)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"K = {m['num_classes']:,} classes, top-1 {fmt(m['top1'])} %")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, rows: list[dict], keys: list[str]) -> None:
    """Top-1 against the first grid key. One key (the λ of Fig. 5): the all / many / medium / few lines;
    more: one top-1 line per combination of the other keys' values. Text values sit at even steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, rest = keys[0], keys[1:]
    ticks = list(dict.fromkeys(r[x] for r in rows))
    numeric = all(isinstance(v, (int, float)) for v in ticks)
    at = (lambda v: v) if numeric else ticks.index
    fig, ax = plt.subplots(figsize=(6, 4))
    if rest:
        lines = {}
        for r in rows:
            lines.setdefault(" ".join(setting(k, r[k]) for k in rest), []).append(r)
        series = [(label, group, "top1") for label, group in lines.items()]
    else:
        series = [(label, rows, key) for key, label in (("top1", "all"), ("many", "many"), ("medium", "medium"),
                                                        ("few", "few"))]
    for label, group, key in series:
        ys = [float("nan") if r[key] is None else r[key] for r in group]
        ax.plot([at(r[x]) for r in group], ys, marker="o", label=label, linewidth=2 if key == "top1" else 1)
    if not numeric:
        ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
    ax.set_xlabel("residual factor λ" if x == "lambda" else x)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
