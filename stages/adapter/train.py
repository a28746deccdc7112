"""Phase B's training: ``fit`` on tensors on the training device, ``train_adapter`` from a feature store
to the adapter file. The method and where we depart from the authors: stages/adapter/__init__.py."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.losses import ShiftedCrossEntropy, make_loss
from pipeline.runtime import cpu_threads_for, pick_device, progress, save_torch
from pipeline.schedule import epoch_lr, note_zero_lr
from stages.adapter.model import FORMAT, Adapter, CosineCrossEntropy, top1
from stages.adapter.samplers import EpochSampler
from stages.adapter.config import TrainConfig

log = logging.getLogger("ballad.adapter")

VIEW_STREAM = 0x5EED_0F_7  # offsets the seed of the view generator from the sampler's


@dataclass
class Fitted:
    """What ``fit`` returns."""
    model: Adapter  # the weights of ``selected_epoch``
    losses: list[float]  # mean training loss of every epoch
    val_acc_per_epoch: list[float]  # val top-1 (%) after every epoch; empty without val features
    select: str  # the rule that chose ``selected_epoch``: best-val or last
    selected_epoch: int  # 1-based

    @property
    def val_acc(self) -> float | None:
        """Val top-1 (%) of the selected epoch (None without val features)."""
        return self.val_acc_per_epoch[self.selected_epoch - 1] if self.val_acc_per_epoch else None


@dataclass
class Views:
    """The augmented train views ``fit`` draws from: V views of each of the N train samples.

    ``stored`` is [V, N, D] on the training device when it fits there; otherwise ``read(v)`` returns
    view v as an [N, D] array and every epoch streams the views (see the module docstring).
    """
    count: int
    dtype: torch.dtype  # the store's: features stay in it on the device and are cast after the gather
    stored: torch.Tensor | None = None
    read: Callable[[int], np.ndarray] | None = None


def fill_epoch_views(rows: torch.Tensor, views: Views, gen: torch.Generator) -> None:
    """Streaming: row i of ``rows`` becomes a random one of sample i's views, reading each view once."""
    pick = torch.randint(views.count, (len(rows),), generator=gen, device=rows.device)
    for v in range(views.count):
        take = pick == v
        if take.any():
            block = torch.from_numpy(np.ascontiguousarray(views.read(v))).to(rows.device)
            rows[take] = block[take].to(rows.dtype)


class Draws:
    """Where each draw reads its features. A draw of sample i reads row ``rows[…]`` of ``source``: the
    train features themselves (row i), the stored views flattened view-major (row v·N + i, v at random
    per draw), or the streamed epoch's one view per sample (row i). Cast after the gather: views stay in
    the store's dtype (float16 by default) on the device. The view indices have their own generator, so
    the sampler draws the same samples with or without views."""

    def __init__(self, feats: torch.Tensor, views: Views | None, seed: int):
        self.n, self.views = len(feats), views
        if views is None:
            self.source = feats
        elif views.stored is not None:
            self.source = views.stored.flatten(0, 1)
        else:
            self.source = torch.empty((self.n, feats.shape[1]), dtype=views.dtype, device=feats.device)
        self.gen = torch.Generator(device=feats.device).manual_seed(seed + VIEW_STREAM)

    def rows(self, batches: torch.Tensor) -> torch.Tensor:
        """The source rows of an epoch's [steps, batch] sample indices (streaming: refills the epoch's views)."""
        if self.views is None:
            return batches
        if self.views.stored is None:
            fill_epoch_views(self.source, self.views, self.gen)
            return batches
        return batches + self.n * torch.randint(self.views.count, batches.shape, generator=self.gen,
                                                device=batches.device)


def make_step(model: Adapter, opt: torch.optim.Optimizer, text: torch.Tensor, labels: torch.Tensor,
              source: torch.Tensor, loss_fn: Callable, total: torch.Tensor) -> Callable:
    """One SGD step on the draws ``idx`` (sample indices) read from ``source[rows]``; the loss is added to
    ``total`` on the device. A loss that is cross-entropy of shifted logits runs in the fused kernel."""
    with torch.no_grad():  # without a text adapter the classifier is a constant: normalise it once
        fixed = model.classifier(text) if model.text is None else None
    fused = isinstance(loss_fn, ShiftedCrossEntropy)

    def step(rows: torch.Tensor, idx: torch.Tensor) -> None:
        weights = fixed if fixed is not None else model.classifier(text)
        z = model.adapt(source[rows].float())
        if fused:
            loss = CosineCrossEntropy.apply(z, weights, labels[idx], loss_fn.bias)
        else:
            loss = loss_fn(F.normalize(z, dim=-1) @ weights.T, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach())
    return step


