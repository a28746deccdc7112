"""Stage `sweep`: Phase B once per point of a grid of its options, each scored on one split.

The grid (grid.py) is the cartesian product of axes over any ``TrainConfig`` option: the λ of the paper's
Fig. 5 by default, or its Table 6 (adapter position) and Table 8 (sampler) ablations, a loss table, or
any ``--grid KEY=V1,V2`` product. The features are read once (once per ``--views`` and ``--select`` value
when the grid varies those); every point trains a fresh adapter with the same seed and the other options
shared, and keeps its epoch by the same rule as `adapter` (``--select``: by default the best val top-1
when the store has a val split), so a point's row equals what `adapter` with those options and
`evaluate` report. Writes ``sweep.json`` (a list of rows, the shape ``dvc plots`` reads), ``sweep.csv``
and ``sweep.png``: one column per grid key, then the metrics, the kept epoch, its val top-1 and its
training loss (``train_loss``). The paper tunes λ on ImageNet-LT's test split; pass ``--split val`` to
choose it without test data.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.runtime import atomic_path, pick_device, write_json
from pipeline.schedule import note_zero_lr
from stages.adapter import embed_all, fit, training_data
from stages.evaluate.grid import Axis, describe, points
from stages.evaluate.plots import plot_sweep
from stages.evaluate.score import adapter_logits, score
from stages.evaluate.config import SweepConfig

METRICS = ("top1", "top5", "many", "medium", "few", "ece")
RECORD = ("selected_epoch", "val_acc", "train_loss")


def sweep(cfg: SweepConfig) -> list[dict]:
    """Train and score one adapter per grid point; write and return the table's rows, in grid order."""
    from store.features import FeatureStore

    cfg.check()
    axes = cfg.axes()
    grid = points(axes)
    for epochs, schedule in {(c.epochs, c.schedule) for c in map(lambda p: cfg.train_config(**p), grid)}:
        note_zero_lr(epochs, schedule)
    store = FeatureStore.open(cfg.features)
    store.num_samples(cfg.split)  # refuses a missing or incomplete split before any training
    dev = pick_device(cfg.device)
    feats, labels = store.features(cfg.split, device=dev)
    labels, data = labels.cpu().numpy(), {}
    rows = []
    for point in grid:
        train = cfg.train_config(**point)
        if (train.views, train.select) not in data:  # what training_data reads depends on these alone
            data[train.views, train.select] = training_data(store, train, dev)
        train_feats, train_labels, text, val, views = data[train.views, train.select]
        fitted = fit(train_feats, train_labels, text, store.logit_scale, train, desc=describe(axes, point),
                     val=val, views=views)
        model = fitted.model
        logits = adapter_logits(model, embed_all(model, feats), text)
        metrics = score(logits, labels, store.train_class_counts, cfg.many, cfg.few)["metrics"]
        rows.append({**{a.key: point[a.name] for a in axes}, **{k: metrics[k] for k in METRICS},
                     "selected_epoch": fitted.selected_epoch, "val_acc": fitted.val_acc,
                     "train_loss": fitted.losses[fitted.selected_epoch - 1]})
    write_table(Path(cfg.out), rows, axes)
    return rows


def write_table(out: Path, rows: list[dict], axes: list[Axis]) -> None:
    """sweep.json, sweep.csv (the same rows) and sweep.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", rows)
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=(*(a.key for a in axes), *METRICS, *RECORD))
        w.writeheader()
        w.writerows(rows)
    plot_sweep(out / "sweep.png", rows, [a.key for a in axes])
