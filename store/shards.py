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
"""
from __future__ import annotations

import io
import json
import os
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError

IMAGE_EXTS = ("jpg", "png", "webp")
SHARD_PATTERN = "shard-{:06d}.tar"
DATASET_FILE = "dataset.json"
MARKER_FILE = ".prepare.json"  # written first: says which dataset an unfinished directory holds


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str  # one of IMAGE_EXTS
    image: bytes
    label: int


@dataclass
class SplitInfo:
    shards: list[str]
    num_samples: int
    class_counts: list[int]
    skipped: list[str] = field(default_factory=list)
    shard_bytes: list[int] | None = None  # per shard, in order; None in dataset.json files that predate them
    shard_sha256: list[str] | None = None


@dataclass
class DatasetInfo:
    """The parsed dataset.json of a shard directory."""

    root: Path
    name: str
    classnames: list[str]
    template: str
    splits: dict[str, SplitInfo]
    fingerprint: str
    command: str | None = None  # `ballad-pipe prepare …` less --out; None in older dataset.json files

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def rebuild(self) -> str:
        """The command that rewrites missing or damaged shards here (``prepare`` keeps the whole ones)."""
        return f"`{self.command or 'ballad-pipe prepare …'} --out {shlex.quote(str(self.root))}`"

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"{self.root / DATASET_FILE}: no split '{name}' (has: {', '.join(self.splits)})")
        return self.splits[name]

    def urls(self, split: str) -> list[str]:
        """Shard paths of ``split`` in order; local files are checked to exist with their recorded size."""
        info = self.split(split)
        if not info.shards:
            raise UserError(f"{self.root / DATASET_FILE}: split '{split}' is empty")
        verify_shards(self, split, full=False)
        return [rel if "://" in rel else str(self.root / rel) for rel in info.shards]


def load_dataset(root: str | os.PathLike) -> DatasetInfo:
    """Read and check ``root/dataset.json``; refuses unfinished or malformed directories."""
    root_str = str(root)
    root = Path(root)
    meta_path = root / DATASET_FILE
    if "://" not in root_str and not root.is_dir():
        raise UserError(f"{root}: no such dataset directory (run `ballad-pipe prepare … --out {root}`)")
    if not meta_path.is_file():
        hint = " (an unfinished prepare: re-run it)" if (root / MARKER_FILE).exists() else ""
        raise UserError(f"{meta_path}: missing; {root} is not a prepared dataset{hint}")
    try:
        meta = json.loads(meta_path.read_text())
        splits = {name: SplitInfo(**s) for name, s in meta["splits"].items()}
        info = DatasetInfo(root=root, name=meta["name"], classnames=list(meta["classnames"]),
                           template=meta["template"], splits=splits, fingerprint=meta["fingerprint"],
                           command=meta.get("command"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: malformed dataset description ({e.__class__.__name__}: {e})") from None
    for name, s in info.splits.items():
        if len(s.class_counts) != info.num_classes or sum(s.class_counts) != s.num_samples:
            raise UserError(f"{meta_path}: split '{name}' counts are inconsistent with its {info.num_classes} classes")
        for record in (s.shard_bytes, s.shard_sha256):
            if record is not None and len(record) != len(s.shards):
                raise UserError(f"{meta_path}: split '{name}' records {len(record)} shard sizes or hashes "
                                f"for {len(s.shards)} shards")
    return info


def verify_shards(info: DatasetInfo, split: str, full: bool = True) -> None:
    """Raise a one-line UserError for the first problem ``shard_problems`` finds in ``split``."""
    problem = next(shard_problems(info, split, full), None)
    if problem is not None:
        raise UserError(problem)


def shard_problems(info: DatasetInfo, split: str, full: bool = True) -> Iterator[str]:
    """One line per damaged local shard of ``split``, naming it and the command that rebuilds it.

    Always: the shard exists with the byte size dataset.json records. ``full`` also reads every byte:
    the sha256, the tar to its end, labels within the classes, and (when every shard passed) the
    labels adding up to the split's class counts. Remote shards are checked as they stream instead.
    """
    s = info.split(split)
    fix = f"rebuild it with {info.rebuild}"
    counts = [0] * info.num_classes
    damaged = False
    for i, rel in enumerate(s.shards):
        if "://" in rel:
            continue
        path = info.root / rel
        size = s.shard_bytes[i] if s.shard_bytes else None
        sha = s.shard_sha256[i] if s.shard_sha256 else None
        problem = _shard_problem(path, size, sha, counts if full else None)
        if problem is not None:
            damaged = True
            yield f"{path}: {problem}; {fix}"
    if full and not damaged and counts != s.class_counts and not any("://" in rel for rel in s.shards):
        k = next(k for k, (a, b) in enumerate(zip(counts, s.class_counts)) if a != b)
        yield (f"{info.root / DATASET_FILE}: split '{split}' lists {s.class_counts[k]} samples of class {k} "
               f"({info.classnames[k]!r}) but its shards hold {counts[k]}; {fix}")


def _shard_problem(path: Path, size: int | None, sha256: str | None, counts: list[int] | None) -> str | None:
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
        for sample in read_shard(path):
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


def read_shard(path: str | os.PathLike) -> Iterator[Sample]:
    """Samples of one local shard in stored order (tests and tools; training streams with webdataset)."""
    with tarfile.open(path, "r") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            key = member.name[: len(member.name) - len(ext) - 1]
            parts = pending.setdefault(key, {})
            parts[ext] = tar.extractfile(member).read()
            if "cls" in parts and any(e in parts for e in IMAGE_EXTS):
                img_ext = next(e for e in IMAGE_EXTS if e in parts)
                yield Sample(key, img_ext, parts[img_ext], int(parts["cls"]))
                del pending[key]


def decode_label(value: bytes) -> int:
    return int(value.decode("ascii").strip())
