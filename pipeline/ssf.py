"""Scaling and shifting of features (SSF; Lian et al., NeurIPS 2022) for Phase A's ``--tune ssf``, written for
open_clip's ViT image towers after LIFT+'s ``SSF`` (facts in the LIFT+ notes; our own implementation).

LIFT+ puts a per-channel y ↦ γ ⊙ y + β after each of a block's four linear layers: the attention input
projection (on q, k, v together, 3d channels), its output projection (d), the MLP's first layer (before
the activation, 4d) and its second (d); γ ~ N(1, 0.02), β ~ N(0, 0.02), so SSF starts near, not at, the
pretrained model. The SSF paper (and LIFT's older code) also puts one after each LayerNorm; LIFT+ does
not, and neither do we. Every one of the four follows a linear layer, so it merges into it:
W' = diag(γ) W, b' = γ ⊙ b + β (``merge``, the one formula). Training runs open_clip's own attention and
MLP on the merged tensors (``torch.func.functional_call``), and ``merge_ssf`` writes them into final.pt,
a plain open_clip state dict that the factory loads with nothing to rebuild.
"""
from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.func import functional_call

from pipeline.peft import image_blocks

# SSF's name in a block → the (weight, bias) it follows, as the block's state dict names them
TARGETS = {"attn_in": ("attn.in_proj_weight", "attn.in_proj_bias"),
           "attn_out": ("attn.out_proj.weight", "attn.out_proj.bias"),
           "mlp_in": ("mlp.c_fc.weight", "mlp.c_fc.bias"),
           "mlp_out": ("mlp.c_proj.weight", "mlp.c_proj.bias")}
_MARKER = ".ssf."


class SSF(nn.Module):
    """γ and β over ``channels``, drawn as LIFT+ draws them."""

    def __init__(self, channels: int, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.scale = nn.Parameter(torch.empty(channels, **kw).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(channels, **kw).normal_(0.0, 0.02))

    @staticmethod
    def merge(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(γ) W, γ ⊙ b + β): the layer followed by SSF, for training and for the exported checkpoint."""
        return weight * scale[:, None], bias * scale + shift


class SSFBlock(ResidualAttentionBlock):
    """open_clip's block whose four linear layers run with SSF merged into them; ``add_ssf`` turns a built
    block into one, keeping its tensors and their names."""

    def merged(self, part: str) -> dict:
        """The merged tensors of the attention (``part`` "attn") or the MLP ("mlp"), named within it."""
        out = {}
        for name, (w, b) in TARGETS.items():
            if w.startswith(part + "."):
                ssf = self.ssf[name]
                weight, bias = SSF.merge(self.get_parameter(w), self.get_parameter(b), ssf.scale, ssf.shift)
                out[w[len(part) + 1:]], out[b[len(part) + 1:]] = weight, bias
        return out

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        h = self.ln_1(q_x)
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None  # as open_clip's attention()
        a = functional_call(self.attn, self.merged("attn"), (h, h, h), {"need_weights": False, "attn_mask": mask})[0]
        x = q_x + self.ls_1(a)
        return x + self.ls_2(functional_call(self.mlp, self.merged("mlp"), (self.ln_2(x),)))


def add_ssf(model, indices: list[int]) -> None:
    """Give the image-tower blocks ``indices`` SSF after each of their four linear layers."""
    blocks = image_blocks(model.visual, "ssf")
    for i in indices:
        block = blocks[i]
        if isinstance(block, SSFBlock):
            continue
        ssfs = {}
        for name, (w, _) in TARGETS.items():
            weight = block.get_parameter(w)
            ssfs[name] = SSF(weight.shape[0], dtype=weight.dtype, device=weight.device)
        block.add_module("ssf", nn.ModuleDict(ssfs))
        block.__class__ = SSFBlock


def ssf_parameters(visual) -> list:
    return [p for b in visual.transformer.resblocks if isinstance(b, SSFBlock) for p in b.ssf.parameters()]


def merge_ssf(state: dict) -> dict:
    """An SSF training state dict as the checkpoint the factory loads: each γ, β merged into the layer it
    follows (and dropped); everything else as is."""
    out = {k: v for k, v in state.items() if _MARKER not in k}
    prefixes = {k[: k.index(_MARKER) + 1] for k in state if _MARKER in k}
    for prefix in prefixes:
        for name, (w, b) in TARGETS.items():
            scale, shift = state[f"{prefix}ssf.{name}.scale"], state[f"{prefix}ssf.{name}.shift"]
            weight, bias = SSF.merge(state[prefix + w], state[prefix + b], scale, shift)
            out[prefix + w], out[prefix + b] = weight.detach(), bias.detach()
    return out
