"""What the sources of `prepare` share: their common options, the checks of those options, and the
rebuild command that dataset.json records.

Each function below returns a fresh config field (pipeline/options.py ``option``), so a flag's default
and help exist once however many sources hold it. A field's ``record`` metadata says how the rebuild
command gives it: ``False`` leaves it out (where to write, whether to overwrite, how many threads read:
none of them changes the dataset), a function turns the value into the recorded one (an input path made
absolute, so the command works from any directory). Torch-free, as every config.
"""
from __future__ import annotations

import math
import numbers
import os
import shlex
from dataclasses import MISSING, fields
from pathlib import Path

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP, SKIP_BAD_HELP
from pipeline.options import INT_MAX, check_ints, option
from pipeline.shared_options import SEED_RULE
from store.shards import has_scheme
from stages.prepare.writer import JPEG_QUALITY, Shrink


def absolute(_config, path) -> str | None:
    """An input path as the recorded command names it: absolute, so it works from any directory."""
    return None if path is None else str(Path(path).absolute())


def classes_file(config, classes) -> str | None:
    """``--classes`` as recorded: ``imagenet`` as it is, a file absolute."""
    return classes if classes in (None, "imagenet") else absolute(config, classes)


def _quality(config, quality) -> int | None:
    """The quality --max-side stores at, the default included, so a changed default rebuilds alike."""
    return JPEG_QUALITY if quality is None and config.max_side is not None else quality


def out():
    return option(MISSING, "--out", "Output directory.", path="dir", record=False)


def overwrite():
    return option(False, "--overwrite", "Replace a different dataset already in --out.", record=False)


def shard_size():
    return option(1000, "--shard-size", "Samples per shard.")


def name():
    # as_typed: ``--name ''`` is a name (refused), not "no value"
    return option(None, "--name", "Dataset name (default: from the input's name).", kind=str, as_typed=True)


def imbalance(help: str | None = None):
    return option(100.0, "--imbalance", help or "Ratio of the largest to the smallest class.")


def skip_bad():
    return option(False, "--skip-bad", SKIP_BAD_HELP)


def max_pixels():
    return option(MAX_PIXELS, "--max-pixels", MAX_PIXELS_HELP)


def max_side():
    return option(None, "--max-side", "Store images whose longer side exceeds this many pixels at that size (aspect "
                                      "kept) as JPEG, for faster decoding; smaller ones keep their bytes [default: "
                                      "every image keeps its bytes].", kind=int)


def jpeg_quality():
    return option(None, "--jpeg-quality", f"JPEG quality, 1-100, of the images --max-side shrinks [default: "
                                          f"{JPEG_QUALITY}].", kind=int, record=_quality)


def input_path(flag: str, help: str, default=MISSING):
    """An input file or folder (required unless ``default``), recorded absolute."""
    return option(default, flag, help, path="any", record=absolute)


def check_common(config) -> None:
    """The options the sources share, those ``config`` has, in one order: --seed, --shard-size,
    --max-pixels, --name, --max-side and --jpeg-quality, --out."""
    have = {f.name for f in fields(config)}
    rules = (SEED_RULE, ("shard_size", 1, INT_MAX, None), ("max_pixels", 1, INT_MAX, None))
    check_ints(config, [rule for rule in rules if rule[0] in have])
    if "name" in have and config.name is not None and (not config.name.strip() or "\n" in config.name):
        raise UserError(f"--name {config.name!r}: must be a non-empty single line")
    if "max_side" in have:
        Shrink.from_options(config.max_side, config.jpeg_quality)
    if has_scheme(os.fspath(config.out)):  # prepare writes a local directory (docs/data.md)
        raise UserError(f"--out {config.out}: must be a local directory (serve or upload it afterwards)")


def check_imbalance(value, highest: float = math.inf, why: str = "") -> None:
    """ρ = n_max / n_min: finite, at least 1, and at most ``highest`` where a larger one would empty a class."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 1 <= value <= highest):
        span = "at least 1" if highest == math.inf else f"from 1 to {highest} ({why})"
        raise UserError(f"--imbalance {value}: must be a finite ratio n_max / n_min {span}")


def rebuild_command(config) -> str:
    """``ballad-pipe prepare SOURCE --option value …`` of ``config``'s recorded fields, in field order:
    dataset.json records it so that an error about a missing or damaged shard can name the command that
    rebuilds it (store.shards). None and False are left out, True gives the bare flag, a list repeats it."""
    args = ["ballad-pipe", "prepare", config.SOURCE]
    for f in fields(config):
        record = f.metadata.get("record", lambda _config, value: value)
        if record is False:
            continue
        value = record(config, getattr(config, f.name))
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v is not False:
                args += [f.metadata["flag"]] + ([] if v is True else [str(v)])
    return shlex.join(args)
