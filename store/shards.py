"""Webdataset shards: the on-disk form of every dataset the pipeline trains and evaluates on.

Layout::

    DIR/dataset.json                  name, class names, prompt template, per split: shards, counts
    DIR/<split>/shard-000000.tar      samples <key>.<jpg|png|webp> (image bytes) + <key>.cls (label)

Shards are written under a temporary name and renamed when complete, and dataset.json is written
last, so a directory without dataset.json is an unfinished ``prepare`` and a shard that exists is
whole. Tar headers carry fixed metadata (mtime 0, uid 0) so the same input gives byte-identical shards.

dataset.json records each shard's byte size and sha256 and the ``prepare`` command that wrote it, so
that a shard damaged or cut short later is named together with the command that rebuilds it. Every
reader (``urls``) compares sizes, a stat per shard; hashing every byte is left to ``ballad-pipe
verify`` (``verify_shards``): on ImageNet-LT's ~13 GB of train shards that would add some 25 s to every
Phase A and extract start (docs/reliability.md). Files from before these records (no sizes, hashes or
command) still load.

A dataset.json may also describe shards that ``prepare`` did not write (``prepare index``): its shard
entries are then URLs (``http(s)://``, ``s3://``, …), ``pipe:`` commands or absolute local paths, and
``label_key`` names the member that holds each sample's label. ``DatasetInfo.urls`` hands the key on
inside the URLs it returns (``ShardURL``), so every stage streams such shards unchanged. dataset.json
itself may be read from a URL (fsspec): relative shard paths then resolve against that URL. Which
checks apply where: docs/data.md.

A description may come from anywhere, so ``load_dataset`` checks every field before using any
(``_check_description``) and what each shard entry may reach (``_check_entry``, store/trust.py): a
``pipe:`` command runs only with the reader's ``--allow-commands``, never from a description read
from a URL.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import re
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

from pipeline import validate as v
from pipeline.errors import UserError
from store import trust

# `prepare` writes the first three; "jpeg" is as common in shards made elsewhere (`prepare index`).
IMAGE_EXTS = ("jpg", "png", "webp", "jpeg")
SHARD_PATTERN = "shard-{:06d}.tar"
DATASET_FILE = "dataset.json"
MARKER_FILE = ".prepare.json"  # written first: says which dataset an unfinished directory holds
# The coarser levels a dataset.json may name each class at (``taxonomy``), coarse to fine: iNaturalist's
# categories.json keys, kept so that an evaluation can score species predictions at genus … kingdom.
TAXONOMY_LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")
# How dataset.json and a feature store record it: per level, one non-empty name per class
TAXONOMY = v.Field("dict", optional=True, keys={
    level: v.Field("list", optional=True, length=v.length_of("classnames"), items=v.Field("text", low=1))
    for level in TAXONOMY_LEVELS})
Taxonomy = dict[str, list[str]]  # level → class k's name at that level, at [k]


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str  # one of IMAGE_EXTS
    image: bytes
    label: int


@dataclass(frozen=True)
class LabelKey:
    """Where a sample's integer label is: the member ``<key>.<member>`` holding an ASCII integer (``cls``,
    what ``prepare`` writes), or, with ``field``, a JSON member whose ``field`` is the integer
    (``json:label``: shards made by img2dataset-like tools keep their metadata in ``.json``). Written
    ``member`` or ``member:field`` on the command line (``prepare index --label-key``) and in dataset.json.
    Members are matched lowercased, as webdataset lowercases extensions."""

    member: str = "cls"
    field: str | None = None

    @classmethod
    def parse(cls, spec: str, where: str) -> "LabelKey":
        m = re.fullmatch(r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)(?::(\S+))?", spec) if isinstance(spec, str) else None
        if m is None or m.group(1).lower() in IMAGE_EXTS:
            raise UserError(f"{where} {spec!r}: expected EXT (the member holding an integer label, e.g. cls) or "
                            f"EXT:FIELD (an integer field of a JSON member, e.g. json:label), EXT not an image type")
        return cls(m.group(1).lower(), m.group(2))

    def __str__(self) -> str:
        return self.member if self.field is None else f"{self.member}:{self.field}"

    def decode(self, value: bytes) -> int:
        """The label in the member's bytes; ValueError saying what is wrong otherwise."""
        if self.field is None:
            return decode_label(value)
        try:
            label = json.loads(value)[self.field]
        except (ValueError, KeyError, TypeError) as e:  # not JSON, not an object, or no such field
            raise ValueError(f"no field '{self.field}' in its .{self.member} ({e.__class__.__name__})") from None
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"field '{self.field}' of its .{self.member} is {label!r}, not an integer")
        return label


