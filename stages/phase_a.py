"""Stage `phase-a`: finetune both CLIP encoders on the long-tailed train split (BALLAD Phase A).

Its options are ``PhaseAConfig`` (stages/phase_a_config.py, torch-free, re-exported here): each field's
flag, default, choices and help, and ``PhaseAConfig.check``.

The method, with the authors' code's choices as the defaults (docs/fidelity.md lists every point):
- Every step encodes all K class prompts (one template, "a photo of a {}.") with gradients. The
  prompts are tokenized once per run and cut to the longest prompt (pipeline/text.py), which is exact.
- logits = s · norm(v) · norm(u_k)ᵀ with s the model's logit scale held fixed (100 for OpenAI CLIP,
  1/0.07 for a random init); plain cross-entropy over the K classes. The paper writes a temperature
  τ = 1.0 (Eq. 4); the code multiplies by CLIP's scale of 100. ``--logit-scale`` overrides s and
  stores it in the model, so later stages use the same value.
- Instance-balanced sampling (no re-balancing in Phase A, Table 7), batch 512; an epoch is
  ⌊N / 512⌋ optimizer steps, the last partial batch dropped as the code's loader does. The train
  transform is the authors' (crop, flip, ColorJitter 0.4; ``--color-jitter 0`` drops the jitter).
- SGD momentum 0.9, weight decay 5e-4, lr 1e-5 for both encoders, 50 epochs, cosine to 0 stepped
  once per epoch the authors' way (``--schedule``, pipeline/schedule.py): their scheduler steps at the
  start of each epoch, so the first epoch already runs below the base lr and the last one at 0.
  ``--optimizer adamw`` is not in the paper: a randomly initialised model (ballad-tiny in the demo)
  does not learn from scratch at SGD 1e-5.
- Model mode (``--batchnorm``): the authors' model stays in eval mode for the whole run (OpenAI's
  ``build_model`` returns it so and nothing calls ``.train()``), so a ResNet tower's BatchNorm keeps
  its running statistics while its affine parameters learn, and dropout is off. ``auto`` does that
  when Phase A starts from pretrained weights; from a random init, where frozen statistics mean
  nothing, it trains in train mode. The mode holds throughout: evaluations restore it.
- Selection (``--select``): the authors keep the epoch with the best top-1 on the full val split
  (ImageNet-LT: 20,000 images). ``auto`` does that when the dataset has a val split, else keeps the
  last epoch. A new best epoch goes to last.pt first and then to best.pt, so a kill between the two
  leaves last.pt holding the best weights, and resuming rewrites best.pt from it.
- Precision (``--precision``): the authors' weights are fp16 (OpenAI's ``convert_weights``) and SGD
  updates them directly, without a master copy or loss scaling; at lr 1e-5 many updates round to
  nothing. Our default keeps fp32 weights (the optimizer's master copy) with bf16 autocast on CUDA, a
  deliberate improvement; ``fp16-weights`` reproduces the authors' numerics on CUDA.

LIFT's recipe (Shi et al., ICML 2024; docs/lift.md), each part a flag beside BALLAD's default:
- ``--tune`` (pipeline/peft.py): ``full`` (BALLAD) trains both towers; ``bias``, ``lora`` and
  ``adaptformer`` train only their image-tower parameters and freeze the text tower, as LIFT.
- ``--classifier``: ``text`` (BALLAD) classifies with the text tower's embeddings of the K prompts,
  computed every step; ``head`` (LIFT) trains a cosine classifier W [K, D] initialised from those
  embeddings (computed once by the frozen text tower, L2-normalised), so the text tower does not run
  per step and is frozen even under ``--tune full``. logits = s · norm(v) · norm(W)ᵀ on the projected
  image embedding v, the feature ``extract`` stores, with the same s as ``text``: the model's logit
  scale (``--logit-scale 25`` is LIFT's). LIFT puts the head on the 768-d feature before the image
  projection, initialised with the text embeddings mapped back through the projection's transpose;
  ours keeps the store's D-dim space, so ``extract`` writes the trained W as the store's class
  embeddings. The head trains with the tower's lr and weight decay, as LIFT's single optimizer.
- ``--loss logit-adjusted`` adds τ · log(train class prior) (pipeline/prior.py, the same as Phase B's)
  to the training logits only; validation and test accuracies use the plain logits.
Differences from LIFT's code kept on purpose: BALLAD's train transform (LIFT: RandomResizedCrop 0.08–1,
bilinear, no colour jitter; ``--color-jitter 0`` drops ours), the authors' schedule stepped at epoch
start (``--schedule standard`` is LIFT's), no test-time ensembling here (``extract --test-views`` and
``evaluate --tta``).

Gradient accumulation (``--micro-batch``) gives the full-batch gradient while running the text tower
forward with gradients once per step: the earlier micro-batches use detached text features and
collect the loss gradient with respect to them, and the last micro-batch adds ⟨u, g⟩ to its loss,
so a single backward through the text tower carries the gradient of the whole batch (with
``--classifier head`` the head's weights take the text features' part). Under DDP that
last backward is the one that synchronises, so gradients are all-reduced once per step. With frozen
BatchNorm statistics this is exact for ResNet towers too; in train mode each micro-batch is
normalised by its own statistics, as in any gradient accumulation. ``--text-chunk`` extends the same
trick to the prompts (train_step): the text tower's activations are then bounded by the chunk, not K.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.distributed import cleanup, device_for, init_distributed
from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS
from pipeline.live import LiveLog
from pipeline.locks import exclusive_lock
from pipeline.models import check_model_name, create_model, image_tower
from pipeline.peft import HEAD_KEY, TRANSFORMER_TUNES, add_tuning, export_state_dict, mark_trainable, needs_blocks
from pipeline.prior import log_prior
from pipeline.provenance import source_digest
from pipeline.runtime import (atomic_path, autocast, pick_device, progress, save_torch, seed_everything, sha256_file,
                              write_json)
from pipeline.schedule import epoch_lr, note_zero_lr
from pipeline.shots import group_means
from pipeline.text import class_prompts, encode_text, in_chunks, tokenize_trimmed
from stages.phase_a_config import (BATCHNORM_MODES, CLASSIFIERS, LOSSES, OPTIMIZERS, PRECISIONS,  # noqa: F401
                                   SCHEDULES, SELECT_MODES, TUNES, PhaseAConfig)
from stages.phase_a_data import BadSampleCounter, check_shards, eval_batches, train_batches
from store.shards import DATASET_FILE, load_dataset
from store.stream import decode_on_device

log = logging.getLogger("ballad.phase_a")
LIVE_DIR = "dvclive"  # in --out: the step and epoch metrics as dvclive writes them, while the run trains



# What a resumed run must share with the run that wrote last.pt; the rest may change between attempts, as
# --micro-batch and --text-chunk may: they change how each step's gradient is computed, not what it is.
RESUME_KEYS = ("model", "pretrained", "epochs", "optimizer", "lr", "weight_decay", "momentum", "batch_size",
               "logit_scale", "schedule", "batchnorm", "color_jitter", "select", "precision", "tune", "lora_rank",
               "adapter_width", "classifier", "loss", "la_tau", "seed")


class Towers(torch.nn.Module):
    """Both encoders (and the classifier head, if any) behind one forward(), so DistributedDataParallel
    sees every trainable parameter. forward(images, tokens) returns the image embeddings and the class
    weights: the text tower's embeddings of the prompts, or the head [K, D] with ``--classifier head``
    (which needs no text tower; ``tokens`` then only asks for the class weights).

    It also owns the numerics. ``fp32``: fp32 weights and bf16 autocast on CUDA (fp32 on CPU).
    ``fp16-weights``: the factory built the model with fp16 weights, as the authors' is; images are
    cast to fp16 and nothing is autocast. Either way the logits are computed in fp32 (cosine_logits).

    ``text_chunk`` (``--text-chunk``): prompts per text-tower pass, or None for all K at once (train_step).
    """

    def __init__(self, clip, precision: str = "fp32", head: torch.Tensor | None = None,
                 text_chunk: int | None = None):
        super().__init__()
        self.clip, self.precision, self.text_chunk = clip, precision, text_chunk
        self.register_parameter("head", None if head is None else torch.nn.Parameter(head))

    def _numerics(self, device):
        return autocast(device, enabled=self.precision == "fp32")

    def text(self, tokens):
        with self._numerics(tokens.device):
            return encode_text(self.clip, tokens)

    def image(self, images):
        if self.precision == "fp16-weights":
            images = images.half()
        with self._numerics(images.device):
            return self.clip.encode_image(images)

    def classes(self, tokens):
        """The class weights [K, D]: the text tower on the prompt tokens, or the head."""
        return self.text(tokens) if self.head is None else self.head

    @torch.no_grad()
    def class_weights(self, tokens) -> torch.Tensor:
        """The class weights in fp32 without gradients, ``text_chunk`` prompts at a time; detached, so that
        a head's own tensor does not collect the gradients of what uses them."""
        return self.head.detach().float() if self.head is not None else in_chunks(self.text, tokens,
                                                                                  self.text_chunk).float()

    def forward(self, images, tokens=None):
        classes = None if tokens is None else self.classes(tokens)
        return self.image(images), classes


