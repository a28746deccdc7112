"""Shared fixtures: a small generated long-tailed dataset and the embedded ballad-tiny model.

Every test runs torch on one thread (and the subprocesses the tests start, through OMP_NUM_THREADS):
the tests' problems are tiny, so one thread is the fastest (threads wait on each other when other jobs
share the cores: on our busy 2-core VM the fast suite took 472 s with torch's default two, 202 s with
one), and runs that are compared bit for bit split their floating-point reductions the same way."""
from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("BALLAD_PROGRESS", "0")
os.environ["OMP_NUM_THREADS"] = "1"  # before torch (and faiss's OpenMP) load

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small shapes-LT dataset (30 classes, 60 → 3 train images per class), 2+ shards per split."""
    from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_synthetic(SyntheticConfig(out=str(out), max_count=60, imbalance=20, test_per_class=4, val_per_class=2,
                                      shard_size=100))
    return out


@pytest.fixture(scope="session")
def tiny_backbone():
    from pipeline.models import create_model

    return create_model("ballad-tiny")


@pytest.fixture
def single_thread():
    """Asked for by the tests that compare runs bit for bit: they rely on the one torch thread set above."""
    assert torch.get_num_threads() == 1, "an earlier test changed torch's thread count and did not restore it"


@pytest.fixture(scope="session")
def lt_store(tmp_path_factory):
    """A synthetic long-tailed feature store (class-conditional Gaussians), read-only in the tests."""
    from lt_features import make_lt_store

    path = tmp_path_factory.mktemp("lt") / "lt.zarr"
    make_lt_store(path)
    return path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 (port 0) serving a temporary directory: (directory, base URL)."""
    root = tmp_path_factory.mktemp("www")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    env = pytest.MonkeyPatch()
    for var in ("no_proxy", "NO_PROXY"):  # the http clients must not send loopback to a proxy
        env.setenv(var, "127.0.0.1,localhost")
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    env.undo()
    httpd.shutdown()
    httpd.server_close()
    thread.join()
