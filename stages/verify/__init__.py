"""Stage `verify`: every check a reader makes of a dataset, a feature store, a checkpoint or a bundle,
run at once and reported one line per finding (run.py). Options: config.py (torch-free)."""
