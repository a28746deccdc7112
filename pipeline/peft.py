"""The torch side of LIFT's lightweight finetuning (Shi et al., ICML 2024) for Phase A's ``--tune``:
the modules that pipeline/tuning.py's registered methods add, and the image tower's blocks they use.
Written for open_clip's towers (facts in the LIFT notes; this is our own implementation):

- LoRA (``--tune lora``): W_q += s·B_q A_q and W_v += s·B_v A_v on every image-tower block's attention
  input projection (q and v, as LIFT), rank r = ``--lora-rank``, by default LIFT's rule ``lift_width``
  (the same as AdaptFormer's width). A [r, d] ~ U(−1/√r, 1/√r) (the bound LIFT's
  ``kaiming_uniform_(a=√5)`` gives its [d, r] matrix), B [d, r] = 0, so training starts at the
  pretrained model; s = 1/r, LIFT's scaling (LoRA's α/r with α = 1). It is a parametrization of
  ``attn.in_proj_weight``, so open_clip's attention runs unchanged on W + ΔW, and ``merge_lora``
  merges ΔW into the weights: the exported checkpoint is a plain open_clip state dict. LIFT applies the
  low-rank term to the activations (x·A·B); the merged weight gives the same outputs.
- AdaptFormer (``--tune adaptformer``): beside each image-tower block's MLP a bottleneck branch on the
  block's post-attention input x: y = x + MLP(LN₂(x)) + s·up(ReLU(down(LN(x)))), with its own
  LayerNorm, width ``--adapter-width`` (default ``lift_width``), down-projection initialised with
  ``kaiming_normal_(a=√5)`` as LIFT, up-projection weight and both biases 0 and s a learnable scalar
  starting at 1, so training starts at the pretrained model. It cannot be merged; the factory
  (pipeline/models.py, through the registry's ``rebuild``) recognises its tensors in a checkpoint and
  rebuilds the branches before loading.

- Adapter (``--tune adapter``, LIFT+'s ``adapter``): Houlsby's sequential bottleneck on each block's MLP
  output m, m + up(ReLU(down(LN(m)))), before the residual add, as LIFT+'s ``PEFT_MLP`` places it; the
  same branch as AdaptFormer's without the scale (LIFT+ draws the down-projection from
  ``kaiming_uniform_``, we keep LIFT's ``kaiming_normal_`` for both), up-projection zero, so training
  starts at the pretrained model. Rebuilt on load like AdaptFormer.

``--tune-blocks k`` limits every block method to the last k blocks (LIFT+'s ``*_layers`` as an int);
the width rules then count those k blocks, as LIFT+'s code does (``len(layers)``). VPT lives in
pipeline/vpt.py, SSF in pipeline/ssf.py.

``HEAD_KEY`` names the trained classifier of ``--classifier head`` in a checkpoint (stages/phase_a/).
Kept free of stage imports: the factory uses it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.nn.utils import parametrize

from pipeline.errors import UserError
from pipeline.tuning import ANY_TOWER

HEAD_KEY = "classifier_head.weight"  # Phase A --classifier head: the trained class weights [K, D] in final.pt
_LORA_KEY = ".parametrizations.in_proj_weight."


def power_of_two_below(x: float) -> int:
    """2^max(0, ⌊log2 x⌋): the shape of LIFT's and LIFT+'s automatic widths."""
    return 2 ** max(0, int(math.log2(x)))


def lift_width(num_classes: int, num_blocks: int) -> int:
    """LIFT's default bottleneck width 2^max(0, ⌊log2(K / 2L)⌋): ViT-B/16 (L = 12) gives 32 for
    ImageNet-LT, 8 for Places-LT, 4 for CIFAR-100-LT."""
    return power_of_two_below(num_classes / (2 * num_blocks))


def blocks_refusal(tune: str, tower: str) -> UserError:
    """The one-line refusal of a transformer-only ``tune`` for a model whose image tower is ``tower``."""
    return UserError(f"--tune {tune}: needs transformer blocks in the image tower, and the model has {tower}; "
                     f"use {' or '.join(f'--tune {name}' for name in ANY_TOWER)}")


def _blocks(visual) -> tuple[nn.ModuleList | None, str]:
    """(the image tower's standard transformer blocks, or None; what the tower has)."""
    if not isinstance(visual, VisionTransformer):
        kind = "ResNet" if type(visual).__name__ == "ModifiedResNet" else type(visual).__name__
        return None, f"a {kind} image tower"
    blocks = visual.transformer.resblocks
    odd = next((b for b in blocks if not isinstance(b, ResidualAttentionBlock)
                or not getattr(b.attn, "_qkv_same_embed_dim", False)), None)
    return (blocks, "transformer") if odd is None else (None, f"{type(odd).__name__} blocks")


def has_image_blocks(model) -> bool:
    return _blocks(model.visual)[0] is not None


def image_blocks(visual, tune: str) -> nn.ModuleList:
    """The image tower's transformer blocks, or the one-line UserError saying why ``tune`` cannot use them."""
    blocks, tower = _blocks(visual)
    if blocks is None:
        raise blocks_refusal(tune, tower)
    return blocks


def tuned_indices(visual, tune: str, count: int | None) -> list[int]:
    """The indices of the blocks ``tune`` works on: the last ``count`` (``--tune-blocks``), or all when None."""
    total = len(image_blocks(visual, tune))
    if count is None:
        return list(range(total))
    if not 1 <= count <= total:
        raise UserError(f"--tune-blocks {count}: must be between 1 and the image tower's {total} blocks")
    return list(range(total - count, total))


def indices_holding(state: dict, marker: str) -> list[int]:
    """The image-tower blocks whose tensors in ``state`` include ``marker`` (".adaptformer.", ".ssf."…)."""
    prefix = "visual.transformer.resblocks."
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix) and marker in k})


