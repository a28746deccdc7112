"""`prepare folder`: image folders in torchvision's ImageFolder layout → shards, through the same
(path, label) lists as `prepare list` (files.py)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.errors import UserError
from pipeline.options import option
from pipeline.shared_options import seed
from stages.prepare import common
from stages.prepare.classes import load_classnames
from stages.prepare.files import image_root, write_files
from stages.prepare.registry import Source
from stages.prepare.writer import make_fingerprint

# torchvision.datasets.folder.IMG_EXTENSIONS (not imported: prepare runs without torch)
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_TEST_FRACTION = 0.2  # of each class, when ROOT has no test/ folder
SPLITS = ("train", "val", "test")


@dataclass(kw_only=True)
class FolderConfig:
    """Image folders in torchvision's ImageFolder layout."""

    SOURCE: ClassVar[str] = "folder"

    root: str = common.input_path("--root", "ROOT/<class>/*.jpg, or ROOT/train/<class>/… + ROOT/test/<class>/… "
                                            "(+ ROOT/val/<class>/…).")
    val_fraction: float | None = option(None, "--val-fraction", "Share of each class drawn for val when ROOT has no "
                                                                "val/ folder [default: 0].", kind=float)
    test_fraction: float | None = option(None, "--test-fraction", "Share of each class drawn for test when ROOT has no "
                                                                  f"test/ folder [default: {DEFAULT_TEST_FRACTION}].",
                                         kind=float)
    seed: int = seed("Seed of the per-class split and the train order.")
    classes: str | None = option(None, "--classes", "Class names file (one per line, in sorted-folder order; or .json, "
                                                    "as for `prepare list`) or `imagenet`; default: the folder names, "
                                                    "underscores → spaces.", kind=str, record=common.classes_file)
    name: str | None = common.name()
    out: str = common.out()
    shard_size: int = common.shard_size()
    skip_bad: bool = common.skip_bad()
    max_pixels: int = common.max_pixels()
    max_side: int | None = common.max_side()
    jpeg_quality: int | None = common.jpeg_quality()
    overwrite: bool = common.overwrite()

    def check(self) -> None:
        """Every option, before anything is read or written: a one-line UserError naming the first bad one."""
        for flag, value in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not (math.isfinite(value) and 0 <= value < 1)):
                raise UserError(f"{flag} {value}: must be a fraction from 0 to below 1")
        if (self.val_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise UserError(f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction}: must add up "
                            "to below 1 (train keeps the rest)")
        common.check_common(self)


def prepare_folder(cfg: FolderConfig) -> Path:
    """torchvision's ImageFolder layout → shards, through the same (path, label) lists as `list`.

    ``ROOT/<class>/…`` (images found recursively, as ImageFolder does; hidden files skipped) is split
    per class: a seeded shuffle of the class's files, the first round(f·n) to test, the next to val,
    the rest to train, so every class keeps its proportions and adding a class moves no other class's
    images. ``ROOT/train/<class>/…`` + ``ROOT/test/<class>/…`` (+ ``ROOT/val/…``) keeps the split it
    has; --val-fraction then draws val from train/ when there is no val/ folder. Labels are the sorted
    class folders of the train images; names are the folder names (underscores → spaces) or
    ``classes`` (a file in that order, or `imagenet` for the 1,000 ImageNet folders, sorted by WordNet id).
    """
    cfg.check()
    root = image_root(cfg.root, "image folder")
    source, given = _layout(root, cfg)
    folders = _class_folders(source)
    if cfg.classes:
        names, taxonomy = load_classnames(cfg.classes)
        if len(names) != len(folders):
            raise UserError(f"--classes {cfg.classes}: {len(names)} names for the {len(folders)} class folders of "
                            f"{source}")
    else:
        names, taxonomy = [f.replace("_", " ") for f in folders], None
    entries = _entries(root, source, given, folders, cfg)
    fp = make_fingerprint("folder", str(root.resolve()), entries, names, cfg.seed, cfg.shard_size)
    return write_files(cfg, root, entries, names, cfg.name or root.resolve().name, fp, common.rebuild_command(cfg),
                       taxonomy)


