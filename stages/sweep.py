"""Stage `sweep`: Phase B once per residual factor λ, each scored on one split (the paper's Fig. 5).

The features are read once; every λ trains a fresh adapter with the same seed and options, and keeps
its epoch by the same rule as `adapter` (``--select``: by default the best val top-1 when the store
has a val split). Writes ``sweep.json`` (a list of rows, the shape ``dvc plots`` reads), ``sweep.csv``
and ``sweep.png``; each row also holds the kept epoch, its val top-1 and its training loss. The paper
tunes λ on ImageNet-LT's test split; pass ``--split val`` to choose it without test data.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.runtime import atomic_path, pick_device, write_json
from pipeline.schedule import note_zero_lr
from stages.adapter import TrainConfig, embed_all, fit, training_data
from pipeline.shots import FEW, MANY
from stages.evaluate import adapter_logits, check_thresholds, score

METRICS = ("top1", "top5", "many", "medium", "few", "ece")
COLUMNS = ("lambda", *METRICS, "selected_epoch", "val_acc", "loss")


def sweep(features: str | Path, out: str | Path, lambdas: list[float], cfg: TrainConfig = TrainConfig(),
          split: str = "test", many: int = MANY, few: int = FEW, device: str | None = None) -> list[dict]:
    from store.features import FeatureStore

    if not lambdas:
        raise UserError("--lambdas: give at least one value")
    for lam in lambdas:
        replace(cfg, lam=lam).check()
    check_thresholds(many, few)
    note_zero_lr(cfg.epochs, cfg.schedule)
    store = FeatureStore.open(features)
    store.num_samples(split)  # refuses a missing or incomplete split before any training
    dev = pick_device(device)
    train_feats, train_labels, text, val, views = training_data(store, cfg, dev)
    feats, labels = store.features(split, device=dev)
    labels, counts = labels.cpu().numpy(), store.train_class_counts
    rows = []
    for lam in lambdas:
        fitted = fit(train_feats, train_labels, text, store.logit_scale, replace(cfg, lam=lam), desc=f"λ={lam:g}",
                     val=val, views=views)
        model = fitted.model
        metrics = score(adapter_logits(model, embed_all(model, feats), text), labels, counts, many, few)["metrics"]
        rows.append({"lambda": lam, **{k: metrics[k] for k in METRICS}, "selected_epoch": fitted.selected_epoch,
                     "val_acc": fitted.val_acc, "loss": fitted.losses[fitted.selected_epoch - 1]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", rows)
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot_sweep(out / "sweep.png", rows)
    return rows


def plot_sweep(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["lambda"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("top1", "all"), ("many", "many"), ("medium", "medium"), ("few", "few")):
        ys = [float("nan") if r[key] is None else r[key] for r in rows]
        ax.plot(lams, ys, marker="o", label=label, linewidth=2 if key == "top1" else 1)
    ax.set_xlabel("residual factor λ")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
