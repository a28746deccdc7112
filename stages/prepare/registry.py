"""The data sources of `prepare`: each module of this package that defines ``SOURCE`` is one.

A source is one module holding its config dataclass (every option of its `prepare SOURCE` subcommand:
flag, default, choices, help; ``SOURCE`` names the subcommand; the docstring is its help) and its
function, which takes that config. ``sources()`` finds them by importing the package's modules, so
adding a source is adding its module (and its test): the command line (cli/prepare.py) builds one
subcommand per entry. Importing a source module imports no torch, so `prepare --help` stays fast.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import stages.prepare


@dataclass(frozen=True)
class Source:
    """One data source: ``config``, its options; ``run(config)`` writes the dataset and returns --out;
    ``wrote``: the file the command reports writing under --out (None: the directory)."""

    config: type
    run: Callable[[object], object]
    wrote: str | None = None

    @property
    def name(self) -> str:
        return self.config.SOURCE

    @property
    def help(self) -> str:
        return (self.config.__doc__ or "").strip()


@functools.cache
def sources() -> dict[str, Source]:
    """Every source by subcommand name, in name order."""
    found = {}
    for info in pkgutil.iter_modules(stages.prepare.__path__):
        source = getattr(importlib.import_module(f"stages.prepare.{info.name}"), "SOURCE", None)
        if isinstance(source, Source):
            found[source.name] = source
    return dict(sorted(found.items()))
