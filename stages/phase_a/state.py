"""What a Phase A run is (``Run``, fixed once set up) and what training changes (``TrainState``), and
how that state is started, resumed from last.pt, saved and logged. Resuming, the random state, stale
files and the replayed metrics are pipeline/checkpointing.py's, shared with pretraining.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline.checkpointing import checkpoint, clear_stale_writes, replay, restore_rng, resume_state
from pipeline.errors import UserError
from pipeline.live import LiveLog
from pipeline.peft import HEAD_KEY
from pipeline.runtime import atomic_path, save_torch
from stages.phase_a.config import PhaseAConfig
from stages.phase_a.data import BadSampleCounter, Transforms
from stages.phase_a.model import Towers, make_optimizer

log = logging.getLogger("ballad.phase_a")
COMMAND = "phase-a"  # the command whose code files last.pt's source digest covers
LIVE_DIR = "dvclive"  # in --out: the step and epoch metrics as dvclive writes them, while the run trains


@dataclass
class Run:
    """One process's share of a Phase A run, fixed once set up."""

    cfg: PhaseAConfig
    info: object  # store.shards' dataset description
    dist: object  # pipeline.distributed's process group
    device: torch.device
    select: str  # best-val or last
    decode_on: torch.device | None  # --decode gpu: the device that decodes images
    urls: list[str]
    val_urls: list[str]
    test_urls: list[str]
    micro: int  # images per forward pass
    accum: int  # micro-batches per optimizer step
    workers: int
    bb: object  # the model factory's Backbone
    towers: Towers
    net: torch.nn.Module  # the towers, or DDP around them
    tokens: torch.Tensor  # the class prompts
    scale: float
    loss_fn: Callable  # --loss (pipeline/losses.py make_loss): (logits, labels) -> mean loss
    transforms: Transforms  # --train-transform per epoch, --eval-transform
    mode: str  # frozen or train
    channels_last: bool
    record: dict  # final.json's "tuning"

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.jsonl"

    @property
    def steps_per_epoch(self) -> int:
        return self.info.split("train").num_samples // self.cfg.batch_size

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


@dataclass
class TrainState:
    """What training changes, and last.pt holds (with the model's weights)."""

    opt: torch.optim.Optimizer
    step: int = 0
    best: dict | None = None  # {"epoch", "val_acc"} of the best epoch so far
    bad_before: int = 0  # undecodable samples of the attempts before this one
    bad_samples: int = 0
    rows: list = field(default_factory=list)  # train_log.jsonl's
    live: LiveLog | None = None
    bad: BadSampleCounter = field(default_factory=BadSampleCounter)


def start(run: Run) -> TrainState:
    """A fresh state, or last.pt's when the run continues; the log and the live metrics up to its step."""
    cfg = run.cfg
    ckpt = last_checkpoint(cfg, run.last_path, run.total, run.info.fingerprint)
    state = TrainState(opt=make_optimizer(cfg, run.towers))
    if ckpt is not None:
        resume(run, state, ckpt)
    state.bad_samples = state.bad_before
    state.rows = _read_log(run.log_path, state.step) if ckpt is not None else []
    if run.dist.is_main:
        clear_stale_writes(run.out)
        if state.best is None:
            run.best_path.unlink(missing_ok=True)  # another run's
        with atomic_path(run.log_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in state.rows))
    state.live = LiveLog(run.out / LIVE_DIR, enabled=run.dist.is_main)
    replay(state.live, [(row["step"], live_values(row)) for row in state.rows], state.step)
    log.info("phase-a: %d steps (%d epochs), model mode %s, schedule %s, precision %s, selection %s, "
             "tune %s (%d trainable parameters), classifier %s, loss %s, transforms %s / %s", run.total,
             cfg.epochs, run.mode, cfg.schedule, cfg.precision, run.select, cfg.tune, run.record["trainable_params"],
             cfg.classifier, cfg.loss, cfg.train_transform, cfg.eval_transform)
    return state


def last_checkpoint(cfg: PhaseAConfig, path: Path, total: int, fingerprint: str) -> dict | None:
    """last.pt when this run continues it (pipeline/checkpointing.py), written from the same dataset too."""
    return resume_state(cfg, COMMAND, path, total, logger=log,
                        expect={"dataset_fingerprint": (fingerprint, f"--data {cfg.data} is another dataset")})


def resume(run: Run, state: TrainState, ckpt: dict) -> None:
    """Load last.pt's weights, optimizer, random state and progress into ``run`` and ``state``."""
    weights = dict(ckpt["model"])
    head = weights.pop(HEAD_KEY, None)
    try:
        run.bb.model.load_state_dict(weights)
        if run.towers.head is not None:
            run.towers.head.data.copy_(head)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{run.last_path}: checkpoint does not match --model {run.cfg.model} "
                        f"({str(e).splitlines()[0]})") from None
    state.opt.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt, run.device)
    state.step, state.bad_before, state.best = ckpt["step"], ckpt["bad_samples"], ckpt["best"]
    if run.dist.is_main and state.best is not None:
        _check_best(run, ckpt)


def _check_best(run: Run, ckpt: dict) -> None:
    """best.pt must hold the epoch last.pt names as the best. A new best is saved in last.pt first, at
    the end of its epoch, so when best.pt is older, last.pt's own weights are the best ones."""
    best = ckpt["best"]
    held = (torch.load(run.best_path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
            if run.best_path.exists() else None)
    if held == best["epoch"]:
        return
    if ckpt["step"] != best["epoch"] * run.steps_per_epoch:
        raise UserError(f"{run.best_path}: holds epoch {held}, but {run.last_path} names epoch "
                        f"{best['epoch']} as the best; delete {run.last_path} to start over")
    save_best(run.best_path, ckpt["model"], best)


def log_row(run: Run, state: TrainState, row: dict) -> None:
    """One row into train_log.jsonl (main process) and dvclive's files."""
    state.rows.append(row)
    if run.dist.is_main:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    state.live.log(row["step"], live_values(row))


def live_values(row: dict) -> dict:
    """A train_log.jsonl row as dvclive metrics: ``train/loss``, ``train/lr``, ``train/images_per_s`` per
    step; ``val/top1`` (and ``val/many``, ``val/medium``, ``val/few``) per validation; ``test/…`` alike."""
    if "loss" in row:
        return {f"train/{k}": row[k] for k in ("loss", "lr", "images_per_s")}
    split = "val" if "val_acc" in row else "test"
    return {f"{split}/top1": row[f"{split}_acc"], **{f"{split}/{g}": row[g] for g in ("many", "medium", "few")}}


def _read_log(path: Path, upto: int) -> list[dict]:
    """Rows of train_log.jsonl up to step ``upto``; a line cut short by a kill is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["step"] <= upto:
                rows.append(row)
    return rows


def model_state(run: Run) -> dict:
    """What training changes in the model: its state dict, and the head under HEAD_KEY with --classifier
    head. last.pt and best.pt hold it as "model"; final.pt holds it as the --tune method exports it."""
    state = run.bb.model.state_dict()
    if run.towers.head is not None:
        state[HEAD_KEY] = run.towers.head.detach()
    return state


def save_last(run: Run, state: TrainState) -> None:
    if run.dist.is_main:
        save_torch(checkpoint(run.cfg, COMMAND, state.step, run.total, run.device, model=model_state(run),
                              optimizer=state.opt.state_dict(), bad_samples=state.bad_samples, best=state.best,
                              dataset_fingerprint=run.info.fingerprint), run.last_path)


def save_best(path: Path, state_dict, best: dict) -> None:
    save_torch({"model": state_dict, **best}, path)
