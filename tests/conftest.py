"""Shared fixtures: a small generated long-tailed dataset and the embedded ballad-tiny model."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("BALLAD_PROGRESS", "0")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small shapes-LT dataset (30 classes, 60 → 3 train images per class), 2+ shards per split."""
    from stages.prepare import prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_synthetic(out, max_count=60, imbalance=20, test_per_class=4, val_per_class=2, shard_size=100)
    return out


@pytest.fixture(scope="session")
def tiny_backbone():
    from pipeline.models import create_model

    return create_model("ballad-tiny")
