"""Stages `export` and `predict`: a self-contained bundle of the model, its class embeddings and the
adapter (run.py), and predictions from it on image files. Options: config.py (torch-free)."""
