"""The zarr feature store: frozen-CLIP image embeddings of every split plus the class text embeddings.

Layout (zarr v3, one directory)::

    NAME.zarr/                 root attributes: model, pretrained, checkpoint_sha256, fingerprint, embed_dim,
                               logit_scale, classnames, train_class_counts, transform, train_views, view_seed,
                               train_transform, test_views, created, versions, command, splits
      <split>/                 attributes: complete, num_samples, skipped (keys of unreadable images),
                               views (V, train split with views), tta (the mode, other splits with test views)
        image  [N, D]          projected image embedding before L2 normalisation (float16 or float32)
        label  [N]   int32
        key    [N]   str       sample keys, rows in shard order
        views  [V, N, D]       train split only, with `extract --train-views V`: V train-transform views per image
        tta    [T, N, D]       val/test, with `extract --test-views MODE`: T test-time (eval) views per image
      text/                    attributes: templates
        embeddings [K, D] float32, L2-normalised (template ensemble: mean of normalised, re-normalised)
        prompts    [K*T] str   class-major: the T prompts of class 0, then class 1, …
      _staging/<split>/        only while a split is being extracted: one .npz per finished shard

A split's arrays are written from the staged shards in one pass, and ``complete`` is set last, so a
reader never takes a half-written split for a whole one. Every chunk ends in a CRC32C checksum and
every chunk file is written (also all-zero ones), so ``FeatureStore`` turns a flipped bit, a truncated
or a missing chunk into a one-line error instead of silently changed numbers. See docs/feature-store.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shlex
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.validate import COUNT, SHA256, TEXT, Field, Tie, check, fits, length_of, value_of
from pipeline.views import TEST_VIEWS
from store.location import Location
from store.shards import RESERVED_SPLITS, SPLIT_NAME

FORMAT = "ballad-features/1"
SPLIT_ORDER = ("train", "val", "test")
# Measured (docs/feature-store.md): uncompressed chunks of ~8Ki rows read a 115,846 × 1024 fp16 split
# fastest (zarr reads chunks concurrently; one huge chunk is read by one thread). Compression saves
# ~8 % on float features and halves read speed, paid on every Phase B run.
CHUNK_ROWS = 8192
STAGING = "_staging"
VIEWS, TTA = "views", "tta"  # the split arrays of extra views: train-transform views, test-time views
# zarr skips writing a chunk that holds only the fill value (an all-zero label chunk, say); written
# anyway, every chunk carries its checksum and a missing chunk file means damage, not zeros.
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}
# Deletes a store at a URL, as `rm -r` one on disk: the first half of a rebuild command.
REMOVE_URL = "import fsspec, sys; fsspec.url_to_fs(sys.argv[1])[0].rm(sys.argv[1], recursive=True)"


class ExtraViews(NamedTuple):
    """A split's extra views: the array ``name`` (VIEWS or TTA) holds ``count`` views per image, and
    the split attribute ``name`` records ``attr`` (V for train views, the mode for test-time views)."""

    name: str
    count: int
    attr: int | str


def classnames_sha256(classnames: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(classnames)).encode()).hexdigest()


def make_fingerprint(model: str, pretrained: str | None, checkpoint_sha256: str | None, classnames,
                     embed_dim: int) -> dict:
    """What makes two stores' features interchangeable."""
    return {"model": model, "pretrained": pretrained, "checkpoint_sha256": checkpoint_sha256,
            "classnames_sha256": classnames_sha256(classnames), "embed_dim": int(embed_dim)}


def _is_template(text: str) -> bool:
    from pipeline.text import template_problem

    return template_problem(text) is None


