"""Phase B's model: the residual adapter, its fused cosine cross-entropy, scoring, and loading the
adapter file (stages/adapter/train.py writes it). The method and where we depart from the authors:
stages/adapter/__init__.py."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError

FORMAT = "ballad-adapter/1"


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
