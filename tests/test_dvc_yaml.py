"""dvc.yaml against the code and the parameter files, statically (no stage runs here; the end-to-end run
is tests/test_dvc_pipeline.py): every stage's code deps are exactly the project files its command runs,
so a code change re-runs what it touches and nothing else; a stage's command line renders as DVC renders
it (cli/project.py, which bare commands take their options from); every params section a stage passes
whole holds only options of its command; every parameter file (params.yaml and each configs/ recipe) fits
the stages, down to each command line DVC would run being one its command accepts."""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
import yaml

from cli import main
from cli.deps import is_code, stale
from cli.project import expand, render
from pipeline.errors import UserError
from pipeline.provenance import code_files

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def stages() -> dict:
    """The stages of dvc.yaml, ``foreach`` expanded into NAME@KEY as DVC names them."""
    return expand(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"],
                  yaml.safe_load((ROOT / "params.yaml").read_text()))


def command_of(stage: dict) -> str:
    words = shlex.split(stage["cmd"])
    assert words[0] == "ballad-pipe", stage["cmd"]
    return words[1]


def test_every_stages_code_deps_are_the_files_its_command_runs():
    problems = stale(yaml.safe_load((ROOT / "dvc.yaml").read_text()), yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert not problems, f"dvc.yaml's code deps are out of date; run `make deps` (python -m cli.deps --write): {problems}"


def test_the_code_deps_name_each_file_of_the_commands_modules_and_no_folder():
    """What ``make deps`` writes, checked against the stage modules the commands call: no stage depends
    on a whole package (an edit anywhere in it would re-run the stage), and each depends on its own
    command's CLI module but on no other command's."""
    cli_modules = {f"cli/{p.name}" for p in (ROOT / "cli").glob("*.py")}
    for name, stage in stages().items():
        code = [d for d in stage["deps"] if is_code(d)]
        assert all((ROOT / d).is_file() for d in code), f"{name}: {code}"
        own = {f for f in code_files(command_of(stage)) if f in cli_modules}
        assert {"cli/__init__.py", "cli/options.py"} <= own and set(code) & cli_modules == own, name
    assert "cli/bundle.py" not in {d for s in stages().values() for d in s["deps"]}  # no stage runs export


def test_make_deps_rewrites_only_the_code_deps(tmp_path):
    """`python -m cli.deps --write` on a dvc.yaml whose code deps are gone or stale gives back the file it
    writes from today's, byte for byte (comments, data deps and their order kept); without --write it
    lists the stale stages."""
    from click.testing import CliRunner

    from cli.deps import main as deps
    from cli.deps import rewritten

    text = (ROOT / "dvc.yaml").read_text()
    text = rewritten(text, yaml.safe_load(text))  # today's file, up to date (the test above says if it is not)
    code = re.compile(r"^\s+- (cli|pipeline|stages|store)/\S+\n", re.M)
    stripped = code.sub("", text)
    first = "    deps:\n      - ${data.dir}\n"
    assert not code.search(stripped) and stripped.count(first) == 3
    old = stripped.replace(first, f"{first}      - pipeline\n      - stages/gone.py\n")
    path = tmp_path / "dvc.yaml"
    path.write_text(old)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # a foreach may read it
    check = CliRunner().invoke(deps, ["--file", str(path)])
    assert check.exit_code == 1 and "phase_a: missing [" in check.output and "'stages/gone.py'" in check.output
    assert CliRunner().invoke(deps, ["--file", str(path), "--write"]).exit_code == 0
    assert path.read_text() == text


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_command_lines_render_as_dvc_renders_them(path, tmp_path):
    """cli/project.py's rendering (what bare commands default from) against DVC's own, stage by stage."""
    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(path, tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    index = Repo(str(tmp_path)).index.stages
    params = yaml.safe_load(path.read_text())
    ours = {name: rendered(stage["cmd"], params) for name, stage in stages().items()}
    assert ours == {s.addressing.split(":")[-1]: shlex.split(s.cmd) for s in index}
    outputs = {name: sorted(render(o if isinstance(o, str) else next(iter(o)), params, name)
                            for kind in ("outs", "metrics", "plots") for o in stage.get(kind, []))
               for name, stage in stages().items()}  # foreach keys and items in the keys too
    assert outputs == {s.addressing.split(":")[-1]: sorted(o.def_path for o in s.outs) for s in index}


def test_a_missing_param_is_a_one_line_error_naming_the_stage():
    with pytest.raises(UserError, match=r"^dvc.yaml: stage 'x': \$\{adapter.nope\} is not in params.yaml$"):
        render("ballad-pipe adapter --lambda ${adapter.nope}", {"adapter": {}}, "dvc.yaml: stage 'x'")


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
    """``cmd`` as DVC renders it from ``params`` (cli/project.py, checked against DVC above), as words."""
    return shlex.split(render(cmd, params, "dvc.yaml"))


def _configs() -> dict:
    """The commands whose options build a config dataclass, and that dataclass (its ``check`` is theirs)."""
    from stages.adapter.config import TrainConfig
    from stages.extract.config import ExtractConfig
    from stages.phase_a.config import PhaseAConfig
    from stages.pretrain.config import PretrainConfig

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