CLS = LabelKey()


class ShardURL(str):
    """A shard URL that carries how to read it: its dataset's ``LabelKey``, and ``commands``, whether the
    user allowed a ``pipe:`` entry to run (store/trust.py).

    ``DatasetInfo.urls`` returns these for datasets whose labels are not in ``.cls`` members or whose
    commands may run, so that store.stream reads them right although the stages only pass URLs along
    (a plain str means ``.cls`` and no command: the default and fast path). Everywhere else it is the
    str it holds.
    """

    def __new__(cls, url: str, label_key: LabelKey = None, commands: bool = False):
        self = super().__new__(cls, url)
        self.label_key = CLS if label_key is None else label_key
        self.commands = commands
        return self

    def __reduce__(self):  # DataLoader workers started by spawn receive the URLs pickled
        return ShardURL, (str(self), self.label_key, self.commands)


def label_key_of(urls: Iterable[str]) -> LabelKey:
    """The label key that shard URLs carry (``ShardURL``); ``.cls`` for plain strings."""
    keys = {getattr(u, "label_key", CLS) for u in urls}
    if len(keys) > 1:
        raise ValueError(f"shard URLs of one stream carry different label keys: {sorted(map(str, keys))}")
    return keys.pop() if keys else CLS


def has_scheme(url: str) -> bool:
    """``http://…``, ``pipe:cmd``, ``file:…``, ``s3://…``: what is not a plain path."""
    return bool(urlparse(url).scheme)


def local_path(url: str) -> Path | None:
    """The file a shard URL names on this machine (a plain path or ``file:``, as webdataset opens them), else None."""
    parsed = urlparse(url)
    if not parsed.scheme:
        return Path(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


class URLRoot(str):
    """The directory URL of a dataset.json read through fsspec: a str that also joins like a Path
    (``root / "dataset.json"``), as code and messages written for local dataset directories do."""

    def __truediv__(self, rel) -> "URLRoot":
        return URLRoot(urljoin(self + "/", str(rel)))


@dataclass
class SplitInfo:
    shards: list[str]
    num_samples: int
    class_counts: list[int]
    skipped: list[str] = field(default_factory=list)
    # Per shard, in order; None in dataset.json files that predate them. `prepare index` records them for
    # local shards only (None entries for URLs): the cheap check compares local sizes at every start.
    shard_bytes: list[int | None] | None = None
    shard_sha256: list[str | None] | None = None
    image_exts: dict[str, int] | None = None  # samples per image member type; recorded by `prepare index`


@dataclass
class DatasetInfo:
    """The parsed dataset.json of a shard directory (``root``: a Path, or a ``URLRoot`` when read from a URL)."""

    root: Path | URLRoot
    name: str
    classnames: list[str]
    template: str
    splits: dict[str, SplitInfo]
    fingerprint: str
    command: str | None = None  # `ballad-pipe prepare …` less --out; None in older dataset.json files
    label_key: LabelKey = CLS
    indexed: bool = False  # written by `prepare index`: the shards are the user's, described where they are
    allow_commands: bool = False  # the user's consent that its pipe: entries run (--allow-commands)
    taxonomy: Taxonomy | None = None  # the classes at coarser levels (TAXONOMY_LEVELS); None: not known

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def remedy(self) -> str:
        """What to do about a missing or damaged shard: rewrite it (``prepare`` keeps the whole ones), or,
        for shards that `prepare index` described, restore it or describe the shards anew."""
        out = f"{self.command or 'ballad-pipe prepare …'} --out {shlex.quote(str(self.root))}"
        if self.indexed:
            return f"restore it, or describe the shards again with `{out} --overwrite`"
        return f"rebuild it with `{out}`"

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"{self.root / DATASET_FILE}: no split '{name}' (has: {', '.join(self.splits)})")
        return self.splits[name]

    def resolve(self, shard: str) -> str:
        """A shard entry of dataset.json as webdataset opens it: URLs and absolute paths as they are,
        relative paths against the dataset's directory (or its URL)."""
        return shard if has_scheme(shard) or os.path.isabs(shard) else str(self.root / shard)

    def urls(self, split: str) -> list[str]:
        """Shard URLs of ``split`` in order, as ``ShardURL`` (carrying the label key and the consent to run
        commands) unless plain strings say it all (``.cls``, no command); local files are checked to
        exist with their recorded size, and a ``pipe:`` entry is refused without ``allow_commands``."""
        info = self.split(split)
        if not info.shards:
            raise UserError(f"{self.root / DATASET_FILE}: split '{split}' is empty")
        if not self.allow_commands:
            command = next((e for e in info.shards if trust.kind(e) == "command"), None)
            if command is not None:
                trust.refuse_command(command, str(self.root / DATASET_FILE), isinstance(self.root, URLRoot))
        verify_shards(self, split, full=False)
        urls = [self.resolve(rel) for rel in info.shards]
        if self.label_key == CLS and not self.allow_commands:
            return urls
        return [ShardURL(u, self.label_key, self.allow_commands) for u in urls]


