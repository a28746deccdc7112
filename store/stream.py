"""Streaming samples out of shards with webdataset, as one composable chain:

    shards → (split by node) → (split by worker) → (shuffle shards) → tar samples → (shuffle) → decode → transform

Yields ``(key, image, label)``. Images are decoded by pipeline/images.py, within ``max_pixels``
(``--max-pixels``, checked from each header, on the GPU path too before a JPEG goes to the device). An
unreadable one stops the chain with a one-line ``UserError`` naming the sample and its shard, or, with
``skip_bad`` (``--skip-bad``), is logged, skipped and reported through ``on_bad`` (a callable taking
the key). Labels are read from the member the URLs' label key names (store.shards.ShardURL; plain
URLs: ``.cls``).

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

import contextlib
import functools
import logging
import tarfile
import warnings
from typing import Callable, NamedTuple, Sequence

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, BadImage, open_image, read_header
from store.shards import CLS, IMAGE_EXTS, LabelKey, label_key_of
from store.trust import open_shard

log = logging.getLogger("ballad.stream")

DECODES = ("auto", "cpu", "gpu")
DECODE_HELP = ("Where images are decoded and transformed. cpu: with PIL in the loader workers; gpu: the workers "
               "only read, and the model's GPU decodes JPEGs (nvJPEG) and runs the transform (other formats are "
               "decoded on the CPU); auto: gpu when the model runs on CUDA and the shards hold JPEGs.")
NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes (as PIL names them) decoded on the device; CMYK goes to PIL


class Encoded(NamedTuple):
    """A sample's image as ``encode_sample`` hands it on: ``data`` the JPEG's bytes, or the image decoded
    in the worker (uint8 [H, W, 3]) when it is not a JPEG the device decodes; ``params`` what ``draw`` drew;
    ``where`` the sample and its shard, for the error of a JPEG the device cannot decode."""

    data: object
    params: object
    where: str = ""


class EncodedBatch(NamedTuple):
    jpegs: "torch.Tensor"  # noqa: F821  uint8 [total]: the batch's JPEG bytes, concatenated
    lengths: list  # per image, its JPEG's length; 0 for an image decoded in the worker
    decoded: list  # those images (uint8 [H, W, 3]), in batch order
    params: list  # per image, what ``draw`` drew
    where: list  # per image, its ``Encoded.where``


def _where(sample: dict) -> str:
    return f"sample '{sample['__key__']}' in {sample.get('__url__', '?')}"


def _image_and_label(sample: dict, label_key: LabelKey) -> tuple[bytes, int]:
    """The sample's image bytes and label; a sample without them is as unusable as an undecodable image."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadImage(_where(sample), f"no image member ({', '.join(IMAGE_EXTS)})")
    if label_key.member not in sample:
        raise BadImage(_where(sample), f"no .{label_key.member} member for its label")
    try:
        return sample[ext], label_key.decode(sample[label_key.member])
    except ValueError as e:
        raise BadImage(_where(sample), f"its label: {e}") from None


def decode_sample(sample: dict, transform: Callable | None = None, label_key: LabelKey = CLS,
                  max_pixels: int = MAX_PIXELS):
    """webdataset sample dict → (key, transformed image, label); raises BadImage if unreadable."""
    raw, label = _image_and_label(sample, label_key)
    img = open_image(raw, _where(sample), max_pixels)
    return sample["__key__"], (transform(img) if transform else img), label


def encode_sample(sample: dict, draw: Callable, label_key: LabelKey = CLS, max_pixels: int = MAX_PIXELS):
    """webdataset sample dict → (key, Encoded, label) for ``--decode gpu``: a JPEG is only opened for its
    header (so the pixel limit holds before the device decodes it); any other image is decoded here.
    Raises BadImage if the header (or, for other formats, the image) is unreadable."""
    import numpy as np
    import torch

    raw, label = _image_and_label(sample, label_key)
    where = _where(sample)
    header = read_header(raw, where, max_pixels)
    if header.format == "JPEG" and header.mode in NVJPEG_MODES:
        data = raw
    else:
        data = torch.from_numpy(np.array(open_image(raw, where, max_pixels)))
    return sample["__key__"], Encoded(data, draw(header.size, sample["__key__"]), where), label


def sample_stream(urls: list[str], transform: Callable | None = None, *, shuffle_shards: bool = False,
                  shuffle_buffer: int = 0, seed: int = 0, split_by_node: bool = False,
                  split_by_worker: bool = True, skip_bad: bool = False, on_bad: Callable[[str], None] | None = None,
                  before_decode: Callable | None = None, draw: Callable | None = None, max_pixels: int = MAX_PIXELS):
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
    stages.append(tar_samples)
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 1000), seed=seed))
    if before_decode is not None:
        stages.append(before_decode)
    label_key = label_key_of(urls)
    if draw is None:
        last = functools.partial(decode_sample, transform=transform, label_key=label_key, max_pixels=max_pixels)
    else:
        last = functools.partial(encode_sample, draw=draw, label_key=label_key, max_pixels=max_pixels)
    stages.append(_each(last, skip_bad, on_bad))
    return wds.DataPipeline(*stages)


