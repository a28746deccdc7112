"""Class prompts and the exact, truncated text encoder.

Prompts are tokenized once per run. The token tensor is then cut to the longest prompt (EOT
included): with a causal attention mask every position only attends to earlier ones, and pooling
takes the EOT position, so the padding after the longest EOT never influences the embedding. Cutting
it saves most of the text tower's work (ImageNet class prompts are ≤ 20 of 77 tokens), which matters
in Phase A where all K class prompts pass through the text tower with gradients at every step.
"""
from __future__ import annotations

import string

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATE = "a photo of a {}."

# CLIP's prompt ensemble as listed in the BALLAD paper (Appendix C); `--templates ensemble`.
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in the video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a prompt template, or None. A template is applied with ``str.format`` (as
    CLIP's and the authors' code apply it) and comes from files (dataset.json, ``--templates FILE``), so
    it must hold exactly one bare ``{}`` and nothing else ``format`` would act on: a field name or a
    format spec could look up attributes of the class name, raise, or pad a prompt to any length."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # an unmatched brace
        return f"is not a template ({e}); write one {{}} where the class name goes"
    if fields != [("", "", None)]:
        return "must hold exactly one {} (where the class name goes) and no other {…} field"
    return None


def class_prompts(classnames, template: str = DEFAULT_TEMPLATE) -> list[str]:
    return [template.format(c) for c in classnames]


def tokenize_trimmed(tokenizer, prompts) -> torch.Tensor:
    """Token ids [K, L] with L the longest prompt's length (EOT included), not the full context."""
    tokens = tokenizer(list(prompts))
    used = (tokens != 0).sum(dim=1).max().item()
    return tokens[:, : max(int(used), 1)].contiguous()


def _text_tower(model):
    """The module holding token_embedding/transformer/ln_final for truncation, or None if unsupported."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if tower is None or not hasattr(tower, "token_embedding") or not hasattr(tower, "positional_embedding"):
        return None
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return None
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool not in ("argmax", "eos", "first"):
        return None  # pooling the last position depends on the padding length
    return tower


def encode_text(model, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's text encoder, made to accept token tensors shorter than the context length.

    Gives the same embeddings as ``model.encode_text`` on the full 77-token (or config) context;
    towers whose output depends on the padding (HF text towers, CoCa, last-token pooling) fall back
    to the full context.
    """
    from open_clip.transformer import text_global_pool

    tower = _text_tower(model)
    if tower is None:
        full = F.pad(tokens, (0, model.context_length - tokens.shape[1])) if hasattr(model, "context_length") else tokens
        return model.encode_text(full, normalize=normalize)
    L = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:L].to(cast_dtype)
    mask = tower.attn_mask
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:L, :L])
    x = tower.ln_final(x)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def in_chunks(encode, tokens: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``encode(tokens)`` computed ``chunk`` prompts at a time and concatenated (all at once for None).

    Bounds the activations of a pass over K prompts by the chunk rather than K (Phase A's ``--text-chunk``:
    iNaturalist's K is 8,142). Each chunk keeps the whole batch's trimmed length, so every row is the
    embedding the whole batch gives: the rows do not interact in the text tower."""
    return encode(tokens) if chunk is None else torch.cat([encode(c) for c in tokens.split(chunk)])