def load_dataset(root: str | os.PathLike, allow_commands: bool = False) -> DatasetInfo:
    """Read and check dataset.json. ``root`` is its directory or the file itself, on this machine or at a
    URL fsspec reads (``http(s)://`` read-only, ``s3://`` with s3fs, …); refuses unfinished or malformed
    descriptions, one line naming the file and the key (``_check_description``). ``allow_commands``
    (``--allow-commands``): the user's consent that its ``pipe:`` entries run, never honoured for a
    description read from a URL (store/trust.py)."""
    text, root, meta_path = _read_description(root)
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: malformed dataset description ({e.__class__.__name__}: {e})") from None
    _check_description(meta, meta_path)
    known = set(SplitInfo.__dataclass_fields__)  # a later version's fields are left alone
    splits = {name: SplitInfo(**{k: v for k, v in s.items() if k in known}) for name, s in meta["splits"].items()}
    info = DatasetInfo(root=root, name=meta["name"], classnames=list(meta["classnames"]),
                       template=meta["template"], splits=splits, fingerprint=meta["fingerprint"],
                       command=meta.get("command"), indexed=meta.get("indexed", False),
                       label_key=LabelKey.parse(meta.get("label_key", "cls"), f"{meta_path}: label_key"),
                       allow_commands=allow_commands and not isinstance(root, URLRoot),
                       taxonomy=meta.get("taxonomy"))
    for name, s in info.splits.items():
        for entry in s.shards:
            _check_entry(info, name, entry, meta_path)
    return info


# ---------------------------------------------------------------- what a description may hold
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # also a folder and a store group: no dots, no slashes
RESERVED_SPLITS = ("text",)  # the feature store keeps the class prompts in a group of that name
PREPARE_SOURCES = ("synthetic", "list", "cifar100-lt", "folder", "index")


def _check_description(meta, where) -> None:
    """Every field of a dataset.json, before any is used: a one-line UserError naming the file and the key
    (pipeline/validate.py, as for the other files the pipeline reads back).

    The file may come from anywhere (a downloaded folder, a URL), so nothing in it is taken on trust:
    types, ranges, lengths that must agree (one count per class adding up to the split's samples, one
    record per shard, one name per class at each taxonomy level), split names (they become folders and
    store groups), and the two fields that reach further than a value: ``template`` (a format string:
    one ``{}``, nothing that looks up attributes or keys) and ``command``, which error messages offer to
    the user to run (only a ``ballad-pipe prepare`` command line, exactly as shlex quotes it, so that
    pasting it runs nothing else).
    """
    from pipeline.text import template_problem

    meta = v.check(meta, {
        "name": v.Field("text", low=1),
        "classnames": v.Field("list", low=1, items=v.Field("text", low=1)),
        "template": v.Field("text", test=(lambda t: template_problem(t) is None,
                                          "a prompt template: one {} and no other {…} field")),
        "fingerprint": v.Field("text", low=1),
        "command": v.Field("text", null=True, optional=True, test=(_is_prepare_command, (
            "the `ballad-pipe prepare SOURCE …` command that wrote the dataset (less --out)"))),
        "indexed": v.Field("bool", optional=True),
        "label_key": v.Field("text", optional=True),
        "max_side": v.Field("int", optional=True, low=8, high=65500),
        "jpeg_quality": v.Field("int", optional=True, low=1, high=100),
        "taxonomy": TAXONOMY,
        "splits": v.Field("dict", items=v.Field("dict")),
    }, str(where))
    if not meta["splits"]:
        raise UserError(f"{where}: key 'splits' is empty; expected an object of split name → split")
    split = {
        "shards": v.Field("list", items=v.Field("text", low=1)),
        "class_counts": v.Field("list", length=len(meta["classnames"]), items=v.COUNT),
        "num_samples": v.Field("int", low=0, equals=v.Tie(lambda s: sum(s["class_counts"]), "their sum")),
        "skipped": v.Field("list", optional=True, items=v.TEXT),
        "shard_bytes": v.Field("list", optional=True, null=True, length=v.length_of("shards"),
                               items=v.Field("int", low=0, null=True)),
        "shard_sha256": v.Field("list", optional=True, null=True, length=v.length_of("shards"),
                                items=dataclasses.replace(v.SHA256, null=True)),
        "image_exts": v.Field("dict", optional=True, items=v.COUNT),
    }
    for name, s in meta["splits"].items():
        if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name) or name in RESERVED_SPLITS:
            raise UserError(f"{where}: split {v.show(name)} is not a split name (letters, digits, _ and -; not "
                            f"{', '.join(RESERVED_SPLITS)})")
        v.check(s, split, f"{where}: split '{name}'")
        if any(ext not in IMAGE_EXTS for ext in s.get("image_exts") or {}):
            raise UserError(f"{where}: split '{name}': key 'image_exts' names {sorted(s['image_exts'])}; expected "
                            f"image types ({', '.join(IMAGE_EXTS)})")


