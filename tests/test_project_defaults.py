"""Bare commands inside a project (cli/project.py, docs/project-defaults.md): typed in a folder holding
dvc.yaml and params.yaml without their required options, `ballad-pipe adapter --lambda 0.2` and
`ballad-pipe extract --ckpt checkpoints/phase_a/final.pt` receive what `dvc repro` passes them, from
the stage that runs them, and write where it writes; what is typed overrides it; a tie between stages
is a one-line error; a complete command, or one outside a project, runs as typed."""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from cli import main
from cli.project import expand, project_defaults, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the pipeline's dvc.yaml and params.yaml, the current directory."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def record(monkeypatch, command: str) -> list[dict]:
    """The options each run of ``command`` receives, the command doing nothing else."""
    calls = []
    monkeypatch.setattr(main.get_command(click.Context(main), command), "callback", lambda **kw: calls.append(kw))
    return calls


def stage_words(name: str) -> list[str]:
    """Stage ``name``'s command line as `dvc repro` runs it (the rendering is checked against DVC's in
    tests/test_dvc_yaml.py), without the program."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stage = expand(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"], params)[name]
    return shlex.split(render(stage["cmd"], params, "dvc.yaml"))[1:]


@pytest.mark.parametrize("typed, stage", [
    (["adapter", "--lambda", "0.2"], "adapter"),
    (["extract", "--ckpt", "checkpoints/phase_a/final.pt"], "extract"),
    (["extract", "--ckpt", "none"], "extract_zero_shot"),
    (["evaluate", "--features", "features/phase_a.zarr", "--adapter", "models/adapter.pt"], "evaluate@ballad"),
])
def test_a_bare_command_receives_what_dvc_repro_passes(project, monkeypatch, typed, stage):
    calls = record(monkeypatch, typed[0])
    bare = CliRunner().invoke(main, typed)
    full = CliRunner().invoke(main, stage_words(stage))
    assert bare.exit_code == 0 and full.exit_code == 0, bare.output + full.output
    assert calls[0] == calls[1] and calls[0]["out"] == stage_words(stage)[stage_words(stage).index("--out") + 1]
    note = bare.stderr.strip()
    assert note.startswith(f"ballad-pipe {typed[0]}: from dvc.yaml stage '{stage}' (params.yaml): ") and "\n" not in note
    assert set(note.split("; from the command line: ")[1].split(", ")) == {
        f"{flag} {value}" for flag, value in zip(typed[1::2], typed[2::2])}
    assert full.stderr == ""  # the full command line is complete: nothing taken from the project


def test_what_is_typed_overrides_the_stage(project, monkeypatch):
    calls = record(monkeypatch, "adapter")
    result = CliRunner().invoke(main, ["adapter", "--lambda", "0.5", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert (calls[0]["lam"], calls[0]["epochs"], calls[0]["features"], calls[0]["out"]) == (
        0.5, 3, "features/phase_a.zarr", "models/adapter.pt")
    stage_part, typed_part = result.stderr.split("; from the command line: ")
    assert "--features features/phase_a.zarr" in stage_part and "--lambda" not in stage_part
    assert typed_part.strip() == "--lambda 0.5, --epochs 3"


def test_a_bare_adapter_writes_where_dvc_repro_does(project, lt_store):
    shutil.copytree(lt_store, project / "features" / "phase_a.zarr")
    result = CliRunner().invoke(main, ["adapter", "--lambda", "0.2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote models/adapter.pt ")
    assert (project / "models" / "adapter.pt").is_file() and (project / "models/adapter.dvclive/metrics.json").is_file()


def test_stages_that_fit_the_typed_options_equally_are_a_one_line_error(project, monkeypatch):
    calls = record(monkeypatch, "evaluate")
    result = CliRunner().invoke(main, ["evaluate", "--features", "features/phase_a.zarr"])
    assert result.exit_code == 1 and not calls
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: dvc.yaml: stages evaluate@phase_a, evaluate@ballad run "
                                                   "`evaluate` and fit the options typed equally: type ")
    assert "--adapter (none | models/adapter.pt)" in lines[0] and "zero_shot" not in lines[0]


def test_a_complete_command_and_one_outside_a_project_run_as_typed(project, tmp_path_factory, monkeypatch):
    calls = record(monkeypatch, "adapter")
    complete = ["adapter", "--features", "f.zarr", "--out", "a.pt"]
    inside = CliRunner().invoke(main, complete)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    outside = CliRunner().invoke(main, complete)
    assert inside.exit_code == outside.exit_code == 0 and inside.stderr == ""
    assert calls[0] == calls[1]  # TrainConfig's defaults, not params.yaml's
    bare = CliRunner().invoke(main, ["adapter", "--lambda", "0.2"])
    assert bare.exit_code == 2 and "Missing option '--features'" in bare.output and len(calls) == 2


def test_a_subcommand_takes_its_stages_options(project):
    """`prepare synthetic`: the defaults reach the subcommand, nested as click reads them."""
    group = main.get_command(click.Context(main), "prepare")
    defaults = project_defaults(click.Context(main), "prepare", group, ["synthetic", "--seed", "3"])
    words = stage_words("prepare")
    assert words[:2] == ["prepare", "synthetic"]
    assert defaults == {"prepare": {"synthetic": {
        "out": words[words.index("--out") + 1], "imbalance": words[words.index("--imbalance") + 1],
        "max_count": words[words.index("--max-count") + 1], "shard_size": words[words.index("--shard-size") + 1]}}}


def test_a_param_the_stage_reads_and_params_yaml_lacks_is_a_one_line_error(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["adapter"]["lambda"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["adapter", "--epochs", "2"])
    assert result.exit_code == 1
    assert result.output == "Error: dvc.yaml: stage 'adapter': ${adapter.lambda} is not in params.yaml\n"
