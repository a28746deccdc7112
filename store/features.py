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

This module is the layout, its attributes' schema and the reader; store/feature_writer.py is the one
place a store is written.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.validate import COUNT, SHA256, TEXT, Field, Tie, check, fits, length_of, value_of
from pipeline.transforms import EVAL_TRANSFORMS, TRAIN_TRANSFORMS
from pipeline.views import TEST_VIEWS
from store.location import Location
from store.shards import RESERVED_SPLITS, SPLIT_NAME, TAXONOMY

FORMAT = "ballad-features/1"
SPLIT_ORDER = ("train", "val", "test")
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
    # the dataset's coarser names per class (store/shards.py), which `evaluate` scores at; null: none known
    "taxonomy": replace(TAXONOMY, null=True),
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
    "eval_recipe": Field("text", optional=True, choices=tuple(EVAL_TRANSFORMS)),
    "train_recipe": Field("text", null=True, optional=True, choices=tuple(TRAIN_TRANSFORMS)),
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


def load_zarr():
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
        zarr = load_zarr()
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
        if not isinstance(node, load_zarr().Group):
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