def fit(feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float, cfg: TrainConfig,
        desc: str = "adapter", val: tuple[torch.Tensor, torch.Tensor] | None = None,
        views: Views | None = None, on_epoch: Callable[[int, dict], None] | None = None) -> Fitted:
    """Train on tensors already on the training device; ``val``: (features, labels) scored after every
    epoch, which ``cfg.select`` may use to choose the epoch whose weights are returned; ``views``: the
    augmented train views every draw picks from (None: every draw reads ``feats``); ``on_epoch(epoch,
    {"train/loss", "train/lr", "val/top1"})`` after every epoch (1-based; val/top1 None without val)."""
    cfg.check()
    select = cfg.resolved_select(val is not None, "the data given to fit")
    device = feats.device
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its init from the global CPU generator
        torch.manual_seed(cfg.seed)
        model = Adapter(feats.shape[1], scale, cfg.lam, cfg.form, cfg.position).to(device)
    sampler = EpochSampler(cfg.sampler, labels, text.shape[0], cfg.batch_size,
                           torch.Generator(device=device).manual_seed(cfg.seed))
    # a captured CUDA graph reads the learning rate from device memory, so there it is a tensor
    lr = torch.tensor(cfg.lr, device=device) if device.type == "cuda" else cfg.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    loss_fn = make_loss(cfg, torch.bincount(labels, minlength=text.shape[0]))
    draws, total = Draws(feats, views, cfg.seed), torch.zeros((), device=device)
    step = make_step(model, opt, text, labels, draws.source, loss_fn, total)
    if device.type == "cuda":
        step = cuda_graph(step, model, opt, cfg.batch_size, device)
    run = Epochs(model, opt, lr, sampler, draws, step, total, cfg, select, text, val, desc, on_epoch)
    with cpu_threads_for(6 * cfg.batch_size * feats.shape[1] * (feats.shape[1] + text.shape[0]), device):
        return run.all()  # the threads: fwd + bwd of both products


@dataclass
class Epochs:
    """``fit``'s epoch loop: the schedule, the draws, the steps, the loss's check, val and the epoch kept."""
    model: Adapter
    opt: torch.optim.Optimizer
    lr: torch.Tensor | float
    sampler: EpochSampler
    draws: Draws
    step: Callable
    total: torch.Tensor
    cfg: TrainConfig
    select: str
    text: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None
    desc: str
    on_epoch: Callable[[int, dict], None] | None

    def all(self) -> Fitted:
        cfg, losses, val_acc, best = self.cfg, [], [], None
        bar = progress(range(cfg.epochs), desc=self.desc, unit="epoch")
        for epoch in bar:
            rate = self.train_epoch(epoch)
            losses.append(self.total.item() / self.sampler.steps)  # the loss's one read-back per epoch
            if not math.isfinite(losses[-1]):
                raise UserError(f"epoch {epoch + 1}: loss is {losses[-1]}; stopped, nothing written; lower --lr")
            if self.val is not None:
                val_acc.append(top1(self.model, *self.val, self.text))
                if self.select == "best-val" and (best is None or val_acc[-1] > val_acc[best[0] - 1]):  # ties: the earlier
                    best = (epoch + 1, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
            bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{val_acc[-1]:.2f}" if val_acc else "–")
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, {"train/loss": losses[-1], "train/lr": rate,
                                          "val/top1": val_acc[-1] if val_acc else None})
        if best is not None:
            self.model.load_state_dict(best[1])
        return Fitted(self.model.eval(), losses, val_acc, self.select, best[0] if best is not None else cfg.epochs)

    def train_epoch(self, epoch: int) -> float:
        """Epoch ``epoch`` (0-based) of steps at its learning rate, which it returns; the loss sums in ``total``."""
        rate = epoch_lr(self.cfg.lr, epoch, self.cfg.epochs, self.cfg.schedule)
        if torch.is_tensor(self.lr):
            self.lr.fill_(rate)
        else:
            self.opt.param_groups[0]["lr"] = rate
        self.total.zero_()
        batches = self.sampler.epoch(epoch, self.cfg.epochs)
        for r, idx in zip(self.draws.rows(batches), batches):
            self.step(r, idx)
        return rate


