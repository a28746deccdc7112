"""extract's image side: whole shards read into batches by loader workers, finished on the model's device.

Loader worker w reads shards w, w + W, … through the webdataset chain (store/stream.py); a batch never
crosses a shard and always starts at its first sample, so stages/extract/run.py computes a shard alike in
any process, run or resume. Where the pixels are made is ``--decode``'s choice, one class each:

- ``WorkerPixels`` (cpu): workers decode with PIL and run the transforms up to uint8 HWC
  (pipeline/encode.py ``split_transform``); the device scales and normalises each batch.
- ``DevicePixels`` (gpu): workers only read a JPEG's bytes and draw its train views' parameters; the
  device decodes the batch (nvJPEG) and runs the transforms (pipeline/tensor_transforms.py).

Both make the split's extra views the store records (``extra_views``): seeded train-transform views
of train images, or test-time views of the others (pipeline/views.py). The transforms are the run's
recipes (pipeline.transforms.with_recipes: --eval-transform, --train-transform), in the backbone's place of the
factory's; the test-time views resize by the eval recipe's rule (``recipe``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.encode import image_features, normalised, split_transform, view_features
from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS
from pipeline.tensor_transforms import TensorTransform
from pipeline.views import TEST_VIEWS, TrainViews, tta_views
from store.features import TTA, VIEWS, ExtraViews
from store.stream import decode_batch, encode_batch, sample_stream


def extra_views(split: str, train_views: int, test_views: str) -> ExtraViews | None:
    """The split's extra views as the store records them: train views for the train split, test-time
    views for the others, or None."""
    if split == "train":
        return ExtraViews(VIEWS, train_views, train_views) if train_views else None
    return ExtraViews(TTA, TEST_VIEWS[test_views], test_views) if test_views != "none" else None


class Batch(NamedTuple):
    shard: int
    last: bool  # the shard's final batch (possibly empty); carries the shard's skipped keys
    keys: list
    images: object  # the pixels' own batch of images (see the Pixels classes)
    labels: torch.Tensor | None
    skipped: list
    error: str | None = None
    views: torch.Tensor | None = None  # WorkerPixels: [B, E, H, W, 3] extra views of each image


class Ready(NamedTuple):
    """A batch on the model's device: its (readable) keys and labels, the eval-transform images
    [B, 3, S, S], and what the pixels' ``view_features`` makes the extra views from."""

    keys: list
    labels: torch.Tensor
    images: torch.Tensor | None
    views: object


