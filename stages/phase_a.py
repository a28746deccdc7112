"""Stage `phase-a`: finetune both CLIP encoders on the long-tailed train split (BALLAD Phase A).

The method, with the official code's choices as the defaults:
- Every step encodes all K class prompts (one template, "a photo of a {}.") with gradients. The
  prompts are tokenized once per run and cut to the longest prompt (pipeline/text.py), which is exact.
- logits = s · norm(v) · norm(u_k)ᵀ with s the model's logit scale held fixed (100 for OpenAI CLIP,
  1/0.07 for a random init); plain cross-entropy over the K classes. The paper writes a temperature
  τ = 1.0 (Eq. 4); the code multiplies by CLIP's scale of 100. ``--logit-scale`` overrides s and
  stores it in the model, so later stages use the same value.
- Instance-balanced sampling (no re-balancing in Phase A, Table 7), batch 512; an epoch is
  ⌊N / 512⌋ optimizer steps, the last partial batch dropped as the code's loader does.
- SGD momentum 0.9, weight decay 5e-4, lr 1e-5 for both encoders, cosine to 0 stepped once per
  epoch (the code's scheduler; the paper only says "cosine"), 50 epochs. ``--optimizer adamw`` is not
  in the paper: it exists because a randomly initialised model (ballad-tiny in the demo) does not
  learn from scratch at SGD 1e-5.

Gradient accumulation (``--micro-batch``) gives the full-batch gradient while running the text tower
forward with gradients once per step: the earlier micro-batches use detached text features and
collect the loss gradient with respect to them, and the last micro-batch adds ⟨u, g⟩ to its loss,
so a single backward through the text tower carries the gradient of the whole batch. Under DDP that
last backward is the one that synchronises, so gradients are all-reduced once per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.distributed import cleanup, device_for, init_distributed
from pipeline.errors import UserError
from pipeline.models import check_model_name, create_model
from pipeline.runtime import atomic_path, autocast, pick_device, progress, seed_everything, sha256_file, write_json
from pipeline.text import class_prompts, encode_text, tokenize_trimmed
from stages.phase_a_data import BadSampleCounter, check_shards, eval_batches, train_batches
from store.shards import load_dataset

log = logging.getLogger("ballad.phase_a")

MANY, FEW = 100, 20  # shot groups: many > 100 train images, few < 20, medium in between


@dataclass
class PhaseAConfig:
    data: str
    model: str
    out: str = "checkpoints/phase_a"
    pretrained: str | None = None
    epochs: int = 50
    optimizer: str = "sgd"
    lr: float = 1e-5
    weight_decay: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 512
    micro_batch: int | None = None  # per process; None = the whole per-process batch at once
    logit_scale: float | None = None  # None = the model's own, kept fixed
    seed: int = 0
    workers: int = 4
    shuffle_buffer: int = 2000
    save_every: int = 200
    eval_every: int = 0  # epochs; 0 = no evaluation
    eval_samples: int = 2000
    grad_checkpointing: bool = False
    strict: bool = False
    resume: bool = False
    device: str | None = None


# What a resumed run must share with the run that wrote last.pt; the rest may change between attempts.
RESUME_KEYS = ("model", "pretrained", "epochs", "optimizer", "lr", "weight_decay", "momentum", "batch_size",
               "logit_scale", "seed")


class Towers(torch.nn.Module):
    """Both encoders behind one forward(), so DistributedDataParallel sees every trainable parameter."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images, tokens=None):
        text = None if tokens is None else encode_text(self.clip, tokens)
        return self.clip.encode_image(images), text


def class_logits(image_features, text_features, scale: float):
    return scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def train_step(net, tokens, micro_batches, scale: float, device) -> float:
    """Forward and backward of one optimizer step over ``micro_batches`` [(images, labels)]; returns the mean loss."""
    n = sum(len(y) for _, y in micro_batches)
    *head, (x_last, y_last) = micro_batches
    total, grad_text = 0.0, None
    if head:
        clip = getattr(net, "module", net).clip
        with torch.no_grad(), autocast(device):
            text = encode_text(clip, tokens).float()
        text.requires_grad_(True)
        with getattr(net, "no_sync", contextlib.nullcontext)():
            for x, y in head:
                with autocast(device):
                    image = net(x)[0]
                loss = F.cross_entropy(class_logits(image, text, scale), y) * (len(y) / n)
                loss.backward()
                total += loss.item()
        grad_text = text.grad
    with autocast(device):
        image, text = net(x_last, tokens)
    loss = F.cross_entropy(class_logits(image, text, scale), y_last) * (len(y_last) / n)
    total += loss.item()
    if grad_text is not None:
        loss = loss + (text.float() * grad_text).sum()
    loss.backward()
    return total


