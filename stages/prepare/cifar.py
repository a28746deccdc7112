"""`prepare cifar100-lt`: CIFAR-100-LT cut from the official python archive (LDAM-DRW's recipe)."""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.errors import UserError
from pipeline.shared_options import seed
from stages.prepare import common
from stages.prepare.registry import Source
from stages.prepare.writer import Shrink, Spec, make_fingerprint, png, shuffled, write_dataset

TRAIN_PER_CLASS = 500  # the archive's train images per class: the largest class of every ratio


@dataclass(kw_only=True)
class CifarConfig:
    """CIFAR-100-LT from the official python archive."""

    SOURCE: ClassVar[str] = "cifar100-lt"

    archive: str = common.input_path("--archive", "The official cifar-100-python.tar.gz.")
    out: str = common.out()
    imbalance: float = common.imbalance(f"Ratio of the largest to the smallest class, 1 to {TRAIN_PER_CLASS}.")
    seed: int = seed("Seed of each class's train images kept and of the train order.")
    shard_size: int = common.shard_size()
    max_side: int | None = common.max_side()
    jpeg_quality: int | None = common.jpeg_quality()
    overwrite: bool = common.overwrite()

    def check(self) -> None:
        """Every option, before the archive is read: a one-line UserError naming the first bad one."""
        common.check_imbalance(self.imbalance, TRAIN_PER_CLASS, f"the largest class has {TRAIN_PER_CLASS} images; "
                                                                "a larger ratio leaves the smallest none")
        common.check_common(self)


def cifar_lt_counts(imbalance: float, num_classes: int = 100, max_count: int = TRAIN_PER_CLASS) -> list[int]:
    """n_i = ⌊500 · ρ^(−i/99)⌋, as in LDAM-DRW and BALLAD (10,847 images at ρ = 100)."""
    return [int(max_count * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def prepare_cifar100_lt(cfg: CifarConfig) -> Path:
    """CIFAR-100-LT: per class, a seeded shuffle of its train images then the first n_i (LDAM's recipe)."""
    cfg.check()
    archive = Path(cfg.archive)
    names, train, test = _read_archive(archive)
    rng = np.random.RandomState(cfg.seed)  # same stream as LDAM's np.random.seed + np.random.shuffle
    keep = []
    for cls, n in enumerate(cifar_lt_counts(cfg.imbalance, len(names))):
        idx = np.where(train[1] == cls)[0]
        rng.shuffle(idx)
        keep.extend(idx[:n].tolist())

    def specs(split_arrays, indices, split):
        data, labels = split_arrays
        return [Spec(f"{split}_{i:05d}", int(labels[i]), (lambda a=data[i]: ("png", png(a)))) for i in indices]

    splits = {"train": shuffled(specs(train, keep, "train"), cfg.seed),
              "test": specs(test, range(len(test[1])), "test")}
    fp = make_fingerprint("cifar100-lt", cfg.imbalance, cfg.seed, cfg.shard_size,
                          hashlib.sha256(archive.read_bytes()).hexdigest())
    return write_dataset(cfg.out, f"cifar100-lt-r{cfg.imbalance:g}", names, splits, fp, shard_size=cfg.shard_size,
                         overwrite=cfg.overwrite, command=common.rebuild_command(cfg),
                         shrink=Shrink.from_options(cfg.max_side, cfg.jpeg_quality))


def _read_archive(archive: Path) -> tuple[list[str], tuple, tuple]:
    """(class names, train (images, labels), test (images, labels)) of the official archive, checked."""
    if not archive.is_file():
        raise UserError(f"--archive {archive}: file not found")
    try:
        with tarfile.open(archive, "r:*") as tar:
            meta = _read_pickle(tar, "cifar-100-python/meta", archive, (b"fine_label_names",))
            raw = {split: _read_pickle(tar, f"cifar-100-python/{split}", archive, (b"data", b"fine_labels"))
                   for split in ("train", "test")}
    except (tarfile.TarError, EOFError, OSError) as e:  # OSError: a gzip stream cut short or garbled
        raise UserError(f"{archive}: not a readable tar archive ({e.__class__.__name__}: {e})") from None
    names = meta[b"fine_label_names"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, bytes) and n.strip() for n in names):
        raise UserError(f"{archive}: 'cifar-100-python/meta' has no list of class names (at least 2)")
    names = [n.decode("utf-8", "replace").replace("_", " ") for n in names]
    train, test = (_cifar_split(raw[split], f"cifar-100-python/{split}", archive, len(names))
                   for split in ("train", "test"))
    return names, train, test


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR archive's pickles hold dicts, lists, bytes and numpy arrays; an unpickler that builds
    nothing else, so that an archive someone else made cannot run code when opened (plain pickle calls
    any importable function the file names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(tar: tarfile.TarFile, member: str, archive: Path, keys: tuple[bytes, ...]) -> dict:
    """One pickled dict of the archive, with ``keys``; a one-line UserError for anything else."""
    try:
        obj = _ArraysOnly(tar.extractfile(member), encoding="bytes").load()
    except KeyError:
        raise UserError(f"{archive}: no '{member}' inside; expected the official cifar-100-python.tar.gz") from None
    except Exception as e:  # any unpickling failure (refused class, truncated or garbled data) means the same
        raise UserError(f"{archive}: '{member}' is not a CIFAR pickle ({e.__class__.__name__}: {e})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{archive}: '{member}' has no {missing[0].decode()!r}; expected the official "
                        "cifar-100-python.tar.gz")
    return obj


def _cifar_split(d: dict, member: str, archive: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N]) of a train or test dict, checked against each other."""
    data, labels = np.asarray(d[b"data"]), np.asarray(d[b"fine_labels"])
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),)
            or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and not 0 <= labels.min() <= labels.max()
                                                               < num_classes)):
        raise UserError(f"{archive}: '{member}' does not hold N × 3072 uint8 images with N labels below "
                        f"{num_classes}; expected the official cifar-100-python.tar.gz")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


SOURCE = Source(CifarConfig, prepare_cifar100_lt)
