"""Streaming samples out of shards with webdataset, as one composable chain:

    shards → (split by node) → (split by worker) → (shuffle shards) → tar samples → (shuffle) → decode → transform

Yields ``(key, image, label)``. Unreadable images are skipped and reported through ``on_bad`` (a
callable taking the key), or raise ``UserError`` naming the key when ``strict``. Labels are read from
the member the URLs' label key names (store.shards.ShardURL; plain URLs: ``.cls``).
"""
from __future__ import annotations

import io
import logging
from typing import Callable

from pipeline.errors import UserError
from store.shards import CLS, IMAGE_EXTS, LabelKey, label_key_of

log = logging.getLogger("ballad.stream")


class BadSample(Exception):
    pass


def decode_sample(sample: dict, transform: Callable | None = None, strict: bool = False, label_key: LabelKey = CLS):
    """webdataset sample dict → (key, transformed image, label); raises BadSample if undecodable."""
    from PIL import Image

    key = sample["__key__"]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    try:
        if ext is None or label_key.member not in sample:
            raise ValueError("missing image or label")
        label = label_key.decode(sample[label_key.member])
        with Image.open(io.BytesIO(sample[ext])) as im:
            img = im.convert("RGB")
    except Exception as e:  # any decoder failure means the same thing: this sample is unusable
        if strict:
            raise UserError(f"sample '{key}' in {sample.get('__url__', '?')}: unreadable ({e.__class__.__name__}: {e})") from None
        raise BadSample(key) from e
    return key, (transform(img) if transform else img), label


def sample_stream(urls: list[str], transform: Callable | None = None, *, shuffle_shards: bool = False,
                  shuffle_buffer: int = 0, seed: int = 0, split_by_node: bool = False,
                  split_by_worker: bool = True, strict: bool = False, on_bad: Callable[[str], None] | None = None,
                  before_decode: Callable | None = None):
    """A webdataset pipeline over ``urls`` yielding (key, image, label) tuples.

    ``before_decode`` is an optional stage on the raw sample dicts, run after shuffling and before
    decoding (Phase A uses it to skip, without decoding, what a resumed run has already seen).
    """
    import webdataset as wds

    stages = [wds.SimpleShardList(list(urls))]
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    if shuffle_shards:
        stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
    stages.append(wds.tarfile_to_samples())
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 1000), seed=seed))
    if before_decode is not None:
        stages.append(before_decode)
    stages.append(_decoded(transform, strict, on_bad, label_key_of(urls)))
    return wds.DataPipeline(*stages)


def _decoded(transform, strict, on_bad, label_key):
    def stage(samples):
        for sample in samples:
            try:
                yield decode_sample(sample, transform, strict, label_key)
            except BadSample as e:
                log.warning("skipping unreadable sample '%s'", e.args[0])
                if on_bad is not None:
                    on_bad(e.args[0])
    return stage
