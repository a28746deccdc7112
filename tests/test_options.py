"""One source per setting (issue 18): options built from the config dataclasses, `none` read once at the
command-line edge, one --device, and a --help that does not import torch."""
from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import MISSING, fields, replace

import click
import pytest
from click.testing import CliRunner

from cli import COMMANDS, main
from cli.options import FLOAT_OR_NONE, INT_OR_NONE, TEXT_OR_NONE
from pipeline.errors import UserError
from pipeline.options import DEVICE, DEVICE_HELP, none_to_null
from stages.adapter.config import TrainConfig
from stages.phase_a.config import PhaseAConfig


def command(name: str) -> click.Command:
    return main.get_command(click.Context(main), name)


def options(cmd: click.Command) -> dict[str, click.Option]:
    return {opt: p for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


# -- --help without torch --------------------------------------------------------------------------------

def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from cli import COMMANDS, main\n"
        "for args in [['--help'], *[[name, '--help'] for name in COMMANDS]]:\n"
        "    try:\n"
        "        main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    assert 'torch' not in sys.modules, args\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    assert "Usage:" in proc.stdout and "--micro-batch" in proc.stdout


# -- options built from the configs ----------------------------------------------------------------------

@pytest.mark.parametrize("config, name", [(PhaseAConfig, "phase-a"), (TrainConfig, "adapter")])
def test_every_config_field_is_its_option_with_the_fields_default_choices_and_help(config, name):
    opts = options(command(name))
    ctx = click.Context(command(name))
    for f in fields(config):
        meta = f.metadata
        opt = opts[meta["flag"]]
        assert opt.name == f.name and opt.help == meta["help"], meta["flag"]
        if f.default_factory is not MISSING:
            assert opt.get_default(ctx, call=True) == f.default_factory()
        elif f.default is MISSING:
            assert opt.required, meta["flag"]
        else:
            assert opt.get_default(ctx, call=False) == f.default, meta["flag"]
        if meta["choices"]:
            assert tuple(opt.type.choices) == meta["choices"], meta["flag"]


def test_phase_a_config_is_one_class_and_checks_itself():
    import stages.phase_a as pa
    import stages.phase_a.config as pac

    assert pa.PhaseAConfig is pac.PhaseAConfig
    assert pa.CLASSIFIERS is pac.CLASSIFIERS and pa.PRECISIONS is pac.PRECISIONS
    PhaseAConfig(data="d", model="m").check()
    with pytest.raises(UserError, match=r"^--micro-batch 0: must be at least 1$"):
        PhaseAConfig(data="d", model="m", micro_batch=0).check()


def test_text_chunk_is_refused_below_1_in_one_line():
    result = CliRunner().invoke(main, ["phase-a", "--data", "d", "--model", "m", "--text-chunk", "0"])
    assert result.exit_code != 0 and result.output == "Error: --text-chunk 0: must be at least 1\n"


# -- none ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, text, value", [
    (INT_OR_NONE, "none", None), (INT_OR_NONE, "None", None), (INT_OR_NONE, "", None), (INT_OR_NONE, "64", 64),
    (FLOAT_OR_NONE, "None", None), (FLOAT_OR_NONE, "25", 25.0), (TEXT_OR_NONE, "none", None),
    (TEXT_OR_NONE, "None", None), (TEXT_OR_NONE, "openai", "openai"),
])
def test_or_none_reads_none_once(kind, text, value):
    assert kind.convert(text, None, None) == value
    assert none_to_null(text) == (None if text in ("none", "None", "") else text)


def test_or_none_refuses_what_the_wrapped_type_refuses():
    with pytest.raises(click.BadParameter):
        INT_OR_NONE.convert("many", None, None)


