"""Shared fixtures: a small generated long-tailed dataset and the embedded ballad-tiny model."""
from __future__ import annotations

import os

import pytest
import torch

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


@pytest.fixture
def single_thread():
    """One torch thread: tiny problems run fastest on one (far faster when other processes share the
    cores), and runs compared bit for bit must split their floating-point reductions the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lt_store(tmp_path_factory):
    """A synthetic long-tailed feature store (class-conditional Gaussians), read-only in the tests."""
    from lt_features import make_lt_store

    path = tmp_path_factory.mktemp("lt") / "lt.zarr"
    make_lt_store(path)
    return path
