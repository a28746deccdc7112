"""Images and prompts → the features a feature store holds, computed one way for ``extract`` and for
``predict`` (stages/bundle/run.py), so that a bundle rounds features exactly as the store does.

``split_transform`` cuts an eval or train transform where loader workers hand over to the model's
device: workers stop at uint8 HWC tensors, and ``normalised`` scales and normalises each batch on
the device (a quarter of the bytes between processes, much less per-image CPU time on small images,
the same values bit for bit).
"""
from __future__ import annotations

import numpy as np


def split_transform(transform):
    """(per-image part, batched part) of a transform: when it ends in ToTensor + Normalize (BALLAD's
    do), the per-image part ends in uint8 HWC instead and the batched part is the Normalize; else
    (transform, None)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return transform, None
    return T.Compose([*steps[:-2], _uint8_hwc]), steps[-1]


def _uint8_hwc(img):
    import torch

    return torch.from_numpy(np.array(img, dtype=np.uint8))  # RGB already: the transform converts first


def normalised(images, dev, normalize):
    """Finish ``split_transform``'s batched part on ``dev``."""
    x = images.to(dev, non_blocking=True)
    if normalize is None:
        return x
    return normalize(x.permute(0, 3, 1, 2).float().div(255).contiguous())


def image_features(model, images, dev, dtype):
    """Stored features of a transformed batch: encode_image (bf16 autocast on CUDA), cast to the store's dtype."""
    from pipeline.runtime import autocast

    with autocast(dev):
        feats = model.encode_image(images.to(dev, non_blocking=True))
    return feats.to(dtype)


def view_features(model, views, dev, dtype, normalize, batch_size: int):
    """[E, B, D] stored features of a batch's extra views [B, E, …] (``split_transform``'s per-image
    output), forwarded ``batch_size`` images at a time."""
    import torch

    flat = views.flatten(0, 1)
    feats = [image_features(model, normalised(flat[i:i + batch_size], dev, normalize), dev, dtype)
             for i in range(0, len(flat), batch_size)]
    return torch.cat(feats).view(views.shape[0], views.shape[1], -1).transpose(0, 1)


def text_embeddings(backbone, classnames, templates, dev, batch: int = 256):
    """[K, D] L2-normalised class embeddings: per class, the mean of its normalised prompt embeddings, re-normalised."""
    import torch
    import torch.nn.functional as F

    from pipeline.text import encode_text, tokenize_trimmed

    prompts = [t.format(c) for c in classnames for t in templates]
    model = backbone.model.to(dev).eval()
    with torch.inference_mode():
        emb = torch.cat([encode_text(model, tokenize_trimmed(backbone.tokenizer, prompts[i:i + batch]).to(dev),
                                     normalize=True).float()
                         for i in range(0, len(prompts), batch)])
        emb = F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
    return emb.cpu().numpy(), prompts