# ---------------------------------------------------------------- LoRA
class LowRankQV(nn.Module):
    """A parametrization of ``nn.MultiheadAttention.in_proj_weight`` [3d, d] (rows q, k, v):
    W ↦ W + (1/r)·[B_q A_q; 0; B_v A_v]."""

    def __init__(self, dim: int, rank: int, dtype=None, device=None):
        super().__init__()
        bound = 1 / math.sqrt(rank)
        kw = {"dtype": dtype, "device": device}
        self.a_q = nn.Parameter(torch.empty(rank, dim, **kw).uniform_(-bound, bound))
        self.b_q = nn.Parameter(torch.zeros(dim, rank, **kw))
        self.a_v = nn.Parameter(torch.empty(rank, dim, **kw).uniform_(-bound, bound))
        self.b_v = nn.Parameter(torch.zeros(dim, rank, **kw))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merge(weight, self.a_q, self.b_q, self.a_v, self.b_v)

    @staticmethod
    def merge(weight, a_q, b_q, a_v, b_v) -> torch.Tensor:
        """W + ΔW: the one formula, for training (forward) and for the exported checkpoint."""
        d, scaling = weight.shape[1], 1 / a_q.shape[0]
        return torch.cat([weight[:d] + scaling * (b_q @ a_q), weight[d:2 * d], weight[2 * d:] + scaling * (b_v @ a_v)])


def add_lora(model, rank: int, indices: list[int] | None = None) -> None:
    """Put a ``LowRankQV`` on the attention input projection of the image-tower blocks ``indices`` (all: None)."""
    blocks = image_blocks(model.visual, "lora")
    for i in range(len(blocks)) if indices is None else indices:
        attn = blocks[i].attn
        w = attn.in_proj_weight
        parametrize.register_parametrization(attn, "in_proj_weight",
                                             LowRankQV(w.shape[1], rank, dtype=w.dtype, device=w.device))


def merge_lora(state: dict) -> dict:
    """A LoRA training state dict as the checkpoint the factory loads: ΔW merged into ``in_proj_weight``
    (the parametrization's tensors dropped); everything else as is."""
    out = {}
    for key, value in state.items():
        if _LORA_KEY not in key:
            out[key] = value
        elif key.endswith(_LORA_KEY + "original"):
            prefix = key[: -len("original")] + "0."
            out[key.replace(_LORA_KEY + "original", ".in_proj_weight")] = LowRankQV.merge(
                value, *(state[prefix + n] for n in ("a_q", "b_q", "a_v", "b_v"))).detach()
    return out


# ---------------------------------------------------------------- AdaptFormer and Adapter
class Adapter(nn.Module):
    """The bottleneck branch up(ReLU(down(LN(x)))), zero at initialisation. ``like`` is the block it joins:
    its LayerNorm class and dtypes (fp32 LayerNorm beside fp16 weights, as open_clip's)."""

    def __init__(self, like: ResidualAttentionBlock, width: int):
        super().__init__()
        w, ln = like.mlp.c_fc.weight, like.ln_2.weight
        dim = w.shape[1]
        self.ln = type(like.ln_2)(dim, dtype=ln.dtype, device=ln.device)
        self.down = nn.Linear(dim, width, dtype=w.dtype, device=w.device)
        self.up = nn.Linear(width, dim, dtype=w.dtype, device=w.device)
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.ln(x))))


class AdaptFormer(Adapter):
    """Adapter's branch times s, a learnable scalar starting at 1 (LIFT's AdaptFormer)."""

    def __init__(self, like: ResidualAttentionBlock, width: int):
        super().__init__(like, width)
        self.scale = nn.Parameter(torch.ones(1, dtype=self.up.weight.dtype, device=self.up.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class AdaptFormerBlock(ResidualAttentionBlock):
    """open_clip's block with AdaptFormer's branch beside its MLP; ``add_bottleneck`` turns a built block
    into one, keeping its tensors and their names. Image-tower blocks are self-attention, so the
    cross-attention inputs open_clip's signature carries are always None here."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x))) + self.adaptformer(x)


class AdapterBlock(ResidualAttentionBlock):
    """open_clip's block with the sequential adapter on its MLP's output (before the residual add)."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        m = self.mlp(self.ln_2(x))
        return x + self.ls_2(m + self.adapter(m))


BOTTLENECKS = {"adaptformer": (AdaptFormer, AdaptFormerBlock), "adapter": (Adapter, AdapterBlock)}


def add_bottleneck(model, kind: str, width: int, indices: list[int]) -> None:
    """Give the image-tower blocks ``indices`` a ``kind`` branch ("adaptformer" or "adapter") of ``width``;
    blocks that already have one (a checkpoint trained with it) keep theirs when the width is the same."""
    module, block_class = BOTTLENECKS[kind]
    blocks = image_blocks(model.visual, kind)
    for i in indices:
        block = blocks[i]
        if isinstance(block, block_class):
            if getattr(block, kind).down.out_features != width:
                raise UserError(f"--adapter-width {width}: the model already has {kind} branches of width "
                                f"{getattr(block, kind).down.out_features}")
            continue
        block.add_module(kind, module(block, width))
        block.__class__ = block_class


def bottleneck_width(state: dict, kind: str) -> int | None:
    """The width of a checkpoint's ``kind`` branches, or None when it has none."""
    for key, value in state.items():
        if key.startswith("visual.") and key.endswith(f".{kind}.down.weight"):
            return int(value.shape[0])
    return None
