"""LIFT's lightweight finetuning of the image tower (Shi et al., ICML 2024), for Phase A's ``--tune``.

BALLAD finetunes every weight of both towers (``full``). LIFT trains a few parameters of the image
tower and freezes the text tower; its public code offers the variants below, written here for
open_clip's towers (facts in the LIFT notes; this is our own implementation):

- ``bias``: BitFit plus norm parameters. Every image-tower parameter whose name ends in ``bias``
  (attention in/out projections, MLP layers, norm layers) and the weight (γ) of every normalisation layer
  in the tower (ViT: ``ln_pre``, each block's ``ln_1``/``ln_2``, ``ln_post``; ResNet: BatchNorm γ and β
  plus the attention pool's biases). LIFT's ``bias_tuning`` and ``ln_tuning`` are two switches covering
  the transformer blocks only; ours is the pair of them, over the whole image tower.
- ``lora``: W_q += s·B_q A_q and W_v += s·B_v A_v on every image-tower block's attention input
  projection (q and v, as LIFT), rank r = ``--lora-rank`` (default 8; LIFT sizes it by the same rule as
  the AdaptFormer width). A [r, d] ~ U(−1/√r, 1/√r) (the bound LIFT's
  ``kaiming_uniform_(a=√5)`` gives its [d, r] matrix), B [d, r] = 0, so training starts at the
  pretrained model; s = 1/r, LIFT's scaling (LoRA's α/r with α = 1). It is a parametrization of
  ``attn.in_proj_weight``, so open_clip's attention runs unchanged on W + ΔW, and ``export_state_dict``
  merges ΔW into the weights: the exported checkpoint is a plain open_clip state dict. LIFT applies the
  low-rank term to the activations (x·A·B); the merged weight gives the same outputs.
- ``adaptformer``: beside each image-tower block's MLP a bottleneck branch on the block's
  post-attention input x: y = x + MLP(LN₂(x)) + s·up(ReLU(down(LN(x)))), with its own LayerNorm, width
  ``--adapter-width`` (default LIFT's rule ``lift_width``), down-projection initialised with
  ``kaiming_normal_(a=√5)`` as LIFT, up-projection weight and both biases 0 and s a learnable scalar
  starting at 1, so training starts at the pretrained model. It cannot be merged; the factory
  (pipeline/models.py) recognises its tensors in a checkpoint and rebuilds the branches before loading.

``lora`` and ``adaptformer`` need open_clip's own transformer blocks (``ResidualAttentionBlock``) in the
image tower; ``full`` and ``bias`` work on any tower. ``HEAD_KEY`` names the trained classifier of
``--classifier head`` in a checkpoint (stages/phase_a.py). Kept free of stage imports: the factory uses it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.nn.utils import parametrize

from pipeline.errors import UserError
from pipeline.tuning import LORA_RANK, TRANSFORMER_TUNES, TUNES  # noqa: F401  (defined torch-free there)

HEAD_KEY = "classifier_head.weight"  # Phase A --classifier head: the trained class weights [K, D] in final.pt
_LORA_KEY = ".parametrizations.in_proj_weight."


def lift_width(num_classes: int, num_blocks: int) -> int:
    """LIFT's default bottleneck width 2^max(0, ⌊log2(K / 2L)⌋): ViT-B/16 (L = 12) gives 32 for
    ImageNet-LT, 8 for Places-LT, 4 for CIFAR-100-LT."""
    return 2 ** max(0, int(math.log2(num_classes / (2 * num_blocks))))


def needs_blocks(tune: str, tower: str) -> UserError:
    """The one-line refusal of a transformer-only ``tune`` for a model whose image tower is ``tower``."""
    return UserError(f"--tune {tune}: needs transformer blocks in the image tower, and the model has {tower}; "
                     "use --tune full or --tune bias")


def _blocks(model) -> tuple[nn.ModuleList | None, str]:
    """(the image tower's standard transformer blocks, or None; what the tower has)."""
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        kind = "ResNet" if type(visual).__name__ == "ModifiedResNet" else type(visual).__name__
        return None, f"a {kind} image tower"
    blocks = visual.transformer.resblocks
    odd = next((b for b in blocks if not isinstance(b, ResidualAttentionBlock)
                or not getattr(b.attn, "_qkv_same_embed_dim", False)), None)
    return (blocks, "transformer") if odd is None else (None, f"{type(odd).__name__} blocks")


def has_image_blocks(model) -> bool:
    return _blocks(model)[0] is not None


def image_blocks(model, tune: str) -> nn.ModuleList:
    """The image tower's transformer blocks, or the one-line UserError saying why ``tune`` cannot use them."""
    blocks, tower = _blocks(model)
    if blocks is None:
        raise needs_blocks(tune, tower)
    return blocks


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


def add_lora(model, rank: int) -> None:
    """Put a ``LowRankQV`` on every image-tower block's attention input projection."""
    for block in image_blocks(model, "lora"):
        attn = block.attn
        w = attn.in_proj_weight
        parametrize.register_parametrization(attn, "in_proj_weight",
                                             LowRankQV(w.shape[1], rank, dtype=w.dtype, device=w.device))


def export_state_dict(state: dict) -> dict:
    """A training state dict as the checkpoint the factory loads: LoRA merged into ``in_proj_weight``
    (the parametrization's tensors dropped); everything else, AdaptFormer's branches included, as is."""
    out = {}
    for key, value in state.items():
        if _LORA_KEY not in key:
            out[key] = value
        elif key.endswith(_LORA_KEY + "original"):
            prefix = key[: -len("original")] + "0."
            out[key.replace(_LORA_KEY + "original", ".in_proj_weight")] = LowRankQV.merge(
                value, *(state[prefix + n] for n in ("a_q", "b_q", "a_v", "b_v"))).detach()
    return out


# ---------------------------------------------------------------- AdaptFormer
class AdaptFormer(nn.Module):
    """The bottleneck branch: s · up(ReLU(down(LN(x)))), zero at initialisation. ``like`` is the block
    it joins: its LayerNorm class and dtypes (fp32 LayerNorm beside fp16 weights, as open_clip's)."""

    def __init__(self, like: ResidualAttentionBlock, width: int):
        super().__init__()
        w, ln = like.mlp.c_fc.weight, like.ln_2.weight
        dim = w.shape[1]
        self.ln = type(like.ln_2)(dim, dtype=ln.dtype, device=ln.device)
        self.down = nn.Linear(dim, width, dtype=w.dtype, device=w.device)
        self.up = nn.Linear(width, dim, dtype=w.dtype, device=w.device)
        self.scale = nn.Parameter(torch.ones(1, dtype=w.dtype, device=w.device))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.ln(x)))) * self.scale


