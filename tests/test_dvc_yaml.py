"""dvc.yaml against the code and the parameter files, statically (no stage runs here; the end-to-end run
is tests/test_dvc_pipeline.py): every stage depends on every project module its command imports, so a
code change never leaves a stale result; every params section a stage passes whole holds only options of
its command; every parameter file (params.yaml and each configs/ recipe) fits the stages, down to each
command line DVC would run being one its command accepts."""
from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from cli import COMMANDS, main
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "store")
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def stages() -> dict:
    """The stages of dvc.yaml, ``foreach`` expanded into NAME@KEY as DVC names them."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for key, item in stage["foreach"].items():
            text = yaml.safe_dump(stage["do"])
            text = text.replace("${key}", key)
            for field, value in item.items():
                text = text.replace(f"${{item.{field}}}", str(value))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_files(start: Path) -> set[Path]:
    """Every project file ``start`` imports, at module level or inside functions, transitively."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a package import runs its __init__ too
                    f = module_file(".".join(parts[:i]))
                    if f is not None and f not in seen:
                        todo.append(f)
    return seen


def command_of(stage: dict) -> str:
    words = shlex.split(stage["cmd"])
    assert words[0] == "ballad-pipe", stage["cmd"]
    return words[1]


def test_every_stage_depends_on_the_code_it_runs():
    for name, stage in stages().items():
        command = command_of(stage)
        target = module_file(COMMANDS[command].split(":")[0])
        deps = [ROOT / d for d in stage.get("deps", [])]
        missing = [str(f.relative_to(ROOT)) for f in sorted(imported_files(target))
                   if not any(f == d or d in f.parents for d in deps)]
        assert not missing, f"stage {name} runs `{command}` but does not depend on {missing}"


def command_options(command: str) -> set[str]:
    cmd = main.get_command(click.Context(main), command)
    return {opt for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_param_sections_passed_whole_hold_only_the_commands_options(path):
    params = yaml.safe_load(path.read_text())
    for name, stage in stages().items():
        options = command_options(command_of(stage))
        for section in re.findall(r"\$\{([\w.]+)\}", stage["cmd"]):
            value = params
            for part in section.split("."):
                assert part in value, f"{path.name}: {name} reads ${{{section}}}, which is missing"
                value = value[part]
            if isinstance(value, dict):  # passed whole: each key becomes --key
                unknown = [k for k in value if f"--{k}" not in options]
                assert not unknown, f"{path.name}: [{section}] {unknown} are not options of `{command_of(stage)}`"
                assert all(v is not None for v in value.values()), f"{path.name}: [{section}] has a null value"


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_parameter_file_has_the_demos_sections(path):
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = yaml.safe_load(path.read_text())
    assert set(params) == set(demo), path.name
    for section in ("data", "model", "adapter"):
        assert set(demo[section]) <= set(params[section]), f"{path.name}: [{section}]"


def rendered(cmd: str, params: dict) -> list[str]:
    """``cmd`` as DVC renders it from ``params``: ``${a.b}`` → its value; a section passed whole → ``--key
    value`` per key (true → ``--key`` alone, false → nothing, as DVC's default ``store_true``)."""
    def value(match) -> str:
        v = params
        for part in match.group(1).split("."):
            v = v[part]
        if not isinstance(v, dict):
            return str(v)
        return " ".join(f"--{k}" if w is True else "" if w is False else f"--{k} {shlex.quote(str(w))}"
                        for k, w in v.items())
    return shlex.split(re.sub(r"\$\{([\w.]+)\}", value, cmd))


def _configs() -> dict:
    """The commands whose options build a config dataclass, and that dataclass (its ``check`` is theirs)."""
    from stages.adapter_config import TrainConfig
    from stages.extract_config import ExtractConfig
    from stages.phase_a_config import PhaseAConfig
    from stages.pretrain_config import PretrainConfig

    return {"pretrain": PretrainConfig, "phase-a": PhaseAConfig, "extract": ExtractConfig, "adapter": TrainConfig,
            "sweep": TrainConfig}


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_parameter_file_gives_command_lines_their_commands_accept(path):
    """Each stage's command line parses (types, choices, required options, `prepare`'s sources: a typo in
    a recipe's data.args included) and its config's own check passes, so `dvc repro` on a recipe fails
    on no option, on any machine."""
    params, configs = yaml.safe_load(path.read_text()), _configs()
    for name, stage in stages().items():
        words = rendered(stage["cmd"], params)
        command, args, ctx = main, words[1:], None
        while isinstance(command, click.Group):  # `prepare list …`: down to the source's command
            ctx = click.Context(command, parent=ctx)
            command, args = command.get_command(ctx, args[0]), args[1:]
            assert command is not None, f"{path.name}: {name}: {words}"
        config = configs.get(command_of(stage))
        try:
            options = command.make_context(command.name, args, parent=ctx).params
            if config is not None:
                config(**{f.name: options[f.name] for f in dataclasses.fields(config) if f.name in options}).check()
        except (click.UsageError, UserError) as e:
            pytest.fail(f"{path.name}: {name}: {e.format_message() if isinstance(e, click.UsageError) else e}")