def _is_prepare_command(command: str) -> bool:
    """Whether ``command`` is a `ballad-pipe prepare SOURCE …` line (less --out) exactly as ``prepare``
    records it (shlex-quoted), so that a message offering it offers nothing else."""
    try:
        args = shlex.split(command)
    except ValueError:  # an unclosed quote
        return False
    return (shlex.join(args) == command and args[:2] == ["ballad-pipe", "prepare"] and len(args) > 2
            and args[2] in PREPARE_SOURCES and "--out" not in args)


def _check_entry(info: DatasetInfo, split: str, entry: str, where) -> None:
    """A shard entry may reach only what its description is about: a relative path stays inside the
    dataset's folder (or under its URL); absolute paths, URLs and commands appear only in descriptions
    that `prepare index` wrote (``indexed``); a description read from a URL names nothing on this machine
    and no command (store/trust.py)."""
    at = f"{where}: shard {entry!r} of split '{split}'"
    what = trust.kind(entry)
    from_url = isinstance(info.root, URLRoot)
    if what == "command" and from_url:
        trust.refuse_command(entry, str(where), True)
    relative = what == "file" and not has_scheme(entry) and not os.path.isabs(entry)
    if relative:
        if posixpath.normpath(entry).split("/")[0] == "..":
            raise UserError(f"{at} leaves the dataset's folder")
        return
    if not info.indexed:
        raise UserError(f"{at}: only `prepare index` describes shards outside the dataset's folder "
                        "(its dataset.json has \"indexed\": true)")
    if what == "file" and from_url:
        raise UserError(f"{at}: a description read from a URL cannot name files on this machine")


def _read_description(root: str | os.PathLike) -> tuple[bytes, Path | URLRoot, Path | URLRoot]:
    """(dataset.json's bytes, the dataset's root, dataset.json's path) for a local path or a URL."""
    where = os.fspath(root)
    root = local_path(where)
    if root is not None:
        if root.name == DATASET_FILE and root.is_file():
            root = root.parent
        meta_path = root / DATASET_FILE
        if not root.is_dir():
            raise UserError(f"{root}: no such dataset directory (run `ballad-pipe prepare … --out {root}`)")
        if not meta_path.is_file():
            hint = " (an unfinished prepare: re-run it)" if (root / MARKER_FILE).exists() else ""
            raise UserError(f"{meta_path}: missing; {root} is not a prepared dataset{hint}")
        return meta_path.read_bytes(), root, meta_path
    import fsspec

    base = where.rstrip("/")
    root = URLRoot(base[: -len(DATASET_FILE) - 1] if base.endswith("/" + DATASET_FILE) else base)
    meta_path = root / DATASET_FILE
    try:
        with fsspec.open(meta_path, "rb") as f:
            return f.read(), root, meta_path
    except Exception as e:  # fsspec's errors differ by protocol: unknown scheme, missing driver, refused connection
        # fsspec's http reports any failure as FileNotFoundError; the HTTP status in its cause tells them apart
        cause = e.__cause__ if isinstance(e, FileNotFoundError) else e
        if cause is None or getattr(cause, "status", None) == 404:
            raise UserError(f"{meta_path}: not found; {root} is not a prepared dataset") from None
        why = " ".join(str(cause).split())[:200]
        raise UserError(f"{meta_path}: cannot be read ({cause.__class__.__name__}: {why})") from None


