"""The one writer of the feature store (layout and reader: store/features.py).

Every store is made here: ``create_store`` opens a new one or the same run's unfinished one (resume),
``SplitWriter`` stages a split shard by shard and writes its arrays in one pass with ``complete`` set
last, ``write_store`` writes a whole store from arrays in memory (tests, benchmarks), ``write_text`` the
class prompts' embeddings. Chunks are ~``CHUNK_ROWS`` rows, each ending in a CRC32C checksum.
"""
from __future__ import annotations

import contextlib
import io
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.validate import check
from store.features import (FORMAT, ROOT_ATTRS, SPLIT_ORDER, STAGING, TTA, VIEWS, WRITE_ALL_CHUNKS, ExtraViews,
                            FeatureStore, load_zarr, make_fingerprint)
from store.location import Location

# Measured (docs/feature-store.md): uncompressed chunks of ~8Ki rows read a 115,846 × 1024 fp16 split
# fastest (zarr reads chunks concurrently; one huge chunk is read by one thread). Compression saves
# ~8 % on float features and halves read speed, paid on every Phase B run.
CHUNK_ROWS = 8192


def chunk_rows(n: int) -> int:
    """Rows per chunk: about CHUNK_ROWS but equal-sized, as zarr pads an uncompressed last chunk to full size."""
    return max(1, -(-n // max(1, -(-n // CHUNK_ROWS))))


def _array(group, name, data_or_shape, dtype, row_axis: int = 0):
    """Create (and fill, given data) an array chunked by ~CHUNK_ROWS along ``row_axis``; a chunk holds one
    index of every axis before it (one view of a [V, N, D] array) and all of every axis after it."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    shape = data_or_shape if isinstance(data_or_shape, tuple) else data_or_shape.shape
    chunks = (1,) * row_axis + (chunk_rows(shape[row_axis]),) + tuple(shape[row_axis + 1:])
    # Numbers compress poorly and are read whole on every run, so they stay uncompressed; keys are
    # text and shrink well with zstd. The CRC32C checksum goes last, over the stored bytes.
    compressors = [ZstdCodec(), Crc32cCodec()] if np.dtype(dtype).kind in "UTO" else [Crc32cCodec()]
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors,
                             overwrite=True, config=WRITE_ALL_CHUNKS)
    if not isinstance(data_or_shape, tuple):
        arr[:] = data_or_shape
    return arr


def create_store(path, attrs: dict, overwrite: bool = False):
    """Open ``path`` (a local path or a URL) for writing: a new store, or the same run's unfinished one (resume).

    A store whose fingerprint, dataset or dtype differs from ``attrs`` is refused unless ``overwrite``, and
    so is one whose attributes do not fit ``ROOT_ATTRS`` (edited by hand: they decide what is resumed).
    """
    zarr = load_zarr()
    where = Location(path, "--out")
    if where.exists():
        theirs = _existing_attrs(where)
        try:
            if theirs is not None:
                check(theirs, ROOT_ATTRS, f"--out {where}", "attribute", "choose another --out or pass --overwrite")
            clash = "(not a feature store)" if theirs is None else _identity_clash(theirs, attrs)
        except UserError:
            if not overwrite:
                raise
            clash = "(malformed attributes)"
        if not clash:  # the same settings: resume, keeping what earlier runs recorded
            group = zarr.open_group(store=where.zarr_store(read_only=False), mode="r+")
            group.attrs.update({**attrs, **{k: theirs[k] for k in ("created", "splits") if k in theirs},
                                "decode": {**(theirs.get("decode") or {}), **(attrs.get("decode") or {})}})
            return group
        if not overwrite and (theirs is not None or where.is_file() or not where.is_empty()):
            what = "is not a feature store" if theirs is None else f"holds a store made with another {clash}"
            raise UserError(f"--out {where}: {what}; choose another --out or pass --overwrite")
        where.remove()
    group = zarr.open_group(store=where.zarr_store(read_only=False), mode="w")
    group.attrs.update({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **attrs, "splits": []})
    return group


def _existing_attrs(where: Location) -> dict | None:
    try:
        attrs = dict(load_zarr().open_group(store=where.zarr_store(read_only=True), mode="r").attrs)
    except Exception:  # anything unreadable is "not a store"; the caller decides what that means
        return None
    return attrs if attrs.get("format") == FORMAT else None


# What a resumed or extended extract must share with the store; a store written before a setting
# existed counts as having its default (view settings: none).
IDENTITY = {"fingerprint": None, "dataset_fingerprint": None, "dtype": None, "templates": None,
            "train_views": 0, "view_seed": None, "train_transform": None, "test_views": "none",
            "eval_recipe": "ballad", "train_recipe": None}


def _identity_clash(theirs: dict, ours: dict) -> str | None:
    for key, default in IDENTITY.items():
        if theirs.get(key, default) != ours.get(key, default):
            if key == "fingerprint":
                diff = [k for k in ours[key] if theirs.get(key, {}).get(k) != ours[key][k]]
                return f"{'/'.join(diff) or 'model'} ({', '.join(f'{k}={theirs.get(key, {}).get(k)}' for k in diff)})"
            return f"{key} ({theirs.get(key, default)})"
    # Where a split's images were decoded (--decode): the device's pixels differ slightly from PIL's, so
    # one split's rows must all come from one path; other splits may use another.
    theirs_decode, ours_decode = theirs.get("decode") or {}, ours.get("decode") or {}
    clash = [s for s in ours_decode if s in theirs_decode and theirs_decode[s] != ours_decode[s]]
    if clash:
        return f"--decode for split {clash[0]} ({theirs_decode[clash[0]]})"
    return None


def write_text(group, embeddings: np.ndarray, prompts: Sequence[str], templates: Sequence[str]) -> None:
    emb = np.asarray(embeddings, dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    text = group.require_group("text")
    _array(text, "embeddings", emb, np.float32)
    _array(text, "prompts", np.asarray(list(prompts), dtype=str), str)
    text.attrs["templates"] = list(templates)


def _register_split(group, split: str) -> None:
    splits = list(group.attrs.get("splits", []))
    if split not in splits:
        splits.append(split)
        order = {s: i for i, s in enumerate(SPLIT_ORDER)}
        group.attrs["splits"] = sorted(splits, key=lambda s: (order.get(s, len(order)), s))


def write_split(group, split: str, image: np.ndarray, labels: np.ndarray, keys: Sequence[str],
                dtype="float16", skipped: Sequence[str] = (), extra: ExtraViews | None = None,
                extra_views: np.ndarray | None = None) -> None:
    """Write one split from memory in a single process; ``complete`` is set last.

    ``extra_views`` [extra.count, N, D] is written as the array ``extra.name`` when ``extra`` is given.
    """
    if len(image) != len(labels) or len(keys) != len(labels):
        raise ValueError(f"split '{split}': image, label and key row counts differ")
    if extra is not None and np.shape(extra_views) != (extra.count, *np.shape(image)):
        raise ValueError(f"split '{split}': {extra.name} is {np.shape(extra_views)}, expected "
                         f"({extra.count}, {', '.join(map(str, np.shape(image)))})")
    g = group.require_group(split)
    g.attrs.update({"complete": False})
    _register_split(group, split)
    _array(g, "image", np.asarray(image, dtype=dtype), dtype)
    _array(g, "label", np.asarray(labels, dtype=np.int32), np.int32)
    _array(g, "key", np.asarray(list(keys), dtype=str), str)
    if extra is not None:
        _array(g, extra.name, np.asarray(extra_views, dtype=dtype), dtype, row_axis=1)
        g.attrs[extra.name] = extra.attr
    g.attrs.update({"complete": True, "num_samples": int(len(labels)), "skipped": list(skipped)})


def write_store(path, *, image: dict, labels: dict, keys: dict | None, text_embeddings: np.ndarray, classnames,
                logit_scale: float, train_class_counts, prompts=None, meta: dict | None = None,
                dtype="float16", overwrite=False, views: dict | None = None, tta: dict | None = None) -> FeatureStore:
    """A complete store from in-memory arrays (tests and benchmarks: synthetic stores).

    ``views`` {split: [V, N, D]} adds train-transform views, ``tta`` {split: (mode, [T, N, D])} test-time views.
    """
    where = Location(path, "path")
    if where.exists():
        if not overwrite:
            raise UserError(f"{path}: exists; pass overwrite=True to replace it")
        where.remove()
    views, tta = dict(views or {}), dict(tta or {})
    text_embeddings = np.asarray(text_embeddings, dtype=np.float32)
    embed_dim = int(text_embeddings.shape[1])
    meta = dict(meta or {})
    attrs = {"format": FORMAT, "model": meta.get("model", "synthetic"), "pretrained": meta.get("pretrained"),
             "checkpoint_sha256": meta.get("checkpoint_sha256"), "embed_dim": embed_dim,
             "logit_scale": float(logit_scale), "classnames": list(classnames),
             "train_class_counts": [int(c) for c in train_class_counts], "dtype": str(np.dtype(dtype)),
             "train_views": max((len(v) for v in views.values()), default=0),
             "test_views": next((mode for mode, _ in tta.values()), "none")}
    attrs["fingerprint"] = make_fingerprint(attrs["model"], attrs["pretrained"], attrs["checkpoint_sha256"],
                                            classnames, embed_dim)
    group = create_store(path, {**attrs, **meta})
    prompts = list(prompts) if prompts is not None else [f"a photo of a {c}." for c in classnames]
    write_text(group, text_embeddings, prompts, meta.get("templates", ["a photo of a {}."]))
    for split in image:
        split_keys = keys[split] if keys else [f"{split}_{i:06d}" for i in range(len(labels[split]))]
        extra, extra_views = None, None
        if split in views:
            extra_views = np.asarray(views[split])
            extra = ExtraViews(VIEWS, len(extra_views), len(extra_views))
        elif split in tta:
            mode, extra_views = tta[split][0], np.asarray(tta[split][1])
            extra = ExtraViews(TTA, len(extra_views), mode)
        write_split(group, split, image[split], labels[split], split_keys, dtype, extra=extra, extra_views=extra_views)
    return FeatureStore.open(path)


# ---------------------------------------------------------------- resumable, multi-process split writer
class SplitWriter:
    """Stages one split shard by shard, then writes its arrays; every step survives SIGKILL.

    Each finished shard becomes ``_staging/<split>/<index>.npz``, written whole or not at all (a local
    store: a temporary name, fsync, rename; object storage: one upload, see store/location.py), which is
    also the record that the shard is done: a re-run only computes missing ones.
    Processes may stage disjoint shards concurrently. ``finish`` turns the staged shards into the
    split's arrays: each process writes a disjoint range of whole chunks, then the main process sets
    ``complete`` and removes the staging directory. With ``extra``, each shard also stages its
    [count, n, D] extra views, written to the split's array ``extra.name`` chunk by chunk as the rest.
    """

    def __init__(self, group, split: str, num_shards: int, dtype="float16", extra: ExtraViews | None = None):
        self.group, self.split, self.num_shards, self.dtype = group, split, num_shards, np.dtype(dtype)
        self.extra = extra
        self.where = Location.of_zarr(group.store)
        self.dir = f"{STAGING}/{split}"  # inside the store

    def prepare(self, is_main: bool) -> None:
        """Main process only, before any shard is staged: mark the split incomplete, drop partial files."""
        if not is_main:
            return
        g = self.group.require_group(self.split)
        g.attrs.update({"complete": False})
        _register_split(self.group, self.split)
        self.where.remove_temporaries(self.dir)  # a killed process's half-written shard; recomputed

    def part(self, shard: int) -> str:
        return f"{self.dir}/{shard:06d}.npz"

    def missing(self, shards: Sequence[int]) -> list[int]:
        return [s for s in shards if not self.where.exists(self.part(s))]

    def stage(self, shard: int, image: np.ndarray, labels: np.ndarray, keys: Sequence[str], skipped: Sequence[str],
              extra_views: np.ndarray | None = None):
        arrays = {"image": np.asarray(image, dtype=self.dtype), "label": np.asarray(labels, dtype=np.int32),
                  "key": np.asarray(list(keys), dtype=str), "skipped": np.asarray(list(skipped), dtype=str)}
        if self.extra is not None:
            want = (self.extra.count, *arrays["image"].shape)
            if np.shape(extra_views) != want:
                raise ValueError(f"shard {shard}: {self.extra.name} is {np.shape(extra_views)}, expected {want}")
            arrays[self.extra.name] = np.asarray(extra_views, dtype=self.dtype)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.where.write(self.part(shard), buffer.getvalue())

    @contextlib.contextmanager
    def _load(self, shard: int):
        """The staged arrays of ``shard``, each read only when used (the counts need the labels alone)."""
        with self.where.open(self.part(shard)) as f, np.load(f) as arrays:
            yield arrays

    def finish(self, embed_dim: int, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None) -> None:
        """Every process calls this after all shards are staged (``barrier`` separates the steps).

        A process holds one chunk's rows of every array at a time: with extra views about
        2 · count · CHUNK_ROWS · D values (the staged shards it reads and the block it writes).
        """
        missing = self.missing(range(self.num_shards))
        if missing:
            raise RuntimeError(f"split '{self.split}': shards {missing[:5]} were not staged")
        counts, skipped = [], []
        for s in range(self.num_shards):
            with self._load(s) as p:
                counts.append(len(p["label"]))
                skipped += [str(k) for k in p["skipped"]]
        total = sum(counts)
        if total == 0:
            raise UserError(f"split '{self.split}': every image is unreadable (see the warnings above)")
        g = self.group[self.split]
        # name -> (dtype, shape, row axis)
        arrays = {"image": (self.dtype, (total, embed_dim), 0), "label": (np.int32, (total,), 0),
                  "key": (str, (total,), 0)}
        if self.extra is not None:
            arrays[self.extra.name] = (self.dtype, (self.extra.count, total, embed_dim), 1)
        if rank == 0:
            for name, (dtype, shape, axis) in arrays.items():
                _array(g, name, shape, dtype, row_axis=axis)
        barrier()
        out = {name: g[name].with_config(WRITE_ALL_CHUNKS) for name in arrays}
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rows = chunk_rows(total)
        n_chunks = -(-total // rows)
        # Whole chunks per process, so no two processes ever write the same chunk file.
        for c in range(rank * n_chunks // world_size, (rank + 1) * n_chunks // world_size):
            lo, hi = c * rows, min(total, (c + 1) * rows)
            block = {name: [] for name in arrays}
            s = int(np.searchsorted(offsets, lo, side="right")) - 1
            while s < self.num_shards and offsets[s] < hi:
                a, b = max(lo, offsets[s]) - offsets[s], min(hi, offsets[s + 1]) - offsets[s]
                with self._load(s) as p:
                    for name, (_, _, axis) in arrays.items():
                        block[name].append(p[name][(slice(None),) * axis + (slice(a, b),)])
                s += 1
            for name, (_, _, axis) in arrays.items():
                out[name][(slice(None),) * axis + (slice(lo, hi),)] = np.concatenate(block[name], axis=axis)
        barrier()
        if rank == 0:
            done = {"num_samples": total, "skipped": skipped, "complete": True}
            if self.extra is not None:
                done = {self.extra.name: self.extra.attr, **done}
            g.attrs.update(done)
            self.remove_staging()
        barrier()

    def remove_staging(self) -> None:
        """Drop the staged shards of a complete split (also left behind by a kill right after ``complete``)."""
        self.where.remove(self.dir)
        if self.where.is_empty(STAGING):
            self.where.remove(STAGING)