def batchnorm_mode(batchnorm: str, pretrained: str | None) -> str:
    """'frozen' or 'train': ``--batchnorm``, with ``auto`` frozen when training starts from pretrained
    weights (an open_clip tag or a file, the authors' case) and train from a random init."""
    if batchnorm != "auto":
        return batchnorm
    return "train" if pretrained is None else "frozen"


def set_batchnorm(towers: torch.nn.Module, mode: str) -> None:
    """Put the model in the mode ``mode`` ('frozen' or 'train') trains it in.

    frozen is the authors' state, eval mode for the whole model: BatchNorm normalises with its running
    statistics and never updates them, dropout is off, and every parameter still learns.
    """
    towers.train(mode == "train")


def cosine_logits(image_features, text_features, scale: float):
    """s · norm(v) · norm(u)ᵀ: the logits Phase A trains and scores."""
    return scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def train_step(net, tokens, micro_batches, scale: float, bias: torch.Tensor | None = None) -> float:
    """Forward and backward of one optimizer step over ``micro_batches`` [(images, labels)]; returns the
    mean loss. ``bias`` [K] is added to the training logits (``--loss logit-adjusted``: τ·log prior).

    The earlier micro-batches score against detached class weights and collect the loss gradient g
    w.r.t. them; the last one runs the text tower with gradients and adds ⟨u, g⟩ to its loss, so one
    backward through the text tower (the one DDP synchronises) carries the whole batch's gradient.
    With ``--text-chunk`` (``Towers.text_chunk``, fewer than K) only the last prompt joins that
    backward: the last micro-batch's share of g is taken from its logits alone (no tower backward), and
    the other K - 1 prompts, chunk by chunk, run the text tower again with gradients and are
    backpropagated with their rows of g (_text_backward). One prompt, not a chunk, waits in the
    synchronising backward, so the text tower's activations held at once are one chunk's, not K's."""
    def loss_of(image, classes, y):
        logits = cosine_logits(image, classes, scale)
        return F.cross_entropy(logits if bias is None else logits + bias, y) * (len(y) / n)

    towers = getattr(net, "module", net)
    n = sum(len(y) for _, y in micro_batches)
    *first, (x_last, y_last) = micro_batches
    chunk = towers.text_chunk
    if towers.head is not None or chunk is None or chunk >= len(tokens):
        chunk = None  # all prompts at once: a head runs no text tower, and a chunk of K or more is all of them
    chunks = [] if chunk is None else list(tokens[:-1].split(chunk))
    late = tokens if chunk is None else tokens[-1:]  # the prompts that go through the synchronising backward
    cut = len(tokens) - len(late)
    total, grad_text = 0.0, None
    if first or chunks:
        text = towers.class_weights(tokens).requires_grad_(True)
        with getattr(net, "no_sync", contextlib.nullcontext)():
            for x, y in first:
                loss = loss_of(net(x)[0], text, y)
                loss.backward()
                total += loss.item()
        grad_text = text.grad
    image, late_text = net(x_last, late)
    if chunks:
        early = text[:cut].detach().requires_grad_(True)
        loss = loss_of(image, torch.cat([early, late_text.float()]), y_last)
        if late_text.requires_grad:  # the text tower trains
            grad_early = torch.autograd.grad(loss, early, retain_graph=True)[0]
            _text_backward(towers, chunks, (grad_early if grad_text is None else grad_early + grad_text[:cut])
                           .split(chunk))
    else:
        loss = loss_of(image, late_text, y_last)
    total += loss.item()
    if grad_text is not None:
        loss = loss + (late_text.float() * grad_text[cut:]).sum()
    loss.backward()
    return total