class AdaptFormerBlock(ResidualAttentionBlock):
    """open_clip's block with AdaptFormer's branch beside its MLP; ``add_adaptformer`` turns a built block
    into one, keeping its tensors and their names. Image-tower blocks are self-attention, so the
    cross-attention inputs open_clip's signature carries are always None here."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x))) + self.adaptformer(x)


def add_adaptformer(model, width: int) -> None:
    """Give every image-tower block an AdaptFormer branch of ``width``; blocks that already have one
    (a checkpoint trained with it) keep theirs when the width is the same."""
    for block in image_blocks(model, "adaptformer"):
        if isinstance(block, AdaptFormerBlock):
            if block.adaptformer.down.out_features != width:
                raise UserError(f"--adapter-width {width}: the model already has AdaptFormer branches of width "
                                f"{block.adaptformer.down.out_features}")
            continue
        block.add_module("adaptformer", AdaptFormer(block, width))
        block.__class__ = AdaptFormerBlock


def adaptformer_width(state: dict) -> int | None:
    """The AdaptFormer width of a checkpoint's tensors, or None when it has no AdaptFormer branches."""
    for key, value in state.items():
        if key.startswith("visual.") and key.endswith(".adaptformer.down.weight"):
            return int(value.shape[0])
    return None


# ---------------------------------------------------------------- what trains
def add_tuning(model, tune: str, *, num_classes: int, lora_rank: int = LORA_RANK,
               adapter_width: int | None = None) -> dict:
    """Add ``tune``'s modules to the image tower (nothing for full and bias); returns what was added,
    for final.json."""
    if tune == "lora":
        add_lora(model, lora_rank)
        return {"tune": tune, "lora_rank": lora_rank, "lora_scaling": 1 / lora_rank, "lora_targets": "q, v",
                "merged": True}
    if tune == "adaptformer":
        blocks = image_blocks(model, tune)
        width = adapter_width or lift_width(num_classes, len(blocks))
        add_adaptformer(model, width)
        return {"tune": tune, "adapter_width": width, "adapter_width_rule": adapter_width is None,
                "blocks": len(blocks)}
    if tune not in ("full", "bias"):
        raise UserError(f"--tune {tune}: choose one of {', '.join(TUNES)}")
    return {"tune": tune}


def mark_trainable(model, tune: str, train_text: bool) -> None:
    """Set requires_grad: ``tune``'s image-tower parameters, the text tower's only when ``train_text``,
    never the logit scale (Phase A holds it fixed)."""
    visual = model.visual
    if tune == "full":
        chosen = list(visual.parameters())
    elif tune == "bias":
        norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
        chosen = [p for n, p in visual.named_parameters() if n.endswith("bias")]
        chosen += [m.weight for m in visual.modules() if isinstance(m, norms) and m.weight is not None]
    else:
        kind = LowRankQV if tune == "lora" else AdaptFormer
        chosen = [p for m in visual.modules() if isinstance(m, kind) for p in m.parameters()]
    ids = {id(p) for p in chosen}
    if train_text:
        image = {id(p) for p in visual.parameters()}
        ids |= {id(p) for n, p in model.named_parameters() if id(p) not in image and n != "logit_scale"}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
