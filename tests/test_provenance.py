"""pipeline/provenance.py: the project files a command runs (dvc.yaml's code deps) and their digest (what
phase-a's and pretrain's --resume compare): every import followed, lazy ones inside functions and
relative ones included, third-party ones not, and nothing else counted, so an edit to code a command
never runs neither re-runs its stage nor restarts its resumable run."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.provenance import LOADS, PACKAGES, ROOT, code_files, source_digest

MINI = {
    "cli/__init__.py": 'COMMANDS = {"go": "cli.go:go", "other": "cli.other:other"}\nimport click\n',
    "cli/go.py": "from cli.options import flag\n\ndef go():\n    from stages.thing import run\n    return run()\n",
    "cli/options.py": "import click\nflag = 1\n",
    "cli/other.py": "def other():\n    from stages import unused\n",
    "stages/__init__.py": "",
    "stages/thing/__init__.py": "from .run import run\n",
    "stages/thing/run.py": "import numpy\nfrom ..helper import x\nfrom pipeline.errors import E\n\ndef run():\n    return x\n",
    "stages/helper.py": "import os.path\nx = 1\n",
    "stages/unused.py": "import store.deep\n",
    "pipeline/__init__.py": "",
    "pipeline/errors.py": "class E(Exception):\n    pass\n",
    "store/__init__.py": "",
    "store/deep.py": "",
}


def write(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def fresh_digest(command: str, root: Path) -> str:
    code_files.cache_clear()  # both are computed once per process: the code a run loaded at its start
    source_digest.cache_clear()
    return source_digest(command, root)


def test_a_commands_files_are_what_it_imports_lazily_relatively_and_through_packages(tmp_path):
    root = write(tmp_path, MINI)
    assert code_files("go", root) == ("cli/__init__.py", "cli/go.py", "cli/options.py", "pipeline/__init__.py",
                                      "pipeline/errors.py", "stages/__init__.py", "stages/helper.py",
                                      "stages/thing/__init__.py", "stages/thing/run.py")
    assert code_files("other", root) == ("cli/__init__.py", "cli/other.py", "stages/__init__.py", "stages/unused.py",
                                         "store/__init__.py", "store/deep.py")
    with pytest.raises(UserError, match=r"^cli/__init__.py: no command 'nope' \(the commands: go, other\)$"):
        code_files("nope", root)


def test_the_digest_changes_with_the_commands_files_only(tmp_path):
    root = write(tmp_path, MINI)
    before = fresh_digest("go", root)
    (root / "stages/unused.py").write_text("# edited\n")       # a module `go` never imports
    (root / "cli/other.py").write_text(MINI["cli/other.py"] + "# edited\n")  # another command's CLI module
    (root / "stages/new.py").write_text("")
    assert fresh_digest("go", root) == before
    (root / "stages/helper.py").write_text(MINI["stages/helper.py"] + "# a comment counts\n")
    assert fresh_digest("go", root) != before
    (root / "stages/helper.py").write_text(MINI["stages/helper.py"])
    assert fresh_digest("go", root) == before
    (root / "stages/thing/run.py").rename(root / "stages/thing/run2.py")  # the same bytes under another name
    (root / "stages/thing/__init__.py").write_text("from .run2 import run\n")
    (root / "stages/thing/run2.py").write_text(MINI["stages/thing/run.py"])
    assert fresh_digest("go", root) != before


def test_the_files_loaded_by_name_count_as_imported(tmp_path, monkeypatch):
    """A data file a module reads and the modules a registry imports through importlib (``LOADS``)."""
    root = write(tmp_path, {**MINI, "stages/data/a.json": "{}", "stages/data/notes.txt": "",
                            "stages/plugins/p.py": "import store.deep\n"})
    monkeypatch.setitem(LOADS, "stages/helper.py", ("stages/data", "*.json"))
    monkeypatch.setitem(LOADS, "stages/thing/run.py", ("stages/plugins", "*.py"))
    code_files.cache_clear()
    files = set(code_files("go", root))
    assert {"stages/data/a.json", "stages/plugins/p.py", "store/__init__.py", "store/deep.py"} <= files
    assert "stages/data/notes.txt" not in files
    code_files.cache_clear()


def test_every_file_loaded_by_name_is_declared():
    """Files a static reading of the imports cannot see: each data file in the packages and each module
    that imports by name must have its ``LOADS`` entry (the command dispatch of cli/__init__.py aside)."""
    loaded = {p for folder, pattern in LOADS.values() for p in (ROOT / folder).glob(pattern)}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc"):
                assert path in loaded, f"{path.relative_to(ROOT)}: a file the code reads? add it to LOADS"
            if path.suffix == ".py" and path.relative_to(ROOT).as_posix() not in ("cli/__init__.py", *LOADS):
                calls = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(ast.parse(path.read_text()))
                         if isinstance(n, (ast.Attribute, ast.Name))}
                assert not calls & {"import_module", "__import__", "iter_modules"}, \
                    f"{path.relative_to(ROOT)} imports modules by name: add what it loads to LOADS"


def copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_phase_a_resumes_after_edits_to_code_it_does_not_run(tmp_path):
    """The real project: another command's CLI module and a module only evaluate runs leave phase-a's
    digest alone; phase-a's own CLI module changes it."""
    root = copy_project(tmp_path)
    before = fresh_digest("phase-a", root)
    only_evaluate = sorted(set(code_files("evaluate", root)) - set(code_files("phase-a", root))
                           - set(code_files("adapter", root)))
    assert only_evaluate and "cli/bundle.py" not in code_files("phase-a", root)
    for name in ("cli/bundle.py", only_evaluate[-1]):
        (root / name).write_text((root / name).read_text() + "\n# edited\n")
    assert fresh_digest("phase-a", root) == before
    (root / "cli/phase_a.py").write_text((root / "cli/phase_a.py").read_text() + "\n# edited\n")
    assert fresh_digest("phase-a", root) != before


def test_the_digest_of_the_running_code_is_the_one_of_its_files():
    assert source_digest("phase-a") == fresh_digest("phase-a", ROOT)
    assert source_digest("phase-a") != source_digest("pretrain")
    assert "cli/phase_a.py" in code_files("phase-a")