@torch.no_grad()
def evaluate(model, tokens, urls, transform, device, *, batch: int, workers: int, limit: int, train_counts,
             channels_last: bool = False) -> dict:
    """Top-1 accuracy on the first ``limit`` samples of ``urls``, overall and per shot group."""
    model.eval()
    k = len(train_counts)
    with autocast(device):
        text = F.normalize(encode_text(model, tokens).float(), dim=-1)
    correct, seen = torch.zeros(k), torch.zeros(k)
    for images, labels in eval_batches(urls, transform, batch=batch, workers=workers, limit=limit):
        with autocast(device):
            image = model.encode_image(_to_device(images, device, channels_last))
        pred = (F.normalize(image.float(), dim=-1) @ text.T).argmax(1).cpu()
        seen += torch.bincount(labels, minlength=k)
        correct += torch.bincount(labels[pred == labels], minlength=k)
    model.train()
    row = {"test_acc": round(float(correct.sum() / seen.sum().clamp(min=1)), 4)}
    counts = torch.tensor(train_counts)
    for name, mask in (("many", counts > MANY), ("medium", (counts <= MANY) & (counts >= FEW)), ("few", counts < FEW)):
        mask &= seen > 0
        row[name] = round(float((correct[mask] / seen[mask]).mean()), 4) if mask.any() else None
    return row


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


