"""Every command's options come from one config dataclass (issue 23): walking the click tree, each
option of each command is a field of the config its callback was built from (``config_options``),
with the same flag, default and choices, so a flag, a default or a choice list exists once."""
from __future__ import annotations

from dataclasses import MISSING, fields

import click
import pytest

from cli import main
from tests.test_cli_options import leaves

COMMANDS = list(leaves(main))


def test_the_walk_finds_every_command():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"phase-a", "extract", "adapter", "evaluate", "sweep", "export", "predict", "prepare synthetic"} <= names


@pytest.mark.parametrize("words,cmd", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_option_is_a_field_of_the_commands_config(words, cmd):
    config = getattr(cmd.callback, "__config__", None)
    assert config is not None, f"`{' '.join(words)}` is not built from a config dataclass (cli.options.config_options)"
    by_flag = {f.metadata["flag"]: f for f in fields(config) if "flag" in f.metadata}
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name == "help":
            continue
        f = by_flag.get(p.opts[0])
        assert f is not None, f"`{' '.join(words)}` {p.opts[0]} has no field in {config.__name__}"
        assert p.name == f.name
        if f.metadata.get("choices"):
            assert tuple(p.type.choices) == tuple(f.metadata["choices"]), p.opts[0]
        if f.default is not MISSING:
            assert p.default == f.default, p.opts[0]
        else:
            assert p.required or f.default_factory is not MISSING, p.opts[0]
