"""The grid `sweep` trains over: axes of Phase B options, and the paper's ablations as ready grids.

An axis is a ``TrainConfig`` option named by its flag without the dashes (``lambda``, ``loss``,
``batch-size``) and the values it takes; the grid is the cartesian product of the axes, the first
varying slowest. Each value is parsed by the type of the option's default and checked by
``TrainConfig.check``, so an axis accepts exactly what `adapter --KEY VALUE` accepts, and a bad one is
one line naming the axis. Torch-free: the configs (stages/evaluate/config.py) check the grid before any
work starts.

The ready grids (``--ablation``) are the paper's: Table 6 (where the adapter sits), Table 8 (Phase B's
sampler), Fig. 5 (λ from 0 to 1 by 0.1), and a loss table that BALLAD has not (the authors train with
cross-entropy only). Their values are the options' own choices, so a sampler, position or loss added
to ``TrainConfig`` joins its ablation without an edit here.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Callable

from pipeline.errors import UserError
from stages.adapter.config import TrainConfig


@dataclass(frozen=True)
class Axis:
    key: str  # the option's flag without dashes: the table's column
    name: str  # its TrainConfig field
    values: tuple  # parsed, in the order given


def _choices(key: str) -> Callable[[], tuple[str, ...]]:
    return lambda: _field(key).metadata["choices"]


@dataclass(frozen=True)
class Ablation:
    what: str  # for --help
    key: str
    values: Callable[[], tuple[str, ...]]


ABLATIONS = {
    "lambda": Ablation("λ from 0 to 1 by 0.1 (paper Fig. 5)", "lambda",
                       lambda: tuple(f"{i / 10:g}" for i in range(11))),
    "positions": Ablation("the adapter on the visual, text or both embeddings (paper Table 6)", "position",
                          _choices("position")),
    "samplers": Ablation("every Phase B sampler (paper Table 8)", "sampler", _choices("sampler")),
    "losses": Ablation("every Phase B training loss", "loss", _choices("loss")),
}


def _field(key: str):
    by_flag = {f.metadata["flag"]: f for f in fields(TrainConfig)}
    if f"--{key}" not in by_flag:
        keys = ", ".join(flag.removeprefix("--") for flag in by_flag)
        raise UserError(f"no Phase B option --{key}; a grid key is one of {keys}")
    return by_flag[f"--{key}"]


def _parse(kind: type, text: str):
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{text} is not {'a whole number' if kind is int else 'a number'}") from None


def axis(key: str, texts: tuple[str, ...], base: TrainConfig) -> Axis:
    """One axis, every value parsed and checked with the other options as ``base`` has them."""
    f = _field(key)
    if not texts:
        raise UserError("give at least one value")
    values = tuple(_parse(type(f.default), t) for t in texts)
    for text, value in zip(texts, values):
        if values.count(value) > 1:
            raise UserError(f"{text} is listed twice")
        replace(base, **{f.name: value}).check()
    return Axis(key, f.name, values)


def _specs(flag: str, text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(the text errors start with, key, value texts) of one ``--ablation`` name, ``--lambdas`` list or ``--grid``."""
    if flag == "--ablation":
        a = ABLATIONS[text]
        return [(f"--ablation {text}", a.key, a.values())]
    if flag == "--lambdas":
        return [(f"--lambdas {text}", "lambda", tuple(v.strip() for v in text.split(",") if v.strip()))]
    key, eq, values = text.partition("=")
    if not eq or not key.strip():
        raise UserError(f"--grid {text}: expected KEY=V1,V2,… (KEY: a Phase B option without its dashes)")
    return [(f"--grid {text}", key.strip(), tuple(v.strip() for v in values.split(",") if v.strip()))]


def grid_axes(given: list[tuple[str, str]], base: TrainConfig) -> list[Axis]:
    """The axes of ``given`` ((flag, text) pairs, in order), each checked, then every grid point checked."""
    axes = []
    for flag, text in given:
        for prefix, key, texts in _specs(flag, text):
            try:
                if any(a.key == key for a in axes):
                    raise UserError(f"{key} is already an axis of this grid")
                axes.append(axis(key, texts, base))
            except UserError as e:
                raise UserError(f"{prefix}: {e}") from None
    for point in points(axes):
        try:
            replace(base, **point).check()
        except UserError as e:
            raise UserError(f"the grid point {describe(axes, point)}: {e}") from None
    return axes


def points(axes: list[Axis]) -> list[dict]:
    """Every combination of the axes' values, as TrainConfig field → value, the first axis slowest."""
    return [dict(zip((a.name for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def setting(key: str, value) -> str:
    """``lambda=0.2``: one grid key and value as the command line and the plot's legend write them."""
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def describe(axes: list[Axis], point: dict) -> str:
    """``lambda=0.2 loss=ce``: a grid point as its keys and values."""
    return " ".join(setting(a.key, point[a.name]) for a in axes)
