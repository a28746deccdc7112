"""Stage `evaluate`: accuracy by shot group and calibration of an adapter, or of the store as it is.

Metrics, all in percent:
- ``top1`` / ``top5`` over the samples of the split.
- ``many`` / ``medium`` / ``few``: BALLAD's (OLTR's) ``shot_acc``: per-class accuracy first, then the
  mean over the classes whose train count is > ``many`` (many), < ``few`` (few) or in between
  (medium). Only classes with samples in the split count; a group without one is ``null`` in
  metrics.json, where the official code reports 0 (it appends a 0 to an empty group), which would
  read as a measured accuracy.
- ``ece``: expected calibration error of the max softmax probability over 15 equal-width bins
  (Guo et al. 2017), Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|.

Two optional, additive changes to the logits, neither in the paper nor the official code: the kNN
cache of stages/knn.py and post-hoc logit adjustment (Menon et al. 2021), logits − τ·log π with π
the train class prior (a class without train samples counts as one sample).

``tta="mean"`` is LIFT's test-time ensembling, not BALLAD's (the authors score the centre crop alone,
our default): the class logits of each of the store's test-time views (`extract --test-views`) after
the adapter, averaged. The kNN cache still looks up the eval-transform feature of each sample.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.options import check_int, check_number
from pipeline.runtime import atomic_path, pick_device, write_json
from pipeline.prior import log_prior
from pipeline.shots import FEW, MANY, group_means, shot_groups
from stages.adapter import Adapter, embed_all, load_adapter
from stages.knn import KnnConfig, knn_logits

ECE_BINS = 15
TTA_MODES = ("none", "mean")


def check_thresholds(many: int, few: int) -> None:
    """The shot-group thresholds (train image counts) in range, before the store is opened."""
    check_int("--many-threshold", many, 0)
    check_int("--few-threshold", few, 0)
    if few > many:
        raise UserError(f"--few-threshold {few} exceeds --many-threshold {many}")


def shot_accuracy(pred: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, many: int = MANY,
                  few: int = FEW) -> tuple[dict, np.ndarray, np.ndarray]:
    """(group → mean per-class accuracy or None, per-class accuracy [K] (NaN: untested), test counts [K])."""
    k = len(train_counts)
    test_counts = np.bincount(labels, minlength=k)
    correct = np.bincount(labels, weights=(pred == labels), minlength=k)
    with np.errstate(invalid="ignore"):
        acc = 100 * correct / test_counts
    return group_means(acc, test_counts > 0, train_counts, many, few), acc, test_counts


def calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE in percent; bin b holds confidences in (b/bins, (b+1)/bins]."""
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    hits = np.bincount(which, weights=correct.astype(float), minlength=bins)
    return float(100 * np.abs(hits - np.bincount(which, weights=conf, minlength=bins)).sum() / len(conf))


def score(logits: torch.Tensor, labels: np.ndarray, train_counts: np.ndarray, many: int = MANY, few: int = FEW) -> dict:
    """Metrics plus the per-class and top-5 arrays the report files need."""
    probs = logits.float().softmax(dim=1)
    top_p, top_c = probs.topk(min(5, probs.shape[1]), dim=1)
    top_p, top_c = top_p.cpu().numpy(), top_c.cpu().numpy()
    pred = top_c[:, 0]
    groups, acc, test_counts = shot_accuracy(pred, labels, train_counts, many, few)
    metrics = {"top1": float(100 * np.mean(pred == labels)),
               "top5": float(100 * np.mean((top_c == labels[:, None]).any(1))), **groups,
               "ece": calibration_error(top_p[:, 0].astype(np.float64), pred == labels),
               "num_test": int(len(labels)), "num_classes": int(len(train_counts))}
    return {"metrics": metrics, "per_class": acc, "test_counts": test_counts, "top5": top_c, "scores": top_p}


def adapter_logits(model: Adapter, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Logits on the CPU for features already embedded by ``model``."""
    with torch.no_grad():
        return (emb @ model.classifier(text).T).cpu()


def view_logits(model: Adapter, views: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Test-time ensembling: the mean over views [T, N, D] of each view's class logits, on the CPU.
    Summed view by view, so memory holds one [N, K] matrix and a running sum, not T of them."""
    total = adapter_logits(model, embed_all(model, views[0]), text)
    for view in views[1:]:
        total += adapter_logits(model, embed_all(model, view), text)
    return total / len(views)


def evaluate(features: str | Path, out: str | Path, adapter: str | None = None, split: str = "test",
             many: int = MANY, few: int = FEW, logit_adjust: float = 0.0, knn: KnnConfig = KnnConfig(),
             tta: str = "none", device: str | None = None) -> dict:
    """Score ``split`` and write metrics.json, per_class.csv, predictions.npz and per_class.png to ``out``."""
    from store.features import FeatureStore

    check_thresholds(many, few)
    knn.check()
    check_number("--logit-adjust", logit_adjust, "must be a finite number")
    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta}: choose one of {', '.join(TTA_MODES)}")
    store = FeatureStore.open(features)
    views = store.tta_mode(split)  # also refuses a split the store lacks
    if tta == "mean" and views is None:
        raise UserError(f"--tta mean: split '{split}' of {features} has no test-time views; re-extract with "
                        f"`ballad-pipe extract … --test-views five-crop` (or flip, ten-crop)")
    dev = pick_device(device)
    model = load_adapter(adapter, store, features).to(dev)
    feats, labels = store.features(split, device=dev)
    emb = embed_all(model, feats)
    text = store.text_embeddings(device=dev)
    if tta == "mean":
        logits = view_logits(model, store.tta_features(split, device=dev), text)
    else:
        logits = adapter_logits(model, emb, text)
    if knn.k:
        logits += knn_logits(model, store, emb, knn, dev)
    if logit_adjust:
        logits -= logit_adjust * log_prior(store.train_class_counts)
    counts = store.train_class_counts
    result = score(logits, labels.cpu().numpy(), counts, many, few)
    result["metrics"].update(tta=tta, tta_views=views if tta == "mean" else None)
    write_report(Path(out), result, store.classnames, counts, store.keys(split), labels.cpu().numpy(), many, few)
    return result["metrics"]


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