@pytest.mark.parametrize("word", ["none", "None"])
def test_phase_a_numeric_options_take_dvcs_null(monkeypatch, word):
    import stages.phase_a as pa

    seen = []
    monkeypatch.setattr(pa, "run_phase_a", lambda cfg: seen.append(cfg) or "final.pt")
    result = CliRunner().invoke(main, ["phase-a", "--data", "d", "--model", "m", "--pretrained", word,
                                       "--micro-batch", word, "--logit-scale", word, "--adapter-width", word])
    assert result.exit_code == 0, result.output
    assert seen == [PhaseAConfig(data="d", model="m")]


@pytest.mark.parametrize("word", ["none", "None"])
def test_an_option_with_a_value_default_may_still_be_none(monkeypatch, word):
    """``--head-init-shots`` defaults to 100 (LIFT+'s) and takes none (every image, LIFT's)."""
    import stages.phase_a as pa

    seen = []
    monkeypatch.setattr(pa, "run_phase_a", lambda cfg: seen.append(cfg) or "final.pt")
    args = ["phase-a", "--data", "d", "--model", "m", "--classifier", "head", "--head-init", "class-mean"]
    assert CliRunner().invoke(main, [*args, "--head-init-shots", word]).exit_code == 0
    assert CliRunner().invoke(main, args).exit_code == 0
    assert [cfg.head_init_shots for cfg in seen] == [None, 100]
    seen[0].check()  # none passes the config's own range check, 0 does not
    with pytest.raises(UserError, match="--head-init-shots 0"):
        replace(seen[0], head_init_shots=0).check()


@pytest.mark.parametrize("args, stage, returns, nones", [
    (["evaluate", "--features", "f", "--out", "o"],  # the default, none
     "stages.evaluate.run.evaluate", {k: 1.0 for k in ("top1", "top5", "many", "medium", "few", "ece")} | {"num_test": 1},
     ["0.adapter"]),
    (["neighbors", "--features", "f", "--key", "k", "--adapter", "None"],
     "stages.evaluate.knn.neighbors", {"key": "k", "class": "c", "predicted_class": "c", "neighbors": []},
     ["0.adapter"]),
    (["extract", "--ckpt", "none", "--pretrained", "None", "--workers", "None", "--data", "d", "--out", "o"],
     "stages.extract.run.extract", {}, [0, "pretrained", "workers"]),
    (["export", "--ckpt", "c", "--adapter", "none", "--features", "f", "--out", "o"],
     "stages.bundle.run.export", {"adapter": None, "model": {"name": "m"}, "classnames": []}, [1]),
], ids=["evaluate", "neighbors", "extract", "export"])
def test_stages_receive_none_for_none(monkeypatch, args, stage, returns, nones):
    """``nones``: the stage function's arguments (by position or keyword, or ``N.field`` of the config passed
    at position N) that must arrive as None."""
    module, name = stage.rsplit(".", 1)
    calls = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: calls.append((a, kw)) or returns)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    [(positional, keywords)] = calls

    def argument(k):
        if isinstance(k, int):
            return positional[k]
        if "." in k:
            index, field = k.split(".")
            return getattr(positional[int(index)], field)
        return keywords[k]

    assert {k: argument(k) for k in nones} == dict.fromkeys(nones)


# -- --device --------------------------------------------------------------------------------------------

def test_every_command_defaults_to_the_same_device():
    commands = {name: command(name) for name in COMMANDS}
    with_device = {name: options(cmd)["--device"] for name, cmd in commands.items()
                   if cmd is not None and "--device" in options(cmd)}
    assert {"phase-a", "extract", "adapter", "evaluate", "sweep", "neighbors", "predict"} <= set(with_device)
    ctx = {name: click.Context(command(name)) for name in with_device}
    assert {name: opt.get_default(ctx[name]) for name, opt in with_device.items()} == dict.fromkeys(with_device, DEVICE)
    for name in ("phase-a", "extract", "adapter", "evaluate", "sweep", "neighbors", "predict"):
        assert with_device[name].help == DEVICE_HELP, name
