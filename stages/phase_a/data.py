"""Phase A's data: the train split streamed from shards with an exact number of batches per epoch, and
the recipe's transforms (``Transforms``).

Every epoch builds a fresh webdataset stream seeded by (seed, epoch): shards are split by rank (DDP)
and by DataLoader worker, shuffled, read, shuffled again in a sample buffer, decoded and augmented.
Each worker cycles through its own shards (a new shuffle per pass) until the epoch's batches are
taken, so every rank takes the same number of steps however unevenly the shards divide. A resumed
run skips, without decoding, the samples its epoch had already used; the order it then sees is the
one the interrupted run would have seen when the number of ranks and workers is unchanged.
With ``--decode gpu`` the workers only read and draw each image's augmentation (store/stream.py), and
each micro-batch is decoded and augmented on the GPU in the main process (``DeviceDecode``). A loader
worker's UserError (an unreadable image) reaches the run as its one line (``one_line``).

The train transform is rebuilt for every epoch (``Transforms.train``: LIFT+'s MDA crop depends on the
epoch) and handed to that epoch's stream, on either decode path; its draws come from the generators
seeded as above. In the main process (``--workers 0``) a resumed run restores the RNG state last.pt
saved, so its crops are the interrupted run's; a loader worker seeds its RNG at the epoch's start and
skips the consumed samples without decoding them, so with workers the order is the same but the crops
after the resume point are new draws (a known departure from an uninterrupted run).
"""
from __future__ import annotations

import multiprocessing
import tarfile
from pathlib import Path

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS
from store.shards import DATASET_FILE, local_path, split_member
from store.stream import collate_encoded, decode_batch, sample_stream


class Transforms:
    """Phase A's transforms for ``backbone`` (its image size, its eval transform's mean and std):
    ``train(epoch)``, --train-transform at that epoch of --epochs (pipeline/transforms.py), and ``eval``,
    --eval-transform, for the val and test accuracies."""

    def __init__(self, cfg, backbone):
        from pipeline.transforms import eval_transform, normalization

        self.cfg, self.size = cfg, backbone.image_size
        self.mean, self.std = normalization(backbone.eval_transform)
        self.eval = eval_transform(cfg.eval_transform, self.size, self.mean, self.std)

    def train(self, epoch: int):
        from pipeline.transforms import train_transform

        cfg = self.cfg
        return train_transform(cfg.train_transform, self.size, self.mean, self.std, epoch=epoch, epochs=cfg.epochs,
                               color_jitter=cfg.color_jitter, mda_schedule=cfg.mda_schedule)


def check_shards(info, split: str) -> list[str]:
    """The split's shard URLs, after checking local shards hold the labels dataset.json describes.

    Reads only tar headers and the small label members (the dataset's label key), so it is cheap even
    for ImageNet-LT. When any shard is at a URL or is a command, the split is checked as it
    streams instead: counting it here would download it once more.
    """
    urls = info.urls(split)
    paths = [local_path(u) for u in urls]
    if None in paths:
        return urls
    counts = [0] * info.num_classes
    for path in paths:
        for key, label in _shard_labels(path, info.label_key, info.remedy):
            if not 0 <= label < info.num_classes:
                raise UserError(f"{path}: label {label} of '{key}' is outside the {info.num_classes} classes of "
                                f"{DATASET_FILE}; {info.remedy}")
            counts[label] += 1
    expected = info.split(split).class_counts
    if counts != expected:
        k = next(k for k, (a, b) in enumerate(zip(counts, expected)) if a != b)
        raise UserError(f"{info.root / DATASET_FILE}: split '{split}' lists {expected[k]} samples of class {k} "
                        f"({info.classnames[k]!r}) but its shards hold {counts[k]}; {info.remedy}")
    return urls