def _check_options(cfg: PhaseAConfig, world: int) -> None:
    for name in ("epochs", "batch_size", "save_every", "eval_samples"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise UserError(f"--optimizer {cfg.optimizer}: choose sgd or adamw")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: must divide evenly over the {world} processes")
    per_rank = cfg.batch_size // world
    if cfg.micro_batch is not None and (cfg.micro_batch < 1 or per_rank % cfg.micro_batch):
        raise UserError(f"--micro-batch {cfg.micro_batch}: must divide the per-process batch of {per_rank}")


def resume_state(cfg: PhaseAConfig, path: Path, fingerprint: str):
    """The contents of last.pt when this run continues it, else None. Loaded with weights_only=True.

    ``--resume`` continues only a run with the same RESUME_KEYS settings and dataset. When they
    changed (``dvc repro`` after a params edit) it warns and starts over. Without ``--resume``, an
    existing run is never overwritten.
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
    if changed:
        log.warning("%s is a run with other settings (%s): starting a new run from step 0", path, "; ".join(changed))
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


def _loader_error(e: UserError) -> UserError:
    # A DataLoader worker's error comes back with its traceback in the message; keep the one line that matters.
    return UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])


def run_phase_a(cfg: PhaseAConfig) -> Path:
    """Train, checkpoint and write OUT/final.pt + OUT/final.json; returns the path of final.pt."""
    check_model_name(cfg.model)
    info = load_dataset(cfg.data)
    urls = check_shards(info, "train")
    test_urls = check_shards(info, "test") if cfg.eval_every else []
    dist = init_distributed(pick_device(cfg.device).type)
    try:
        return _train(cfg, info, urls, test_urls, dist)
    finally:
        cleanup(dist)


def _build_model(cfg: PhaseAConfig, device):
    """The backbone set up for training (fixed logit scale); also says whether images go channels_last."""
    seed_everything(cfg.seed)
    bb = create_model(cfg.model, cfg.pretrained, device=device)
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


def _train(cfg, info, urls, test_urls, dist) -> Path:
    world = dist.world_size
    _check_options(cfg, world)
    n_train = info.split("train").num_samples
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than the {n_train} training samples")
    if len(urls) < world:
        raise UserError(f"{info.root}: {len(urls)} train shard(s) cannot feed {world} processes; "
                        "re-run prepare with a smaller --shard-size")
    total = steps_per_epoch * cfg.epochs
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch or per_rank
    accum = per_rank // micro
    workers = min(cfg.workers, len(urls) // world)  # a worker without a shard would end the stream early
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        for stale in out.glob(".*.tmp"):
            stale.unlink()  # a checkpoint write cut short by a kill; the file it was replacing is intact
    last_path, log_path = out / "last.pt", out / "train_log.jsonl"
    device = device_for(dist, cfg.device)
    ckpt = resume_state(cfg, last_path, info.fingerprint)

    bb, channels_last = _build_model(cfg, device)
    model, scale = bb.model, float(bb.model.logit_scale.exp())
    tokens = tokenize_trimmed(bb.tokenizer, class_prompts(info.classnames, info.template)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    step, bad_before = 0, 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"{last_path}: checkpoint does not match --model {cfg.model} ({str(e).splitlines()[0]})") from None
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], device)
        step, bad_before = ckpt["step"], ckpt["bad_samples"]
        log.info("resuming %s at step %d of %d", out, step, total)
    rows = _read_log(log_path, step)
    if dist.is_main:
        with atomic_path(log_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    net = Towers(model)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    bad = BadSampleCounter()

    def save_last():
        if dist.is_main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step, "bad_samples": bad_before + int(stats[1]), "rng": _rng_state(device),
                     "config": asdict(cfg), "dataset_fingerprint": info.fingerprint}
            with atomic_path(last_path) as tmp:
                torch.save(state, tmp)

    def log_row(row):
        rows.append(row)
        if dist.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(epoch):
        if dist.is_main:
            row = evaluate(model, tokens, test_urls, bb.eval_transform, device, batch=micro, workers=cfg.workers,
                           limit=cfg.eval_samples, train_counts=info.split("train").class_counts,
                           channels_last=channels_last)
            log.info("epoch %d: test accuracy %.4f (many %s, medium %s, few %s)", epoch, row["test_acc"],
                     row["many"], row["medium"], row["few"])
            log_row({"step": step, "epoch": epoch, **row})

    if cfg.eval_every and step == 0:
        run_eval(0)
    bar = progress(total=total, initial=step, desc="phase-a", unit="step", disable=None if dist.is_main else True)
    stats = torch.zeros(2, device=device)  # [loss, undecodable samples]: all-reduced so every rank decides alike
    batches, tick = None, time.perf_counter()
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if batches is None:
            batches = train_batches(urls, bb.train_transform, seed=cfg.seed, epoch=epoch, micro_batch=micro,
                                    workers=workers, shuffle_buffer=cfg.shuffle_buffer, distributed=dist.enabled,
                                    consumed=in_epoch * accum, strict=cfg.strict, on_bad=bad,
                                    pin_memory=device.type == "cuda")
        try:
            micro_batches = [next(batches) for _ in range(accum)]
        except UserError as e:  # --strict and a bad sample
            raise _loader_error(e) from None
        for keys, _, labels in micro_batches:  # remote shards are not checked up front
            outside = ((labels < 0) | (labels >= info.num_classes)).nonzero()
            if len(outside):
                i = int(outside[0])
                raise UserError(f"sample '{keys[i]}': label {int(labels[i])} is outside the {info.num_classes} "
                                f"classes of {info.root / 'dataset.json'}")
        loss = train_step(net, tokens, [(_to_device(x, device, channels_last), y.to(device, non_blocking=True))
                                        for _, x, y in micro_batches], scale, device)
        stats = torch.tensor([loss, bad.value], device=device)
        if dist.enabled:
            torch.distributed.all_reduce(stats)
            stats[0] /= world
        loss = float(stats[0])
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {last_path}" if last_path.exists() else "no checkpoint was written"
            raise UserError(f"step {step + 1}: loss is {loss}; stopped without updating the weights ({where}); "
                            "lower --lr or --logit-scale")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        speed = cfg.batch_size / (now - tick)
        tick = now
        lr = opt.param_groups[0]["lr"]
        log_row({"step": step, "epoch": epoch + 1, "loss": round(loss, 5), "lr": lr, "images_per_s": round(speed, 1),
                 "bad_samples": bad_before + int(stats[1])})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
        bar.update()
        if step % steps_per_epoch == 0:
            batches = None
            sched.step()
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                run_eval(epoch + 1)
            tick = time.perf_counter()  # evaluation and the next epoch's loader start are not training speed
        if step % cfg.save_every == 0 or step == total:
            save_last()
    bar.close()
    return _finish(cfg, info, model, out, dist, rows, total, steps_per_epoch, scale, bad_before + int(stats[1]))


def _write_loss_csv(path: Path, rows: list[dict]) -> None:
    """The training rows of train_log.jsonl as CSV: `dvc plots` reads CSV and JSON, not JSON lines."""
    import csv

    fields = ("step", "epoch", "loss", "lr", "images_per_s")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in rows if "loss" in r)


def _finish(cfg, info, model, out, dist, rows, steps, steps_per_epoch, scale, bad_samples) -> Path:
    """Write final.pt (a plain state dict open_clip loads) and then final.json; check the ranks agree."""
    state = model.state_dict()
    digest = param_digest(state)
    digests = [digest]
    if dist.enabled:
        digests = [None] * dist.world_size
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    final = out / "final.pt"
    if dist.is_main:
        with atomic_path(final) as tmp:
            torch.save(state, tmp)
        evals = [r for r in rows if "test_acc" in r]
        _write_loss_csv(out / "train_log.csv", rows)
        write_json(out / "final.json", {
            "model": cfg.model, "pretrained": cfg.pretrained,
            "dataset": {"name": info.name, "fingerprint": info.fingerprint, "path": str(info.root)},
            "classnames": info.classnames, "template": info.template,
            "checkpoint": final.name, "sha256": sha256_file(final),
            "steps": steps, "epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch, "logit_scale": scale,
            "eval": evals[-1] if evals else None, "bad_samples": bad_samples,
            "world_size": dist.world_size, "rank_param_digests": digests, "config": asdict(cfg)})
    return final
