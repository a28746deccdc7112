"""The training losses of Phase A and Phase B: one registry, one definition of each.

Each loss is one entry of ``LOSSES`` (``@register``): its name, its ``--loss`` help, its parameters and
its builder. A parameter is a config field (flag, default, help, range), so adding a loss is one entry
here and its test: ``loss_options`` gives every config that trains (Phase A's, Phase B's
``TrainConfig``) the ``--loss`` choice and every parameter, ``check_loss`` checks them, ``make_loss``
builds the chosen one. This module is torch-free when imported (the configs, and so ``--help``, read
it); torch is imported inside the builders.

A built loss is a callable ``(logits [N, K], labels [N]) -> mean loss`` over the training logits only:
evaluation always scores the plain logits. Its class constants come from the train class counts n_k
(a class without samples counts as one, as in pipeline/prior.py, so every constant stays finite).
The losses that are cross-entropy of shifted logits (ce, logit-adjusted, balanced-softmax) are a
``ShiftedCrossEntropy``, whose ``bias`` Phase B folds into its fused cosine kernel.

Where we depart from the papers' code:
- class-balanced and generalised reweighting take the plain batch mean (1/N)·Σ w_{y_i}·ℓ_i, as Cui et
  al.'s TensorFlow code (its default reduction divides by the number of non-zero weights); the PyTorch
  code of LDAM-DRW and DisAlign passes the weights to ``F.cross_entropy``, which divides by Σ w_{y_i}
  instead (a per-batch scale; with weights normalised to sum K the two agree on a class-balanced batch).
- LDAM (Cao et al. 2019) subtracts the margin from cosines and then scales by s: CE(s·(cos − m_y·e_y)).
  Our logits are already scaled (Phase B: the store's logit scale × cosine), so the margin is
  subtracted at scale s from the logits as they are: CE(z − s·m_y·e_y). That is Cao et al.'s loss
  exactly when s equals the model's logit scale; with CLIP's 100 and the default s = 30 the margin is
  0.3 of max_m in cosine units.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from pipeline.options import check_choices, check_finite, option

NONNEGATIVE = "must be 0 or more and finite"


@dataclass(frozen=True)
class Param:
    """One parameter of a loss: the config field ``name`` (flag ``--name`` with dashes)."""
    name: str
    default: float
    help: str
    ok: Callable[[float], bool]  # the range, given a finite number
    why: str  # the error when the value is outside it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Loss:
    name: str
    help: str
    build: Callable  # (parameters {name: value}, counts float64 tensor [K]) -> loss callable
    params: tuple[Param, ...] = ()


LOSSES: dict[str, Loss] = {}


def register(name: str, help: str, *params: Param):
    """Adds the decorated builder to ``LOSSES`` as the loss ``name`` with ``params``."""
    def add(build):
        LOSSES[name] = Loss(name, help, build, params)
        return build
    return add


def loss_params() -> list[Param]:
    """Every registered loss's parameters, in registry order."""
    return [p for entry in LOSSES.values() for p in entry.params]


def loss_options(cls):
    """Class decorator, under ``@dataclass``: adds ``loss`` (default ce) and every loss parameter as
    fields of ``cls``, after its own, so a config holds whatever loss the registry offers."""
    annotations = cls.__dict__.get("__annotations__", {})
    help = "; ".join(f"{entry.name}: {entry.help}" for entry in LOSSES.values())
    fields = {"loss": ("str", option("ce", "--loss", help + ".", tuple(LOSSES)))}
    fields.update({p.name: ("float", option(p.default, p.flag, p.help)) for p in loss_params()})
    for name, (kind, f) in fields.items():
        annotations[name] = kind
        setattr(cls, name, f)
    cls.__annotations__ = annotations
    return cls


def check_loss(config) -> None:
    """``--loss`` is registered and every loss parameter (the chosen loss's or not) is in its range."""
    check_choices(config, ("loss",))

    def ok(p: Param) -> bool:
        value = getattr(config, p.name)
        return isinstance(value, numbers.Real) and math.isfinite(value) and p.ok(value)
    check_finite(config, [(p.name, ok(p), p.why) for p in loss_params()])


def chosen_params(config) -> dict[str, float]:
    """The parameters of ``config.loss`` (what a run records of its loss)."""
    return {p.name: getattr(config, p.name) for p in LOSSES[config.loss].params}


