"""Stage `verify`: check a dataset directory, a feature store, a Phase A checkpoint directory or a
bundle end to end, reading every byte, and say what is wrong.

The stages check cheaply on every run (shard sizes, chunk checksums as chunks are read, a bundle's
hashes when it loads); ``verify`` is the full pass to run after copying data between machines or when
a number looks wrong. Each check gives one ``Finding``: ``ok`` for what passed, ``FAIL`` with what is
wrong and the command that rebuilds it. Damage is reported, never raised, so that one run lists all of
it; ``verify`` raises a UserError only when ``path`` is none of the four kinds.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterator, TypeVar

import numpy as np

from pipeline.errors import UserError
from pipeline.runtime import sha256_file

T = TypeVar("T")


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str  # "<path>: what passed", or "<path>: what is wrong; what rebuilds it"

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'FAIL'} {self.text}"


def verify(path) -> tuple[str, Iterator[Finding]]:
    """What ``path`` is and its findings, produced as each check runs (hashing a dataset takes a while)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    for kind, markers, check in KINDS:
        if any((path / m).is_file() for m in markers):
            return kind, check(path)
    names = ", ".join(m for _, markers, _ in KINDS for m in markers)
    raise UserError(f"{path}: not a dataset directory, feature store, Phase A checkpoint directory or bundle "
                    f"(none of {names} in it)")


def _one_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"


def _opened(load: Callable[[], T], describe: Callable[[T], str]) -> Generator[Finding, None, T | None]:
    """A check's first finding: what ``load`` opened, as ``describe`` says (returned to go on with), or the
    UserError it raised (None returned: nothing more can be checked)."""
    try:
        opened = load()
    except UserError as e:
        yield Finding(False, str(e))
        return None
    yield Finding(True, describe(opened))
    return opened


# ---------------------------------------------------------------- dataset directories (prepare)
def _dataset(path: Path) -> Iterator[Finding]:
    from store.shards import DATASET_FILE, load_dataset, local_path, shard_problems

    info = yield from _opened(lambda: load_dataset(path), lambda info: f"{path / DATASET_FILE}: dataset {info.name!r}, "
                              f"{info.num_classes} classes, splits {', '.join(info.splits)}")
    if info is None:
        return
    for split, s in info.splits.items():
        problems = list(shard_problems(info, split, full=True))
        yield from (Finding(False, p) for p in problems)
        if not problems:
            checked = ("sha256, tar and labels match dataset.json" if s.shard_sha256 is not None
                       else "tar and labels match dataset.json (no sha256 recorded: written by an older prepare)")
            remote = sum(local_path(info.resolve(rel)) is None for rel in s.shards)
            note = f"; {remote} remote shard(s) not checked" if remote else ""
            yield Finding(True, f"{path / split}: {len(s.shards)} shard(s), {s.num_samples} samples; {checked}{note}")


# ---------------------------------------------------------------- feature stores (extract)
def _store(path: Path) -> Iterator[Finding]:
    import zarr

    from store.features import FeatureStore

    store = yield from _opened(lambda: FeatureStore.open(path), lambda store: f"{path}: feature store of "
                               f"{store.meta.get('model')}, {store.num_classes} classes, {store.embed_dim}-d, "
                               f"splits {', '.join(store.splits) or 'none'}")
    if store is None:
        return
    rebuild = f"rebuild the store: `{store.rebuild_command}`"
    arrays = {name: node for name, node in zarr.open_group(str(path), mode="r").members(max_depth=None)
              if isinstance(node, zarr.Array)}
    for name in sorted(arrays):
        a = arrays[name]
        problem = _array_problem(a, name, store.num_classes)
        dtype = "str" if a.dtype.kind in "TUO" else a.dtype
        yield Finding(problem is None, f"{path / name}: {problem}; {rebuild}" if problem else
                      f"{path / name}: {a.shape} {dtype}, read whole")
    for split in store.splits:  # opening checked the rows of every complete split against its attributes
        try:
            n = store.num_samples(split)
        except UserError as e:  # an incomplete split; the store's message names the command that finishes it
            yield Finding(False, str(e))
            continue
        yield Finding(True, f"{path / split}: complete, {n} rows in image, label and key")


def _array_problem(array, name: str, num_classes: int) -> str | None:
    """Read ``array`` whole, one chunk's worth of rows at a time, so that every chunk's checksum is tested.

    A missing chunk file is damage: the store writes every chunk, all-zero ones included, and zarr
    would read a missing one as zeros without a word.
    """
    missing = array.nchunks - array.nchunks_initialized
    if missing:
        return f"{missing} of its {array.nchunks} chunk files are missing"
    step = array.chunks[0] if array.ndim else 1
    nonfinite = 0
    try:
        for lo in range(0, array.shape[0], step) if array.ndim else [None]:
            block = array[...] if lo is None else array[lo:lo + step]
            if np.issubdtype(block.dtype, np.floating):
                nonfinite += int(block.size - np.isfinite(block).sum())
            if name.rpartition("/")[2] == "label" and block.size and not (0 <= block.min() and block.max() < num_classes):
                return f"labels outside the {num_classes} classes (rows from {lo})"
    except Exception as e:  # zarr raises ValueError for a failed checksum, others for a cut chunk: all mean damage
        return "a chunk fails its CRC32C checksum" if "checksum" in str(e) else f"a chunk is unreadable ({_one_line(e)})"
    return f"{nonfinite} non-finite values" if nonfinite else None


