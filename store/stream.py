"""Streaming samples out of shards with webdataset, as one composable chain:

    shards → (split by node) → (split by worker) → (shuffle shards) → tar samples → (shuffle) → decode → transform

Yields ``(key, image, label)``. Unreadable images are skipped and reported through ``on_bad`` (a
callable taking the key), or raise ``UserError`` naming the key when ``strict``. Labels are read from
the member the URLs' label key names (store.shards.ShardURL; plain URLs: ``.cls``).

Where images are decoded (``--decode``, ``DECODES``): with ``cpu`` the chain's last stage decodes
with PIL and runs the transform, in the loader workers. With ``gpu`` the same place in the chain
runs ``encode_sample`` instead: a JPEG stays compressed (its size read from the header) and
``draw(size, key)`` draws its random transform parameters exactly where the CPU path would run the
transform, from the same generator (pipeline/tensor_transforms.py); any other format is decoded
there with PIL, as nvJPEG reads only JPEGs. ``encode_batch`` packs a batch's JPEG bytes into one
tensor (one shared-memory block per batch, not one per image), and ``decode_batch`` decodes them in
the main process on the model's device in one call (nvJPEG on CUDA; libjpeg-turbo on the CPU, which
the tests use). The CPU path is unchanged by all this: the chain is built with one stage or the other.
"""
from __future__ import annotations

import functools
import io
import logging
import warnings
from typing import Callable, NamedTuple, Sequence

from pipeline.errors import UserError
from store.shards import CLS, IMAGE_EXTS, LabelKey, label_key_of

log = logging.getLogger("ballad.stream")

DECODES = ("auto", "cpu", "gpu")
DECODE_HELP = ("Where images are decoded and transformed. cpu: with PIL in the loader workers; gpu: the workers "
               "only read, and the model's GPU decodes JPEGs (nvJPEG) and runs the transform (other formats are "
               "decoded on the CPU); auto: gpu when the model runs on CUDA and the shards hold JPEGs.")
NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes (as PIL names them) decoded on the device; CMYK goes to PIL


class BadSample(Exception):
    pass


class Encoded(NamedTuple):
    """A sample's image as ``encode_sample`` hands it on: ``data`` the JPEG's bytes, or the image decoded
    in the worker (uint8 [H, W, 3]) when it is not a JPEG the device decodes; ``params`` what ``draw`` drew."""

    data: object
    params: object


class EncodedBatch(NamedTuple):
    jpegs: "torch.Tensor"  # noqa: F821  uint8 [total]: the batch's JPEG bytes, concatenated
    lengths: list  # per image, its JPEG's length; 0 for an image decoded in the worker
    decoded: list  # those images (uint8 [H, W, 3]), in batch order
    params: list  # per image, what ``draw`` drew


def _image_and_label(sample: dict, label_key: LabelKey) -> tuple[bytes, int]:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or label_key.member not in sample:
        raise ValueError("missing image or label")
    return sample[ext], label_key.decode(sample[label_key.member])


def _unreadable(sample: dict, e: Exception, strict: bool):
    if strict:
        raise UserError(f"sample '{sample['__key__']}' in {sample.get('__url__', '?')}: unreadable "
                        f"({e.__class__.__name__}: {e})") from None
    raise BadSample(sample["__key__"]) from e


def decode_sample(sample: dict, transform: Callable | None = None, strict: bool = False, label_key: LabelKey = CLS):
    """webdataset sample dict → (key, transformed image, label); raises BadSample if undecodable."""
    from PIL import Image

    try:
        raw, label = _image_and_label(sample, label_key)
        with Image.open(io.BytesIO(raw)) as im:
            img = im.convert("RGB")
    except Exception as e:  # any decoder failure means the same thing: this sample is unusable
        _unreadable(sample, e, strict)
    return sample["__key__"], (transform(img) if transform else img), label


def encode_sample(sample: dict, draw: Callable, strict: bool = False, label_key: LabelKey = CLS):
    """webdataset sample dict → (key, Encoded, label) for ``--decode gpu``: a JPEG is only opened for its
    size; raises BadSample if the image's header (or, for other formats, the image) is unreadable."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        raw, label = _image_and_label(sample, label_key)
        with Image.open(io.BytesIO(raw)) as im:
            size = im.size
            if im.format == "JPEG" and im.mode in NVJPEG_MODES:
                data = raw
            else:
                data = torch.from_numpy(np.array(im.convert("RGB")))
    except Exception as e:
        _unreadable(sample, e, strict)
    return sample["__key__"], Encoded(data, draw(size, sample["__key__"])), label


def sample_stream(urls: list[str], transform: Callable | None = None, *, shuffle_shards: bool = False,
                  shuffle_buffer: int = 0, seed: int = 0, split_by_node: bool = False,
                  split_by_worker: bool = True, strict: bool = False, on_bad: Callable[[str], None] | None = None,
                  before_decode: Callable | None = None, draw: Callable | None = None):
    """A webdataset pipeline over ``urls`` yielding (key, image, label) tuples.

    ``before_decode`` is an optional stage on the raw sample dicts, run after shuffling and before
    decoding (Phase A uses it to skip, without decoding, what a resumed run has already seen).
    ``draw`` (``--decode gpu``) ends the chain in ``encode_sample`` instead of decoding: the images
    are ``Encoded`` and ``transform`` is not used.
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
    label_key = label_key_of(urls)
    if draw is None:
        last = functools.partial(decode_sample, transform=transform, strict=strict, label_key=label_key)
    else:
        last = functools.partial(encode_sample, draw=draw, strict=strict, label_key=label_key)
    stages.append(_each(last, on_bad))
    return wds.DataPipeline(*stages)