def tar_samples(sources):
    """webdataset's ``tarfile_to_samples`` with our opener: {url} dicts → sample dicts, grouped by key.

    Each shard is opened by ``store.trust.open_shard`` (no process unless the URL carries the user's
    consent, no fsspec chain) instead of webdataset's ``gopen``, and any failure to read one becomes a
    one-line UserError naming the shard: raised in a loader worker, the stages turn it back into that
    line (a ``tarfile.ReadError`` would arrive as a traceback).
    """
    from webdataset import tariterators

    for source in sources:
        url = source["url"]
        try:
            with open_shard(url) as stream:
                yield from tariterators.group_by_keys(tariterators.tar_file_expander([{**source, "stream": stream}]))
        except UserError:
            raise
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:  # missing, cut short, not a tar, a failed command
            what = e.args[0] if e.args else e  # webdataset appends the stream and URL to the arguments
            raise UserError(f"{url}: unreadable shard ({e.__class__.__name__}: {' '.join(str(what).split())[:200]})") from None


def _each(fn: Callable, skip_bad: bool, on_bad):
    def stage(samples):
        for sample in samples:
            try:
                yield fn(sample)
            except BadImage as e:
                _unreadable(e, sample["__key__"], skip_bad, on_bad)
    return stage


def _unreadable(e: BadImage, key: str, skip_bad: bool, on_bad) -> None:
    """Stop with ``e``'s one line or, with ``skip_bad``, log it and report ``key`` to ``on_bad``."""
    if not skip_bad:
        raise e.refusal() from None
    log.warning("skipping %s", e)
    if on_bad is not None:
        on_bad(key)


# ---------------------------------------------------------------- --decode gpu: batches and decoding
def encode_batch(images: Sequence[Encoded]) -> EncodedBatch:
    """A batch of ``Encoded`` images packed for the trip to the main process."""
    import torch

    lengths = [len(e.data) if isinstance(e.data, bytes) else 0 for e in images]
    blob = bytearray().join(e.data for e in images if isinstance(e.data, bytes))
    jpegs = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    return EncodedBatch(jpegs, lengths, [e.data for e in images if not isinstance(e.data, bytes)],
                        [e.params for e in images], [e.where for e in images])


def collate_encoded(samples) -> tuple[tuple, EncodedBatch, "torch.Tensor"]:  # noqa: F821
    """A DataLoader ``collate_fn`` for (key, Encoded, label) samples: (keys, EncodedBatch, labels), the
    keys and labels as the default collate makes them."""
    import torch

    keys, images, labels = zip(*samples)
    return keys, encode_batch(images), torch.tensor(labels)


def decode_batch(keys: Sequence[str], batch: EncodedBatch, device, skip_bad: bool = False,
                 on_bad: Callable[[str], None] | None = None, max_pixels: int = MAX_PIXELS) -> tuple[list[int], list]:
    """(indices, images) of the batch's readable images, uint8 [3, H, W] on ``device``: the JPEGs decoded
    there in one call, the others (decoded in the workers) copied. When one JPEG fails the batched call,
    each is decoded alone, and one the device refuses with PIL on the CPU (pipeline/images.py, within
    ``max_pixels``); one that nothing reads (its header fine, its data not) stops with its one line or,
    with ``skip_bad``, is skipped and reported to ``on_bad``, as the CPU path treats it."""
    others = iter(batch.decoded)
    images = [None if n else next(others).to(device, non_blocking=True).permute(2, 0, 1) for n in batch.lengths]
    at = [i for i, n in enumerate(batch.lengths) if n]
    pieces = batch.jpegs.split(batch.lengths) if at else ()
    if at:
        for i, img in zip(at, _decode_jpegs([pieces[i] for i in at], device) or ()):
            images[i] = img
    keep = []
    for i in range(len(images)):
        if images[i] is None:
            try:
                images[i] = _decode_one(pieces[i], device, batch.where[i] or f"sample '{keys[i]}'", max_pixels)
            except BadImage as e:
                _unreadable(e, keys[i], skip_bad, on_bad)
                continue
        keep.append(i)
    return keep, [images[i] for i in keep]


@contextlib.contextmanager
def _quiet_decoders():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points its decoders to TorchCodec
        yield


def _decode_jpegs(data: list, device) -> list | None:
    """The JPEGs decoded on ``device`` in one call; None when one bad image fails the whole call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with _quiet_decoders():
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return None


def _decode_one(data, device, where: str, max_pixels: int):
    """One JPEG decoded on ``device``, or, when the device's decoder refuses it, by PIL on the CPU."""
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with _quiet_decoders():
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    image = open_image(data.numpy().tobytes(), where, max_pixels)
    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)


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
    try:
        for sample in tar_samples([{"url": url}]):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            return ext is not None and sample[ext][:3] == b"\xff\xd8\xff"
    except Exception:  # an unreadable shard: the stage's own read names what is wrong with it
        return False
    return False
