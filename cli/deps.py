"""`python -m cli.deps [--write]` (`make deps`): dvc.yaml's code deps, each stage's exactly the project
files its command runs (pipeline/provenance.py's ``code_files``), so a code change re-runs what it touches.

Without ``--write`` it lists the stages whose code deps differ and exits 1 if any do; with ``--write``
it rewrites those deps lists in place. A dep outside the project's packages (data: ``${data.dir}``,
checkpoints, stores) is kept, in its place, and the code deps follow it; every other line of dvc.yaml
is kept as it is, and the rewritten file must load as the old one did but for those lists.
A developer's tool, not a ``ballad-pipe`` command.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import yaml

from cli.project import DVC_YAML, PARAMS_YAML, expand, program_command
from pipeline.provenance import PACKAGES, ROOT, code_files
from pipeline.runtime import atomic_path

STAGE = re.compile(r"^  ([\w@.-]+):\s*(#.*)?$")  # a stage's name, under `stages:`
DEPS = re.compile(r"^(\s+)deps:\s*$")
SECTION = re.compile(r"^([\w-]+):")  # a top-level key of dvc.yaml


def is_code(dep: str) -> bool:
    """A dep that is a project file (or package folder): one the command's code replaces."""
    return "${" not in dep and Path(dep).parts[0] in PACKAGES


def wanted(stage: dict, deps: list[str]) -> list[str]:
    """``deps`` with the code ones replaced by exactly the files the stage's command runs."""
    command = program_command(stage.get("cmd"))
    if command is None:
        return deps  # not a ballad-pipe command: its deps are its own business
    return [d for d in deps if not is_code(d)] + list(code_files(command))


def stale(doc: dict, params: dict) -> list[str]:
    """The stages (foreach expanded) whose code deps are not those their command runs, each with why."""
    out = []
    for name, stage in expand(doc.get("stages") or {}, params).items():
        deps = stage.get("deps") or []
        if sorted(deps) != sorted(wanted(stage, deps)):
            extra = sorted(set(deps) - set(wanted(stage, deps)))
            missing = sorted(set(wanted(stage, deps)) - set(deps))
            out.append(f"{name}: missing {missing}, not run {extra}")
    return out


def rewritten(text: str, doc: dict) -> str:
    """dvc.yaml's ``text`` with each stage's deps list (a foreach stage's ``do`` deps) rewritten."""
    lines, out, stage, section, i = text.splitlines(keepends=True), [], None, None, 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if SECTION.match(line):
            section, stage = SECTION.match(line).group(1), None
        elif section == "stages" and STAGE.match(line):
            stage = doc["stages"][STAGE.match(line).group(1)]
        match = DEPS.match(line)
        if match and stage is not None:
            item = f"{match.group(1)}  - "
            deps = []
            while i < len(lines) and lines[i].startswith(item):
                deps.append(lines[i][len(item):].strip())
                i += 1
            body = stage.get("do", stage)
            out += [f"{item}{d}\n" for d in wanted(body, deps)]
    return "".join(out)


def check_same_but_deps(old: dict, new: dict) -> None:
    def without(doc):
        return {name: {k: v for k, v in s.get("do", s).items() if k != "deps"} | {"_": s.get("foreach")}
                for name, s in doc["stages"].items()} | {k: v for k, v in doc.items() if k != "stages"}
    if without(old) != without(new):
        raise click.ClickException(f"{DVC_YAML}: rewriting the deps lists changed something else; left as it was")


@click.command()
@click.option("--write", is_flag=True, help="Rewrite the code deps in dvc.yaml instead of listing the stale ones.")
@click.option("--file", "path", default=str(ROOT / DVC_YAML), show_default=True, type=click.Path(dir_okay=False))
def main(write: bool, path: str) -> None:
    """List (or, with --write, rewrite) the dvc.yaml stages whose code deps are not what they run."""
    path = Path(path)
    text = path.read_text()
    doc = yaml.safe_load(text)
    params = yaml.safe_load((path.parent / PARAMS_YAML).read_text())
    problems = stale(doc, params)
    if not write:
        click.echo("\n".join(problems) or f"{path}: every stage's code deps are the files it runs")
        sys.exit(1 if problems else 0)
    new = rewritten(text, doc)
    check_same_but_deps(doc, yaml.safe_load(new))
    if stale(yaml.safe_load(new), params):
        raise click.ClickException(f"{path}: a deps list is not in `deps:` + `  - item` lines; left as it was")
    if new != text:
        with atomic_path(path) as tmp:
            tmp.write_text(new)
    click.echo(f"{path}: {len(problems)} stage(s) rewritten")


if __name__ == "__main__":
    main(prog_name="python -m cli.deps")
