"""Settings that are also command-line options: one definition of each, shared by configs and the CLI.

Torch-free and click-free, so the stages' config dataclasses (stages/adapter_config.py,
stages/phase_a_config.py) import it and ``ballad-pipe --help`` stays fast. cli/options.py
turns the fields made here into click options.

- ``option``: a dataclass field whose metadata names its flag, help and choices (and, where the
  default does not tell, the value's type), so a config is the one source of its options.
- ``NONE_WORDS`` / ``none_to_null``: what spells "no value" on the command line. DVC writes a null
  param as ``None``; users write ``none``. The CLI converts them once (``OrNone``), so stages receive
  Python's None; a stage whose Python callers pass ``"none"`` calls ``none_to_null`` on entry.
- ``DEVICE`` / ``DEVICE_HELP``: the one default and help of ``--device`` on every command.
- ``refuse`` / ``check_ints`` / ``check_finite`` / ``check_choices``: a config's checks, each failure one
  line that names the option by its flag and value (``--lr nan: must be …``); ``check_int`` and
  ``check_number`` check one value named by its flag, for the stages whose options have no config.
  Every integer option has a range with an upper end: ``INT_MAX`` where nothing smaller applies.
  A NaN fails every comparison, so a float's range alone would let it through: the number checks
  refuse NaN and ±inf first. They are the stages' checks, run before any work, not click types: the
  stages' Python callers get them too, and the message says the range (``--lr nan: must be above 0
  and finite``) where a type could only say "not finite". tests/test_cli_options.py holds every
  command to it, feeding every numeric option NaN, ±inf and out-of-range integers.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, field
from typing import Callable, Iterable, NoReturn

from pipeline.errors import UserError

NONE_WORDS = ("none", "None", "")
DEVICE = "auto"
# The largest integer option: counts, sizes and seeds become 64-bit integers (numpy, torch, zarr), so a
# larger one is a typo (10^30 epochs), refused in one line rather than overflowing later.
INT_MAX = 2**63 - 1
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: CUDA when present, else the CPU."


def none_to_null(value):
    """None when ``value`` spells no value (``none``, ``None`` or empty), else ``value`` unchanged."""
    return None if isinstance(value, str) and value in NONE_WORDS else value


def option(default, flag: str, help: str, choices: tuple[str, ...] | None = None, *,
           factory: Callable[[], object] | None = None, **cli):
    """A dataclass field that is also the command-line option ``flag``.

    ``default`` is the field's default (``dataclasses.MISSING``: a required option); ``factory``, when
    given, computes it instead (the CLI calls it when the command runs). ``cli`` holds what the default
    does not tell the CLI: ``kind`` (int, float or str) for a default of None or from a factory,
    ``path`` ("any", "dir" or "file") for a path, ``show_default`` (a text for a computed default),
    ``none=True`` for an option that may be none although its default is a value (or that is required).
    """
    metadata = {"flag": flag, "help": help, "choices": choices, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _flag(config, name: str) -> str:
    return config.__dataclass_fields__[name].metadata["flag"]


def refuse(config, name: str, why: str) -> NoReturn:
    """A one-line UserError naming field ``name`` of the config dataclass ``config`` by its flag and value."""
    raise UserError(f"{_flag(config, name)} {getattr(config, name)}: {why}")


def check_int(flag: str, value, least: int, most: int = INT_MAX, why: str | None = None) -> None:
    """Refuses ``value`` unless it is an integer (not a bool) from ``least`` to ``most``: one line naming
    ``flag``, saying ``why`` (default: the range); one above ``INT_MAX`` is refused as too large."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if whole and least <= value <= most:
        return
    if whole and most == INT_MAX and value > most:
        why = "must be below 2^63"
    elif why is None:
        why = "must be an integer " + (f"at least {least}" if most == INT_MAX else f"from {least} to {most}")
    raise UserError(f"{flag} {value}: {why}")


def check_number(flag: str, value, why: str, ok: bool = True) -> None:
    """Refuses ``value`` unless it is a finite real number (not a bool) and ``ok``: one line naming ``flag``."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and number and math.isfinite(value)):
        raise UserError(f"{flag} {value}: {why}")


def check_ints(config, rules: Iterable[tuple[str, int, int, str]]) -> None:
    """``check_int`` for the first field of ``rules`` (name, least, most, why) out of range; None passes
    for a field whose default is None."""
    for name, least, most, why in rules:
        value = getattr(config, name)
        f = config.__dataclass_fields__[name]
        if value is not None or (f.default is not None and not f.metadata.get("none")):
            check_int(_flag(config, name), value, least, most, why)


def check_finite(config, rules: Iterable[tuple[str, bool, str]]) -> None:
    """Refuses the first field of ``rules`` (name, ok, why) that is not ok, or not a finite number (None
    passes where ok allows it)."""
    for name, ok, why in rules:
        value = getattr(config, name)
        if value is None and not ok:
            refuse(config, name, why)
        if value is not None:
            check_number(_flag(config, name), value, why, ok)


def check_choices(config, names: Iterable[str]) -> None:
    """Refuses the first field of ``names`` whose value is not one of the field's choices."""
    for name in names:
        choices = config.__dataclass_fields__[name].metadata["choices"]
        if getattr(config, name) not in choices:
            refuse(config, name, f"choose one of {', '.join(choices)}")
