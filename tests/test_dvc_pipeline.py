"""The DVC pipeline end to end on a very small demo: every declared metric appears, changing only
adapter.lambda re-runs only the adapter and the stages downstream of it, and `dvc exp show` compares
experiments' metrics (the small metrics files, dvclive's training logs included, are tracked by git, as
DVC intends). And without running a stage (outputs stood in for, recorded by `dvc commit`): a code edit
leaves `dvc status` clean for every stage whose command does not run the edited file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "data": {"args": "--imbalance 20 --max-count 40 --test-per-class 3 --val-per-class 1 --seed 0 --shard-size 100"},
    "pretrain": {"corpus-size": 512, "steps": 20, "batch-size": 64, "warmup": 5, "eval-size": 80},
    "phase_a": {"epochs": 1, "schedule": "standard", "batch-size": 32, "micro-batch": 32, "workers": 0},
    "extract": {"workers": 0, "test-views": "flip"},
    "views": {"train-views": 2},
    "adapter": {"train": {"epochs": 2, "batch-size": 64}},
    "sweep": {"lambda": {"ablation": "none", "lambdas": "0,0.5"}},  # two λ; the other grids as the demo's
}


def _dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", BALLAD_PROGRESS="0",
               DVC_NO_ANALYTICS="1")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _merge(params: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(params[key], value)
        else:
            params[key] = value


def _set_params(repo: Path, overrides: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    _merge(params, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_lambda_reruns_only_phase_b(tmp_path):
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _set_params(repo, SMALL)

    _dvc(repo, "repro")
    from test_dvc_yaml import stages

    metrics = [next(iter(m)) for s in stages().values() for m in s.get("metrics", [])]
    reports = [m for m in metrics if m.startswith("reports/")]
    assert {"reports/ballad/metrics.json", "reports/phase_a/metrics.json", "reports/zero_shot/metrics.json"} <= set(reports)
    for m in reports:
        values = json.loads((repo / m).read_text())
        assert {"top1", "top5", "many", "medium", "few", "ece", "num_test", "num_classes"} <= set(values)
    # dvclive's files of pretraining and Phase A (per step) and Phase B (per epoch), which `dvc plots` draws
    assert set(metrics) - set(reports) == {"checkpoints/pretrain/dvclive/metrics.json",
                                           "checkpoints/phase_a/dvclive/metrics.json", "models/adapter.dvclive/metrics.json"}
    assert set(json.loads((repo / "checkpoints/pretrain/dvclive/metrics.json").read_text())) >= {"loss", "lr", "step"}
    assert json.loads((repo / "models/adapter.dvclive/metrics.json").read_text())["step"] == 2
    assert set(json.loads((repo / "checkpoints/phase_a/dvclive/metrics.json").read_text())["train"]) == {
        "loss", "lr", "images_per_s"}
    plots = _dvc(repo, "plots", "show", "--json")
    assert "checkpoints/phase_a/dvclive/plots/metrics/train/loss.tsv" in plots
    assert "models/adapter.dvclive/plots/metrics/train/loss.tsv" in plots
    assert "checkpoints/pretrain/dvclive/plots/metrics/loss.tsv" in plots
    assert all((repo / f"reports/sweep/{name}/sweep.json").is_file() for name in ("lambda", "positions", "samplers",
                                                                                   "losses"))

    _set_params(repo, {"adapter": {"lambda": 0.5}})
    status = json.loads(_dvc(repo, "status", "--json"))
    assert set(status) == {"adapter"}, status  # the only stage whose own inputs changed
    out = _dvc(repo, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"adapter", "evaluate@ballad"}, out
    assert json.loads(_dvc(repo, "status", "--json")) == {}

    # Two experiments: each carries its own metrics, and `dvc exp show` lists them beside the baseline.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    for lam in (0.0, 1.0):
        _dvc(repo, "exp", "run", "-S", f"adapter.lambda={lam}", "--name", f"lam{lam:g}")
    rows = json.loads(_dvc(repo, "exp", "show", "--json"))
    found = {}
    for commit in rows:
        for exp in [commit, *(commit.get("experiments") or [])]:
            for rev in exp.get("revs", [exp]):
                data = (rev.get("data") or {})
                name = rev.get("name") or data.get("name") or data.get("rev")
                metrics_data = data.get("metrics", {}).get("reports/ballad/metrics.json", {}).get("data")
                live = data.get("metrics", {}).get("models/adapter.dvclive/metrics.json", {}).get("data")
                if name and metrics_data and live:
                    found[name] = (metrics_data["top1"], live["train"]["loss"])  # git carries dvclive's files too
    assert {"lam0", "lam1"} <= set(found), rows
    assert all(isinstance(v, float) for pair in found.values() for v in pair)
    assert found["lam0"][1] != found["lam1"][1]  # each experiment its own Phase B log


def _append(path: Path, text: str = "\n# edited\n") -> None:
    path.write_text(path.read_text() + text)


@pytest.mark.slow
def test_a_code_edit_changes_only_the_stages_whose_command_runs_it(tmp_path):
    """dvc.yaml's code deps as DVC reads them: another command's CLI module (export's) changes no stage,
    phase-a's CLI module only phase_a, a module only evaluate and sweep run only those."""
    from dvc.repo import Repo

    from pipeline.provenance import PACKAGES, code_files

    repo = tmp_path / "repo"
    for package in PACKAGES:
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, repo / name)
    _dvc(repo, "init", "--no-scm", "-q")
    for stage in Repo(str(repo)).index.stages:  # every output stood in for by a small file
        for out in stage.outs:
            path = repo / out.def_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(out.def_path)
    _dvc(repo, "commit", "--force", "-q")
    assert json.loads(_dvc(repo, "status", "--json")) == {}

    _append(repo / "cli" / "bundle.py")  # `export`'s CLI module: no stage runs it
    assert json.loads(_dvc(repo, "status", "--json")) == {}

    evaluate_only = sorted(set(code_files("evaluate")) - {f for c in ("prepare", "pretrain", "phase-a", "extract",
                                                                      "adapter") for f in code_files(c)})
    _append(repo / evaluate_only[-1])
    changed = set(json.loads(_dvc(repo, "status", "--json")))
    sweeps = {f"sweep@{name}" for name in ("lambda", "positions", "samplers", "losses")}
    assert "evaluate@ballad" in changed and changed <= {"evaluate@zero_shot", "evaluate@phase_a", "evaluate@ballad",
                                                        *sweeps}, (evaluate_only[-1], changed)
    shutil.copy2(REPO / evaluate_only[-1], repo / evaluate_only[-1])

    _append(repo / "cli" / "phase_a.py")
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"phase_a"}
