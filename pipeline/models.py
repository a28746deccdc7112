"""The model factory: the one place that knows how open_clip builds models.

``create_model(name, pretrained)`` returns the model with BALLAD's train and eval transforms and a
tokenizer. ``name`` is any open_clip architecture (``RN50``, ``ViT-B-16``, …) or ``ballad-tiny``, a
small randomly initialised CLIP shipped inside this package for tests and the demo. ``pretrained`` is
an open_clip tag (``openai``, ``laion2b_s34b_b79k``: downloaded on first use, so only on machines with
network), a local checkpoint path (our ``final.pt`` or any open_clip state dict), or None for random
init. Nothing else in the project calls open_clip's factory.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length


def _open_clip():
    import open_clip

    if "ballad-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def available_models() -> list[str]:
    return _open_clip().list_models()


def check_model_name(name: str) -> None:
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `python -c 'import open_clip; print(open_clip.list_models())'` lists them"
        raise UserError(f"--model {name}: unknown open_clip architecture{hint}")


def build_transforms(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """BALLAD's transforms (official code): RandomResizedCrop(scale 0.5–1, bicubic) + flip for training,
    Resize + CenterCrop for evaluation, both with CLIP normalisation."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    to_tensor = [T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), *to_tensor])
    evaluate = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), *to_tensor])
    return train, evaluate


def _to_rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if size is None:
        raise UserError("cannot tell the model's image size (model.visual.image_size is missing)")
    return int(size)


def create_model(name: str, pretrained: str | None = None, device="cpu") -> Backbone:
    """Build ``name`` with weights from ``pretrained`` (tag, local path, or None for random init)."""
    import torch

    open_clip = _open_clip()
    check_model_name(name)
    if pretrained in ("", "none", "None"):
        pretrained = None
    if pretrained is not None and _looks_like_path(pretrained) and not os.path.exists(pretrained):
        raise UserError(f"--pretrained {pretrained}: no such checkpoint file")
    if pretrained is not None and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(f"--pretrained {pretrained}: not a weight tag of {name} "
                            f"(known tags: {', '.join(tags) or 'none'}) and not a file")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, weights_only=True)
    except RuntimeError as e:
        if pretrained and os.path.exists(pretrained) and ("size mismatch" in str(e) or "state_dict" in str(e)):
            raise UserError(f"{pretrained}: checkpoint does not match architecture {name} ({str(e).splitlines()[0]})") from None
        raise
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    size = _image_size(model)
    train_tf, eval_tf = build_transforms(size, mean, std)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    return Backbone(name=name, pretrained=pretrained, model=model, train_transform=train_tf,
                    eval_transform=eval_tf, tokenizer=tokenizer, image_size=size, embed_dim=embed_dim)


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.endswith((".pt", ".pth", ".bin", ".safetensors"))
