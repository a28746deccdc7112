"""The layers of docs/architecture.md, enforced: building blocks (pipeline/, store/) import no stage and
no CLI; stages import no CLI and use each other only through public names; the CLI (cli/, the top)
imports stage modules lazily, inside its command functions, so `ballad-pipe --help` stays fast
(torch-free config modules excepted). No exemptions: every arrow points down."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path):
    """(module, imported names, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in top


def files(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_building_blocks_import_no_stage_and_no_cli():
    for path in files("pipeline", "store"):
        bad = [m for m, _, _ in imports(path) if _within(m, "stages") or _within(m, "cli")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: building blocks sit below the stages and the CLI"


def test_stages_import_no_cli():
    for path in files("stages"):
        bad = [m for m, _, _ in imports(path) if _within(m, "cli")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the CLI sits above the stages"


def test_stages_use_each_other_only_through_public_names():
    for path in files("stages"):
        for module, names, _ in imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not (module.startswith("stages.") and private), \
                f"{path.relative_to(ROOT)} imports private {private} from {module}"


def test_cli_imports_stage_modules_lazily():
    for path in files("cli"):
        eager = [m for m, _, top in imports(path) if top and m.startswith("stages.") and not (m.endswith("_config") or m.endswith(".config"))]
        assert not eager, f"{path.relative_to(ROOT)} imports {eager} at module level"
