"""The checkpoint building block pretraining and Phase A share (pipeline/checkpointing.py): which options
must match to resume, what last.pt records, the random state, stale writes and the replayed metrics."""
from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch

from pipeline.checkpointing import (checkpoint, clear_stale_writes, replay, restore_rng, resumable, resume_keys,
                                    resume_state)
from pipeline.errors import UserError
from pipeline.options import option

CPU = torch.device("cpu")


@dataclasses.dataclass
class Config:
    out: str = option("o", "--out", "Output.")
    lr: float = resumable(option(0.1, "--lr", "Learning rate."))
    workers: int = option(2, "--workers", "Workers.")
    seed: int = resumable(option(0, "--seed", "Seed."))
    resume: bool = option(False, "--resume", "Resume.")


def test_resume_keys_are_the_fields_marked_resumable():
    assert resume_keys(Config) == ("lr", "seed")
    assert dataclasses.fields(Config)[1].metadata["flag"] == "--lr"  # marking keeps the option's own metadata


def saved(tmp_path, cfg, step=3, total=10):
    path = tmp_path / "last.pt"
    torch.save(checkpoint(cfg, "pretrain", step, total, CPU, model={"w": torch.ones(2)}), path)
    return path


def test_a_checkpoint_resumes_only_with_the_same_resume_keys(tmp_path, caplog):
    path = saved(tmp_path, Config())
    assert resume_state(Config(resume=True, workers=7), "pretrain", path, 10)["step"] == 3  # workers may change
    with caplog.at_level(logging.WARNING, logger="ballad.checkpointing"):
        assert resume_state(Config(resume=True, lr=0.2), "pretrain", path, 10) is None
        assert resume_state(Config(resume=True), "pretrain", path, 3) is None  # finished
        assert resume_state(Config(resume=True), "pretrain", path, 10, expect={"data": (1, "--data is another")}) is None
    assert "--lr 0.1 → 0.2" in caplog.text and "finished run (step 3 of 3)" in caplog.text
    assert "--data is another" in caplog.text
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        resume_state(Config(), "pretrain", path, 10)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"last.pt: unreadable checkpoint .*delete it to start over$"):
        resume_state(Config(resume=True), "pretrain", path, 10)


def test_another_commands_code_does_not_resume(tmp_path):
    path = saved(tmp_path, Config())
    assert resume_state(Config(resume=True), "phase-a", path, 10) is None  # the digest is of pretrain's files


def test_the_random_state_is_restored(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    state = checkpoint(Config(), "pretrain", 1, 2, CPU)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    restore_rng(state, CPU)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_stale_writes_go_and_other_files_stay(tmp_path):
    (tmp_path / ".last.pt.abc.tmp").write_bytes(b"cut")
    (tmp_path / "last.pt").write_bytes(b"whole")
    clear_stale_writes(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_replay_logs_each_row_once_and_the_summary_at_the_step():
    class Live:
        def __init__(self):
            self.calls = []

        def log(self, step, values, sync=True):
            self.calls.append((step, values, sync))

    live = Live()
    replay(live, [(1, {"loss": 2.0}), (2, {"loss": 1.0})], 2)
    assert live.calls == [(1, {"loss": 2.0}, False), (2, {"loss": 1.0}, False), (2, {}, True)]
