"""`sweep` over any Phase B option (issue 25): a grid's rows equal separate `adapter` + `evaluate` runs, the
paper's ablations are ready grids whose values are the options' own choices, and a bad key or value is one
line naming it, before anything is read."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from stages.adapter.config import TrainConfig
from stages.evaluate.grid import ABLATIONS
from stages.evaluate.run import evaluate
from stages.evaluate.sweep import sweep
from stages.evaluate.config import EvaluateConfig, SweepConfig

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = dict(epochs=1, batch_size=64, schedule="standard")


def test_a_2x2_grid_gives_4_rows_equal_to_separate_adapter_runs(lt_store, tmp_path):
    from stages.adapter import train_adapter

    cfg = SweepConfig(features=str(lt_store), out=str(tmp_path / "s"), grid=("loss=ce,logit-adjusted",
                                                                               "lambda=0.1,0.5"), **FAST)
    rows = sweep(cfg)
    assert [(r["loss"], r["lambda"]) for r in rows] == [("ce", 0.1), ("ce", 0.5), ("logit-adjusted", 0.1),
                                                         ("logit-adjusted", 0.5)]
    assert list(rows[0])[:3] == ["loss", "lambda", "top1"]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text()) == rows
    table = list(csv.DictReader(open(tmp_path / "s" / "sweep.csv")))
    assert [(r["loss"], float(r["lambda"])) for r in table] == [(r["loss"], r["lambda"]) for r in rows]
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for r in rows[1], rows[2]:  # two points that differ in both keys from the shared defaults
        adapter = tmp_path / f"{r['loss']}-{r['lambda']}.pt"
        blob = train_adapter(lt_store, adapter, TrainConfig(lam=r["lambda"], loss=r["loss"], **FAST), device="cpu")
        m = evaluate(EvaluateConfig(str(lt_store), str(tmp_path / adapter.stem), adapter=str(adapter)))
        assert r["train_loss"] == blob["losses"][blob["selected_epoch"] - 1]
        assert {k: r[k] for k in ("top1", "many", "few", "ece")} == pytest.approx(
            {k: m[k] for k in ("top1", "many", "few", "ece")})
    assert rows[0]["top1"] != rows[3]["top1"]  # the grid's settings reached the training


def test_ablations_take_their_values_from_the_options_choices():
    choices = {f: TrainConfig.__dataclass_fields__[f].metadata["choices"] for f in ("position", "sampler", "loss")}
    for name, key, field in (("positions", "position", "position"), ("samplers", "sampler", "sampler"),
                             ("losses", "loss", "loss")):
        [axis] = SweepConfig(features="f", out="o", ablation=name).axes()
        assert (axis.key, axis.values) == (key, choices[field])
    [lam] = SweepConfig(features="f", out="o").axes()  # no axis given: the λ of Fig. 5
    assert lam.key == "lambda" and lam.values == tuple(i / 10 for i in range(11))
    sampler, lam = SweepConfig(features="f", out="o", ablation="samplers", lambdas="0.2,0.4").axes()
    assert sampler.key == "sampler" and lam.values == (0.2, 0.4)
    assert set(ABLATIONS) == {"lambda", "positions", "samplers", "losses"}


@pytest.mark.parametrize("grid, message", [
    (("foo=1,2",), r"--grid foo=1,2: no Phase B option --foo; a grid key is one of lambda, .*loss"),
    (("lambda",), r"--grid lambda: expected KEY=V1,V2,…"),
    (("lambda=",), r"--grid lambda=: give at least one value"),
    (("lambda=0.1,x",), r"--grid lambda=0.1,x: x is not a number"),
    (("lambda=0.1,1.5",), r"--grid lambda=0.1,1.5: --lambda 1.5: must be in \[0, 1\]"),
    (("epochs=2,2.5",), r"--grid epochs=2,2.5: 2.5 is not a whole number"),
    (("sampler=sqrt,square",), r"--grid sampler=sqrt,square: --sampler square: choose one of .*sqrt"),
    (("lambda=0.1,0.1",), r"--grid lambda=0.1,0.1: 0.1 is listed twice"),
    (("lambda=0.1", "lambda=0.2"), r"--grid lambda=0.2: lambda is already an axis of this grid"),
    (("schedule=standard,authors", "epochs=1,2"), r"the grid point schedule=authors epochs=1: --epochs 1: "),
])
def test_a_bad_grid_is_one_line_naming_the_key(tmp_path, grid, message):
    with pytest.raises(UserError, match="^" + message) as e:
        sweep(SweepConfig(features=str(tmp_path / "absent.zarr"), out=str(tmp_path / "s"), grid=grid,
                          schedule="standard"))
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


def test_cli_sweep_grid_and_ablation(lt_store, tmp_path):
    args = ["sweep", "--features", str(lt_store), "--epochs", "1", "--schedule", "standard", "--batch-size", "128"]
    r = CliRunner().invoke(main, [*args, "--ablation", "positions", "--grid", "lambda=0.2,0.6", "--out",
                                  str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(x["position"], x["lambda"]) for x in rows] == [(p, lam) for p in ("visual", "text", "both")
                                                            for lam in (0.2, 0.6)]
    assert r.output.splitlines()[0].split()[:3] == ["position", "lambda", "top-1"] and len(r.output.splitlines()) == 8
    r = CliRunner().invoke(main, [*args, "--grid", "sampler=sqrt,round", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and r.output.startswith("Error: --grid sampler=sqrt,round: --sampler round: choose one of")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
