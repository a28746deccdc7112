"""Visual prompt tuning (Jia et al., ECCV 2022) for Phase A's ``--tune vpt-shallow`` and ``vpt-deep``, written
for open_clip's ViT image towers after LIFT+'s prompt tuning (``v.pt``; facts in the LIFT+ notes, our
own implementation):

- A prompted block takes P learnable tokens [P, d] into its input sequence. ``vpt-deep`` prompts every
  block (or the last k, ``--tune-blocks``), each block's prompts replacing the previous block's prompt
  outputs (LIFT+: the prompts of every layer in ``pt_layers``); ``vpt-shallow`` prompts the first block
  only (with ``--tune-blocks k`` the first of the last k), and its prompt outputs then travel through
  the later blocks. After the last block the prompt tokens are dropped, so the tower pools (class token
  or average) and projects exactly the tokens it had without them.
- Where the prompts sit in the sequence changes no output: attention without a mask treats the tokens as
  a set. We append them (LIFT's ``VPT``); LIFT+ inserts them after the class token.
- Initialisation N(0, 0.02) as LIFT+ (LIFT: uniform ±√(6 / (3·patch² + d))).
- P = 2^max(0, ⌊log2(K / L)⌋), K classes and L the blocks in scope (all, or --tune-blocks k): LIFT+'s
  rule, which counts the prompted layers. For ``vpt-shallow`` we keep the deep count rather than K / 1
  (LIFT+ has shallow only as a one-layer list, where its rule would put K tokens, rounded down to a
  power of two, into the sequence), so a shallow run costs what one deep block does.
- The prompts are not mergeable; final.pt holds them (``…resblocks.i.vpt_prompt``) and the factory,
  through the registry's ``rebuild``, rebuilds the prompted blocks from them before loading.
"""
from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch import nn

from pipeline.errors import UserError
from pipeline.peft import has_image_blocks, image_blocks, indices_holding, power_of_two_below

PROMPT = "vpt_prompt"  # a prompted block's tensor, in its state dict


def prompt_count(num_classes: int, num_blocks: int) -> int:
    """LIFT+'s default prompt length 2^max(0, ⌊log2(K / L)⌋): ViT-B/16 (L = 12) on ImageNet-LT gives 64."""
    return power_of_two_below(num_classes / num_blocks)


class PromptedBlock(ResidualAttentionBlock):
    """open_clip's block that first drops the ``carried`` prompt tokens at the end of its input (the previous
    prompted block's) and appends its own ``vpt_prompt`` [P, d]."""

    carried: int = 0

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        batch_first = self.attn.batch_first
        x = q_x if batch_first else q_x.transpose(0, 1)
        prompt = self.vpt_prompt.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :x.shape[1] - self.carried], prompt], dim=1)
        return super().forward(x if batch_first else x.transpose(0, 1), attn_mask=attn_mask)


class PromptedTransformer(Transformer):
    """The image tower's transformer, returning only the tokens it was given: the prompts' outputs dropped."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        return super().forward(x, attn_mask=attn_mask)[:, :x.shape[1]]  # both are NLD, whatever batch_first


def add_prompts(model, tune: str, count: int, indices: list[int]) -> None:
    """Prompt the image-tower blocks ``indices`` with ``count`` tokens each; blocks that already have them
    (a checkpoint trained with them) keep theirs when the count is the same."""
    visual = model.visual
    blocks = image_blocks(visual, tune)
    for n, i in enumerate(indices):
        block = blocks[i]
        if isinstance(block, PromptedBlock):
            if block.vpt_prompt.shape[0] != count:
                raise UserError(f"--tune {tune}: the model's block {i} already has {block.vpt_prompt.shape[0]} "
                                f"prompt tokens, not {count}")
            continue
        w = block.mlp.c_fc.weight
        block.register_parameter(PROMPT, nn.Parameter(torch.empty(count, w.shape[1], dtype=w.dtype, device=w.device)
                                                      .normal_(0, 0.02)))
        block.__class__ = PromptedBlock
        block.carried = 0 if n == 0 else count
    visual.transformer.__class__ = PromptedTransformer


def prompt_parameters(visual) -> list:
    return [b.vpt_prompt for b in visual.transformer.resblocks if isinstance(b, PromptedBlock)]


def rebuild_prompts(model, tune: str, state: dict) -> None:
    """Before loading ``state``: prompt the blocks whose prompts it holds (none, or a tower without blocks:
    nothing to do; the loader's check then names the extra tensors)."""
    indices = indices_holding(state, f".{PROMPT}")
    if indices and has_image_blocks(model):
        count = int(state[f"visual.transformer.resblocks.{indices[0]}.{PROMPT}"].shape[0])
        add_prompts(model, tune, count, indices)
