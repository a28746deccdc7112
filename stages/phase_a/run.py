"""A Phase A run: checked, set up (or resumed from last.pt), trained epoch by epoch, written out.

``run_phase_a`` checks everything it can before any work, then one process's share of the run is a
``Run`` (what the run is, fixed once set up: data, model, towers) and a ``TrainState`` (what training
changes and last.pt holds: optimizer, step, best epoch, log rows), both in stages/phase_a/state.py
with how they are started, resumed, saved and logged. ``train_one_epoch`` trains one epoch, as
open_clip's trainer does, on that epoch's train transform (stages/phase_a/data.py ``Transforms``), then
validates (``--select best-val``), tests (``--eval-every``; both with --eval-transform) and saves;
``finish`` writes final.pt and final.json.

The loss is pipeline/losses.py's ``make_loss`` (any registered --loss), over the training logits only.
With ``--micro-batch`` each micro-batch's loss is weighted by its share of the batch: exact for a loss
that is a mean over samples (all but LADE, whose regulariser estimates per-class means over the
batch, and so over each micro-batch instead).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.distributed import cleanup, device_for, init_distributed
from pipeline.errors import UserError
from pipeline.locks import exclusive_lock
from pipeline.losses import chosen_params, make_loss
from pipeline.models import check_model_name, image_tower
from pipeline.peft import HEAD_KEY, blocks_refusal
from pipeline.runtime import pick_device, progress, save_torch, sha256_file, write_json
from pipeline.schedule import epoch_lr, note_zero_lr
from pipeline.shared_options import resolved_select
from pipeline.text import class_prompts, tokenize_trimmed
from pipeline.tuning import add_tuning, mark_trainable, tuning
from stages.phase_a.config import PhaseAConfig
from stages.phase_a.data import Transforms, check_shards, loader_error, train_batches
from stages.phase_a.model import (Towers, batchnorm_mode, build_model, param_digest, set_batchnorm, split_accuracy,
                                  to_device, train_step)
from stages.phase_a.head_init import initial_head
from stages.phase_a.state import Run, TrainState, log_row, model_state, save_best, save_last, start
from store.shards import DATASET_FILE, load_dataset
from store.stream import decode_on_device

log = logging.getLogger("ballad.phase_a")


def run_phase_a(cfg: PhaseAConfig) -> Path:
    """Train, checkpoint and write OUT/final.pt + OUT/final.json; returns the path of final.pt."""
    cfg.check()
    note_zero_lr(cfg.epochs, cfg.schedule)
    check_model_name(cfg.model)
    if tuning(cfg.tune).needs_blocks and (tower := image_tower(cfg.model)) != "transformer":
        raise blocks_refusal(cfg.tune, tower)
    info = load_dataset(cfg.data, allow_commands=cfg.allow_commands)
    select = selection(cfg, info)
    device_type = pick_device(cfg.device).type
    if cfg.precision == "fp16-weights" and device_type != "cuda":
        raise UserError("--precision fp16-weights: the authors' fp16 weights need CUDA; use --precision fp32 on CPU")
    dist = init_distributed(device_type)
    try:
        urls = check_shards(info, "train")
        on_device = decode_on_device(cfg.decode, torch.device(device_type), urls)
        _check_world(cfg, info, urls, dist.world_size)
        with exclusive_lock(cfg.out, what="--out") if dist.is_main else contextlib.nullcontext():
            run = set_up(cfg, info, dist, urls, select, on_device)
            return train(run, start(run))
    finally:
        cleanup(dist)


def selection(cfg: PhaseAConfig, info) -> str:
    """'best-val' or 'last': what ``--select`` means for this dataset."""
    has_val = "val" in info.splits and info.splits["val"].num_samples > 0
    return resolved_select(cfg.select, has_val, str(info.root / DATASET_FILE))


def _check_world(cfg: PhaseAConfig, info, urls, world: int) -> None:
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: must divide evenly over the {world} processes")
    per_rank = cfg.batch_size // world
    if cfg.micro_batch is not None and per_rank % cfg.micro_batch:
        raise UserError(f"--micro-batch {cfg.micro_batch}: must divide the per-process batch of {per_rank}")
    n_train = info.split("train").num_samples
    if n_train < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the {n_train} training samples")
    if len(urls) < world:
        raise UserError(f"{info.root}: {len(urls)} train shard(s) cannot feed {world} processes; "
                        "re-run prepare with a smaller --shard-size")


def set_up(cfg: PhaseAConfig, info, dist, urls: list[str], select: str, on_device: bool) -> Run:
    """The model with ``--tune``'s modules and trainable set, behind Towers (and DDP), and the data plan."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    device = device_for(dist, cfg.device)
    bb, channels_last = build_model(cfg, device)
    model = bb.model
    tokens = tokenize_trimmed(bb.tokenizer, class_prompts(info.classnames, info.template)).to(device)
    record = add_tuning(model, cfg.tune, num_classes=info.num_classes, lora_rank=cfg.lora_rank,
                        adapter_width=cfg.adapter_width, tune_blocks=cfg.tune_blocks)
    mark_trainable(model, cfg.tune, text=cfg.classifier == "text", tune_blocks=cfg.tune_blocks)
    head, head_input = initial_head(cfg, bb, tokens, urls, device, device if on_device else None, channels_last)
    towers = Towers(model, cfg.precision, head, cfg.text_chunk, head_input)
    record["trainable_params"] = sum(p.numel() for p in towers.parameters() if p.requires_grad)
    mode = batchnorm_mode(cfg.batchnorm, bb.pretrained)
    set_batchnorm(towers, mode)
    net = towers
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            towers, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = cfg.batch_size // dist.world_size
    micro = cfg.micro_batch or per_rank
    return Run(cfg=cfg, info=info, dist=dist, device=device, select=select,
               decode_on=device if on_device else None, urls=urls,
               val_urls=check_shards(info, "val") if select == "best-val" else [],
               test_urls=check_shards(info, "test") if cfg.eval_every else [], micro=micro, accum=per_rank // micro,
               workers=min(cfg.workers, len(urls) // dist.world_size),  # a worker without a shard ends the stream
               bb=bb, towers=towers, net=net, tokens=tokens, scale=float(model.logit_scale.exp()),
               loss_fn=make_loss(cfg, info.split("train").class_counts, device=device),
               transforms=Transforms(cfg, bb),
               mode=mode, channels_last=channels_last, record=record)


def train(run: Run, state: TrainState) -> Path:
    """Every epoch left, then final.pt and final.json."""
    if run.cfg.eval_every and state.step == 0:
        log_test_accuracy(run, state, 0)
    bar = progress(total=run.total, initial=state.step, desc="phase-a", unit="step",
                   disable=None if run.dist.is_main else True)
    for epoch in range(state.step // run.steps_per_epoch, run.cfg.epochs):
        train_one_epoch(run, state, epoch, bar)
    bar.close()
    return finish(run, state)


def train_one_epoch(run: Run, state: TrainState, epoch: int, bar) -> None:
    """The steps of ``epoch`` from ``state.step`` on, a row logged and last.pt saved every --save-every
    steps; at its end validation (which saves a new best), the test accuracy, and last.pt."""
    cfg = run.cfg
    for group in state.opt.param_groups:
        group["lr"] = epoch_lr(cfg.lr, epoch, cfg.epochs, cfg.schedule)
    end = (epoch + 1) * run.steps_per_epoch
    consumed = (state.step - epoch * run.steps_per_epoch) * run.accum
    batches = train_batches(run.urls, run.transforms.train(epoch), seed=cfg.seed, epoch=epoch,
                            micro_batch=run.micro, workers=run.workers, shuffle_buffer=cfg.shuffle_buffer,
                            distributed=run.dist.enabled, consumed=consumed, skip_bad=cfg.skip_bad, on_bad=state.bad,
                            pin_memory=run.device.type == "cuda", decode_on=run.decode_on, max_pixels=cfg.max_pixels)
    try:
        tick = time.perf_counter()
        while state.step < end:
            loss = optimizer_step(run, state, _take(batches, run.accum))
            now, lr = time.perf_counter(), state.opt.param_groups[0]["lr"]
            speed, tick = cfg.batch_size / (now - tick), now
            log_row(run, state, {"step": state.step, "epoch": epoch + 1, "loss": round(loss, 5), "lr": lr,
                                 "images_per_s": round(speed, 1), "bad_samples": state.bad_samples})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
            bar.update()
            if state.step < end and state.step % cfg.save_every == 0:
                save_last(run, state)
    finally:
        batches.close()  # now, not when collected: a DataLoader's shutdown waits for each worker
    saved = run.select == "best-val" and validate(run, state, epoch + 1)
    if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        log_test_accuracy(run, state, epoch + 1)
    if not saved and (state.step % cfg.save_every == 0 or state.step == run.total):
        save_last(run, state)


def _take(batches, n: int) -> list:
    """The next ``n`` micro-batches; an unreadable image without --skip-bad as its one line."""
    try:
        return [next(batches) for _ in range(n)]
    except UserError as e:
        raise loader_error(e) from None


def optimizer_step(run: Run, state: TrainState, micro_batches) -> float:
    """One optimizer step over ``micro_batches`` [(keys, images, labels)]; returns the loss, the mean over
    the ranks (which, like the count of undecodable samples, every rank then holds alike)."""
    _check_labels(run, micro_batches)
    device = run.device
    loss = train_step(run.net, run.tokens, [(to_device(x, device, run.channels_last), y.to(device, non_blocking=True))
                                            for _, x, y in micro_batches], run.scale, run.loss_fn)
    stats = torch.tensor([loss, state.bad.value], device=device)
    if run.dist.enabled:
        torch.distributed.all_reduce(stats)
        stats[0] /= run.dist.world_size
    loss = float(stats[0])
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is {run.last_path}" if run.last_path.exists()
                 else "no checkpoint was written")
        raise UserError(f"step {state.step + 1}: loss is {loss}; stopped without updating the weights "
                        f"({where}); lower --lr or --logit-scale")
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    state.step += 1
    state.bad_samples = state.bad_before + int(stats[1])
    return loss


def _check_labels(run: Run, micro_batches) -> None:
    k = run.info.num_classes
    for keys, _, labels in micro_batches:  # remote shards are not checked up front
        outside = ((labels < 0) | (labels >= k)).nonzero()
        if len(outside):
            i = int(outside[0])
            raise UserError(f"sample '{keys[i]}': label {int(labels[i])} is outside the {k} "
                            f"classes of {run.info.root / DATASET_FILE}")


def accuracy(run: Run, split: str, urls, samples: int) -> dict:
    """``split_accuracy`` of the model as it is now, on the first ``samples`` images of ``split``."""
    cfg = run.cfg
    return split_accuracy(run.towers, run.tokens, urls, run.transforms.eval, samples=samples, batch=run.micro,
                          workers=cfg.workers, train_counts=run.info.split("train").class_counts,
                          channels_last=run.channels_last, desc=f"phase-a {split}", decode_on=run.decode_on,
                          skip_bad=cfg.skip_bad, max_pixels=cfg.max_pixels)


def validate(run: Run, state: TrainState, epoch: int) -> bool:
    """Top-1 on the full val split (main process); a strictly better epoch becomes the best (ties keep
    the earlier one), saved to last.pt and then best.pt. Returns whether last.pt was written."""
    if not run.dist.is_main:
        return False
    row = accuracy(run, "val", run.val_urls, run.info.split("val").num_samples)
    log.info("epoch %d: val accuracy %.4f (many %s, medium %s, few %s)", epoch, row["top1"], row["many"],
             row["medium"], row["few"])
    acc = row.pop("top1")
    log_row(run, state, {"step": state.step, "epoch": epoch, "val_acc": acc, **row})
    if state.best is not None and acc <= state.best["val_acc"]:
        return False
    state.best = {"epoch": epoch, "val_acc": acc}
    save_last(run, state)
    save_best(run.best_path, model_state(run), state.best)
    return True


def log_test_accuracy(run: Run, state: TrainState, epoch: int) -> None:
    """Top-1 on the first --eval-samples test images (main process), logged; never used for selection."""
    if run.dist.is_main:
        samples = min(run.cfg.eval_samples, run.info.split("test").num_samples)
        row = accuracy(run, "test", run.test_urls, samples)
        log.info("epoch %d: test accuracy %.4f (many %s, medium %s, few %s)", epoch, row["top1"], row["many"],
                 row["medium"], row["few"])
        log_row(run, state, {"step": state.step, "epoch": epoch, "test_acc": row.pop("top1"), **row})


def finish(run: Run, state: TrainState) -> Path:
    """Write final.pt (the selected epoch's weights as a state dict the factory loads: a plain open_clip one
    with a merged or no --tune module and --classifier text) and then final.json; check that the ranks
    ended with the same weights."""
    weights = model_state(run)
    digests = [param_digest(weights)]
    if run.dist.enabled:
        digests = [None] * run.dist.world_size
        torch.distributed.all_gather_object(digests, param_digest(weights))
        if len(set(digests)) > 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    final = run.out / "final.pt"
    if run.dist.is_main:
        epoch, val_acc = run.cfg.epochs, None
        if run.select == "best-val":
            chosen = torch.load(run.best_path, map_location="cpu", weights_only=True)
            weights, epoch, val_acc = chosen["model"], chosen["epoch"], chosen["val_acc"]
        save_torch(tuning(run.cfg.tune).export(weights), final)
        write_json(run.out / "final.json", final_record(run, state, final, epoch, val_acc, digests))
    return final


def final_record(run: Run, state: TrainState, final: Path, epoch: int, val_acc: float | None, digests) -> dict:
    """final.json: what extract and the report read of the run, and its whole config."""
    cfg, info = run.cfg, run.info
    tests = [r for r in state.rows if "test_acc" in r and r["epoch"] == epoch]
    return {"model": cfg.model, "pretrained": cfg.pretrained,
            "dataset": {"name": info.name, "fingerprint": info.fingerprint, "path": str(info.root)},
            "classnames": info.classnames, "template": info.template,
            "checkpoint": final.name, "sha256": sha256_file(final),
            "steps": run.total, "epochs": cfg.epochs, "steps_per_epoch": run.steps_per_epoch,
            "logit_scale": run.scale, "batchnorm": run.mode, "precision": cfg.precision,
            "schedule": cfg.schedule, "select": run.select, "selected_epoch": epoch, "val_acc": val_acc,
            "tuning": run.record, "classifier": cfg.classifier,
            "head_key": None if run.towers.head is None else HEAD_KEY,
            "head_input": None if run.towers.head is None else run.towers.head_input,
            "head_init": None if run.towers.head is None else cfg.head_init,
            "loss": cfg.loss, "loss_params": chosen_params(cfg), "train_transform": cfg.train_transform,
            "mda_schedule": cfg.mda_schedule if cfg.train_transform == "mda" else None,
            "eval_transform": cfg.eval_transform,
            "eval": tests[-1] if tests else None, "bad_samples": state.bad_samples,
            "world_size": run.dist.world_size, "rank_param_digests": digests, "config": asdict(cfg)}
