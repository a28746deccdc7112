"""Scoring from the feature store: stages `evaluate`, `sweep`, `neighbors` and `report`.

Read top to bottom, each command is one module: ``run.py`` (evaluate: the store → logits → metrics →
report files), ``sweep.py`` (one adapter per grid point, ``grid.py``'s axes and ablations), ``knn.py``
(the kNN cache evaluate may add, and `neighbors`), ``report.py`` (the comparison table). Their shared
parts: ``score.py`` (logits → metrics), ``files.py`` (metrics.json, per_class.csv, predictions.npz)
and ``plots.py`` (per_class.png, sweep.png). The options are stages/evaluate/config.py's, torch-free;
so is this file, which the configs import through ``grid.py``.
"""