class WorkerPixels:
    """``--decode cpu``: loader workers decode with PIL and transform each image (and its extra views)
    up to uint8 HWC; the device scales and normalises. ``recipe``: the eval transform's, for the
    test-time views' resize."""

    draw = None  # sample_stream decodes

    def __init__(self, backbone, extra: ExtraViews | None, view_seed: int = 0, recipe: str = "ballad"):
        self.per_image, self.normalize = split_transform(backbone.eval_transform)
        self.views, self.views_normalize = None, None
        if extra is not None and extra.name == VIEWS:
            per_view, self.views_normalize = split_transform(backbone.train_transform)
            self.views = TrainViews(per_view, extra.count, view_seed)
        elif extra is not None:
            self.views, self.views_normalize = tta_views(self.per_image, extra.attr, recipe), self.normalize
        # A batch with views holds 1 + count times the pixels (at 224 px, batch 256 and 8 views: 0.35 GB
        # of uint8) and takes as many times longer to forward, so fewer batches wait per worker.
        self.prefetch = max(1, 4 // (1 + (extra.count if extra else 0)))

    def in_worker(self, img, key: str):
        return self.per_image(img), (self.views(img, key) if self.views else None)

    def collate(self, images, views):
        return torch.stack(images), (torch.stack(views) if self.views else None)

    def ready(self, b: Batch, dev, skip_bad: bool, on_bad, max_pixels: int) -> Ready:
        return Ready(b.keys, b.labels, normalised(b.images, dev, self.normalize), b.views)

    def view_features(self, model, ready: Ready, dev, dtype, batch_size: int):
        return view_features(model, ready.views, dev, dtype, self.views_normalize, batch_size)


class DevicePixels:
    """``--decode gpu``: loader workers read JPEG bytes and draw each image's train-view parameters
    from the same seeds as ``WorkerPixels`` (store/stream.py ``encode_sample``); the device decodes
    the batch and runs the eval transform, the train views' transform or the test-time crops
    (``recipe``: as ``WorkerPixels``')."""

    prefetch = 4  # batches hold compressed images only

    def __init__(self, backbone, extra: ExtraViews | None, view_seed: int = 0, recipe: str = "ballad"):
        self.eval = TensorTransform(backbone.eval_transform)
        self.train_views = self.tta = None
        if extra is not None and extra.name == VIEWS:
            self.train_views = TrainViews(TensorTransform(backbone.train_transform), extra.count, view_seed)
        elif extra is not None:
            self.tta = tta_views(backbone.eval_transform, extra.attr, recipe)  # its crops work on tensors too
            self.finish = TensorTransform(self.tta.finish)
        self.draw = self.train_views.draw if self.train_views else _nothing

    def in_worker(self, encoded, key: str):
        return encoded, None

    def collate(self, images, views):
        return encode_batch(images), None

    def ready(self, b: Batch, dev, skip_bad: bool, on_bad, max_pixels: int) -> Ready:
        keep, images = decode_batch(b.keys, b.images, dev, skip_bad, on_bad, max_pixels)
        return Ready([b.keys[i] for i in keep], b.labels[keep], self.eval(images) if keep else None,
                     (images, [b.images.params[i] for i in keep]))

    def view_features(self, model, ready: Ready, dev, dtype, batch_size: int):
        """[E, B, D], one view of the B images at a time."""
        images, params = ready.views
        if self.train_views is not None:
            views = (self.train_views.transform(images, [p[v] for p in params])
                     for v in range(self.train_views.count))
        else:
            crops = [self.tta.crops(img) for img in images]
            views = (self.finish([c[v] for c in crops]) for v in range(self.tta.count))
        return torch.stack([image_features(model, x, dev, dtype) for x in views])


def _nothing(size, key):
    return None


class ShardBatches(torch.utils.data.IterableDataset):
    """Whole shards read in loader workers; worker w takes shards w, w + W, …"""

    def __init__(self, shards, pixels, batch_size: int, skip_bad: bool, max_pixels: int):
        self.shards, self.pixels, self.batch_size = shards, pixels, batch_size
        self.skip_bad, self.max_pixels = skip_bad, max_pixels

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for shard, url in self.shards[wid::nw]:
            try:
                yield from self._batches(shard, url)
            except UserError as e:
                # Raised across the worker boundary it would arrive wrapped in a traceback.
                yield Batch(shard, True, [], None, None, [], error=str(e))
                return
            except Exception as e:  # a truncated or unreadable tar, named by its path
                yield Batch(shard, True, [], None, None, [],
                            error=f"{url}: unreadable shard ({e.__class__.__name__}: {e})")
                return

    def _batches(self, shard, url):
        skipped, batch = [], []
        stream = sample_stream([url], None, split_by_worker=False, skip_bad=self.skip_bad, on_bad=skipped.append,
                               draw=self.pixels.draw, max_pixels=self.max_pixels)
        for key, img, label in stream:
            batch.append((key, label, *self.pixels.in_worker(img, key)))
            if len(batch) == self.batch_size:
                yield self._collate(shard, False, batch, [])
                batch = []
        yield self._collate(shard, True, batch, skipped)

    def _collate(self, shard, last, batch, skipped) -> Batch:
        if not batch:
            return Batch(shard, last, [], None, None, skipped)
        keys, labels, images, views = zip(*batch)
        images, views = self.pixels.collate(images, views)
        return Batch(shard, last, list(keys), images, torch.tensor(labels, dtype=torch.int32), skipped, views=views)


def make_loader(shards, pixels, batch_size: int, workers: int, skip_bad: bool, pin_memory: bool = False,
                max_pixels: int = MAX_PIXELS):
    """Batches of whole ``shards`` [(index, url)], their pixels made by ``pixels`` (a Pixels class)."""
    workers = min(workers, len(shards))
    return torch.utils.data.DataLoader(ShardBatches(shards, pixels, batch_size, skip_bad, max_pixels), batch_size=None,
                                       num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=pixels.prefetch if workers else None)