def _text_backward(towers: Towers, chunks, grads) -> None:
    """Add to the parameters' .grad each chunk's ⟨u, g⟩ gradient, its text-tower pass rerun with
    gradients. Through torch.autograd.grad, not backward: the step's synchronising forward has run, and
    a backward now would fire DDP's gradient hooks before the one backward that must fire them."""
    params = [p for p in towers.parameters() if p.requires_grad]
    for chunk, grad in zip(chunks, grads):
        u = towers.text(chunk)
        for p, d in zip(params, torch.autograd.grad(u, params, grad.to(u.dtype), allow_unused=True)):
            if d is not None:
                p.grad = d if p.grad is None else p.grad.add_(d)


@torch.no_grad()
def split_accuracy(towers: Towers, tokens, urls, transform, *, samples: int, batch: int, workers: int, train_counts,
                   channels_last: bool = False, desc: str = "accuracy", decode_on=None, skip_bad: bool = False,
                   max_pixels: int = MAX_PIXELS) -> dict:
    """Top-1 accuracy of the model's own classifier (prompts or head; plain logits) on the first
    ``samples`` images of a split, overall (``top1``) and per shot group; evaluated in eval mode, the
    model's mode restored after. ``decode_on``: the device that decodes (``--decode gpu``), or None;
    ``skip_bad``, ``max_pixels``: what an unreadable image does (phase_a_data.train_batches)."""
    device, k = tokens.device, len(train_counts)
    training = towers.training
    towers.eval()
    try:
        text = F.normalize(towers.class_weights(tokens), dim=-1)
        correct, seen = torch.zeros(k), torch.zeros(k)
        with progress(desc=desc, total=samples, unit="img") as bar:
            for images, labels in _one_line(eval_batches(urls, transform, batch=batch, workers=workers, limit=samples,
                                                         decode_on=decode_on, skip_bad=skip_bad,
                                                         max_pixels=max_pixels)):
                image = towers.image(_to_device(images, device, channels_last))
                pred = (F.normalize(image.float(), dim=-1) @ text.T).argmax(1).cpu()
                seen += torch.bincount(labels, minlength=k)
                correct += torch.bincount(labels[pred == labels], minlength=k)
                bar.update(len(labels))
    finally:
        towers.train(training)
    with np.errstate(invalid="ignore"):
        per_class = (correct / seen).numpy()
    groups = group_means(per_class, seen.numpy() > 0, train_counts)
    return {"top1": round(float(correct.sum() / seen.sum().clamp(min=1)), 4),
            **{name: None if acc is None else round(acc, 4) for name, acc in groups.items()}}