def make_loss(config, class_counts, device=None):
    """The loss ``config.loss`` with ``config``'s parameters, for the train class counts ``class_counts``
    (a list, array or tensor [K]). Its class constants are computed where the counts are (a list: the
    CPU) and then moved to ``device`` (default: where the counts are)."""
    import torch

    counts = torch.as_tensor(class_counts)
    entry = LOSSES[config.loss]
    fn = entry.build({p.name: getattr(config, p.name) for p in entry.params}, counts)
    return fn.to(device) if device is not None else fn


class ClassLoss:
    """A loss with per-class constant tensors (its attributes), which ``to`` moves to a device."""

    def to(self, device):
        for name, value in vars(self).items():
            if hasattr(value, "to"):
                setattr(self, name, value.to(device))
        return self


class ShiftedCrossEntropy(ClassLoss):
    """Cross-entropy of the logits + a constant per-class ``bias`` (None: plain cross-entropy)."""

    def __init__(self, bias=None):
        self.bias = bias

    def __call__(self, logits, labels):
        from torch.nn import functional as F

        return F.cross_entropy(logits if self.bias is None else logits + self.bias, labels)


class Reweighted(ClassLoss):
    """(1/N)·Σ w_{y_i}·CE_i with class weights ``weights`` [K] (normalised to sum K by the builders)."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, logits, labels):
        from torch.nn import functional as F

        return (self.weights[labels] * F.cross_entropy(logits, labels, reduction="none")).mean()


def normalised(weights):
    """``weights`` [K] (float64) scaled to sum K, as float32."""
    return (weights * (len(weights) / weights.sum())).float()


@register("ce", "cross-entropy (BALLAD)")
def cross_entropy(p, counts):
    return ShiftedCrossEntropy()


@register("logit-adjusted", "cross-entropy of the logits + τ·log(train class prior), in training only (LIFT; "
                            "Menon et al. 2021)",
          Param("la_tau", 1.0, "τ of --loss logit-adjusted, ≥ 0.", lambda v: v >= 0, NONNEGATIVE))
def logit_adjusted(p, counts):
    from pipeline.prior import log_prior

    return ShiftedCrossEntropy(p["la_tau"] * log_prior(counts))


@register("balanced-softmax", "cross-entropy of the logits + log(train class prior) (Ren et al. 2020)")
def balanced_softmax(p, counts):
    """Ren et al.'s softmax with each class's exp(z_k) weighted by n_k: the logits + log n_k, the same
    as + log prior (the softmax ignores a constant): logit-adjusted with τ = 1."""
    from pipeline.prior import log_prior

    return ShiftedCrossEntropy(log_prior(counts))


class Focal(ClassLoss):
    """The multi-class focal loss without Lin et al.'s α (their α balances foreground and background)."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def __call__(self, logits, labels):
        logp = logits.log_softmax(1).gather(1, labels[:, None]).squeeze(1)
        return ((-logp.expm1()).pow(self.gamma) * logp).mean().neg()  # −expm1(log p) = 1 − p, exact near p = 1


@register("focal", "−(1 − p_y)^γ·log p_y (Lin et al. 2017)",
          Param("focal_gamma", 2.0, "γ of --loss focal, ≥ 0 (0: cross-entropy).", lambda v: v >= 0, NONNEGATIVE))
def focal(p, counts):
    return Focal(p["focal_gamma"])


class LDAM(ClassLoss):
    """CE(z − s·m_y·e_y): the true class's logit lowered by its margin (see the module docstring)."""

    def __init__(self, margins, s: float):
        self.margins, self.s = margins, s

    def __call__(self, logits, labels):
        from torch.nn import functional as F

        shift = (self.s * self.margins[labels])[:, None].to(logits.dtype)
        return F.cross_entropy(logits.scatter_add(1, labels[:, None], -shift), labels)


@register("ldam", "cross-entropy with the true class's logit lowered by s·m_y, m_y ∝ n_y^(−1/4) (Cao et al. 2019)",
          Param("ldam_max_m", 0.5, "Largest margin of --loss ldam (the rarest class's), > 0.", lambda v: v > 0,
                "must be above 0 and finite"),
          Param("ldam_s", 30.0, "Scale s of --loss ldam's margins, > 0.", lambda v: v > 0,
                "must be above 0 and finite"))
