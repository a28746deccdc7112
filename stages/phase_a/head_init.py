"""The weights ``--classifier head`` starts from (``--head-init``, pipeline/heads.py's registry), and the
train images the image-based methods read.

``class-mean`` and ``linear-probe`` need the feature at the head's input of at most ``--head-init-shots``
train images per class: their keys are chosen from every train sample's (key, label), read in one pass
over the shards without decoding anything (``train_labels``), by ``choose_per_class`` from ``--seed``;
then only those are decoded (a stage before decoding drops the rest), under the run's eval transform
(``--eval-transform``; LIFT's code: Resize + CenterCrop), and encoded by the model in eval mode before any
training step. The ``--tune`` modules are in the model by then but start as the identity (AdaptFormer's
up-projection and LoRA's B are zero), so these are the pretrained model's features, as LIFT's
``use_tuner=False``. Under DDP every rank computes the same initialisation (DDP then broadcasts rank 0's).
"""
from __future__ import annotations

import torch

from pipeline.heads import PROJECTION, choose_per_class, head_init, resolved_head_input
from pipeline.runtime import progress
from stages.phase_a.data import Transforms, eval_batches, one_line
from stages.phase_a.model import image_features, text_head, to_device


def initial_head(cfg, bb, tokens, urls, device, decode_on=None, channels_last: bool = False):
    """(head weights [K, F] or None, the feature it reads): None and the projected embedding unless
    ``--classifier head``."""
    if cfg.classifier != "head":
        return None, PROJECTION
    model = bb.model
    head_input = resolved_head_input(model, cfg.head_input)
    weights = head_init(cfg.head_init).weights(
        text=lambda: text_head(model, tokens, cfg.text_chunk, head_input),
        samples=lambda: train_samples(cfg, bb, urls, head_input, device, decode_on, channels_last),
        num_classes=len(tokens))
    return weights.to(device), head_input


def train_labels(urls) -> tuple[list[str], list[int]]:
    """Every sample's key and label, in shard order, read from the label members without decoding an image."""
    import webdataset as wds

    from store.shards import label_key_of
    from store.stream import tar_samples

    label_key = label_key_of(urls)
    keys, labels = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(list(urls)), tar_samples):
        if label_key.member in sample:  # a sample without one is refused (or skipped) where it is decoded
            keys.append(sample["__key__"])
            labels.append(label_key.decode(sample[label_key.member]))
    return keys, labels


class KeepKeys:
    """A stage before decoding: only the samples whose key is in ``keys``."""

    def __init__(self, keys: set):
        self.keys = frozenset(keys)

    def __call__(self, samples):
        return (s for s in samples if s["__key__"] in self.keys)


def train_samples(cfg, bb, urls, head_input: str, device, decode_on=None, channels_last: bool = False):
    """(features [N, F] float32, labels [N]) at ``head_input`` of the chosen train images (the module's docstring)."""
    keys, labels = train_labels(urls)
    keep = choose_per_class(keys, labels, cfg.head_init_shots, cfg.seed)
    model, training = bb.model, bb.model.training
    model.eval()
    feats, seen = [], []
    try:
        batches = eval_batches(urls, Transforms(cfg, bb).eval, batch=cfg.micro_batch or cfg.batch_size,
                               workers=cfg.workers, limit=len(keep), decode_on=decode_on, skip_bad=cfg.skip_bad,
                               max_pixels=cfg.max_pixels, before_decode=KeepKeys(keep))
        with torch.no_grad(), progress(desc=f"head init ({cfg.head_init})", total=len(keep), unit="img") as bar:
            for images, y in one_line(batches):
                x = to_device(images, device, channels_last)
                feats.append(image_features(model, x, cfg.precision, head_input).float())
                seen.append(y)
                bar.update(len(y))
    finally:
        model.train(training)
    return torch.cat(feats), torch.cat(seen).to(device)
