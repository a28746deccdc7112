"""Which code produced an output: the project files a command runs, and a digest of them.

``code_files(command)`` is every project file the ``ballad-pipe`` command imports, transitively: its
module in cli/ (with cli/__init__.py and every package ``__init__`` on the way), what it imports at
module level and inside functions (the CLI imports stage modules inside its command functions), and the
files those modules load by name (``LOADS``: data files, modules imported through importlib).
Third-party modules are not project files. It is computed from the source text, not by importing, so it
names the same files on every machine, torch or not; once per process, as the code a run loaded when
it started is the code that runs.

Two consumers use the one set, so a code change re-runs and restarts exactly what it touches:

- dvc.yaml's code deps of each stage (written by ``make deps``, checked by tests/test_dvc_yaml.py): an
  edit to one command's CLI module, or to a module a stage never imports, leaves that stage up to date;
- ``source_digest(command)``: phase-a's and pretrain's ``--resume`` continue a checkpoint only when the
  code that wrote it is the code running now; otherwise a ``dvc repro`` after a code change would finish
  the old code's run and record it as the new code's result. Any edit to the set counts, including ones
  that cannot change the result (a comment): a needless restart is cheap, an undetected change is not.

This is a building block: it imports no CLI. It reads cli/__init__.py's ``COMMANDS`` table as text
(``command_module``) to find where a command starts.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "pipeline", "stages", "store")  # the project's own top-level packages
COMMAND_TABLE = Path("cli") / "__init__.py"  # where ``COMMANDS`` maps a command to "module:attribute"
# What a module loads by name at run time rather than by an import statement: module -> (folder, glob),
# relative to ROOT. Data files it reads, and modules it imports through importlib (followed in turn).
# tests/test_provenance.py checks that every data file in the packages and every module importing by
# name (cli/__init__.py's command dispatch aside: a command's files start at its module) is here.
LOADS = {
    "pipeline/models.py": ("pipeline/model_configs", "*.json"),  # open_clip.add_model_config
    "stages/prepare/registry.py": ("stages/prepare", "*.py"),   # every data source of `prepare`
    "stages/adapter/__init__.py": ("stages/adapter", "*.py"),   # its public names, each from its module
}


def command_module(command: str, root: Path = ROOT) -> str:
    """The module of ``command`` ("phase-a" -> "cli.phase_a"), from ``COMMANDS`` in cli/__init__.py."""
    for node in ast.parse((root / COMMAND_TABLE).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            table = ast.literal_eval(node.value)
            if command not in table:
                raise UserError(f"{COMMAND_TABLE}: no command {command!r} (the commands: {', '.join(table)})")
            return table[command].split(":")[0]
    raise UserError(f"{COMMAND_TABLE}: no COMMANDS table")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file of the module ``name`` (a package's ``__init__.py``), or None for any other module."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = root.joinpath(*parts)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):  # a package first, as Python finds them
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (``from pipeline.errors import UserError``), not a module


def imported_names(path: Path, package: str) -> list[str]:
    """Every module name ``path`` (a module of ``package``) imports, anywhere in it, and each name a
    ``from`` import takes (it may be a submodule: ``from stages import shapes``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def module_files(module: str, root: Path = ROOT) -> set[Path]:
    """The project files that importing ``module`` can run or load, transitively, each package
    ``__init__`` included."""
    seen, todo = set(), [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name.removesuffix(".__init__")
            todo += imported_names(path, package)
            folder, pattern = LOADS.get(path.relative_to(root).as_posix(), (None, None))
            for loaded in sorted((root / folder).glob(pattern)) if folder else ():
                if loaded.suffix == ".py":
                    todo.append(".".join(loaded.relative_to(root).with_suffix("").parts))
                else:
                    seen.add(loaded)
    return seen


@functools.lru_cache(maxsize=None)
def code_files(command: str, root: Path = ROOT) -> tuple[str, ...]:
    """The project files ``ballad-pipe command`` runs or reads, as sorted paths relative to ``root``."""
    files = module_files(command_module(command, root), root)
    return tuple(sorted(f.relative_to(root).as_posix() for f in files))


@functools.lru_cache(maxsize=None)
def source_digest(command: str, root: Path = ROOT) -> str:
    """sha256 over ``code_files(command)``: each file's path and bytes, length-prefixed so that no two
    file sets hash alike."""
    h = hashlib.sha256()
    for name in code_files(command, root):
        for part in (name.encode(), (root / name).read_bytes()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()
