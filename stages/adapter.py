"""Stage `adapter`: BALLAD Phase B, a residual linear adapter trained on cached features.

The backbone is frozen in Phase B, so training never touches images: it reads the feature store.
f* = λ·A(f) + (1 − λ)·f, logits = s · norm(f*) · uᵀ with the store's L2-normalised class text
embeddings u and logit scale s, cross-entropy over the K classes.

Where the paper and the official code differ, the code's choice is the default:
- form: the code's A(f) = W f without bias (``linear``); the paper's Eq. 5, ReLU(Wᵀf + b), is ``relu``.
- scale: the code multiplies by a fixed 100 (CLIP's learned scale); here the store's logit scale,
  which is that value for CLIP checkpoints.
- schedule: SGD (momentum 0.9, weight decay 5e-4), cosine annealing to 0 stepped once per epoch as in
  the code, so the last epoch runs at lr·(1 + cos(π(T−1)/T))/2.
- model selection: the code keeps the epoch with the best validation accuracy; this stage keeps the
  last epoch, so no evaluation split steers training.
- position (Table 6): ``text`` adapts the class text embeddings instead (u* = λ·A(u) + (1 − λ)·u,
  renormalised); ``both`` uses two separate adapters.
- W starts from nn.Linear's default initialisation, as in the code.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.runtime import atomic_path, cpu_threads_for, pick_device, progress
from stages.samplers import SAMPLERS, EpochSampler

log = logging.getLogger("ballad.adapter")

FORMS = ("linear", "relu")
POSITIONS = ("visual", "text", "both")
FORMAT = "ballad-adapter/1"


@dataclass(frozen=True)
class TrainConfig:
    lam: float = 0.2
    epochs: int = 10
    lr: float = 0.2
    batch_size: int = 512
    sampler: str = "class-balanced"
    form: str = "linear"
    position: str = "visual"
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def check(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise UserError(f"--lambda {self.lam}: must lie in [0, 1]")
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value <= 0:
                raise UserError(f"{option} {value}: must be positive")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: must be positive")
        for option, value, allowed in (("--sampler", self.sampler, SAMPLERS), ("--form", self.form, FORMS),
                                       ("--position", self.position, POSITIONS)):
            if value not in allowed:
                raise UserError(f"{option} {value}: choose one of {', '.join(allowed)}")


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
    """Mean cross-entropy of the logits norm(z) · Wᵀ (W: the scaled classifier), in a few fused passes.

    The same value and gradients as ``F.cross_entropy(F.normalize(z, dim=-1) @ W.T, y)``; written
    by hand because Phase B's matrices are small enough that autograd's separate normalise,
    softmax and loss passes cost a good fraction of the step on a CPU.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        logits = (z @ weights.T).mul_(r)
        logp = torch.log_softmax(logits, dim=1)  # not log(softmax): at scale 100 a probability can underflow
        ctx.save_for_backward(z, weights, y, r, logits, logp)
        return logp.gather(1, y[:, None]).mean().neg()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, weights, y, r, logits, logp = ctx.saved_tensors
        g = logp.exp_()  # in place: backward runs once
        g[torch.arange(len(y), device=y.device), y] -= 1  # softmax − one-hot
        scale = r * (grad / len(y))
        # d/dz of (z·w)/|z|: (w − (ẑ·w)ẑ)/|z|, summed over classes with weights g
        along = torch.linalg.vecdot(g, logits, dim=1).unsqueeze(1) * r
        dz = (g @ weights).sub_(z * along).mul_(scale) if ctx.needs_input_grad[0] else None
        dw = g.T @ (z * scale) if ctx.needs_input_grad[1] else None
        return dz, dw, None


@torch.no_grad()
def embed_all(model: Adapter, feats: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``model.embed`` in chunks, so a whole split never needs the adapter's intermediates at once."""
    return torch.cat([model.embed(feats[i:i + chunk].float()) for i in range(0, len(feats), chunk)])


def fit(feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float, cfg: TrainConfig,
        desc: str = "adapter") -> tuple[Adapter, list[float]]:
    """Train on tensors already on the training device; returns the adapter and the mean loss per epoch."""
    cfg.check()
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
    total = torch.zeros((), device=device)

    def step(idx: torch.Tensor) -> None:
        weights = fixed if fixed is not None else model.classifier(text)
        loss = CosineCrossEntropy.apply(model.adapt(feats[idx]), weights, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach())

    if device.type == "cuda":
        step = cuda_graph(step, model, opt, cfg.batch_size, device)
    losses = []
    bar = progress(range(cfg.epochs), desc=desc, unit="epoch")
    dim, classes = feats.shape[1], text.shape[0]
    with cpu_threads_for(6 * cfg.batch_size * dim * (dim + classes), device):  # fwd + bwd of both products
        for epoch in bar:
            # cosine annealing to 0, stepped once per epoch like the official code's scheduler
            rate = cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
            if torch.is_tensor(lr):
                lr.fill_(rate)
            else:
                opt.param_groups[0]["lr"] = rate
            total.zero_()
            for idx in sampler.epoch(epoch, cfg.epochs):
                step(idx)
            losses.append(total.item() / sampler.steps)  # the one host sync per epoch
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return model.eval(), losses


def cuda_graph(step, model: Adapter, opt: torch.optim.Optimizer, batch: int, device: torch.device):
    """``step`` captured as one CUDA graph: each call is then one copy and one replay.

    A Phase B step is ~30 small kernels; launched one by one from Python they take several times
    the GPU's work. Capture needs warm-up steps first; their updates are undone afterwards, so the
    training run is the same as without the graph.
    """
    idx = torch.zeros(batch, dtype=torch.long, device=device)
    start = [p.detach().clone() for p in model.parameters()]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(idx)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(idx)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), start):
            p.copy_(p0)
    for state in opt.state.values():
        state["momentum_buffer"].zero_()  # = the first step's buffer, which is the gradient itself

    def replay(batch_idx: torch.Tensor) -> None:
        idx.copy_(batch_idx)
        graph.replay()
    return replay


def train_adapter(features: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(),
                  device: str | None = None) -> dict:
    """Train on the store's train split and save the adapter with its config and the store's fingerprint."""
    from store.features import FeatureStore

    cfg.check()
    dev = pick_device(device)
    store = FeatureStore.open(features)
    feats, labels = store.features("train", device=dev, dtype=torch.float32)
    model, losses = fit(feats, labels.long(), store.text_embeddings(device=dev), store.logit_scale, cfg)
    blob = {"format": FORMAT, "dim": model.dim, "config": asdict(cfg), "fingerprint": dict(store.fingerprint),
            "losses": losses, "num_train": len(labels),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(out) as tmp:
        torch.save(blob, tmp)
    log.info("adapter: %d train features, final loss %.4f → %s", len(labels), losses[-1], out)
    return blob


def load_adapter(path: str | Path | None, store, features: str | Path) -> Adapter:
    """The saved adapter, checked against ``store``; ``None`` or ``'none'`` gives the identity."""
    if path is None or str(path) == "none":
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
