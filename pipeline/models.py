"""The model factory: the one place that knows how open_clip builds models.

``create_model(name, pretrained)`` returns the model with the train and eval transforms of the
authors' code (colour jitter included) and a tokenizer. ``name`` is any open_clip architecture
(``RN50``, ``ViT-B-16``, …) or one shipped inside this package for tests and the demo: ``ballad-tiny``
(a small CLIP with a ResNet image tower) and ``ballad-tiny-vit`` (the same text tower beside a small
ViT, for Phase A's lightweight ``--tune`` variants, which need transformer blocks). ``pretrained`` is an
open_clip tag (``openai``, ``laion2b_s34b_b79k``: downloaded on first use, so only on machines with
network), a local checkpoint path (our ``final.pt`` or any open_clip state dict), or None for random
init. A Phase A checkpoint may carry AdaptFormer branches (rebuilt before loading) and a trained
classifier head (``Backbone.head``); see pipeline/tuning.py and peft.py. Nothing else in the project calls
open_clip's factory.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.transforms import CLIP_MEAN, CLIP_STD, COLOR_JITTER, build_transforms

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class Backbone:
    """A CLIP model with everything needed to feed it."""

    name: str
    pretrained: str | None
    model: "torch.nn.Module"  # noqa: F821
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    image_size: int
    embed_dim: int
    head: "torch.Tensor | None" = None  # noqa: F821  [K, D] trained class weights (Phase A --classifier head)

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def class_head(self, num_classes: int):
        """The checkpoint's trained classifier [K, D] as float32 numpy, or None when it has none (the
        class prompts' text embeddings classify); refuses a head trained for another class count."""
        if self.head is None:
            return None
        if self.head.shape[0] != num_classes:
            raise UserError(f"{self.pretrained}: its classifier head has {self.head.shape[0]} classes, "
                            f"the dataset {num_classes}")
        return self.head.float().numpy()


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns that it loaded no weights whenever ``pretrained`` is None, also when we load a
    local checkpoint right after; the factory reports what it loaded itself."""

    def filter(self, record):
        return not record.getMessage().startswith("No pretrained weights loaded")


def _open_clip():
    import open_clip

    root = logging.getLogger()
    if not any(isinstance(f, _NoRandomInitWarning) for f in root.filters):
        root.addFilter(_NoRandomInitWarning())

    if "ballad-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


@functools.lru_cache(maxsize=None)
def _tokenizer(name: str):
    """open_clip's tokenizer of ``name``, built once per process and shared by its models: building the BPE
    tables takes a quarter of a second, longer than building ballad-tiny, and a tokenizer holds no state of
    its model."""
    return _open_clip().get_tokenizer(name)


def available_models() -> list[str]:
    return _open_clip().list_models()


def check_model_name(name: str) -> None:
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `python -c 'import open_clip; print(open_clip.list_models())'` lists them"
        raise UserError(f"--model {name}: unknown open_clip architecture{hint}")


def image_tower(name: str) -> str:
    """What the architecture's config says its image tower is: ``transformer`` (open_clip's ViT with
    its standard attention blocks) or a phrase naming what it is instead. Read before building, so
    that options needing transformer blocks are refused before any work."""
    vision = (_open_clip().get_model_config(name) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "a timm image tower"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "a ResNet image tower"
    custom = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    if vision.get("block_type") == "custom" or any(vision.get(k) for k in custom):
        return "custom attention blocks"
    return "transformer"


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if size is None:
        raise UserError("cannot tell the model's image size (model.visual.image_size is missing)")
    return int(size)


def create_model(name: str, pretrained: str | None = None, device="cpu", *, color_jitter: float = COLOR_JITTER,
                 fp16_weights: bool = False) -> Backbone:
    """Build ``name`` with weights from ``pretrained`` (tag, local path, or None for random init).

    ``fp16_weights`` builds the model as OpenAI's ``clip.build_model`` does (open_clip's "fp16"
    precision, its ``convert_weights_to_lp``): Conv/Linear/attention weights and the projections in
    fp16; BatchNorm, LayerNorm (computed in fp32), embeddings and the logit scale in fp32. Inputs must
    then be cast to fp16 by the caller; fp16 convolutions are for CUDA.
    """
    import torch

    from pipeline.heads import head_widths

    open_clip = _open_clip()
    check_model_name(name)
    if pretrained is not None and _looks_like_path(pretrained) and not os.path.exists(pretrained):
        raise UserError(f"--pretrained {pretrained}: no such checkpoint file")
    if pretrained is not None and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(f"--pretrained {pretrained}: not a weight tag of {name} "
                            f"(known tags: {', '.join(tags) or 'none'}) and not a file")
    is_file = pretrained is not None and os.path.exists(pretrained)
    model = open_clip.create_model(name, pretrained=None if is_file else pretrained, device=device, weights_only=True,
                                   precision="fp16" if fp16_weights else "fp32")
    head = load_checkpoint(model, pretrained, name) if is_file else None
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    size = _image_size(model)
    train_tf, eval_tf = build_transforms(size, mean, std, color_jitter)
    tokenizer = _tokenizer(name)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    if head is not None and (head.dim() != 2 or head.shape[1] not in head_widths(model, embed_dim)):
        raise UserError(f"{pretrained}: its classifier head is {tuple(head.shape)}, the model embeds in "
                        f"{embed_dim} dimensions")
    return Backbone(name=name, pretrained=pretrained, model=model, train_transform=train_tf,
                    eval_transform=eval_tf, tokenizer=tokenizer, image_size=size, embed_dim=embed_dim, head=head)


def load_checkpoint(model, path: str, name: str):
    """Load a state dict file into ``model`` after checking every tensor's name and shape; returns the
    trained classifier head it carries (Phase A ``--classifier head``) or None.

    A checkpoint is untrusted input: ``weights_only=True`` refuses pickled code, and safetensors files
    hold no code at all. Accepts our ``final.pt``, a bundle's ``model.safetensors``, open_clip state dicts
    and ``{"state_dict": …}`` wrappers (DDP ``module.`` prefixes are stripped). A checkpoint trained with
    a ``--tune`` method that is not merged into the weights holds its modules' tensors: each registered
    method (pipeline/tuning.py) rebuilds its modules in ``model`` first (AdaptFormer's branches, with
    the width those tensors have; LoRA is merged, so it needs nothing).
    """
    import torch

    from pipeline.peft import HEAD_KEY
    from pipeline.tuning import REGISTRY

    try:
        if str(path).endswith(".safetensors"):  # a bundle's model.safetensors (stages/bundle/run.py)
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file at all
        raise UserError(f"{path}: not a readable state-dict checkpoint ({e.__class__.__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, found {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    head = sd.pop(HEAD_KEY, None)
    for method in REGISTRY.values():  # modules that final.pt holds unmerged (AdaptFormer's branches)
        method.rebuild(model, sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} is {tuple(sd[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}" if wrong
                  else f"{len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}")
        raise UserError(f"{path}: checkpoint does not match architecture {name} ({detail})")
    model.load_state_dict(sd, strict=True)
    return head


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.endswith((".pt", ".pth", ".bin", ".safetensors"))