def cuda_graph(step, model: Adapter, opt: torch.optim.Optimizer, batch: int, device: torch.device):
    """``step`` captured as one CUDA graph: each call is then one copy and one replay.

    A Phase B step is ~30 small kernels; launched one by one from Python they take several times
    the GPU's work. Capture needs warm-up steps first; their updates are undone afterwards, so the
    training run is the same as without the graph.
    """
    rows, idx = (torch.zeros(batch, dtype=torch.long, device=device) for _ in range(2))
    start = [p.detach().clone() for p in model.parameters()]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(rows, idx)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(rows, idx)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), start):
            p.copy_(p0)
    for state in opt.state.values():
        state["momentum_buffer"].zero_()  # = the first step's buffer, which is the gradient itself

    def replay(batch_rows: torch.Tensor, batch_idx: torch.Tensor) -> None:
        rows.copy_(batch_rows)
        idx.copy_(batch_idx)
        graph.replay()
    return replay


def views_budget(device) -> int:
    """Bytes of views ``training_data`` places on ``device`` at once: half of what is free there."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            free_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return free_kib * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


def training_data(store, cfg: TrainConfig, device, max_view_bytes: int | None = None) -> tuple:
    """(train features, train labels, class text embeddings, (val features, val labels) or None, Views or
    None) from a ``FeatureStore`` on ``device``; val whenever the store has it complete, which
    ``cfg.select`` may need; views as ``cfg.views`` resolves, in memory up to ``max_view_bytes`` (default
    ``views_budget``), streamed from the store beyond."""
    has_val = store.is_complete("val")
    cfg.resolved_select(has_val, str(store.path))
    count = store.num_views("train")
    views = None
    if cfg.resolved_views(count, str(store.path)) == "all":
        budget = views_budget(device) if max_view_bytes is None else max_view_bytes
        if store.views_nbytes("train") <= budget:
            stored = store.views("train", device=device)  # the store's dtype: float16 halves the memory
            views = Views(count, stored.dtype, stored=stored)
        else:
            log.info("adapter: %d views of %s (%.1f GB) exceed %.1f GB of memory: streaming them every epoch",
                     count, store.path, store.views_nbytes("train") / 1e9, budget / 1e9)
            dtype = getattr(torch, store.meta.get("dtype", "float16"))
            views = Views(count, dtype, read=lambda v: store.read_views_rows("train", v)[0])
    feats, labels = store.features("train", device=device, dtype=torch.float32)
    val = store.features("val", device=device, dtype=torch.float32) if has_val else None
    return feats, labels, store.text_embeddings(device=device), val, views


def live_dir(out: str | Path) -> Path:
    """Where ``train_adapter`` logs its epochs for dvclive: beside the adapter file (adapter.pt → adapter.dvclive)."""
    return Path(out).with_suffix(".dvclive")


def train_adapter(features: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(),
                  device: str | None = None, max_view_bytes: int | None = None) -> dict:
    """Train on the store's train split, score its val split (if complete) every epoch, and save the kept
    epoch's adapter with the config, the per-epoch record and the store's fingerprint. Every epoch's
    loss, learning rate and val top-1 go to dvclive's files in ``live_dir(out)`` as it ends."""
    from pipeline.live import LiveLog
    from store.features import FeatureStore

    cfg.check()
    note_zero_lr(cfg.epochs, cfg.schedule)
    store = FeatureStore.open(features)
    dev = pick_device(device)
    feats, labels, text, val, views = training_data(store, cfg, dev, max_view_bytes)
    live = LiveLog(live_dir(out))
    fitted = fit(feats, labels, text, store.logit_scale, cfg, val=val, views=views, on_epoch=live.log)
    live.log(cfg.epochs, {"selected_epoch": fitted.selected_epoch}, plot=False)
    model = fitted.model
    blob = {"format": FORMAT, "dim": model.dim, "config": asdict(cfg), "fingerprint": dict(store.fingerprint),
            "views": "all" if views else "none", "num_views": views.count if views else 0,
            "views_streamed": bool(views and views.stored is None),
            "losses": fitted.losses, "val_acc_per_epoch": fitted.val_acc_per_epoch, "select": fitted.select,
            "selected_epoch": fitted.selected_epoch, "val_acc": fitted.val_acc, "num_train": len(labels),
            "num_val": len(val[1]) if val is not None else 0,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_torch(blob, out)
    log.info("adapter: %d train features, kept epoch %d of %d (%s) → %s", len(labels), fitted.selected_epoch,
             cfg.epochs, fitted.select, out)
    return blob