# What the attributes may hold (pipeline/validate.py): checked by ``FeatureStore.open``, as a user or a
# copy may have edited zarr.json, which no chunk checksum covers. The keys that readers compute with
# are required; the others are checked when present (stores from tests and older versions lack some).
DTYPES = ("float16", "float32")
MAX_LOGIT_SCALE = 1e4  # CLIP clamps its learned scale at 100; far above, a softmax is an argmax anyway
LOGIT_SCALE = Field("number", low=0, above=True, high=MAX_LOGIT_SCALE)
TEMPLATES = Field("list", low=1, items=Field("text", test=(_is_template, "a template with one {} for the class name")))
MAYBE_TEXT = Field("text", null=True, optional=True)
COMMAND = replace(MAYBE_TEXT, low=1)
ROOT_ATTRS = {
    "classnames": Field("list", low=1, items=Field("text", low=1)),
    "embed_dim": Field("int", low=1),
    "logit_scale": LOGIT_SCALE,
    "train_class_counts": Field("list", items=COUNT, length=length_of("classnames")),
    "fingerprint": Field("dict", keys={
        "model": TEXT, "pretrained": Field("text", null=True), "checkpoint_sha256": replace(SHA256, null=True),
        "classnames_sha256": Field("text", equals=Tie(lambda attrs: classnames_sha256(attrs["classnames"]),
                                                      "the sha256 of 'classnames'")),
        "embed_dim": Field("int", equals=value_of("embed_dim"))}),
    "model": replace(TEXT, optional=True), "pretrained": MAYBE_TEXT, "checkpoint": MAYBE_TEXT,
    "checkpoint_sha256": replace(SHA256, null=True, optional=True),
    "dataset": Field("dict", null=True, optional=True, keys={"name": TEXT, "path": TEXT}),
    "dataset_fingerprint": MAYBE_TEXT, "dtype": Field("text", optional=True, choices=DTYPES),
    "templates": replace(TEMPLATES, optional=True), "image_size": Field("int", optional=True, low=1),
    "transform": Field("text", optional=True, line=False), "train_views": replace(COUNT, optional=True),
    "view_seed": Field("int", null=True, optional=True, low=0),
    "train_transform": replace(MAYBE_TEXT, line=False), "test_views": Field("text", optional=True, choices=tuple(TEST_VIEWS)),
    "decode": Field("dict", optional=True, items=Field("text", choices=("cpu", "gpu"))),
    "versions": Field("dict", optional=True, items=Field("text", null=True)),
    "created": replace(TEXT, optional=True), "command": COMMAND,
    "classifier": Field("text", optional=True, choices=("text", "head")),
    "splits": Field("list", optional=True, unique=True, items=Field("text", test=(
        lambda name: SPLIT_NAME.fullmatch(name) is not None and name not in RESERVED_SPLITS,
        f"a split name ({SPLIT_NAME.pattern}, not {', '.join(RESERVED_SPLITS)})"))),
}
TEXT_ATTRS = {"templates": TEMPLATES}
SPLIT_ATTRS = {
    "complete": Field("bool"), "num_samples": replace(COUNT, optional=True),
    "skipped": Field("list", optional=True, items=TEXT), VIEWS: Field("int", optional=True, low=1),
    TTA: Field("text", optional=True, choices=tuple(mode for mode, count in TEST_VIEWS.items() if count)),
}


def _zarr():
    import zarr

    return zarr


def _to_device(array: np.ndarray, device, dtype=None):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    if device is not None and torch.device(device).type == "cuda":
        t = t.pin_memory()
    # Cast after the copy: a float16 store crosses the bus at half the bytes.
    return t.to(device, non_blocking=True).to(dtype) if dtype is not None else t.to(device)


def _deliver(array: np.ndarray, device=None, dtype=None):
    """numpy (cast to the numpy ``dtype`` if given) when ``device`` is None, else a tensor on ``device``."""
    if device is None:
        return array if dtype is None else array.astype(dtype)
    return _to_device(array, device, dtype)


def _has_checksums(array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs)


