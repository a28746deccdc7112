"""Stage `adapter`: BALLAD Phase B, a residual linear adapter trained on cached features.

The backbone is frozen in Phase B, so training never touches images: it reads the feature store.
f* = λ·A(f) + (1 − λ)·f, logits = s · norm(f*) · uᵀ with the store's L2-normalised class text
embeddings u and logit scale s, cross-entropy over the K classes. The options and their defaults are
``TrainConfig`` (stages/adapter_config.py); the defaults are what the authors' code does:
- sampler: the authors' ClassAwareSampler (stages/samplers.py); ``--sampler`` offers the others.
- schedule: SGD (momentum 0.9, weight decay 5e-4) with the cosine stepped at the start of every epoch,
  as the authors call ``CosineAnnealingLR.step()``: epoch 1 runs at lr·(1 + cos(π/T))/2 and the last at
  lr 0, so the last epoch leaves the weights as they are. ``--schedule standard``: full lr first.
- model selection: the epoch with the best top-1 on the store's ``val`` split, as the authors keep
  (strictly better only: a tie keeps the earlier epoch); the last epoch when the store has no val split
  or with ``--select last``. Scoring val reads no random numbers, so the training run is the same either
  way; val is scored every epoch whenever the store has it, and the scores are saved. (The authors'
  best accuracy starts at 0, so a val top-1 of 0 in every epoch would keep their untrained adapter;
  here epoch 1.)
- form: the code's A(f) = W f without bias (``linear``); the paper's Eq. 5, ReLU(Wᵀf + b), is ``relu``.
- position (Table 6): ``text`` adapts the class text embeddings instead (u* = λ·A(u) + (1 − λ)·u,
  renormalised); ``both`` uses two separate adapters.
- W starts from nn.Linear's default initialisation, as in the code.
- inputs (``--views``): the authors run the frozen towers on a fresh train-transform view (crop, flip,
  colour jitter) of every image at every draw. A store extracted with ``--train-views V`` holds V such
  views per image, and every draw here takes one of them uniformly at random (``--views all``, the
  default when the store has them): the same distribution of inputs, from V samples of it per image
  instead of a new one per draw. The view indices come from their own generator, so the sampler draws the
  same samples with or without views. Without views (``--views none``, or a store extracted without
  them) every draw reads the image's one eval-transform feature: a departure from the method that
  matters most for the tail, whose few images are drawn hundreds of times.
Where we differ from the code:
- views that do not fit in memory (``views_budget``) are streamed: each epoch reads the V views once
  from the store and gives every sample one random view for the whole epoch, so a sample drawn twice in
  one epoch sees the same view twice (in memory, each draw has its own view).
- scale: the code multiplies by a fixed 100 (CLIP's learned scale); here the store's logit scale,
  which is that value for CLIP checkpoints.
- ``--loss logit-adjusted`` (LIFT; not in BALLAD's code) adds τ·log(train class prior) to the training
  logits only; evaluation and the val scores use the plain logits.
- a non-finite loss stops the run with an error, and nothing is written. The loss is summed on the
  device (a CUDA graph cannot sync), so it is checked once per epoch, when the epoch's mean loss is read
  back, and the error names the epoch, not the step.
"""
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
from torch import nn

from pipeline.errors import UserError
from pipeline.prior import log_prior
from pipeline.runtime import cpu_threads_for, pick_device, progress, save_torch
from pipeline.schedule import epoch_lr, note_zero_lr
from stages.adapter_config import TrainConfig
from stages.samplers import EpochSampler

log = logging.getLogger("ballad.adapter")

FORMAT = "ballad-adapter/1"
VIEW_STREAM = 0x5EED_0F_7  # offsets the seed of the view generator from the sampler's


