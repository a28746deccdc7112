"""Options more than one command shares, and click options built from a config dataclass's fields.

- ``OrNone``: "a value or none". ``none``, ``None`` (what DVC writes for a null param) and the empty
  string become Python's None here, once, at the edge; every other value is converted by the wrapped
  type (``INT_OR_NONE``, ``FLOAT_OR_NONE``, ``TEXT_OR_NONE``, or a click.Path). Every option whose
  value may be none uses it, so stages receive None.
- ``device``: ``--device`` with its one default and help (pipeline/options.py), on every command.
- ``config_options`` / ``field_option``: the click options of a config dataclass whose fields were made
  with ``pipeline.options.option`` (flag, help, choices in the field's metadata), so a default, a
  choice list or a help text is written once, in the config.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, fields

import click

from pipeline.options import DEVICE, DEVICE_HELP, NONE_WORDS

PATHS = {"any": click.Path(), "dir": click.Path(file_okay=False), "file": click.Path(dir_okay=False)}


class OrNone(click.ParamType):
    """A value of ``inner``, or None for ``none`` / ``None`` / the empty string."""

    def __init__(self, inner):
        self.inner = click.types.convert_type(inner)
        self.name = f"{self.inner.name} or none"

    def get_metavar(self, param, ctx):
        inner = self.inner.get_metavar(param=param, ctx=ctx) or self.inner.name.upper()
        return f"{inner}|none"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value in NONE_WORDS):
            return None
        return self.inner.convert(value, param, ctx)


INT_OR_NONE = OrNone(click.INT)
FLOAT_OR_NONE = OrNone(click.FLOAT)
TEXT_OR_NONE = OrNone(click.STRING)

device = click.option("--device", default=DEVICE, show_default=True, help=DEVICE_HELP)


def field_option(f: Field):
    """The click option of the dataclass field ``f`` (see pipeline.options.option), passed as ``f.name``."""
    meta = f.metadata
    flag, help = meta["flag"], meta["help"]
    if meta.get("multiple") or meta.get("as_typed"):
        # repeated (its values a tuple), or a text passed as typed (``''`` and ``none`` are values, checked
        # by the config as such, not "no value")
        required = f.default is MISSING
        return click.option(flag, f.name, multiple=meta.get("multiple", False), required=required,
                            default=None if required else f.default, metavar=meta.get("metavar"), help=help)
    if isinstance(f.default, bool):
        return click.option(flag, f.name, is_flag=True, default=f.default, help=help)
    kind = PATHS[meta["path"]] if meta.get("path") else meta.get("kind")
    if meta.get("choices"):
        kind = click.Choice(meta["choices"])
    if f.default_factory is not MISSING:
        return click.option(flag, f.name, default=f.default_factory, type=kind, help=help,
                            show_default=meta.get("show_default", True))
    if f.default is MISSING:  # required; ``none`` in the metadata: and may be none
        return click.option(flag, f.name, required=True, type=OrNone(kind) if meta.get("none") else kind, help=help)
    if f.default is None:
        return click.option(flag, f.name, default=None, type=OrNone(kind), help=help)
    kind = kind or type(f.default)
    return click.option(flag, f.name, default=f.default, show_default=True, help=help,
                        type=OrNone(kind) if meta.get("none") else kind)  # ``none``: a default that may be none


def config_options(config, names=None):
    """A decorator adding the options of ``config``'s fields (``names``, default all), in field order.

    The callback keeps ``config`` as ``__config__``: tests/test_cli_configs.py walks every command and
    finds each option's field there, so no option exists outside its command's config."""
    chosen = [f for f in fields(config) if names is None or f.name in names]

    def decorate(command):
        for f in reversed(chosen):
            command = field_option(f)(command)
        command.__config__ = config
        return command

    return decorate
