"""Webdataset shards: the on-disk form of every dataset the pipeline trains and evaluates on.

Layout::

    DIR/dataset.json                  name, class names, prompt template, per split: shards, counts
    DIR/<split>/shard-000000.tar      samples <key>.<jpg|png|webp> (image bytes) + <key>.cls (label)

Shards are written under a temporary name and renamed when complete, and dataset.json is written
last, so a directory without dataset.json is an unfinished ``prepare`` and a shard that exists is
whole. Tar headers carry fixed metadata (mtime 0, uid 0) so the same input gives byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
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


@dataclass
class DatasetInfo:
    """The parsed dataset.json of a shard directory."""

    root: Path
    name: str
    classnames: list[str]
    template: str
    splits: dict[str, SplitInfo]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"{self.root / DATASET_FILE}: no split '{name}' (has: {', '.join(self.splits)})")
        return self.splits[name]

    def urls(self, split: str) -> list[str]:
        """Shard paths of ``split`` in order; local files are checked to exist."""
        info = self.split(split)
        if not info.shards:
            raise UserError(f"{self.root / DATASET_FILE}: split '{split}' is empty")
        urls = []
        for rel in info.shards:
            if "://" in rel:
                urls.append(rel)
                continue
            path = self.root / rel
            if not path.is_file():
                raise UserError(f"{path}: shard listed in {DATASET_FILE} is missing; re-run `ballad-pipe prepare`")
            urls.append(str(path))
        return urls


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
                           template=meta["template"], splits=splits, fingerprint=meta["fingerprint"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: malformed dataset description ({e.__class__.__name__}: {e})") from None
    for name, s in info.splits.items():
        if len(s.class_counts) != info.num_classes or sum(s.class_counts) != s.num_samples:
            raise UserError(f"{meta_path}: split '{name}' counts are inconsistent with its {info.num_classes} classes")
    return info


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