class Residual(nn.Module):
    """x ↦ λ·A(x) + (1 − λ)·x."""

    def __init__(self, dim: int, lam: float, form: str):
        super().__init__()
        self.lam, self.relu = lam, form == "relu"
        self.linear = nn.Linear(dim, dim, bias=self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.linear(x)
        return torch.lerp(x, a.relu() if self.relu else a, self.lam)


class Adapter(nn.Module):
    """Visual and/or text residual adapters; ``position=None`` is the identity (the store as it is)."""

    def __init__(self, dim: int, scale: float, lam: float = 0.2, form: str = "linear", position: str | None = "visual"):
        super().__init__()
        self.dim, self.scale = dim, scale
        self.visual = Residual(dim, lam, form) if position in ("visual", "both") else None
        self.text = Residual(dim, lam, form) if position in ("text", "both") else None

    def adapt(self, f: torch.Tensor) -> torch.Tensor:
        """f* for image features f, not normalised."""
        return self.visual(f) if self.visual is not None else f

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        """norm(f*)."""
        return F.normalize(self.adapt(f), dim=-1)

    def classifier(self, u: torch.Tensor) -> torch.Tensor:
        """s · norm(u*) for class text embeddings u: logits = embed(f) @ classifier(u).T."""
        return self.scale * F.normalize(self.text(u) if self.text is not None else u, dim=-1)


class CosineCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits norm(z) · Wᵀ + b (W: the scaled classifier, b: an optional constant
    per-class bias, e.g. the logit adjustment), in a few fused passes.

    The same value and gradients as ``F.cross_entropy(F.normalize(z, dim=-1) @ W.T + b, y)``; written
    by hand because Phase B's matrices are small enough that autograd's separate normalise,
    softmax and loss passes cost a good fraction of the step on a CPU.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weights: torch.Tensor, y: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        r = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        logits = (z @ weights.T).mul_(r)
        # log_softmax, not log(softmax): at scale 100 a probability can underflow
        logp = torch.log_softmax(logits if bias is None else logits + bias, dim=1)
        ctx.save_for_backward(z, weights, y, r, logits, logp)
        return logp.gather(1, y[:, None]).mean().neg()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, weights, y, r, logits, logp = ctx.saved_tensors
        g = logp.exp_()  # in place: backward runs once
        g[torch.arange(len(y), device=y.device), y] -= 1  # softmax − one-hot
        scale = r * (grad / len(y))
        # d/dz of (z·w)/|z|: (w − (ẑ·w)ẑ)/|z|, summed over classes with weights g (the bias has no part in it)
        along = torch.linalg.vecdot(g, logits, dim=1).unsqueeze(1) * r
        dz = (g @ weights).sub_(z * along).mul_(scale) if ctx.needs_input_grad[0] else None
        dw = g.T @ (z * scale) if ctx.needs_input_grad[1] else None
        return dz, dw, None, None


@torch.no_grad()
def embed_all(model: Adapter, feats: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``model.embed`` in chunks, so a whole split never needs the adapter's intermediates at once."""
    return torch.cat([model.embed(feats[i:i + chunk].float()) for i in range(0, len(feats), chunk)])


@torch.no_grad()
def top1(model: Adapter, feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    """Top-1 accuracy in percent of the plain logits (the ones evaluate scores)."""
    pred = (embed_all(model, feats) @ model.classifier(text).T).argmax(1)
    return 100 * (pred == labels).double().mean().item()


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
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sampler = EpochSampler(cfg.sampler, labels, text.shape[0], cfg.batch_size, gen)
    # a captured CUDA graph reads the learning rate from device memory, so there it is a tensor
    lr = torch.tensor(cfg.lr, device=device) if device.type == "cuda" else cfg.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    with torch.no_grad():  # without a text adapter the classifier is a constant: normalise it once
        fixed = model.classifier(text) if model.text is None else None
    bias = (cfg.la_tau * log_prior(torch.bincount(labels, minlength=text.shape[0]))
            if cfg.loss == "logit-adjusted" else None)
    total = torch.zeros((), device=device)
    # A draw of sample i reads row `rows` of `source`: feats itself (row i), the stored views flattened
    # view-major (row v·N + i), or the streamed epoch's one view per sample (row i). Cast after the gather:
    # views stay in the store's dtype (float16 by default) on the device.
    n = len(labels)
    if views is None:
        source = feats
    elif views.stored is not None:
        source = views.stored.flatten(0, 1)
    else:
        source = torch.empty((n, feats.shape[1]), dtype=views.dtype, device=device)
    view_gen = torch.Generator(device=device).manual_seed(cfg.seed + VIEW_STREAM)

    def step(rows: torch.Tensor, idx: torch.Tensor) -> None:
        weights = fixed if fixed is not None else model.classifier(text)
        loss = CosineCrossEntropy.apply(model.adapt(source[rows].float()), weights, labels[idx], bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach())

    if device.type == "cuda":
        step = cuda_graph(step, model, opt, cfg.batch_size, device)
    losses, val_acc, best = [], [], None
    bar = progress(range(cfg.epochs), desc=desc, unit="epoch")
    dim, classes = feats.shape[1], text.shape[0]
    with cpu_threads_for(6 * cfg.batch_size * dim * (dim + classes), device):  # fwd + bwd of both products
        for epoch in bar:
            rate = epoch_lr(cfg.lr, epoch, cfg.epochs, cfg.schedule)
            if torch.is_tensor(lr):
                lr.fill_(rate)
            else:
                opt.param_groups[0]["lr"] = rate
            total.zero_()
            batches = sampler.epoch(epoch, cfg.epochs)
            rows = batches
            if views is not None and views.stored is not None:
                rows = batches + n * torch.randint(views.count, batches.shape, generator=view_gen, device=device)
            elif views is not None:
                fill_epoch_views(source, views, view_gen)
            for r, idx in zip(rows, batches):
                step(r, idx)
            losses.append(total.item() / sampler.steps)  # the loss's one read-back per epoch
            if not math.isfinite(losses[-1]):
                raise UserError(f"epoch {epoch + 1}: loss is {losses[-1]}; stopped, nothing written; lower --lr")
            if val is not None:
                val_acc.append(top1(model, *val, text))
                if select == "best-val" and (best is None or val_acc[-1] > val_acc[best[0] - 1]):  # ties: the earlier
                    best = (epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{val_acc[-1]:.2f}" if val_acc else "–")
            if on_epoch is not None:
                on_epoch(epoch + 1, {"train/loss": losses[-1], "train/lr": rate,
                                     "val/top1": val_acc[-1] if val_acc else None})
    if best is not None:
        model.load_state_dict(best[1])
    return Fitted(model.eval(), losses, val_acc, select, best[0] if best is not None else cfg.epochs)


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


def load_adapter(path: str | Path | None, store, features: str | Path) -> Adapter:
    """The saved adapter, checked against ``store``; ``None`` gives the identity."""
    if path is None:
        return Adapter(store.embed_dim, store.logit_scale, position=None)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--adapter {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not one of ours
        raise UserError(f"--adapter {path}: not a readable adapter file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"--adapter {path}: not an adapter file written by `ballad-pipe adapter`")
    if blob["dim"] != store.embed_dim:
        raise UserError(f"--adapter {path}: built for {blob['dim']}-d features, but {features} holds "
                        f"{store.embed_dim}-d features")
    ours = store.fingerprint
    differ = [k for k in sorted(set(ours) | set(blob["fingerprint"])) if ours.get(k) != blob["fingerprint"].get(k)]
    if differ:
        raise UserError(f"--adapter {path}: trained on another feature store than {features} "
                        f"({', '.join(differ)} differ); retrain it with --features {features}")
    cfg = blob["config"]
    model = Adapter(blob["dim"], store.logit_scale, cfg["lam"], cfg["form"], cfg["position"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