def _layout(root: Path, cfg: FolderConfig) -> tuple[Path, dict[str, Path]]:
    """(the folder whose class folders are drawn from, {split: the folder that is that split})."""
    given = {split: root / split for split in SPLITS if (root / split).is_dir()}
    if "train" in given and "test" in given:
        source = given.pop("train")
        if cfg.test_fraction:
            raise UserError(f"--test-fraction {cfg.test_fraction}: {root} has a test/ folder, which is the test split")
    elif "train" in given and "val" in given:  # a split layout without test/: the flat reading would make "train" a class
        raise UserError(f"--root {root}: has train/ and val/ but no test/ folder; add test/<class>/ folders, or put "
                        "the class folders directly under the root to split them by --test-fraction")
    else:
        source, given = root, {}
    if cfg.val_fraction and "val" in given:
        raise UserError(f"--val-fraction {cfg.val_fraction}: {root} has a val/ folder, which is the val split")
    return source, given


def _entries(root: Path, source: Path, given: dict[str, Path], folders: list[str],
             cfg: FolderConfig) -> dict[str, list[tuple[str, int]]]:
    """{split: [(path relative to root, label)]}: the drawn splits of ``source``, then the given ones."""
    fractions = {"test": DEFAULT_TEST_FRACTION if cfg.test_fraction is None else cfg.test_fraction,
                 "val": cfg.val_fraction or 0}
    fractions = {split: f for split, f in fractions.items() if split not in given and f > 0}
    entries: dict[str, list[tuple[str, int]]] = {"train": [], **{split: [] for split in (*given, *fractions)}}
    for label, folder in enumerate(folders):
        drawn = _stratified(_images(source / folder, root), fractions, cfg.seed, label, source / folder)
        for split, rels in drawn.items():
            entries[split] += [(rel, label) for rel in rels]
    for split, path in given.items():
        extra = sorted(set(_class_folders(path)) - set(folders))
        if extra:
            raise UserError(f"{path / extra[0]}: class folder not in {source}")
        for label, folder in enumerate(folders):
            if (path / folder).is_dir():
                entries[split] += [(rel, label) for rel in _images(path / folder, root)]
    return {split: entries[split] for split in SPLITS if entries.get(split)}


def _class_folders(path: Path) -> list[str]:
    folders = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise UserError(f"{path}: no class folders (expected ROOT/<class>/*.jpg, or ROOT/train/<class>/… and "
                        "ROOT/test/<class>/…)")
    return folders


def _images(folder: Path, root: Path) -> list[str]:
    """Image files under ``folder`` (recursively, following links as ImageFolder does), as sorted paths
    relative to ``root``; an empty class folder is refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in FOLDER_SUFFIXES]
    if not found:
        raise UserError(f"{folder}: class folder holds no images ({', '.join(FOLDER_SUFFIXES)})")
    return sorted(Path(f).relative_to(root).as_posix() for f in found)


def _stratified(files: list[str], fractions: dict[str, float], seed: int, label: int, folder: Path) -> dict[str, list[str]]:
    """One class's files → {split: sorted files}: a shuffle seeded by (seed, label), then round(f·n) files
    per drawn split (test first, then val) and the rest to train, which must keep at least one."""
    order = np.random.default_rng([seed, label]).permutation(len(files))
    drawn, at = {}, 0
    for split, f in fractions.items():
        n = math.floor(f * len(files) + 0.5)
        drawn[split] = sorted(files[i] for i in order[at:at + n])
        at += n
    if at >= len(files):
        given = " ".join(f"--{split}-fraction {f}" for split, f in fractions.items())
        raise UserError(f"{folder}: its {len(files)} image(s) leave none for train with {given}; "
                        "lower the fraction or add images")
    return {"train": sorted(files[i] for i in order[at:]), **drawn}


SOURCE = Source(FolderConfig, prepare_folder)