# ---------------------------------------------------------------- Phase A checkpoint directories
def _checkpoint(path: Path) -> Iterator[Finding]:
    final, meta_file, last = path / "final.pt", path / "final.json", path / "last.pt"
    retrain = f"retrain: `ballad-pipe phase-a … --out {shlex.quote(str(path))}`"
    if final.exists() or meta_file.exists():
        yield _final(final, meta_file, retrain)
    else:
        yield Finding(False, f"{path}: no final.pt, an unfinished run; `ballad-pipe phase-a … --out "
                             f"{shlex.quote(str(path))} --resume` continues it")
    if last.exists():
        yield _last(last)


def _final(final: Path, meta_file: Path, retrain: str) -> Finding:
    """final.pt is the file final.json describes (sha256) and loads, weights only, into its architecture."""
    from pipeline.models import create_model
    from pipeline.validate import SHA256
    from stages.extract.meta import CHECKPOINT_META, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(meta_file, {**CHECKPOINT_META, "sha256": SHA256}, retrain)
    except OSError as e:
        return Finding(False, f"{meta_file}: missing or malformed ({e.__class__.__name__}); phase-a writes it after "
                              f"final.pt, so the run did not finish; {retrain}")
    except UserError as e:
        return Finding(False, str(e))
    sha, model = meta["sha256"], meta["model"]
    if not final.is_file():
        return Finding(False, f"{final}: missing, though {meta_file.name} describes it; {retrain}")
    if sha256_file(final) != sha:
        return Finding(False, f"{final}: damaged or replaced (its sha256 differs from {meta_file.name}'s); {retrain}")
    try:  # as every stage loads it: weights only, each tensor's name and shape checked against the architecture
        tensors = len(create_model(model, pretrained=str(final)).model.state_dict())
    except UserError as e:
        return Finding(False, f"{e}; {retrain}")
    return Finding(True, f"{final}: sha256 matches {meta_file.name}, its {tensors} tensors load weights-only into {model}")


def _last(last: Path) -> Finding:
    import torch

    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # as in phase-a's resume: any failure means the file cannot be resumed from
        return Finding(False, f"{last}: unreadable resume state ({_one_line(e)}); delete it to start over")
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
        return Finding(False, f"{last}: not a phase-a resume state (no model, optimizer and step); delete it to start over")
    return Finding(True, f"{last}: resume state at step {state['step']} loads weights-only")


# ---------------------------------------------------------------- bundles (export)
def _bundle(path: Path) -> Iterator[Finding]:
    from stages.bundle.run import HEAD_FILE, META_FILE, MODEL_FILE, Bundle, read_meta

    meta = yield from _opened(lambda: read_meta(path), lambda meta: f"{path / META_FILE}: model "
                              f"{meta['model'].get('name')}, {len(meta['classnames'])} classes, "
                              f"adapter {'yes' if meta['adapter'] else 'none'}")
    if meta is None:
        return
    redo = f"re-export: `{_export_command(path, meta)}`"
    whole = True
    for name in (MODEL_FILE, HEAD_FILE):
        f = path / name
        if not f.is_file():
            problem = "missing from the bundle"
        elif sha256_file(f) != meta["files"].get(name):
            problem = f"damaged or replaced (its sha256 differs from {META_FILE}'s)"
        else:
            yield Finding(True, f"{f}: sha256 matches {META_FILE}")
            continue
        whole = False
        yield Finding(False, f"{f}: {problem}; {redo}")
    if not whole:
        return
    try:
        bundle = Bundle.load(path, device="cpu")
        logits = bundle.logits([_blank(bundle)])
    except UserError as e:
        yield Finding(False, f"{e}; {redo}")
        return
    except Exception as e:  # anything else while building or running the model means the bundle is unusable
        yield Finding(False, f"{path}: does not load or predict ({_one_line(e)}); {redo}")
        return
    if not bool(logits.isfinite().all()):
        yield Finding(False, f"{path}: predicts non-finite logits; {redo}")
    else:
        yield Finding(True, f"{path}: loads and predicts {logits.shape[1]} classes")


def _blank(bundle):
    from PIL import Image

    side = bundle.meta["transform"]["center_crop"][0]
    return Image.new("RGB", (side, side), (128, 128, 128))


def _export_command(path: Path, meta: dict) -> str:
    ckpt, store = meta["model"].get("checkpoint"), (meta.get("store") or {}).get("path")
    if not (ckpt and store):
        return f"ballad-pipe export … --out {shlex.quote(str(path))}"
    adapter = meta["adapter"]["file"] if meta["adapter"] else "none"
    return shlex.join(["ballad-pipe", "export", "--ckpt", ckpt, "--adapter", adapter, "--features", store,
                       "--out", str(path)])


# kind, files that mark it (any one), check; bundles first: nothing else holds bundle.json
KINDS: tuple[tuple[str, tuple[str, ...], Callable[[Path], Iterator[Finding]]], ...] = (
    ("bundle", ("bundle.json",), _bundle),
    ("dataset", ("dataset.json", ".prepare.json"), _dataset),
    ("feature store", ("zarr.json",), _store),
    ("Phase A checkpoint directory", ("final.json", "final.pt", "last.pt"), _checkpoint),
)