def verify_shards(info: DatasetInfo, split: str, full: bool = True) -> None:
    """Raise a one-line UserError for the first problem ``shard_problems`` finds in ``split``."""
    problem = next(shard_problems(info, split, full), None)
    if problem is not None:
        raise UserError(problem)


def shard_problems(info: DatasetInfo, split: str, full: bool = True) -> Iterator[str]:
    """One line per damaged local shard of ``split``, naming it and what to do about it.

    Always: the shard exists with the byte size dataset.json records. ``full`` also reads every byte:
    the sha256, the tar to its end, labels within the classes, and (when every shard passed and all
    are local) the labels adding up to the split's class counts. Shards at URLs are checked as they
    stream instead.
    """
    s = info.split(split)
    counts = [0] * info.num_classes
    damaged = remote = False
    for i, rel in enumerate(s.shards):
        path = local_path(info.resolve(rel))
        if path is None:
            remote = True
            continue
        size = s.shard_bytes[i] if s.shard_bytes else None
        sha = s.shard_sha256[i] if s.shard_sha256 else None
        problem = _shard_problem(path, size, sha, counts if full else None, info.label_key)
        if problem is not None:
            damaged = True
            yield f"{path}: {problem}; {info.remedy}"
    if full and not damaged and not remote and counts != s.class_counts:
        k = next(k for k, (a, b) in enumerate(zip(counts, s.class_counts)) if a != b)
        yield (f"{info.root / DATASET_FILE}: split '{split}' lists {s.class_counts[k]} samples of class {k} "
               f"({info.classnames[k]!r}) but its shards hold {counts[k]}; {info.remedy}")


def _shard_problem(path: Path, size: int | None, sha256: str | None, counts: list[int] | None,
                   label_key: LabelKey) -> str | None:
    """What is wrong with one shard, or None; ``counts`` (full check) collects its labels."""
    from pipeline.runtime import sha256_file

    if not path.is_file():
        return f"shard listed in {DATASET_FILE} is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        what = "empty shard" if actual == 0 else "truncated or damaged shard"
        return f"{what} ({actual} bytes, {DATASET_FILE} records {size})"
    if counts is None:
        return None
    if sha256 is not None and sha256_file(path) != sha256:
        return f"damaged shard (its sha256 differs from {DATASET_FILE}'s)"
    try:
        for sample in read_shard(path, label_key):
            if not 0 <= sample.label < len(counts):
                return f"label {sample.label} of '{sample.key}' is outside the {len(counts)} classes"
            counts[sample.label] += 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        return f"unreadable shard ({e.__class__.__name__}: {' '.join(str(e).split())})"
    return None


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uname = ti.gname = "ballad"
    return ti, io.BytesIO(data)


def write_shard(path: Path, samples: Iterable[Sample]) -> int:
    """Write one shard atomically (temp name, then rename); returns the number of samples."""
    from pipeline.runtime import atomic_path

    n = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                for name, data in ((f"{s.key}.{s.ext}", s.image), (f"{s.key}.cls", str(s.label).encode())):
                    tar.addfile(*_tar_member(name, data))
                n += 1
    return n


def read_shard(path: str | os.PathLike, label_key: LabelKey = CLS) -> Iterator[Sample]:
    """Samples of one local shard in stored order (tests and tools; training streams with webdataset).
    Members group into samples as webdataset groups them: key up to the first dot of the file name."""
    with tarfile.open(path, "r") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if not member.isreg():  # directory entries in tars written by other tools
                continue
            key, ext = split_member(member.name)
            parts = pending.setdefault(key, {})
            parts[ext] = tar.extractfile(member).read()
            if label_key.member in parts and any(e in parts for e in IMAGE_EXTS):
                img_ext = next(e for e in IMAGE_EXTS if e in parts)
                yield Sample(key, img_ext, parts[img_ext], label_key.decode(parts[label_key.member]))
                del pending[key]


def split_member(name: str) -> tuple[str, str]:
    """(sample key, lowercased extension) of a tar member, as webdataset splits it: at the first dot of
    the file name (``a/b.seg.png`` → ``a/b``, ``seg.png``)."""
    _, dot, ext = name.rpartition("/")[2].partition(".")
    return (name[: len(name) - len(ext) - 1] if dot else name), ext.lower()


def decode_label(value: bytes) -> int:
    return int(value.decode("ascii").strip())