def ldam(p, counts):
    """Cao et al.'s margins: m_k = C·n_k^(−1/4), C such that the largest is max_m."""
    margins = counts.double().clamp_min(1).pow(-0.25)
    return LDAM((margins * (p["ldam_max_m"] / margins.max())).float(), p["ldam_s"])


@register("class-balanced", "cross-entropy weighted by (1 − β)/(1 − β^n_y), the inverse effective number of "
                            "samples (Cui et al. 2019)",
          Param("cb_beta", 0.9999, "β of --loss class-balanced, in [0, 1) (0: cross-entropy).",
                lambda v: 0 <= v < 1, "must be in [0, 1)"))
def class_balanced(p, counts):
    """w_k = (1 − β)/(1 − β^n_k) normalised to sum K (Cui et al.'s Eq. 6 and their normalisation)."""
    n = counts.double().clamp_min(1)
    beta = p["cb_beta"]
    effective = -(n * math.log(beta)).expm1() if beta > 0 else n.new_ones(n.shape)  # 1 − β^n, exact near β = 1
    return Reweighted(normalised((1 - beta) / effective))


@register("grw", "cross-entropy weighted by n_y^(−ρ), generalised re-weighting (Zhang et al. 2021)",
          Param("grw_exponent", 1.2, "Exponent ρ of --loss grw, ≥ 0 (0: cross-entropy; 1: inverse frequency).",
                lambda v: v >= 0, NONNEGATIVE))
def generalised_reweighting(p, counts):
    """DisAlign's generalised re-weighting: w_k ∝ (1/n_k)^ρ normalised to sum K; ρ = 1.2 is their default."""
    return Reweighted(normalised(counts.double().clamp_min(1).pow(-p["grw_exponent"])))


class LADE(ClassLoss):
    """PC-softmax cross-entropy + weight × the LADE regulariser (see ``lade``)."""

    def __init__(self, log_prior, lam: float, weight: float):
        self.log_prior, self.prior, self.lam, self.weight = log_prior, log_prior.exp(), lam, weight

    def __call__(self, logits, labels):
        from torch.nn import functional as F

        k, n = logits.shape[1], len(labels)
        pc = F.cross_entropy(logits + self.log_prior, labels)
        member = logits.new_zeros(logits.shape).scatter_(1, labels[:, None], 1.0)  # one-hot [N, K]
        per_class = member.sum(0)
        first = (logits * member).sum(0) / per_class.clamp_min(1)  # mean z_y over the batch's samples of y
        second = (logits - self.log_prior - math.log(k)).logsumexp(0) - math.log(n)  # log mean exp(z_y) under p_t
        bound = first - second - self.lam * second.square()
        return pc - self.weight * (self.prior * bound).sum()


@register("lade", "PC-softmax cross-entropy + a weighted LADE regulariser (Hong et al. 2021)",
          Param("lade_lambda", 0.1, "λ of --loss lade's regulariser (the squared log-mean-exp term), ≥ 0.",
                lambda v: v >= 0, NONNEGATIVE),
          Param("lade_weight", 0.1, "Weight α of --loss lade's regulariser, ≥ 0 (0: balanced-softmax).",
                lambda v: v >= 0, NONNEGATIVE))
def lade(p, counts):
    """Hong et al. 2021, "Disentangling Label Distribution for Long-tailed Visual Recognition": L =
    L_PC + α·L_LADER. L_PC is cross-entropy of z + log p_s (p_s the train prior: the same as
    balanced-softmax). L_LADER = −Σ_y p_s(y)·[ mean_{i: y_i = y} z_y(x_i) − log mean_i exp(z_y(x_i) −
    log p_s(y) + log p_t(y)) − λ·(that log-mean-exp)² ], the Donsker–Varadhan bound of their Eq. 10 for
    each class with the balanced target prior p_t = 1/K, estimated over the batch, and ReMINE's squared
    term (λ) keeping the estimate bounded, as the authors' ``LADELoss`` (without the 1e-9 it adds inside its logs). As there, a class absent from
    the batch keeps its second term (its first is 0), and the means run over the batch, not the data."""
    from pipeline.prior import log_prior

    return LADE(log_prior(counts), p["lade_lambda"], p["lade_weight"])
