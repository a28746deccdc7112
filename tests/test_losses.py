"""pipeline/losses.py: every registered loss against a reference written here in numpy (value and, by
finite differences of that reference, gradient), its parameters' checks, and the config fields."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses import LOSSES, ShiftedCrossEntropy, check_loss, chosen_params, loss_options, make_loss

COUNTS = np.array([50, 10, 3, 1, 0])  # a class without samples counts as one
K = len(COUNTS)


@dataclass
@loss_options
class Options:
    """A config that holds the registry's fields, as Phase A's and Phase B's do."""


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def prior():
    n = np.maximum(COUNTS, 1).astype(np.float64)
    return n / n.sum()


def ce_rows(z, y):
    return -log_softmax(z)[np.arange(len(y)), y]


def reference(name: str, p: dict, z: np.ndarray, y: np.ndarray) -> float:
    """Each loss from its paper's formula, in float64, one loop or line at a time."""
    n = np.maximum(COUNTS, 1).astype(np.float64)
    if name == "ce":
        return ce_rows(z, y).mean()
    if name == "logit-adjusted":
        return ce_rows(z + p["la_tau"] * np.log(prior()), y).mean()
    if name == "balanced-softmax":  # softmax with exp(z_k) weighted by n_k
        w = np.exp(z - z.max(1, keepdims=True)) * n
        return -np.mean([math.log(w[i, y[i]] / w[i].sum()) for i in range(len(y))])
    if name == "focal":
        py = np.exp(-ce_rows(z, y))
        return np.mean(-(1 - py) ** p["focal_gamma"] * np.log(py))
    if name == "ldam":
        m = 1 / n ** 0.25
        m = m * p["ldam_max_m"] / m.max()
        shifted = z.copy()
        for i, c in enumerate(y):
            shifted[i, c] -= p["ldam_s"] * m[c]
        return ce_rows(shifted, y).mean()
    if name in ("class-balanced", "grw"):
        if name == "class-balanced":
            beta = p["cb_beta"]
            w = (1 - beta) / (1 - beta ** n)
        else:
            w = n ** -p["grw_exponent"]
        w = w * K / w.sum()
        return np.mean(w[y] * ce_rows(z, y))
    if name == "lade":
        pc = ce_rows(z + np.log(prior()), y).mean()
        reg = 0.0
        for c in range(K):
            mine = z[y == c, c]
            first = mine.mean() if len(mine) else 0.0
            second = math.log(np.mean(np.exp(z[:, c] - np.log(prior()[c]) + np.log(1 / K))))
            reg += prior()[c] * (first - second - p["lade_lambda"] * second ** 2)
        return pc - p["lade_weight"] * reg
    raise AssertionError(f"no reference for {name}")


PARAMS = {  # non-default values, so a parameter that is ignored shows
    "ce": {}, "logit-adjusted": {"la_tau": 1.7}, "balanced-softmax": {}, "focal": {"focal_gamma": 1.5},
    "ldam": {"ldam_max_m": 0.4, "ldam_s": 5.0}, "class-balanced": {"cb_beta": 0.9}, "grw": {"grw_exponent": 0.8},
    "lade": {"lade_lambda": 0.3, "lade_weight": 0.5}}


def test_every_registered_loss_has_a_reference_here():
    assert set(PARAMS) == set(LOSSES)
    assert all(set(PARAMS[name]) == {p.name for p in LOSSES[name].params} for name in LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_value_and_gradient_match_the_formula(name):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(12, K, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 0, 1])  # class 4 absent from the batch
    options = Options(loss=name, **PARAMS[name])
    fn = make_loss(options, COUNTS.tolist())
    value = fn(logits, labels)
    z, y = logits.detach().numpy(), labels.numpy()
    assert value.item() == pytest.approx(reference(name, PARAMS[name], z, y), rel=1e-5, abs=1e-6)
    (grad,) = torch.autograd.grad(value, logits)
    step, numeric = 1e-6, np.zeros_like(z)
    for i in range(z.shape[0]):
        for k in range(K):
            hi, lo = z.copy(), z.copy()
            hi[i, k] += step
            lo[i, k] -= step
            numeric[i, k] = (reference(name, PARAMS[name], hi, y) - reference(name, PARAMS[name], lo, y)) / (2 * step)
    assert np.allclose(grad.numpy(), numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name,params", [("logit-adjusted", {"la_tau": 0.0}), ("focal", {"focal_gamma": 0.0}),
                                         ("class-balanced", {"cb_beta": 0.0}), ("grw", {"grw_exponent": 0.0})])
def test_parameters_at_their_neutral_value_give_cross_entropy(name, params):
    logits, labels = torch.randn(20, K, generator=torch.Generator().manual_seed(2)), torch.arange(20) % K
    ce = make_loss(Options(), COUNTS)(logits, labels)
    assert torch.allclose(make_loss(Options(loss=name, **params), COUNTS)(logits, labels), ce, atol=1e-6)


def test_lade_without_its_regulariser_is_balanced_softmax():
    logits, labels = torch.randn(20, K, generator=torch.Generator().manual_seed(3)), torch.arange(20) % K
    bs = make_loss(Options(loss="balanced-softmax"), COUNTS)(logits, labels)
    assert torch.equal(make_loss(Options(loss="lade", lade_weight=0.0), COUNTS)(logits, labels), bs)


def test_shifted_cross_entropies_expose_their_bias():
    """Phase B runs these in its fused kernel from ``bias``: it must be the shift the loss applies."""
    for name in ("ce", "logit-adjusted", "balanced-softmax"):
        fn = make_loss(Options(loss=name, la_tau=0.5), COUNTS)
        assert isinstance(fn, ShiftedCrossEntropy)
    assert make_loss(Options(), COUNTS).bias is None
    expected = 0.5 * torch.from_numpy(np.log(prior())).float()
    assert torch.allclose(make_loss(Options(loss="logit-adjusted", la_tau=0.5), COUNTS).bias, expected)
    assert not isinstance(make_loss(Options(loss="focal"), COUNTS), ShiftedCrossEntropy)


def test_class_constants_move_to_the_device_asked_for():
    fn = make_loss(Options(loss="ldam"), torch.tensor(COUNTS), device="meta")
    assert fn.margins.device.type == "meta"


def test_config_fields_and_checks_come_from_the_registry():
    names = [f.name for f in fields(Options)]
    assert names == ["loss"] + [p.name for entry in LOSSES.values() for p in entry.params]
    assert chosen_params(Options(loss="ldam", ldam_s=2.0)) == {"ldam_max_m": 0.5, "ldam_s": 2.0}
    check_loss(Options())
    with pytest.raises(UserError, match=r"^--loss nope: choose one of ce, logit-adjusted"):
        check_loss(Options(loss="nope"))
    for entry in LOSSES.values():
        for p in entry.params:
            for bad in (math.nan, math.inf, -1.0, "1"):
                with pytest.raises(UserError, match=rf"^{re.escape(p.flag)} {re.escape(str(bad))}: {re.escape(p.why)}$"):
                    check_loss(Options(**{p.name: bad}))
    with pytest.raises(UserError, match=r"^--cb-beta 1.0: must be in \[0, 1\)$"):
        check_loss(Options(cb_beta=1.0))
    with pytest.raises(UserError, match=r"^--ldam-s 0.0: must be above 0"):
        check_loss(Options(ldam_s=0.0))
