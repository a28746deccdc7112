"""`prepare list`: ImageNet-LT / Places-LT / iNaturalist 2018 style split lists → shards."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.errors import UserError
from pipeline.shared_options import seed
from pipeline.options import option
from stages.prepare import common
from stages.prepare.classes import load_classnames
from stages.prepare.files import image_root, write_files
from stages.prepare.registry import Source
from stages.prepare.writer import make_fingerprint
from store.shards import Taxonomy


@dataclass(kw_only=True)
class ListConfig:
    """ImageNet-LT / Places-LT / iNaturalist 2018 style split lists."""

    SOURCE: ClassVar[str] = "list"

    root: str = common.input_path("--root", "Folder the list paths are relative to.")
    train_list: str = common.input_path("--train-list", "`relative/path.jpg <label>` per line.")
    test_list: str = common.input_path("--test-list", "The test split's list, as --train-list.")
    val_list: str | None = common.input_path("--val-list", "The val split's list, as --train-list.", None)
    classes: str | None = option(None, "--classes", "Class names file (one per line, index = line; or .json: a list of "
                                                    "names, or of objects with id and name, as iNaturalist's "
                                                    "categories.json) or `imagenet`; default: the train list's folder "
                                                    "names.", kind=str, record=common.classes_file)
    name: str | None = common.name()
    seed: int = seed("Seed of the train split's shuffled order.")
    out: str = common.out()
    shard_size: int = common.shard_size()
    skip_bad: bool = common.skip_bad()
    max_pixels: int = common.max_pixels()
    max_side: int | None = common.max_side()
    jpeg_quality: int | None = common.jpeg_quality()
    overwrite: bool = common.overwrite()

    def check(self) -> None:
        """Every option, before anything is read or written: a one-line UserError naming the first bad one."""
        common.check_common(self)


def prepare_lists(cfg: ListConfig) -> Path:
    """Split lists → shards: every listed image must exist under --root; labels index --classes (or
    the train list's folder names)."""
    cfg.check()
    root = image_root(cfg.root, "image root directory")
    lists = {"train": Path(cfg.train_list), "test": Path(cfg.test_list)}
    if cfg.val_list:
        lists["val"] = Path(cfg.val_list)
    entries = {split: parse_list(p) for split, p in lists.items()}
    names, taxonomy = _classnames(cfg.classes, lists, entries)
    for split, es in entries.items():
        for rel, _ in es:
            if not (root / rel).is_file():
                raise UserError(f"{lists[split]}: image '{rel}' not found under {root}")
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in lists.values()]
    fp = make_fingerprint("lists", str(root.resolve()), digests, names, cfg.seed, cfg.shard_size)
    name = cfg.name or Path(cfg.train_list).stem.split("_")[0]
    return write_files(cfg, root, entries, names, name, fp, common.rebuild_command(cfg), taxonomy)


def _classnames(classes: str | None, lists: dict[str, Path], entries) -> tuple[list[str], Taxonomy | None]:
    """The names of --classes, which must cover every label the lists use; else the train list's folders."""
    max_label = max(lab for es in entries.values() for _, lab in es)
    if not classes:
        return classnames_from_folders(entries["train"], max_label + 1, lists["train"]), None
    names, taxonomy = load_classnames(classes)
    if len(names) <= max_label:
        worst = next(p for s, p in lists.items() for _, lab in entries[s] if lab == max_label)
        raise UserError(f"--classes {classes}: {len(names)} names but {worst} uses label {max_label}")
    return names, taxonomy


def parse_list(path: Path) -> list[tuple[str, int]]:
    """Lines ``relative/path.jpg <label>``; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: list file not found")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected '<relative/path> <label>', got {line!r}")
        rel, label = parts
        try:
            label = int(label)
        except ValueError:
            raise UserError(f"{path}:{lineno}: label {label!r} is not an integer") from None
        if label < 0:
            raise UserError(f"{path}:{lineno}: label {label} is negative")
        entries.append((rel, label))
    if not entries:
        raise UserError(f"{path}: list is empty")
    return entries


def classnames_from_folders(entries, num_classes: int, list_path: Path) -> list[str]:
    """`train/airfield/00004851.jpg 0` → class 0 is "airfield" (underscores → spaces)."""
    names: dict[int, str] = {}
    for rel, label in entries:
        parent = Path(rel).parent.name
        if not parent:
            raise UserError(f"{list_path}: '{rel}' has no folder to name class {label}; pass --classes FILE")
        names.setdefault(label, parent.replace("_", " "))
    missing = [k for k in range(num_classes) if k not in names]
    if missing:
        raise UserError(f"{list_path}: no image names class {missing[0]}; pass --classes FILE")
    return [names[k] for k in range(num_classes)]


SOURCE = Source(ListConfig, prepare_lists)
