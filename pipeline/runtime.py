"""Runtime helpers shared by every stage: seeding, device choice, logging, progress, atomic writes."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

log = logging.getLogger("ballad")


def setup_logging(verbose: bool = False) -> None:
    """Our messages at INFO (DEBUG with -v); libraries' (open_clip logs its INFO to the root) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str | None = None):
    """``requested`` ('cpu', 'cuda', 'cuda:1', or None/'auto' for CUDA when present, else CPU)."""
    import torch

    from pipeline.errors import UserError

    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine")
    return dev


@contextlib.contextmanager
def cpu_threads_for(flops_per_step: float, device):
    """One CPU thread for steps too small to split: below a few MFLOP per step, waking and joining
    torch's thread pool costs more than the work (10–40× slower here when other jobs share the cores)."""
    import torch

    small = device.type == "cpu" and flops_per_step < 4e6
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def autocast(device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on CPU, where the same code runs in fp32."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             disable: bool | None = None, **kw):
    """A tqdm bar on stderr; hidden when stderr is not a terminal unless BALLAD_PROGRESS=1."""
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("BALLAD_PROGRESS")
        disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, **kw)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from other users of a shared store
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a write() that fails (disk full) names no file; the CLI's message needs one
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically, with bytes that depend on ``obj`` only. Given a path, torch
    names the archive inside the file after it (here the random temporary name), so equal weights would
    give files of different sha256 and DVC would re-run every stage downstream; a file object avoids it."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
