"""Every numeric option of every command refuses what no run can use (issue 22): NaN, ±inf, a negative
count and 10^30, each in one line naming the option, before anything is read or written.

The commands and their options are walked from the click tree (``cli.main``, `prepare`'s
subcommands included), so an option added later is covered without an edit here. Every input and output
a command requires is given as a path that does not exist: an error naming that path instead of the
option means the option was checked too late, after a file was opened."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import main

FLOATS = ("nan", "inf", "-inf")
INTS = ("-1", str(10**30))  # every integer option here is a count, a size, a threshold or a seed: ≥ 0


def leaves(group: click.Group, path: tuple[str, ...] = ()):
    """(command words, command) of every command under ``group``."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield from leaves(cmd, (*path, name)) if isinstance(cmd, click.Group) else [((*path, name), cmd)]


def kind(param: click.Parameter) -> type | None:
    """float or int for a numeric parameter (``OrNone`` unwrapped), else None."""
    inner = getattr(param.type, "inner", param.type)
    for number, base in ((float, click.types.FloatParamType), (int, click.types.IntParamType)):
        if isinstance(inner, base):
            return number
    return None


REQUIRED = {"model": "ballad-tiny", "key": "some-key"}  # the required options that are not paths


def required_args(cmd: click.Command, absent: Path) -> list[str]:
    """The command's required options and arguments, every path one that does not exist."""
    args = []
    for p in cmd.params:
        if p.required:
            value = REQUIRED.get(p.name, str(absent / p.name))
            if p.name == "shards":
                value = f"train={value}.tar"
            args += [value] if isinstance(p, click.Argument) else [p.opts[0], value]
    return args


CASES = [(words, p.opts[0], value) for words, cmd in leaves(main) for p in cmd.params
         if isinstance(p, click.Option) and kind(p) for value in (FLOATS if kind(p) is float else INTS)]
CASES += [(("sweep",), "--lambdas", value) for value in ("nan", "0.2,inf", "-inf,0.5")]  # a comma list of floats


def test_the_walk_finds_the_numeric_options_of_every_command():
    covered = {" ".join(words) for words, _, _ in CASES}
    assert {"phase-a", "pretrain", "extract", "adapter", "sweep", "evaluate", "neighbors", "predict",
            "prepare synthetic", "prepare list", "prepare folder", "prepare cifar100-lt", "prepare index"} <= covered
    flags = {(" ".join(words), flag) for words, flag, _ in CASES}
    assert {("evaluate", "--logit-adjust"), ("evaluate", "--knn-beta"), ("phase-a", "--lr"), ("predict", "--top-k"),
            ("prepare folder", "--test-fraction"), ("sweep", "--lambdas")} <= flags
    assert len(CASES) > 150


@pytest.mark.parametrize("words, flag, value", CASES, ids=[f"{' '.join(w)} {f} {v}" for w, f, v in CASES])
def test_every_numeric_option_refuses_non_finite_and_out_of_range_values(tmp_path, words, flag, value):
    cmd = main
    for word in words:
        cmd = cmd.get_command(click.Context(cmd), word)
    args = [*words, *required_args(cmd, tmp_path / "absent"), flag, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output  # no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {flag} {value}:"), result.output
    assert not any(tmp_path.iterdir())  # nothing read, nothing written: not even a lock file