# ---------------------------------------------------------------- read side
class FeatureStore:
    """Read access to a feature store; ``open`` refuses paths that are not one."""

    def __init__(self, path: Path | str, group):
        self.path = path  # a Path, or the URL of a store on object storage
        self._group = group
        self.meta: dict = dict(group.attrs)

    @classmethod
    def open(cls, path) -> "FeatureStore":
        """The store at a local path or at any URL fsspec reads (``s3://``, ``gs://``, ``http(s)://``, …)."""
        where = Location(path, "--features")
        path = where.local if where.local is not None else where.url
        if not where.exists():
            raise UserError(f"{path}: no such feature store (run `ballad-pipe extract … --out {path}`)")
        zarr = _zarr()
        try:
            group = zarr.open_group(store=where.zarr_store(read_only=True), mode="r")
        except (FileNotFoundError, ValueError, KeyError, TypeError, zarr.errors.NodeTypeValidationError) as e:
            raise UserError(f"{path}: not a zarr feature store ({e.__class__.__name__})") from None
        if group.attrs.get("format") != FORMAT:
            raise UserError(f"{path}: not a ballad feature store (root attribute format != {FORMAT!r})")
        store = cls(path, group)
        store._check()
        return store

    def _check(self) -> None:
        """Every attribute (the root's, text's, each split's) fits its spec, and the arrays' shapes agree
        with them: K classes of D dims in text/, N = num_samples rows of D dims in a complete split and
        its extra views. Metadata only, no chunk is read (``verify`` reads the labels and checks their range)."""
        rebuild = f"rebuild the store: `{self.rebuild_command}`"
        meta = check(self.meta, ROOT_ATTRS, str(self.path), "attribute", rebuild)
        k, d = len(meta["classnames"]), meta["embed_dim"]
        text = self._subgroup("text", rebuild)
        templates = check(dict(text.attrs), TEXT_ATTRS, f"{self.path}/text", "attribute", rebuild)["templates"]
        self._shape(text, "embeddings", (k, d), f"{k} classnames of embed_dim {d}", rebuild)
        self._shape(text, "prompts", (k * len(templates),), f"{k} classnames × {len(templates)} templates", rebuild)
        for split in self.splits:
            group = self._subgroup(split, rebuild)
            attrs = check(dict(group.attrs), SPLIT_ATTRS, f"{self.path}/{split}", "attribute", rebuild)
            if not attrs["complete"]:
                continue  # refused, with the command that finishes it, where it is read
            n = attrs.get("num_samples")
            rows = {a: group[a].shape[0] for a in ("image", "label", "key") if a in group}
            if len(rows) < 3 or set(rows.values()) != {n}:
                raise UserError(f"{self.path}/{split}: image, label and key rows {rows} disagree with num_samples "
                                f"{n}; {rebuild}")
            self._shape(group, "image", (n, d), f"num_samples {n} of embed_dim {d}", rebuild)
            for name, count in ((VIEWS, attrs.get(VIEWS)), (TTA, TEST_VIEWS.get(attrs.get(TTA)))):
                self._shape(group, name, None if count is None else (count, n, d), f"{name} {attrs.get(name)!r}, "
                            f"num_samples {n}, embed_dim {d}", rebuild)

    def _subgroup(self, name: str, rebuild: str):
        node = self._group.get(name)
        if not isinstance(node, _zarr().Group):
            raise UserError(f"{self.path}: has no group '{name}'" + (" (listed in attribute 'splits')" if
                            name in self.splits else "") + f"; {rebuild}")
        return node

    def _shape(self, group, name: str, want: tuple | None, why: str, rebuild: str) -> None:
        """Array ``name`` of ``group`` has shape ``want``, or is absent when ``want`` is None."""
        shape = tuple(group[name].shape) if name in group else None
        if shape != want:
            found, wanted = ("missing" if x is None else f"shape {x}" for x in (shape, want))
            raise UserError(f"{self.path}/{group.path}/{name}: {found}, expected "
                            f"{'no such array' if want is None else wanted} ({why}); {rebuild}")

    # metadata
    @property
    def classnames(self) -> list[str]:
        return list(self.meta["classnames"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classnames"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])

    @property
    def train_class_counts(self) -> np.ndarray:
        return np.asarray(self.meta["train_class_counts"], dtype=np.int64)

    @property
    def fingerprint(self) -> dict:
        return dict(self.meta["fingerprint"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta.get("splits", []))

    def split_attrs(self, split: str) -> dict:
        if split not in self.splits:
            raise UserError(f"{self.path}: no split '{split}' (has: {', '.join(self.splits) or 'none'})")
        return dict(self._group[split].attrs)

    def is_complete(self, split: str) -> bool:
        return split in self.splits and bool(self._group[split].attrs.get("complete", False))

    def skipped(self, split: str) -> list[str]:
        return list(self.split_attrs(split).get("skipped", []))

    def num_samples(self, split: str) -> int:
        return int(self._complete(split)["image"].shape[0])

    def _complete(self, split: str):
        self.split_attrs(split)
        if not self.is_complete(split):
            raise UserError(f"{self.path}: split '{split}' is incomplete (an interrupted extract); "
                            f"`{self._command} --splits {split}` finishes it")
        return self._group[split]

    @property
    def _command(self) -> str:
        """The extract command the store records, or its outline when it records none (or a malformed one)."""
        cmd = self.meta.get("command")
        return cmd if cmd and fits(cmd, COMMAND) else f"ballad-pipe extract … --out {shlex.quote(str(self.path))}"

    @property
    def rebuild_command(self) -> str:
        """What rebuilds the store from scratch (re-running the extract command alone keeps complete splits)."""
        where = shlex.quote(str(self.path))
        if isinstance(self.path, Path):
            return f"rm -r {where} && {self._command}"
        return f"python -c {shlex.quote(REMOVE_URL)} {where} && {self._command}"

    def _read(self, array, selection=slice(None)) -> np.ndarray:
        """``array.oindex[selection]``, with a one-line UserError for a corrupt, truncated or missing chunk.

        zarr would raise a checksum ValueError (or, without checksums, "cannot reshape…"), or read a
        missing chunk as zeros; none of that tells the user what to do.
        """
        try:
            missing = array.nchunks - array.nchunks_initialized if _has_checksums(array) else 0
            if not missing:
                return array.oindex[selection]
            problem = f"{missing} of its {array.nchunks} chunk files are missing"
        except (ValueError, RuntimeError) as e:
            problem = ("a chunk fails its CRC32C checksum" if "checksum" in str(e)
                       else f"a chunk is unreadable ({e.__class__.__name__})")
        raise UserError(f"{self.path}: array {array.path} is damaged ({problem}); rebuild the store: "
                        f"`{self.rebuild_command}`")

    # arrays
    def features(self, split: str, device=None, dtype=None):
        """(image [N, D], labels [N] int64): numpy when ``device`` is None, else torch tensors on ``device``."""
        g = self._complete(split)
        image, labels = self._read(g["image"]), self._read(g["label"]).astype(np.int64)
        return _deliver(image, device, dtype), _deliver(labels, device)

    def keys(self, split: str) -> np.ndarray:
        return np.array(self._read(self._complete(split)["key"]).tolist(), dtype=str)

    def num_views(self, split: str) -> int:
        """V, the train-transform views per image of ``split`` (0 without views)."""
        g = self._complete(split)
        return int(g[VIEWS].shape[0]) if VIEWS in g else 0

    def _views_array(self, split: str):
        g = self._complete(split)
        if VIEWS not in g:
            raise UserError(f"{self.path}: split '{split}' has no train-transform views; re-extract with "
                            f"`ballad-pipe extract … --train-views 8` (any V from 1 to 1024)")
        return g[VIEWS]

    def views(self, split: str, device=None, dtype=None):
        """[V, N, D] train-transform views in the store's dtype (numpy, or a tensor on ``device``).

        Row n of every view is row n of ``features(split)``. V·N·D values at once: see ``views_nbytes``
        and ``read_views_rows`` for a split that does not fit in memory.
        """
        return _deliver(self._read(self._views_array(split)), device, dtype)

    def views_nbytes(self, split: str) -> int:
        """Bytes of ``views(split)`` in the store's dtype (0 without views)."""
        if not self.num_views(split):
            return 0
        a = self._views_array(split)
        return int(np.prod(a.shape)) * a.dtype.itemsize

    def read_views_rows(self, split: str, v_idx, rows=None, device=None, dtype=None):
        """[len(v_idx), len(rows), D]: views ``v_idx`` (an int, a sequence of ints or a slice) of ``rows``
        (a slice, a sorted sequence of row indices, or None for all rows).

        Every view is its own column of chunks of ~CHUNK_ROWS rows, so this reads exactly the chunks it
        touches: whole views cost their bytes, and a row range costs the chunks it spans. For streaming,
        read blocks of whole views (``v_idx=slice(a, b)``) or of chunk-aligned row ranges, not scattered
        rows (each scattered row costs a whole chunk read).
        """
        array = self._views_array(split)
        v_idx = [v_idx] if isinstance(v_idx, (int, np.integer)) else v_idx
        rows = slice(None) if rows is None else rows
        return _deliver(self._read(array, (v_idx, rows)), device, dtype)

    def tta_mode(self, split: str) -> str | None:
        """The `extract --test-views` mode whose views ``tta_features(split)`` holds; None without them."""
        return self.split_attrs(split).get(TTA)

    def tta_features(self, split: str, device=None, dtype=None):
        """[T, N, D] test-time views (``tta_mode``) of every row of ``features(split)``.

        The views come from a larger resize than the eval transform's (LIFT's), so even the centre
        crop, view 0 of `flip`, differs from ``features(split)``.
        """
        g = self._complete(split)
        if TTA not in g:
            raise UserError(f"{self.path}: split '{split}' has no test-time views; re-extract with "
                            f"`ballad-pipe extract … --test-views five-crop` (or flip, ten-crop)")
        return _deliver(self._read(g[TTA]), device, dtype)

    def text_embeddings(self, device=None, dtype=None):
        """[K, D] float32 L2-normalised class text embeddings (numpy, or a torch tensor on ``device``)."""
        emb = self._read(self._group["text"]["embeddings"])
        return emb if device is None else _to_device(emb, device, dtype)

    @property
    def prompts(self) -> list[str]:
        return self._read(self._group["text"]["prompts"]).tolist()

    @property
    def templates(self) -> list[str]:
        return list(self._group["text"].attrs.get("templates", []))


# ---------------------------------------------------------------- write side
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
    zarr = _zarr()
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
        attrs = dict(_zarr().open_group(store=where.zarr_store(read_only=True), mode="r").attrs)
    except Exception:  # anything unreadable is "not a store"; the caller decides what that means
        return None
    return attrs if attrs.get("format") == FORMAT else None


# What a resumed or extended extract must share with the store; a store written before a setting
# existed counts as having its default (view settings: none).
IDENTITY = {"fingerprint": None, "dataset_fingerprint": None, "dtype": None, "templates": None,
            "train_views": 0, "view_seed": None, "train_transform": None, "test_views": "none"}


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
