"""The ``ballad-pipe`` command line: a thin layer that parses options and calls a stage function.

Each subcommand lives in its own module here and is imported only when invoked, so ``--help`` stays
fast (torch is not imported until a stage needs it).
"""
from __future__ import annotations

import errno
import importlib
import sys

import click

from pipeline.errors import UserError

# name -> "module:attribute"; one module per command keeps option parsing next to nothing else.
COMMANDS = {
    "prepare": "cli.prepare:prepare",
    "pretrain": "cli.pretrain:pretrain",
    "phase-a": "cli.phase_a:phase_a",
    "extract": "cli.extract:extract",
    "adapter": "cli.adapter:adapter",
    "evaluate": "cli.evaluate:evaluate",
    "sweep": "cli.evaluate:sweep",
    "neighbors": "cli.evaluate:neighbors",
    "report": "cli.report:report",
    "export": "cli.bundle:export",
    "predict": "cli.bundle:predict",
    "verify": "cli.verify:verify",
}

# OS errors the user fixes outside the pipeline (space, permissions): one line naming the path, as a
# UserError is printed. Every stage writes through temporary files and renames, so what is on disk is
# the resumable state an interrupted run leaves. Any other OSError is a bug and keeps its traceback.
SPACE = "free some space and re-run the command (prepare and extract resume, phase-a with --resume)"
ACCESS = "make it writable or choose another output, then re-run the command"
OS_ERRORS = {errno.ENOSPC: ("no space left on device", SPACE), errno.EDQUOT: ("disk quota exceeded", SPACE),
             errno.EACCES: ("permission denied", ACCESS), errno.EPERM: ("operation not permitted", ACCESS),
             errno.EROFS: ("read-only file system", ACCESS)}


def os_error_message(e: OSError) -> str:
    what, advice = OS_ERRORS[e.errno]
    return f"{e.filename if e.filename is not None else '(the OS named no file)'}: {what}; {advice}"


class LazyGroup(click.Group):
    """Imports a command's module only when it runs; inside a project (dvc.yaml + params.yaml here) an
    incomplete command takes what it leaves out from the stage that runs it (cli/project.py)."""

    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._importable(name))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or not self._importable(name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    @staticmethod
    def _importable(name):
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not ctx.resilient_parsing:
            from cli.project import project_defaults

            defaults = project_defaults(ctx, name, command, rest)
            if defaults is not None:
                ctx.default_map = defaults
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.errno not in OS_ERRORS:
                raise
            raise click.ClickException(os_error_message(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="ballad-pipe")
def main(verbose: bool) -> None:
    """BALLAD long-tailed recognition: prepare → phase-a → extract → adapter → evaluate."""
    from pipeline.runtime import setup_logging

    setup_logging(verbose)


def run() -> None:  # pragma: no cover - entry for `python -m cli`
    main(prog_name="ballad-pipe", args=sys.argv[1:])
