"""Stage `extract`: a frozen CLIP → the zarr feature store (layout in store/features.py).

Each process (one, or one per torchrun rank) takes a contiguous range of every split's shards and
stages one file per finished shard inside the store; then all processes write disjoint chunks of the
split's arrays from those files. Batches never cross a shard and always start at its first sample
(stages/extract/data.py), so a shard's features are the same whichever process, run or resume
computes them.

Besides the eval-transform feature of every image, the store can hold extra views of each image:
``--train-views V`` random train-transform views of every train image (what the authors' Phase B
sees: it runs the frozen backbone on a fresh augmentation at every draw, which a one-feature cache
would drop), and ``--test-views MODE`` LIFT's test-time views of the other splits (pipeline/views.py).
A train view's randomness is a pure function of (``--view-seed``, sample key, view index), so views
too are the same whichever process, run or resume computes them.

``--decode`` picks where images are decoded and transformed: in the loader workers (cpu) or on the
model's GPU (gpu); see stages/extract/data.py. Options: stages/extract/config.py; what the store
records about its making: stages/extract/meta.py.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np

from pipeline.errors import UserError
from pipeline.heads import PROJECTION, feature_dim, feature_model, resolved_head_input
from pipeline.images import MAX_PIXELS
from pipeline.options import none_to_null
from pipeline.shared_options import default_workers
from pipeline.transforms import with_recipes
from stages.extract.config import ExtractConfig
from stages.extract.data import DevicePixels, WorkerPixels, extra_views, make_loader
from stages.extract.meta import recorded_head_input, resolve_checkpoint, resolve_templates, store_attrs
from store.feature_writer import SplitWriter, create_store, write_text
from store.stream import decode_on_device

log = logging.getLogger("ballad.extract")


def extract(ckpt: str | None, data, out, **options) -> dict:
    """Extract features of the splits of the shards in ``data`` into the store ``out``; resumes.

    ``options`` are ``ExtractConfig``'s other fields (checked before any work). ``ckpt`` None (or
    ``"none"``, as Python callers write it) extracts the model as the factory builds it from
    ``model`` and ``pretrained``.
    The main process holds ``out``'s write lock (pipeline/locks.py) from before anything is written
    until the end, so a second extract on the same store stops with a one-line error and leaves the
    first one's store alone. Returns, per split, how many shards this process computed (0 when the
    split was already complete).
    """
    from pipeline.distributed import cleanup, device_for, init_distributed
    from pipeline.models import create_model
    from pipeline.runtime import pick_device
    from store.location import write_lock
    from store.shards import load_dataset

    cfg = ExtractConfig(ckpt=none_to_null(ckpt), data=data, out=out, **options)
    cfg.check()
    workers = default_workers(8, per_rank=True, spare=1) if cfg.workers is None else cfg.workers
    dataset = load_dataset(data, allow_commands=cfg.allow_commands)
    splits = cfg.split_list() or list(dataset.splits)
    urls = {split: dataset.urls(split) for split in splits}  # names the missing split or shard
    template_list = resolve_templates(cfg.templates, dataset.template)
    ckpt_path, model, pretrained = resolve_checkpoint(cfg.ckpt, cfg.model, none_to_null(cfg.pretrained))
    device = pick_device(cfg.device)
    on_device = {split: decode_on_device(cfg.decode, device, urls[split]) for split in splits}

    dist = init_distributed()
    try:
        with contextlib.ExitStack() as held:
            on_main(dist, lambda: held.enter_context(write_lock(out)))  # before anything is written
            dev = device_for(dist, cfg.device)
            import torch

            # Layers no checkpoint covers (a random-init `--ckpt none`) start the same in every run and rank.
            torch.manual_seed(0)
            backbone = with_recipes(create_model(model, pretrained=str(ckpt_path) if ckpt_path else pretrained,
                                                 device=dev), cfg.eval_transform, cfg.train_transform)
            # Phase A --classifier head: the images are stored at the feature the head reads (pipeline/heads.py)
            head_input = (PROJECTION if backbone.head is None
                          else resolved_head_input(backbone.model, recorded_head_input(ckpt_path)))
            attrs = store_attrs(backbone, dataset, ckpt_path, pretrained, cfg, template_list,
                                {split: "gpu" if on_device[split] else "cpu" for split in splits}, head_input)

            on_main(dist, lambda: _create(out, backbone, dataset, attrs, template_list, dev, cfg.overwrite))
            import zarr

            group = zarr.open_group(str(out), mode="r+")
            done = {}
            for split in splits:
                writer = SplitWriter(group, split, len(urls[split]), cfg.dtype,
                                     extra=extra_views(split, cfg.train_views, cfg.test_views))
                done[split] = _extract_split(writer, urls[split], backbone, dev, dist, cfg, workers, on_device[split],
                                             head_input)
            return done
    finally:
        cleanup(dist)


def _create(out, backbone, dataset, attrs: dict, template_list: list[str], dev, overwrite: bool) -> None:
    """The store with its attributes and the class text embeddings (main process only)."""
    from pipeline.encode import text_embeddings

    # Phase A --classifier head: its trained classifier, not the prompts, holds the class embeddings
    head = backbone.class_head(dataset.num_classes)
    if head is not None and head.shape[1] != attrs["embed_dim"]:
        raise UserError(f"{backbone.pretrained}: its classifier head reads {head.shape[1]}-d features, but its "
                        f"final.json says --head-input {attrs['head_input']} ({attrs['embed_dim']}-d)")
    group = create_store(out, {**attrs, "classifier": "text" if head is None else "head"}, overwrite)
    emb, prompts = text_embeddings(backbone, dataset.classnames, template_list, dev)
    write_text(group, emb if head is None else head, prompts, template_list)


def on_main(dist, fn: Callable[[], object]) -> None:
    """Run ``fn`` in the main process only; a UserError there stops every rank with the same message
    (instead of leaving the other ranks waiting at the next barrier). Also a barrier."""
    error = None
    if dist.is_main:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if dist.enabled:
        import torch.distributed as tdist

        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def _extract_split(writer, urls, backbone, dev, dist, cfg: ExtractConfig, workers: int, on_device: bool,
                   head_input: str = PROJECTION) -> int:
    from pipeline.distributed import barrier

    group, split = writer.group, writer.split
    if split in group and group[split].attrs.get("complete"):
        log.info("%s: already complete in %s", split, group.store)
        if dist.is_main:
            writer.remove_staging()
        return 0
    writer.prepare(dist.is_main)
    barrier(dist)
    n = len(urls)
    mine = range(dist.rank * n // dist.world_size, (dist.rank + 1) * n // dist.world_size)
    todo = writer.missing(mine)
    if len(todo) < len(mine):
        log.info("%s: %d of %d shard(s) already extracted, computing %d", split, len(mine) - len(todo), len(mine), len(todo))
    if todo:
        log.info("%s: decoding on the %s", split, "model's device" if on_device else "CPU, in the loader workers")
        run_shards(writer, [(s, urls[s]) for s in todo], backbone, dev, cfg.batch_size, workers, cfg.skip_bad,
                   cfg.view_seed, on_device, cfg.max_pixels, cfg.eval_transform, head_input)
    barrier(dist)
    writer.finish(feature_dim(backbone.model, head_input, backbone.embed_dim), dist.rank, dist.world_size,
                  lambda: barrier(dist))
    return len(todo)


def run_shards(writer: SplitWriter, shards, backbone, dev, batch_size: int, workers: int, skip_bad: bool,
               view_seed: int = 0, on_device: bool = False, max_pixels: int = MAX_PIXELS,
               recipe: str = "ballad", head_input: str = PROJECTION) -> None:
    """Compute and stage ``shards`` [(index, url)] of one split, with the extra views ``writer.extra``
    names (``recipe``: the eval transform's, whose rule sizes the test-time views); ``on_device``: images
    decoded on ``dev`` (--decode gpu), else in the loader workers. An
    unreadable image (or one above ``max_pixels``) stops the run, or with ``skip_bad`` is recorded as
    skipped. ``head_input``: the feature stored (pipeline/heads.py)."""
    import torch

    from pipeline.encode import image_features
    from pipeline.runtime import progress

    model = feature_model(backbone.model.to(dev).eval(), head_input)
    dim = feature_dim(backbone.model, head_input, backbone.embed_dim)
    store_dtype = getattr(torch, writer.dtype.name)
    pixels = (DevicePixels if on_device else WorkerPixels)(backbone, writer.extra, view_seed, recipe)
    loader = make_loader(shards, pixels, batch_size, workers, skip_bad, pin_memory=dev.type == "cuda" and not on_device,
                         max_pixels=max_pixels)
    pending: dict[int, list[tuple]] = {}  # shard -> (keys, labels, features, view features) per batch so far
    dropped: dict[int, list[str]] = {}  # shard -> keys read but not decodable on the device
    bar = progress(total=len(shards), desc=f"extract {writer.split}", unit="shard")
    with torch.inference_mode():
        for b in loader:
            if b.error:
                raise UserError(b.error)
            parts = pending.setdefault(b.shard, [])
            if b.keys:
                ready = pixels.ready(b, dev, skip_bad, dropped.setdefault(b.shard, []).append, max_pixels)
                if ready.keys:
                    # Kept on the device until the shard ends, so a GPU is not stalled by a copy per batch.
                    extra = (pixels.view_features(model, ready, dev, store_dtype, batch_size)
                             if writer.extra else None)
                    parts.append((ready.keys, ready.labels, image_features(model, ready.images, dev, store_dtype),
                                  extra))
            if b.last:
                _stage(writer, b.shard, pending.pop(b.shard), b.skipped + dropped.pop(b.shard, []), dim)
                bar.update(1)
    bar.close()


def _stage(writer, shard, parts, skipped, embed_dim):
    import torch

    if skipped:
        log.warning("%s shard %d: skipped %d unreadable image(s): %s", writer.split, shard, len(skipped),
                    ", ".join(skipped[:10]))
    keys = [k for p in parts for k in p[0]]
    labels = torch.cat([p[1] for p in parts]).numpy() if parts else np.zeros(0, np.int32)
    image = torch.cat([p[2] for p in parts]).cpu().numpy() if parts else np.zeros((0, embed_dim), writer.dtype)
    extra = None
    if writer.extra is not None:
        extra = (torch.cat([p[3] for p in parts], dim=1).cpu().numpy() if parts
                 else np.zeros((writer.extra.count, 0, embed_dim), writer.dtype))
    writer.stage(shard, image, labels, keys, skipped, extra)