def _shard_labels(path: Path, label_key, remedy: str):
    """(key, label) of every sample in a local shard, from its label members alone."""
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty shard; {remedy}")
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                key, ext = split_member(member.name)
                if member.isreg() and ext == label_key.member:
                    yield key, label_key.decode(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable shard ({e.__class__.__name__}: {e}); {remedy}") from None


class BadSampleCounter:
    """Counts undecodable samples across DataLoader worker processes (shared memory survives fork/spawn)."""

    def __init__(self, start: int = 0):
        self._value = multiprocessing.Value("q", start)

    def __call__(self, key: str) -> None:
        with self._value.get_lock():
            self._value.value += 1

    @property
    def value(self) -> int:
        return self._value.value


class SkipSeen:
    """Drops the raw samples that the first ``consumed`` micro-batches of this epoch took from this worker.

    A DataLoader over an iterable dataset takes batch i from worker i mod W, each worker filling its
    batches from its own stream, so worker w had produced ⌈(consumed − w) / W⌉ of them.
    """

    def __init__(self, consumed: int, micro_batch: int):
        self.consumed, self.micro_batch, self.left = consumed, micro_batch, None

    def __call__(self, samples):
        if self.left is None:  # first pass in this worker; later passes keep counting down
            import torch.utils.data

            wi = torch.utils.data.get_worker_info()
            w, n = (wi.id, wi.num_workers) if wi else (0, 1)
            self.left = max(0, -(-(self.consumed - w) // n)) * self.micro_batch
        for sample in samples:
            if self.left:
                self.left -= 1
                continue
            yield sample


def epoch_seed(seed: int, epoch: int) -> int:
    # webdataset's detshuffle seeds each pass with seed + pass; the shifts keep epochs and passes apart
    return (seed << 40) + (epoch << 20)


def train_batches(urls, transform, *, seed: int, epoch: int, micro_batch: int, workers: int, shuffle_buffer: int,
                  distributed: bool, consumed: int = 0, skip_bad: bool = False, on_bad=None, pin_memory: bool = False,
                  decode_on=None, max_pixels: int = MAX_PIXELS):
    """Endless (keys, images, labels) micro-batches of ``epoch``, after the ``consumed`` ones already used.

    ``decode_on`` (a torch.device, ``--decode gpu``): the workers only read and draw each image's random
    transform parameters (store/stream.py), and each micro-batch is decoded and transformed here, on
    that device; a sample's draws are the ones the CPU path makes for it. An unreadable image (or one
    above ``max_pixels``) raises a one-line UserError, or with ``skip_bad`` is skipped and reported to
    ``on_bad``.
    """
    import torch

    device = DeviceDecode(transform, decode_on, skip_bad, on_bad, max_pixels) if decode_on is not None else None
    stream = sample_stream(urls, transform, shuffle_shards=True, shuffle_buffer=shuffle_buffer,
                           seed=epoch_seed(seed, epoch), split_by_node=distributed, skip_bad=skip_bad, on_bad=on_bad,
                           before_decode=SkipSeen(consumed, micro_batch) if consumed else None,
                           draw=device.draw if device else None, max_pixels=max_pixels).repeat()
    # Seeds the workers' augmentation RNG, so an epoch's crops do not depend on what ran before it.
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch) % 2**63)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=micro_batch, num_workers=workers, generator=gen,
                                              pin_memory=pin_memory and device is None,
                                              collate_fn=collate_encoded if device else None))
    # The loader always starts with worker 0, but the next batch was worker (consumed mod W)'s to give:
    # within every round of one batch per worker, yield the workers in that rotated order.
    first = consumed % max(workers, 1)
    while True:
        batches = [next(loader) for _ in range(max(workers, 1))]
        for batch in batches[first:] + batches[:first]:
            yield device.finish(batch) if device else batch


def eval_batches(urls, transform, *, batch: int, workers: int, limit: int, decode_on=None, skip_bad: bool = False,
                 max_pixels: int = MAX_PIXELS, before_decode=None):
    """(images, labels) batches of the first ``limit`` samples of an evaluation split, in a fixed order
    (``decode_on``, ``skip_bad``, ``max_pixels``: as ``train_batches``; ``before_decode``: a stage on the
    raw samples, e.g. the head initialisation's choice of train images)."""
    import torch

    device = DeviceDecode(transform, decode_on, skip_bad, max_pixels=max_pixels) if decode_on is not None else None
    stream = sample_stream(urls, transform, skip_bad=skip_bad, draw=device.draw if device else None,
                           max_pixels=max_pixels, before_decode=before_decode)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=min(workers, len(urls)),
                                         collate_fn=collate_encoded if device else None)
    seen = 0
    for b in loader:
        _, images, labels = device.finish(b) if device else b
        take = min(len(labels), limit - seen)
        yield images[:take], labels[:take]
        seen += take
        if seen >= limit:
            return


class DeviceDecode:
    """``--decode gpu`` for one transform: ``draw`` runs in the workers, ``finish`` turns a collated batch
    of encoded images into (keys, images, labels) on ``device`` (an unreadable image refused, or with
    ``skip_bad`` dropped, as the CPU path drops it before batching)."""

    def __init__(self, transform, device, skip_bad: bool = False, on_bad=None, max_pixels: int = MAX_PIXELS):
        from pipeline.tensor_transforms import TensorTransform

        self.transform, self.device, self.on_bad = TensorTransform(transform), device, on_bad
        self.skip_bad, self.max_pixels = skip_bad, max_pixels
        self.draw = self.transform.draw

    def finish(self, batch):
        keys, encoded, labels = batch
        keep, images = decode_batch(keys, encoded, self.device, self.skip_bad, self.on_bad, self.max_pixels)
        return (tuple(keys[i] for i in keep), self.transform(images, [encoded.params[i] for i in keep]),
                labels[keep])


def loader_error(e: UserError) -> UserError:
    """A DataLoader worker's UserError comes back with its traceback in the message: the one line that matters."""
    return UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])


def one_line(batches):
    """``batches`` from a DataLoader, a worker's UserError (an unreadable image) raised as its one line."""
    try:
        yield from batches
    except UserError as e:
        raise loader_error(e) from None