def _each(fn: Callable, on_bad):
    def stage(samples):
        for sample in samples:
            try:
                yield fn(sample)
            except BadSample as e:
                log.warning("skipping unreadable sample '%s'", e.args[0])
                if on_bad is not None:
                    on_bad(e.args[0])
    return stage


# ---------------------------------------------------------------- --decode gpu: batches and decoding
def encode_batch(images: Sequence[Encoded]) -> EncodedBatch:
    """A batch of ``Encoded`` images packed for the trip to the main process."""
    import torch

    lengths = [len(e.data) if isinstance(e.data, bytes) else 0 for e in images]
    blob = bytearray().join(e.data for e in images if isinstance(e.data, bytes))
    jpegs = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    return EncodedBatch(jpegs, lengths, [e.data for e in images if not isinstance(e.data, bytes)],
                        [e.params for e in images])


def collate_encoded(samples) -> tuple[tuple, EncodedBatch, "torch.Tensor"]:  # noqa: F821
    """A DataLoader ``collate_fn`` for (key, Encoded, label) samples: (keys, EncodedBatch, labels), the
    keys and labels as the default collate makes them."""
    import torch

    keys, images, labels = zip(*samples)
    return keys, encode_batch(images), torch.tensor(labels)


def decode_batch(keys: Sequence[str], batch: EncodedBatch, device, strict: bool = False,
                 on_bad: Callable[[str], None] | None = None) -> tuple[list[int], list]:
    """(indices, images) of the batch's readable images, uint8 [3, H, W] on ``device``: the JPEGs decoded
    there in one call, the others (decoded in the workers) copied. A JPEG the batched call refuses is
    decoded alone, then with PIL on the CPU; one that nothing reads (a header fine, the data not) is
    skipped and reported to ``on_bad``, or refused with ``strict``, as the CPU path treats it."""
    others = iter(batch.decoded)
    images = [None if n else next(others).to(device, non_blocking=True).permute(2, 0, 1) for n in batch.lengths]
    at = [i for i, n in enumerate(batch.lengths) if n]
    if at:
        pieces = batch.jpegs.split(batch.lengths)
        for i, img in zip(at, _decode_jpegs([pieces[i] for i in at], device)):
            images[i] = img
    keep = []
    for i, img in enumerate(images):
        if img is not None:
            keep.append(i)
        elif strict:
            raise UserError(f"sample '{keys[i]}': unreadable (no decoder reads its JPEG data)")
        else:
            log.warning("skipping unreadable sample '%s'", keys[i])
            if on_bad is not None:
                on_bad(keys[i])
    return keep, [images[i] for i in keep]


def _decode_jpegs(data: list, device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points its decoders to TorchCodec
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the whole call
            return [_decode_one(d, device) for d in data]


def _decode_one(data, device):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).to(device).permute(2, 0, 1)
    except Exception:  # any decoder failure: unreadable
        return None


def decode_on_device(mode: str, device, urls: Sequence[str]) -> bool:
    """Whether ``--decode mode`` decodes on ``device`` (the model's) rather than in the loader workers.
    ``auto``: when the model runs on CUDA and the first image of ``urls`` is a JPEG."""
    if mode == "gpu":
        if device.type != "cuda":
            import torch

            why = ("CUDA is not available on this machine" if not torch.cuda.is_available()
                   else f"the model runs on {device} (--device); use --decode cpu")
            raise UserError(f"--decode gpu: {why}")
        return True
    return mode == "auto" and device.type == "cuda" and bool(urls) and first_image_is_jpeg(urls[0])


def first_image_is_jpeg(url: str) -> bool:
    """Whether the shard's first image is a JPEG; reads only the start of the shard."""
    import webdataset as wds

    try:
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            return ext is not None and sample[ext][:3] == b"\xff\xd8\xff"
    except Exception:  # an unreadable shard: the stage's own read names what is wrong with it
        return False
    return False
