"""Training metrics through dvclive (pipeline/live.py): Phase A and Phase B write them while they train,
a resumed Phase A holds every step once, and dvclive neither touches a repository nor the network."""
from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

import stages.adapter.train as adapter_module
import stages.phase_a.run as phase_a_module
from pipeline.live import LiveLog
from stages.adapter import TrainConfig, live_dir, train_adapter
from stages.phase_a import LIVE_DIR, PhaseAConfig, run_phase_a
from test_phase_a import TINY, read_log, small_data  # noqa: F401  (the Phase A dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def rows(directory, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of the dvclive metric ``name`` (e.g. train/loss)."""
    path = directory / "plots" / "metrics" / f"{name}.tsv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[name.rsplit("/", 1)[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def summary(directory) -> dict:
    return json.loads((directory / "metrics.json").read_text())


def test_phase_a_logs_while_it_trains_and_a_resumed_run_holds_every_step_once(small_data, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    live = out / LIVE_DIR
    cfg = dict(data=str(small_data), out=str(out), epochs=2, batch_size=16, select="last", save_every=7, **TINY)
    epoch_lr, seen = phase_a_module.epoch_lr, {}

    def stop_at_epoch_2(lr, epoch, *args):  # 7 steps per epoch; last.pt holds step 7
        if epoch == 1:
            seen.update(loss=rows(live, "train/loss"), lr=rows(live, "train/lr"), summary=summary(live))
            raise KeyboardInterrupt
        return epoch_lr(lr, epoch, *args)

    monkeypatch.setattr(phase_a_module, "epoch_lr", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_phase_a(PhaseAConfig(**cfg))
    # written during the run, step by step, before it ended
    assert [s for s, _ in seen["loss"]] == list(range(1, 8)) and [s for s, _ in seen["lr"]] == list(range(1, 8))
    assert seen["summary"]["step"] == 7 and seen["summary"]["train"]["loss"] == seen["loss"][-1][1]
    assert [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r] == seen["loss"]
    # a killed run also logged steps past its checkpoint: the resumed run drops them, as train_log.jsonl's
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "epoch": 2, "loss": 9.0, "lr": 1.0, "images_per_s": 1.0, "bad_samples": 0}) + "\n")
    with open(live / "plots" / "metrics" / "train" / "loss.tsv", "a") as f:
        f.write("8\t9.0\n9\t9")  # the last line cut short by the kill

    monkeypatch.setattr(phase_a_module, "epoch_lr", epoch_lr)
    run_phase_a(PhaseAConfig(**cfg, resume=True))
    loss = rows(live, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 15)) and loss[:7] == seen["loss"]
    assert loss == [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    assert summary(live)["step"] == 14 and summary(live)["train"]["loss"] == loss[-1][1]


def test_phase_b_logs_every_epoch_as_it_ends(lt_store, tmp_path, monkeypatch):
    live = live_dir(tmp_path / "adapter.pt")
    assert live == tmp_path / "adapter.dvclive"
    epoch_lr, seen = adapter_module.epoch_lr, []

    def watch(lr, epoch, *args):
        seen.append([s for s, _ in rows(live, "train/loss")])
        return epoch_lr(lr, epoch, *args)

    monkeypatch.setattr(adapter_module, "epoch_lr", watch)
    blob = train_adapter(lt_store, tmp_path / "adapter.pt", TrainConfig(epochs=3, batch_size=64))
    assert seen == [[], [1], [1, 2]]  # each epoch's row was there when the next epoch started
    assert rows(live, "train/loss") == [(e, pytest.approx(loss)) for e, loss in enumerate(blob["losses"], 1)]
    assert [s for s, _ in rows(live, "train/lr")] == [1, 2, 3] and rows(live, "val/top1") == []  # no val split
    assert summary(live) == {"step": 3, "train": {"loss": pytest.approx(blob["losses"][-1]), "lr": 0.0},
                             "selected_epoch": 3}


def test_dvclive_touches_no_repository_and_stays_offline(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # git but no DVC: dvclive would `dvc init`
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_STUDIO_OFFLINE", raising=False)
    LiveLog(repo / "live").log(1, {"a": 1.0})
    assert not (repo / ".dvc").exists() and not (repo / "dvc.yaml").exists()
    assert sorted(p.name for p in (repo / "live").iterdir()) == ["metrics.json", "plots"]
    assert os.environ["DVC_STUDIO_OFFLINE"] == "true"
    LiveLog(repo / "other", enabled=False).log(1, {"a": 1.0})  # torchrun ranks but the first
    assert not (repo / "other").exists()
