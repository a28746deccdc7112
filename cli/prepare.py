"""`ballad-pipe prepare SOURCE`: datasets → webdataset shards + dataset.json, one subcommand per data source.

The subcommands are built from the registry of sources (stages/prepare/registry.py), each from its
config dataclass, whose fields hold every option's flag, default, choices and help: adding a source
adds its subcommand here without an edit. The registry is imported when the group lists or builds a
subcommand, not when this module is, and imports no torch, so `prepare --help` stays fast.
"""
from __future__ import annotations

import click

from cli.options import config_options


class Sources(click.Group):
    """The `prepare` group: a subcommand per registered source."""

    def list_commands(self, ctx):
        from stages.prepare.registry import sources

        return list(sources())

    def get_command(self, ctx, name):
        from stages.prepare.registry import sources

        source = sources().get(name)
        return None if source is None else source_command(source)


def source_command(source) -> click.Command:
    """`prepare NAME`: the options of ``source.config``, one call of ``source.run``, one line saying what it wrote."""
    def run(**options):
        path = source.run(source.config(**options))
        click.echo(f"wrote {path / source.wrote if source.wrote else path}")

    return click.command(name=source.name, help=source.help)(config_options(source.config)(run))


@click.group(cls=Sources)
def prepare():
    """Write a long-tailed dataset as webdataset shards plus dataset.json (or describe existing shards)."""
