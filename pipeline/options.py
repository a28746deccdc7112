"""Settings that are also command-line options: one definition of each, shared by configs and the CLI.

Torch-free and click-free, so the stages' config dataclasses (stages/adapter_config.py,
stages/phase_a_config.py) import it and ``ballad-pipe --help`` stays fast. pipeline/cli/options.py
turns the fields made here into click options.

- ``option``: a dataclass field whose metadata names its flag, help and choices (and, where the
  default does not tell, the value's type), so a config is the one source of its options.
- ``NONE_WORDS`` / ``none_to_null``: what spells "no value" on the command line. DVC writes a null
  param as ``None``; users write ``none``. The CLI converts them once (``OrNone``), so stages receive
  Python's None; a stage whose Python callers pass ``"none"`` calls ``none_to_null`` on entry.
- ``DEVICE`` / ``DEVICE_HELP``: the one default and help of ``--device`` on every command.
- ``refuse`` / ``check_finite`` / ``check_choices``: a config's checks, each failure one line that
  names the option by its flag and value (``--lr nan: must be …``).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, field
from typing import Callable, Iterable, NoReturn

from pipeline.errors import UserError

NONE_WORDS = ("none", "None", "")
DEVICE = "auto"
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
    ``none=True`` for a required option that may be none.
    """
    metadata = {"flag": flag, "help": help, "choices": choices, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def refuse(config, name: str, why: str) -> NoReturn:
    """A one-line UserError naming field ``name`` of the config dataclass ``config`` by its flag and value."""
    raise UserError(f"{config.__dataclass_fields__[name].metadata['flag']} {getattr(config, name)}: {why}")


def check_finite(config, rules: Iterable[tuple[str, bool, str]]) -> None:
    """Refuses the first field of ``rules`` (name, ok, why) that is not ok, or not a finite number (None
    passes where ok allows it)."""
    for name, ok, why in rules:
        value = getattr(config, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (value is not None and not (number and math.isfinite(value))):
            refuse(config, name, why)


def check_choices(config, names: Iterable[str]) -> None:
    """Refuses the first field of ``names`` whose value is not one of the field's choices."""
    for name in names:
        choices = config.__dataclass_fields__[name].metadata["choices"]
        if getattr(config, name) not in choices:
            refuse(config, name, f"choose one of {', '.join(choices)}")
