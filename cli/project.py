"""Bare commands inside a project: what an incomplete command leaves out comes from the dvc.yaml stage
that runs it (docs/project-defaults.md).

In a folder holding dvc.yaml and params.yaml, a command typed without one of its required options
(``ballad-pipe adapter --lambda 0.2``) takes every option it leaves out from the stage that runs that
command, its ``cmd`` rendered with params.yaml as DVC renders it; the options typed override. A command
given all its required options runs as typed, as it does anywhere else, and outside a project the
options stay required. ``LazyGroup.resolve_command`` (cli/__init__.py) calls ``project_defaults`` for
every command, so no command has code of its own for this; the values reach click as the subcommand's
``default_map``, so they are parsed, converted and checked as typed ones are.

Which stage: those whose command line runs the same command (``prepare synthetic``: the subcommand too)
are the candidates; the one passing the most options typed with the value typed is chosen
(``extract --ckpt checkpoints/phase_a/final.pt``: stage extract, not extract_zero_shot). A tie is a
one-line error naming the tied stages and the options that tell them apart.

Rendering follows DVC's (dvc/parsing/interpolate.py): ``${a.b}`` and ``${a[0]}`` become the value
(booleans ``true`` / ``false``); a section passed whole becomes ``--key value`` per key (nested keys
joined by dots, true as ``--key`` alone, false left out, a list as ``--key v1 v2``: DVC's defaults);
``foreach`` stages expand into NAME@KEY with ``${item...}`` and ``${key}``. Not read: ``vars``,
``matrix`` stages, a ``wdir`` other than the project folder, and DVC's ``parsing`` settings.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import yaml

from pipeline.errors import UserError

PROGRAM = "ballad-pipe"
DVC_YAML, PARAMS_YAML = "dvc.yaml", "params.yaml"
EXPR = re.compile(r"(?<!\\)\$\{\s*([^}]*?)\s*\}")


# ------------------------------------------------------------------ dvc.yaml, rendered as DVC does
def to_str(value) -> str:
    """A value in a command line, as DVC writes it: a section as its flags, a boolean as true / false."""
    if isinstance(value, dict):
        return " ".join(flags(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def flags(section: dict, prefix: str = "") -> list[str]:
    """A section passed whole: ``--key value`` per key (DVC's store_true booleans, nargs lists)."""
    words = []
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            words += flags(value, f"{name}.")
        elif isinstance(value, bool):
            words += [f"--{name}"] if value else []
        elif isinstance(value, (list, tuple)):
            words += [f"--{name}", *(shlex.quote(v) if isinstance(v, str) else str(v) for v in value)] if value else []
        else:
            words += [f"--{name}", shlex.quote(value) if isinstance(value, str) else str(value)]
    return words


def lookup(context: dict, expr: str):
    value = context
    for part in expr.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def render(text: str, context: dict, where: str, partial: bool = False) -> str:
    """``text`` with each ``${...}`` replaced from ``context``; with ``partial``, those whose first name
    ``context`` lacks are kept (for a later context), otherwise each must resolve."""
    def value(match):
        expr = match.group(1)
        if partial and re.split(r"[.\[]", expr)[0] not in context:
            return match.group(0)
        try:
            return to_str(lookup(context, expr))
        except (KeyError, IndexError, ValueError, TypeError):
            raise UserError(f"{where}: ${{{expr}}} is not in {PARAMS_YAML}") from None
    return EXPR.sub(value, text)


def substituted(node, context: dict, where: str):
    """Every string in ``node`` (a dvc.yaml stage), keys too, rendered from ``context``, partially."""
    if isinstance(node, dict):
        return {substituted(k, context, where): substituted(v, context, where) for k, v in node.items()}
    if isinstance(node, list):
        return [substituted(v, context, where) for v in node]
    return render(node, context, where, partial=True) if isinstance(node, str) else node


def expand(stages: dict, params: dict) -> dict[str, dict]:
    """dvc.yaml's stages, each ``foreach`` expanded into NAME@KEY as DVC names them (``${item...}`` and
    ``${key}`` substituted; params are left for ``render``); a ``foreach: ${section}`` iterates over
    ``params``' section. ``matrix`` stages are left out."""
    out = {}
    for name, stage in stages.items():
        if "matrix" in stage:
            continue
        if "foreach" not in stage:
            out[name] = stage
            continue
        items = stage["foreach"]
        if isinstance(items, str):
            expr = EXPR.fullmatch(items.strip())
            try:
                items = lookup(params, expr.group(1)) if expr else None
            except (KeyError, IndexError, ValueError, TypeError):
                items = None
            if not isinstance(items, (dict, list)):
                raise UserError(f"{DVC_YAML}: stage '{name}': foreach {stage['foreach']} is not a list or a "
                                f"section of {PARAMS_YAML}")
        pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
        for key, item in pairs:
            out[f"{name}@{key}"] = substituted(stage["do"], {"item": item, "key": key}, f"{DVC_YAML}: {name}@{key}")
    return out


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top")
    return data


def program_command(cmd) -> str | None:
    """The ``ballad-pipe`` command a stage's ``cmd`` runs (its first word after the program), else None."""
    match = re.match(rf"\s*{PROGRAM}\s+([\w-]+)", cmd) if isinstance(cmd, str) else None
    return match.group(1) if match else None


# ------------------------------------------------------------------ the command line, through click
def descend(command: click.Command, words: list[str]) -> tuple[tuple[str, ...], click.Command, list[str]]:
    """(subcommand names, the command they reach, the words left) of ``words`` given to ``command``."""
    path = []
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.get_command(click.Context(command), words[0])
        if sub is None:
            break
        path.append(words[0])
        command, words = sub, words[1:]
    return tuple(path), command, words


def option_values(command: click.Command, words: list[str]) -> dict:
    """The raw value of each option in ``words`` by parameter name, parsed by click (UsageError if bad)."""
    ctx = click.Context(command, resilient_parsing=True)
    options = {p.name for p in command.params if isinstance(p, click.Option)}
    values, _, _ = command.make_parser(ctx).parse_args(list(words))
    return {k: v for k, v in values.items() if k in options}


def normal(command: click.Command, name: str, raw):
    """``raw`` as the option converts it (paths normalised), so ``0.20`` agrees with ``0.2``."""
    param = next(p for p in command.params if p.name == name)
    try:
        value = param.type_cast_value(click.Context(command), raw)
    except click.BadParameter:
        return raw
    inner = getattr(param.type, "inner", param.type)
    return os.path.normpath(value) if isinstance(inner, click.Path) and isinstance(value, str) else value


def shown(command: click.Command, values: dict) -> str:
    """``values`` as options on a command line, in the command's order."""
    words = []
    for p in command.params:
        if p.name in values:
            value, flag = values[p.name], max(p.opts, key=len)
            items = value if isinstance(value, (list, tuple)) else [value]
            words += [flag if v is True else f"{flag} {shlex.quote(str(v))}" for v in items]
    return ", ".join(words)


# ------------------------------------------------------------------ the stage, and its options as defaults
def candidates(name: str, command: click.Command, path: tuple[str, ...], root: Path) -> dict[str, dict]:
    """The stages of ``root``'s dvc.yaml running ``name`` (``command``) + ``path``: their option values."""
    params = read_yaml(root / PARAMS_YAML)
    found = {}
    for stage_name, stage in expand(read_yaml(root / DVC_YAML).get("stages") or {}, params).items():
        if program_command(stage.get("cmd")) != name or stage.get("wdir", ".") not in (".", "./"):
            continue
        where = f"{DVC_YAML}: stage '{stage_name}'"
        words = shlex.split(render(stage["cmd"], params, where))[1:]
        stage_path, leaf, rest = descend(command, words[1:])
        if stage_path != path:
            continue
        try:
            found[stage_name] = option_values(leaf, rest)
        except click.UsageError as e:
            raise UserError(f"{where}: {e.format_message()}") from None
    return found


def pick(found: dict, typed: dict, command: click.Command, words: str) -> str:
    """The stage passing the most ``typed`` options with the value typed; a tie is a UserError."""
    def agree(values):
        return sum(k in values and normal(command, k, values[k]) == normal(command, k, v) for k, v in typed.items())

    scores = {stage: agree(values) for stage, values in found.items()}
    best = max(scores.values())
    tied = [stage for stage, score in scores.items() if score == best]
    if len(tied) == 1:
        return tied[0]
    apart = []
    for p in command.params:
        seen = [found[s].get(p.name) for s in tied]
        if len({repr(normal(command, p.name, v)) for v in seen}) > 1:
            apart.append(f"{max(p.opts, key=len)} ({' | '.join('-' if v is None else str(v) for v in seen)})")
    required = ", ".join(max(p.opts, key=len) for p in command.params if p.required)
    raise UserError(f"{DVC_YAML}: stages {', '.join(tied)} run `{words}` and fit the options typed equally: "
                    f"type {' or '.join(apart)} to pick one, or every required option ({required}) to use none")


def project_defaults(ctx: click.Context, name: str, command: click.Command, words: list[str],
                     root: Path | None = None) -> dict | None:
    """The ``default_map`` for ``ballad-pipe name words...`` (``ctx``: the group's) run in ``root`` (default:
    the current folder): the options of the dvc.yaml stage that runs it which the words leave out, nested
    under the command names as click reads it; None outside a project, for a complete command, for
    ``--help``, or for a command no stage runs."""
    root = Path.cwd() if root is None else root
    if not all((root / f).is_file() for f in (DVC_YAML, PARAMS_YAML)):
        return None
    path, leaf, rest = descend(command, words)
    try:
        typed = option_values(leaf, rest)
    except click.UsageError:
        return None  # click reports it, as it would anywhere
    help_asked = any(w in ctx.help_option_names for w in rest)
    if help_asked or all(p.name in typed for p in leaf.params if p.required and isinstance(p, click.Option)):
        return None
    found = candidates(name, command, path, root)
    if not found:
        return None
    stage = pick(found, typed, leaf, " ".join((name, *path)))
    values = found[stage]
    defaults = {k: v for k, v in values.items() if k not in typed}
    note = f"from {DVC_YAML} stage '{stage}' ({PARAMS_YAML}): {shown(leaf, defaults) or 'nothing'}"
    if typed:
        note += f"; from the command line: {shown(leaf, typed)}"
    click.echo(f"{PROGRAM} {' '.join((name, *path))}: {note}", err=True)
    for word in reversed((name, *path)):
        defaults = {word: defaults}
    return defaults