def _to_device(images, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _is_resnet(model) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(model.visual, ModifiedResNet)


def param_digest(state_dict) -> str:
    """sha256 over a state dict's names and bytes: equal digests mean identical weights."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def selection(cfg: PhaseAConfig, info) -> str:
    """'best-val' or 'last': what ``--select`` means for this dataset."""
    has_val = "val" in info.splits and info.splits["val"].num_samples > 0
    if cfg.select == "auto":
        return "best-val" if has_val else "last"
    if cfg.select == "best-val" and not has_val:
        raise UserError(f"--select best-val: {info.root / DATASET_FILE} has no val split; use --select last")
    return cfg.select


def resume_state(cfg: PhaseAConfig, path: Path, fingerprint: str):
    """The contents of last.pt when this run continues it, else None. Loaded with weights_only=True.

    ``--resume`` continues only an unfinished run of the same code (source_digest) with the same
    RESUME_KEYS settings and dataset. Otherwise (``dvc repro`` after a params or code edit, or
    ``--force``) it says why and starts over. Without ``--resume``, an existing run is never overwritten.
    """
    if not path.exists():
        if cfg.resume:
            log.info("--resume: no %s yet, starting from step 0", path)
        return None
    if not cfg.resume:
        raise UserError(f"{path}: --out {cfg.out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
    except Exception as e:  # any failure means the same thing: the file is not a checkpoint we can use
        raise UserError(f"{path}: unreadable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                        "delete it to start over") from None
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} → {getattr(cfg, k)}"
               for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if ckpt.get("dataset_fingerprint") != fingerprint:
        changed.append(f"--data {cfg.data} is another dataset")
    if ckpt.get("source_digest") != source_digest():
        changed.append("it was written by another version of the code")
    if changed:
        log.warning("%s is a run with other settings (%s): starting a new run from step 0", path, "; ".join(changed))
        return None
    if ckpt["step"] >= ckpt["total_steps"]:
        log.warning("%s is a finished run (step %d of %d): starting a new run from step 0", path, ckpt["step"],
                    ckpt["total_steps"])
        return None
    return ckpt


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


def live_values(row: dict) -> dict:
    """A train_log.jsonl row as dvclive metrics: ``train/loss``, ``train/lr``, ``train/images_per_s`` per
    step; ``val/top1`` (and ``val/many``, ``val/medium``, ``val/few``) per validation; ``test/…`` alike."""
    if "loss" in row:
        return {f"train/{k}": row[k] for k in ("loss", "lr", "images_per_s")}
    split = "val" if "val_acc" in row else "test"
    return {f"{split}/top1": row[f"{split}_acc"], **{f"{split}/{g}": row[g] for g in ("many", "medium", "few")}}


def _loader_error(e: UserError) -> UserError:
    # A DataLoader worker's error comes back with its traceback in the message; keep the one line that matters.
    return UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])


def _one_line(batches):
    """``batches`` from a DataLoader, a worker's UserError (an unreadable image) raised as its one line."""
    try:
        yield from batches
    except UserError as e:
        raise _loader_error(e) from None


def run_phase_a(cfg: PhaseAConfig) -> Path:
    """Train, checkpoint and write OUT/final.pt + OUT/final.json; returns the path of final.pt."""
    cfg.check()
    note_zero_lr(cfg.epochs, cfg.schedule)
    check_model_name(cfg.model)
    if cfg.tune in TRANSFORMER_TUNES and (tower := image_tower(cfg.model)) != "transformer":
        raise needs_blocks(cfg.tune, tower)
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
            return _Run(cfg, info, dist, urls, select, on_device).train()
    finally:
        cleanup(dist)


class _Run:
    """One process's share of a Phase A run: built (or resumed from last.pt), trained, written out."""

    def __init__(self, cfg: PhaseAConfig, info, dist, urls: list[str], select: str, decode_on_device: bool):
        self.cfg, self.info, self.dist, self.urls, self.select = cfg, info, dist, urls, select
        self.val_urls = check_shards(info, "val") if select == "best-val" else []
        self.test_urls = check_shards(info, "test") if cfg.eval_every else []
        world = dist.world_size
        self.steps_per_epoch = info.split("train").num_samples // cfg.batch_size
        self.total = self.steps_per_epoch * cfg.epochs
        per_rank = cfg.batch_size // world
        self.micro = cfg.micro_batch or per_rank
        self.accum = per_rank // self.micro
        self.workers = min(cfg.workers, len(urls) // world)  # a worker without a shard would end the stream early
        self.out = out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path, self.log_path = out / "last.pt", out / "best.pt", out / "train_log.jsonl"
        self.device = device_for(dist, cfg.device)
        self.decode_on = self.device if decode_on_device else None  # --decode gpu: images decoded here
        ckpt = resume_state(cfg, self.last_path, info.fingerprint)

        bb, self.channels_last = _build_model(cfg, self.device)
        self.bb, self.model, self.scale = bb, bb.model, float(bb.model.logit_scale.exp())
        self.mode = batchnorm_mode(cfg.batchnorm, bb.pretrained)
        self.tokens = tokenize_trimmed(bb.tokenizer, class_prompts(info.classnames, info.template)).to(self.device)
        self.tuning = add_tuning(self.model, cfg.tune, num_classes=info.num_classes, lora_rank=cfg.lora_rank,
                                 adapter_width=cfg.adapter_width)
        mark_trainable(self.model, cfg.tune, train_text=cfg.tune == "full" and cfg.classifier == "text")
        self.towers = Towers(self.model, cfg.precision,
                             text_head(self.model, self.tokens, cfg.text_chunk) if cfg.classifier == "head" else None,
                             cfg.text_chunk)
        self.tuning["trainable_params"] = sum(p.numel() for p in self.towers.parameters() if p.requires_grad)
        self.bias = (cfg.la_tau * log_prior(info.split("train").class_counts).to(self.device)
                     if cfg.loss == "logit-adjusted" else None)
        self.opt = make_optimizer(cfg, self.towers)
        self.step, self.bad_before, self.best = 0, 0, None  # best: {"epoch", "val_acc"} of the best epoch so far
        if ckpt is not None:
            self._resume(ckpt)
        self.bad_samples = self.bad_before
        if dist.is_main:
            for stale in out.glob(".*.tmp"):
                stale.unlink()  # a checkpoint write cut short by a kill; the file it was replacing is intact
            if self.best is None:
                self.best_path.unlink(missing_ok=True)  # another run's
        self.rows = _read_log(self.log_path, self.step) if ckpt is not None else []
        if dist.is_main:
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        # The same rows as dvclive's files (pipeline/live.py), rebuilt from those the run keeps: a resumed
        # run's plots hold every step once, as an uninterrupted run's do.
        self.live = LiveLog(out / LIVE_DIR, enabled=dist.is_main)
        for row in self.rows:
            self.live.log(row["step"], live_values(row), sync=False)
        self.live.log(self.step, {})
        set_batchnorm(self.towers, self.mode)
        self.net = self.towers
        if dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.towers, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.bad = BadSampleCounter()
        log.info("phase-a: %d steps (%d epochs), model mode %s, schedule %s, precision %s, selection %s, "
                 "tune %s (%d trainable parameters), classifier %s, loss %s", self.total, cfg.epochs, self.mode,
                 cfg.schedule, cfg.precision, select, cfg.tune, self.tuning["trainable_params"], cfg.classifier,
                 cfg.loss)

    def _state(self) -> dict:
        """What training changes: the model's state dict, and the head under HEAD_KEY with --classifier head.
        last.pt and best.pt hold it as "model"; final.pt holds it through export_state_dict (LoRA merged)."""
        state = self.model.state_dict()
        if self.towers.head is not None:
            state[HEAD_KEY] = self.towers.head.detach()
        return state

    def _resume(self, ckpt: dict) -> None:
        state = dict(ckpt["model"])
        head = state.pop(HEAD_KEY, None)
        try:
            self.model.load_state_dict(state)
            if self.towers.head is not None:
                self.towers.head.data.copy_(head)
        except (RuntimeError, TypeError) as e:
            raise UserError(f"{self.last_path}: checkpoint does not match --model {self.cfg.model} "
                            f"({str(e).splitlines()[0]})") from None
        self.opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], self.device)
        self.step, self.bad_before, self.best = ckpt["step"], ckpt["bad_samples"], ckpt["best"]
        if self.dist.is_main and self.best is not None:
            self._check_best(ckpt)
        log.info("resuming %s at step %d of %d", self.out, self.step, self.total)

    def _check_best(self, ckpt: dict) -> None:
        """best.pt must hold the epoch last.pt names as the best. A new best is saved in last.pt first, at
        the end of its epoch, so when best.pt is older, last.pt's own weights are the best ones."""
        held = (torch.load(self.best_path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
                if self.best_path.exists() else None)
        if held == self.best["epoch"]:
            return
        if ckpt["step"] != self.best["epoch"] * self.steps_per_epoch:
            raise UserError(f"{self.best_path}: holds epoch {held}, but {self.last_path} names epoch "
                            f"{self.best['epoch']} as the best; delete {self.last_path} to start over")
        _save_best(self.best_path, ckpt["model"], self.best)

    def train(self) -> Path:
        cfg, dist, device, world = self.cfg, self.dist, self.device, self.dist.world_size
        if cfg.eval_every and self.step == 0:
            self._test(0)
        bar = progress(total=self.total, initial=self.step, desc="phase-a", unit="step",
                       disable=None if dist.is_main else True)
        stats = torch.zeros(2, device=device)  # [loss, undecodable samples]: all-reduced so every rank decides alike
        batches, tick = None, time.perf_counter()
        while self.step < self.total:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            if batches is None:
                for group in self.opt.param_groups:
                    group["lr"] = epoch_lr(cfg.lr, epoch, cfg.epochs, cfg.schedule)
                batches = train_batches(self.urls, self.bb.train_transform, seed=cfg.seed, epoch=epoch,
                                        micro_batch=self.micro, workers=self.workers, shuffle_buffer=cfg.shuffle_buffer,
                                        distributed=dist.enabled, consumed=in_epoch * self.accum,
                                        skip_bad=cfg.skip_bad, on_bad=self.bad, pin_memory=device.type == "cuda",
                                        decode_on=self.decode_on, max_pixels=cfg.max_pixels)
            try:
                micro_batches = [next(batches) for _ in range(self.accum)]
            except UserError as e:  # an unreadable image without --skip-bad
                batches.close()  # now, not when collected: a DataLoader's shutdown waits for each worker
                raise _loader_error(e) from None
            self._check_labels(micro_batches)
            loss = train_step(self.net, self.tokens, [(_to_device(x, device, self.channels_last),
                                                       y.to(device, non_blocking=True)) for _, x, y in micro_batches],
                              self.scale, self.bias)
            stats = torch.tensor([loss, self.bad.value], device=device)
            if dist.enabled:
                torch.distributed.all_reduce(stats)
                stats[0] /= world
            loss = float(stats[0])
            if not math.isfinite(loss):
                where = (f"the last good checkpoint is {self.last_path}" if self.last_path.exists()
                         else "no checkpoint was written")
                raise UserError(f"step {self.step + 1}: loss is {loss}; stopped without updating the weights "
                                f"({where}); lower --lr or --logit-scale")
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.bad_samples = self.bad_before + int(stats[1])
            now = time.perf_counter()
            speed = cfg.batch_size / (now - tick)
            tick = now
            lr = self.opt.param_groups[0]["lr"]
            self._log_row({"step": self.step, "epoch": epoch + 1, "loss": round(loss, 5), "lr": lr,
                           "images_per_s": round(speed, 1), "bad_samples": self.bad_samples})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
            bar.update()
            saved = False
            if self.step % self.steps_per_epoch == 0:
                batches = None
                if self.select == "best-val":
                    saved = self._validate(epoch + 1)
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    self._test(epoch + 1)
                tick = time.perf_counter()  # evaluations and the next epoch's loader start are not training speed
            if not saved and (self.step % cfg.save_every == 0 or self.step == self.total):
                self._save_last()
        bar.close()
        return self._finish()

    def _check_labels(self, micro_batches) -> None:
        k = self.info.num_classes
        for keys, _, labels in micro_batches:  # remote shards are not checked up front
            outside = ((labels < 0) | (labels >= k)).nonzero()
            if len(outside):
                i = int(outside[0])
                raise UserError(f"sample '{keys[i]}': label {int(labels[i])} is outside the {k} "
                                f"classes of {self.info.root / DATASET_FILE}")

    def _accuracy(self, split: str, urls, samples: int) -> dict:
        return split_accuracy(self.towers, self.tokens, urls, self.bb.eval_transform, samples=samples, batch=self.micro,
                              workers=self.cfg.workers, train_counts=self.info.split("train").class_counts,
                              channels_last=self.channels_last, desc=f"phase-a {split}", decode_on=self.decode_on,
                              skip_bad=self.cfg.skip_bad, max_pixels=self.cfg.max_pixels)

    def _validate(self, epoch: int) -> bool:
        """Top-1 on the full val split (main process); a strictly better epoch becomes the best (ties keep
        the earlier one), saved to last.pt and then best.pt. Returns whether last.pt was written."""
        if not self.dist.is_main:
            return False
        row = self._accuracy("val", self.val_urls, self.info.split("val").num_samples)
        log.info("epoch %d: val accuracy %.4f (many %s, medium %s, few %s)", epoch, row["top1"], row["many"],
                 row["medium"], row["few"])
        acc = row.pop("top1")
        self._log_row({"step": self.step, "epoch": epoch, "val_acc": acc, **row})
        if self.best is not None and acc <= self.best["val_acc"]:
            return False
        self.best = {"epoch": epoch, "val_acc": acc}
        self._save_last()
        _save_best(self.best_path, self._state(), self.best)
        return True

    def _test(self, epoch: int) -> None:
        """Top-1 on the first --eval-samples test images (main process), logged; never used for selection."""
        if self.dist.is_main:
            samples = min(self.cfg.eval_samples, self.info.split("test").num_samples)
            row = self._accuracy("test", self.test_urls, samples)
            log.info("epoch %d: test accuracy %.4f (many %s, medium %s, few %s)", epoch, row["top1"], row["many"],
                     row["medium"], row["few"])
            self._log_row({"step": self.step, "epoch": epoch, "test_acc": row.pop("top1"), **row})

    def _log_row(self, row: dict) -> None:
        self.rows.append(row)
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.live.log(row["step"], live_values(row))

    def _save_last(self) -> None:
        if self.dist.is_main:
            state = {"model": self._state(), "optimizer": self.opt.state_dict(), "step": self.step,
                     "total_steps": self.total, "bad_samples": self.bad_samples, "best": self.best,
                     "rng": _rng_state(self.device), "config": asdict(self.cfg),
                     "dataset_fingerprint": self.info.fingerprint, "source_digest": source_digest()}
            save_torch(state, self.last_path)

    def _finish(self) -> Path:
        """Write final.pt (the selected epoch's weights as a state dict the factory loads; a plain open_clip
        one with --tune full, bias or lora and --classifier text) and then final.json; check that the
        ranks ended with the same weights."""
        cfg, dist, out = self.cfg, self.dist, self.out
        state = self._state()
        digest = param_digest(state)
        digests = [digest]
        if dist.enabled:
            digests = [None] * dist.world_size
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
        final = out / "final.pt"
        if dist.is_main:
            epoch, val_acc = cfg.epochs, None
            if self.select == "best-val":
                chosen = torch.load(self.best_path, map_location="cpu", weights_only=True)
                state, epoch, val_acc = chosen["model"], chosen["epoch"], chosen["val_acc"]
            save_torch(export_state_dict(state), final)
            tests = [r for r in self.rows if "test_acc" in r and r["epoch"] == epoch]
            write_json(out / "final.json", {
                "model": cfg.model, "pretrained": cfg.pretrained,
                "dataset": {"name": self.info.name, "fingerprint": self.info.fingerprint, "path": str(self.info.root)},
                "classnames": self.info.classnames, "template": self.info.template,
                "checkpoint": final.name, "sha256": sha256_file(final),
                "steps": self.total, "epochs": cfg.epochs, "steps_per_epoch": self.steps_per_epoch,
                "logit_scale": self.scale, "batchnorm": self.mode, "precision": cfg.precision,
                "schedule": cfg.schedule, "select": self.select, "selected_epoch": epoch, "val_acc": val_acc,
                "tuning": self.tuning, "classifier": cfg.classifier,
                "head_key": None if self.towers.head is None else HEAD_KEY,
                "loss": cfg.loss, "la_tau": cfg.la_tau if cfg.loss == "logit-adjusted" else None,
                "eval": tests[-1] if tests else None, "bad_samples": self.bad_samples,
                "world_size": dist.world_size, "rank_param_digests": digests, "config": asdict(cfg)})
        return final


def _build_model(cfg: PhaseAConfig, device):
    """The backbone set up for training (fixed logit scale); also says whether images go channels_last."""
    seed_everything(cfg.seed)
    bb = create_model(cfg.model, cfg.pretrained, device=device, color_jitter=cfg.color_jitter,
                      fp16_weights=cfg.precision == "fp16-weights")
    model = bb.model
    if cfg.logit_scale is not None:
        model.logit_scale.data.fill_(math.log(cfg.logit_scale))
    model.logit_scale.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # transformer towers only; open_clip's ResNet ignores it
    channels_last = device.type == "cuda" and _is_resnet(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return bb, channels_last


def text_head(model, tokens, chunk: int | None = None) -> torch.Tensor:
    """LIFT's classifier initialisation (``init_head: text_feat``): the frozen text tower's L2-normalised
    embeddings of the class prompts, in fp32, ``chunk`` prompts at a time (``--text-chunk``: the one
    text-tower pass of a head run). With these weights the head's logits are the zero-shot ones."""
    with torch.no_grad():
        return F.normalize(in_chunks(lambda t: encode_text(model, t), tokens, chunk).float(), dim=-1)


def make_optimizer(cfg: PhaseAConfig, model) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters as they are: fp16 ones with ``--precision
    fp16-weights`` are updated in place in fp16, the authors' way (no fp32 master copy, no loss scaling)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_best(path: Path, state_dict, best: dict) -> None:
    save_torch({"model": state_dict, **best}, path)

