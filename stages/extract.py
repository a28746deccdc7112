"""Stage `extract`: a frozen CLIP → the zarr feature store (layout in store/features.py).

Each process (one, or one per torchrun rank) takes a contiguous range of every split's shards and
stages one file per finished shard inside the store; then all processes write disjoint chunks of the
split's arrays from those files. Batches never cross a shard and always start at its first sample,
so a shard's features are the same whichever process, run or resume computes them.

Besides the eval-transform feature of every image, the store can hold extra views of each image:
``--train-views V`` random train-transform views of every train image (what the authors' Phase B
sees: it runs the frozen backbone on a fresh augmentation at every draw, which a one-feature cache
would drop), and ``--test-views MODE`` LIFT's test-time views of the other splits. A train view's
randomness is a pure function of (``--view-seed``, sample key, view index), so views too are the
same whichever process, run or resume computes them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pipeline.errors import UserError
from pipeline.options import none_to_null
from pipeline.text import ENSEMBLE_TEMPLATES
from store.features import (FORMAT, TTA, VIEWS, ExtraViews, SplitWriter, create_store, make_fingerprint,
                            write_text)

log = logging.getLogger("ballad.extract")

DTYPES = ("float16", "float32")
MAX_TRAIN_VIEWS = 1024
TEST_VIEWS = {"none": 0, "flip": 2, "five-crop": 5, "ten-crop": 10}  # mode -> views per image


def extract(ckpt: str | None, data, out, *, model: str | None = None, pretrained: str | None = None,
            splits: list[str] | None = None, batch_size: int = 256, workers: int | None = None, dtype: str = "float16",
            templates: str = "single", strict: bool = False, overwrite: bool = False, device: str | None = None,
            train_views: int = 0, view_seed: int = 0, test_views: str = "none") -> dict:
    """Extract features of ``splits`` of the shards in ``data`` into the store ``out``; resumes.

    ``ckpt`` None (or ``"none"``, as Python callers write it) extracts the model as the factory builds
    it from ``model`` and ``pretrained``.
    The main process holds ``out``'s write lock (pipeline/locks.py) from before anything is written
    until the end, so a second extract on the same store stops with a one-line error and leaves the
    first one's store alone. Returns, per split, how many shards this process computed (0 when the
    split was already complete).
    """
    from pipeline.distributed import barrier, cleanup, device_for, init_distributed
    from pipeline.locks import exclusive_lock
    from pipeline.models import create_model
    from store.shards import load_dataset

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be 0 (decode in the main process) or more")
    if not 0 <= train_views <= MAX_TRAIN_VIEWS:
        raise UserError(f"--train-views {train_views}: must be between 0 (none) and {MAX_TRAIN_VIEWS}")
    if view_seed < 0:
        raise UserError(f"--view-seed {view_seed}: must be 0 or more")
    check_test_views(test_views, "--test-views")
    workers = default_workers() if workers is None else workers
    ckpt, pretrained = none_to_null(ckpt), none_to_null(pretrained)
    dataset = load_dataset(data)
    splits = list(splits or dataset.splits)
    urls = {split: dataset.urls(split) for split in splits}  # names the missing split or shard
    template_list = resolve_templates(templates, dataset.template)
    ckpt_path, model, pretrained = resolve_checkpoint(ckpt, model, pretrained)

    dist = init_distributed()
    try:
        with contextlib.ExitStack() as held:
            on_main(dist, lambda: held.enter_context(exclusive_lock(out)))  # before anything is written
            dev = device_for(dist, device)
            import torch

            # Layers no checkpoint covers (a random-init `--ckpt none`) start the same in every run and rank.
            torch.manual_seed(0)
            backbone = create_model(model, pretrained=str(ckpt_path) if ckpt_path else pretrained, device=dev)
            views = {"train_views": train_views, "view_seed": view_seed, "test_views": test_views}
            attrs = store_attrs(backbone, dataset, ckpt_path, pretrained, dtype, template_list, views,
                                command(ckpt, data, out, model, pretrained, dtype, templates, **views))

            def create():
                # Phase A --classifier head: its trained classifier, not the prompts, holds the class embeddings
                head = backbone.class_head(dataset.num_classes)
                group = create_store(out, {**attrs, "classifier": "text" if head is None else "head"}, overwrite)
                emb, prompts = text_embeddings(backbone, dataset.classnames, template_list, dev)
                write_text(group, emb if head is None else head, prompts, template_list)

            on_main(dist, create)
            import zarr

            group = zarr.open_group(str(out), mode="r+")
            done = {}
            for split in splits:
                spec = split_views(backbone, split, train_views, view_seed, test_views)
                done[split] = _extract_split(group, split, urls[split], backbone, dev, dist, batch_size, workers,
                                             dtype, strict, spec)
            return done
    finally:
        cleanup(dist)


def check_test_views(mode: str, option: str) -> None:
    if mode not in TEST_VIEWS:
        raise UserError(f"{option} {mode}: choose one of {', '.join(TEST_VIEWS)}")


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


def default_workers() -> int:
    """Decoding processes per rank: the cores left beside each local rank's own process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def _extract_split(group, split, urls, backbone, dev, dist, batch_size, workers, dtype, strict, spec) -> int:
    from pipeline.distributed import barrier

    writer = SplitWriter(group, split, len(urls), dtype, extra=spec.extra if spec else None)
    if split in group and group[split].attrs.get("complete"):
        log.info("%s: already complete in %s", split, group.store.root)
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
        run_shards(writer, [(s, urls[s]) for s in todo], backbone, dev, batch_size, workers, strict, spec)
    barrier(dist)
    writer.finish(backbone.embed_dim, dist.rank, dist.world_size, lambda: barrier(dist))
    return len(todo)


# ---------------------------------------------------------------- extra views of an image
class ViewSpec(NamedTuple):
    """A split's extra views: what the store records (``extra``), the per-image part that loader
    workers run (``per_image(img, key)`` → [E, H, W, 3] uint8, see ``split_transform``) and the
    batched rest on the model's device (``normalize``)."""

    extra: ExtraViews
    per_image: Callable
    normalize: Callable | None


def split_views(backbone, split: str, train_views: int, view_seed: int, test_views: str) -> ViewSpec | None:
    """Train views for the train split, test-time views for the others, or None."""
    if split == "train":
        if not train_views:
            return None
        per_image, normalize = split_transform(backbone.train_transform)
        return ViewSpec(ExtraViews(VIEWS, train_views, train_views), TrainViews(per_image, train_views, view_seed),
                        normalize)
    if test_views == "none":
        return None
    per_image, normalize = split_transform(backbone.eval_transform)
    return ViewSpec(ExtraViews(TTA, TEST_VIEWS[test_views], test_views), tta_views(per_image, test_views),
                    normalize)


def view_rng_seed(seed: int, key: str, view: int) -> int:
    """The torch seed of view ``view`` of sample ``key``: a hash, so the same in every process and run
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.blake2b(f"{seed}/{key}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep clear of the sign bit


class TrainViews:
    """``count`` draws of a random transform per image, draw v of sample ``key`` seeded with
    ``view_rng_seed(seed, key, v)``. The transforms draw from torch's global CPU generator, which is
    seeded per view and restored afterwards (so the main process's own random state is untouched)."""

    def __init__(self, transform: Callable, count: int, seed: int):
        self.transform, self.count, self.seed = transform, count, seed

    def __call__(self, img, key: str):
        import torch

        with torch.random.fork_rng(devices=[]):
            views = []
            for v in range(self.count):
                torch.default_generator.manual_seed(view_rng_seed(self.seed, key, v))
                views.append(self.transform(img))
        return torch.stack(views)


class TtaViews:
    """LIFT's test-time views of a PIL image (resize, then crops; see ``tta_views``), each
    finished by ``finish``; ``__call__`` stacks them."""

    def __init__(self, mode: str, resize: Callable, size: tuple[int, int], finish: Callable):
        self.mode, self.resize, self.size, self.finish = mode, resize, size, finish
        self.count = TEST_VIEWS[mode]

    def crops(self, img) -> list:
        from torchvision.transforms import functional as F

        big = self.resize(img)
        if self.mode == "flip":
            centre = F.center_crop(big, self.size)
            return [centre, F.hflip(centre)]
        return list(F.five_crop(big, self.size) if self.mode == "five-crop" else F.ten_crop(big, self.size))

    def __call__(self, img, key: str | None = None):
        import torch

        return torch.stack([self.finish(c) for c in self.crops(img)])


def tta_views(transform, mode: str) -> TtaViews:
    """The test-time views of ``mode`` built from an eval ``transform`` (Resize, CenterCrop(s), then the rest).

    As LIFT's test-time ensembling: resize the shorter side to s + round(24 s / 224) (LIFT: 224 + 24)
    with the eval transform's interpolation, then `five-crop` = the four corner crops and the centre
    crop of s × s, `ten-crop` = those and their mirror images, `flip` (ours) = the centre crop and its
    mirror image. The steps after the CenterCrop finish every view. LIFT resizes bilinearly; we keep
    the eval transform's bicubic. `extract` (per-image part of split_transform) and `predict` (stages/bundle.py)
    both build their views here.
    """
    from torchvision import transforms as T

    if not TEST_VIEWS.get(mode):
        raise UserError(f"test-time views {mode}: choose one of {', '.join(m for m, n in TEST_VIEWS.items() if n)}")
    steps = list(transform.transforms)
    kinds = [type(t) for t in steps]
    if T.Resize not in kinds or T.CenterCrop not in kinds:
        raise UserError(f"test-time views ({mode}) need an eval transform with Resize and CenterCrop, got {transform}")
    resize, at = steps[kinds.index(T.Resize)], kinds.index(T.CenterCrop)
    size = tuple(steps[at].size)
    bigger = T.Resize(size[0] + round(size[0] * 24 / 224), interpolation=resize.interpolation,
                      antialias=resize.antialias)
    return TtaViews(mode, bigger, size, T.Compose(steps[at + 1:]))


# ---------------------------------------------------------------- the image side
class _Batch(NamedTuple):
    shard: int
    last: bool  # the shard's final batch (possibly empty); carries the shard's skipped keys
    keys: list
    images: "torch.Tensor | None"  # noqa: F821
    labels: "torch.Tensor | None"  # noqa: F821
    skipped: list
    error: str | None = None
    views: "torch.Tensor | None" = None  # noqa: F821  [B, E, …] extra views of each image


def _shard_batches_class():
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        """Decodes whole shards in loader workers; worker w takes shards w, w + W, …"""

        def __init__(self, shards, transform, batch_size, strict, views=None):
            self.shards, self.transform, self.batch_size, self.strict = shards, transform, batch_size, strict
            self.views = views

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            for shard, url in self.shards[wid::nw]:
                try:
                    yield from self._batches(shard, url)
                except UserError as e:
                    # Raised across the worker boundary it would arrive wrapped in a traceback.
                    yield _Batch(shard, True, [], None, None, [], error=str(e))
                    return
                except Exception as e:  # a truncated or unreadable tar, named by its path
                    yield _Batch(shard, True, [], None, None, [],
                                 error=f"{url}: unreadable shard ({e.__class__.__name__}: {e})")
                    return

        def _batches(self, shard, url):
            from store.stream import sample_stream

            skipped, batch = [], []
            stream = sample_stream([url], None, split_by_worker=False, strict=self.strict, on_bad=skipped.append)
            for key, img, label in stream:
                batch.append((key, self.transform(img), label, self.views(img, key) if self.views else None))
                if len(batch) == self.batch_size:
                    yield _collate(shard, False, batch, [])
                    batch = []
            yield _collate(shard, True, batch, skipped)

    return ShardBatches


def _collate(shard, last, batch, skipped) -> _Batch:
    import torch

    if not batch:
        return _Batch(shard, last, [], None, None, skipped)
    keys, images, labels, views = zip(*batch)
    return _Batch(shard, last, list(keys), torch.stack(images), torch.tensor(labels, dtype=torch.int32), skipped,
                  views=None if views[0] is None else torch.stack(views))


def split_transform(transform):
    """(per-image part, batched part) of an eval transform.

    When it ends in ToTensor + Normalize (BALLAD's does), workers stop at uint8 HWC tensors and the
    scaling and normalisation run once per batch on the model's device: a quarter of the bytes
    between processes and much less per-image CPU time on small images. Same values bit for bit.
    """
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


def make_loader(shards, transform, batch_size, workers, strict, pin_memory=False, views=None):
    """Batches of whole shards; ``views(img, key)``, if given, adds each image's ``views.count`` extra views.

    A batch with views holds 1 + count times the pixels (at 224 px, batch 256 and 8 views: 0.35 GB of
    uint8) and takes as many times longer to forward, so fewer batches wait per worker.
    """
    import torch

    dataset = _shard_batches_class()(shards, transform, batch_size, strict, views)
    workers = min(workers, len(shards))
    prefetch = max(1, 4 // (1 + (views.count if views else 0)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=prefetch if workers else None)


def run_shards(writer: SplitWriter, shards, backbone, dev, batch_size, workers, strict,
               views: ViewSpec | None = None) -> None:
    """Compute and stage ``shards`` [(index, url)] of one split (with ``views``: their extra views too)."""
    import torch

    from pipeline.runtime import progress

    model = backbone.model.to(dev).eval()
    store_dtype = getattr(torch, writer.dtype.name)
    per_image, normalize = split_transform(backbone.eval_transform)
    loader = make_loader(shards, per_image, batch_size, workers, strict, pin_memory=dev.type == "cuda",
                         views=views.per_image if views else None)
    pending: dict[int, list[tuple]] = {}  # shard -> (keys, labels, features, view features) per batch so far
    bar = progress(total=len(shards), desc=f"extract {writer.split}", unit="shard")
    with torch.inference_mode():
        for b in loader:
            if b.error:
                raise UserError(b.error)
            parts = pending.setdefault(b.shard, [])
            if b.keys:
                # Kept on the device until the shard ends, so a GPU is not stalled by a copy per batch.
                images = normalised(b.images, dev, normalize)
                extra = (view_features(model, b.views, dev, store_dtype, views.normalize, batch_size)
                         if views else None)
                parts.append((b.keys, b.labels, image_features(model, images, dev, store_dtype), extra))
            if b.last:
                _stage(writer, b.shard, pending.pop(b.shard), b.skipped, backbone.embed_dim)
                bar.update(1)
    bar.close()


def image_features(model, images, dev, dtype):
    """Stored features of a transformed batch: encode_image (bf16 autocast on CUDA), cast to the store's dtype.

    `predict` (stages/bundle.py) calls this too, so a bundle rounds features exactly as the store does.
    """
    from pipeline.runtime import autocast

    with autocast(dev):
        feats = model.encode_image(images.to(dev, non_blocking=True))
    return feats.to(dtype)


def view_features(model, views, dev, dtype, normalize, batch_size: int):
    """[E, B, D] stored features of a batch's extra views [B, E, …] (``split_transform``'s per-image
    output), forwarded ``batch_size`` images at a time. `predict --tta` calls this too."""
    import torch

    flat = views.flatten(0, 1)
    feats = [image_features(model, normalised(flat[i:i + batch_size], dev, normalize), dev, dtype)
             for i in range(0, len(flat), batch_size)]
    return torch.cat(feats).view(views.shape[0], views.shape[1], -1).transpose(0, 1)


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


# ---------------------------------------------------------------- the text side and metadata
def resolve_templates(spec: str, dataset_template: str) -> list[str]:
    """`single` (the dataset's template), `ensemble` (CLIP's, as in the paper) or a file of one per line."""
    if spec == "single":
        return [dataset_template]
    if spec == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--templates {spec}: not 'single', 'ensemble' or an existing file")
    found = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ok = line.count("{}") == 1 and line.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{path}:{lineno}: a template needs exactly one '{{}}' for the class name, got {line!r}")
        found.append(line.strip())
    if not found:
        raise UserError(f"{path}: no templates in file")
    return found


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


def resolve_checkpoint(ckpt: str | None, model: str | None, pretrained: str | None):
    """(checkpoint path or None, model name, pretrained tag); checks --model against the checkpoint's final.json.
    ``ckpt`` None: no checkpoint, the factory's weights."""
    if ckpt is None:
        if model is None:
            raise UserError("--model is required with --ckpt none")
        return None, model, pretrained
    path = Path(ckpt)
    if not path.is_file():
        raise UserError(f"--ckpt {ckpt}: no such checkpoint file (or pass --ckpt none for the factory's weights)")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{sidecar}: malformed checkpoint description ({e})") from None
        trained = info.get("model")
        if model is not None and trained is not None and model != trained:
            raise UserError(f"--model {model}: checkpoint {ckpt} is a {trained} (per {sidecar.name}); "
                            f"pass --model {trained}")
        model = model or trained
        pretrained = pretrained or none_to_null(info.get("pretrained"))  # older final.json files hold "none"
    if model is None:
        raise UserError(f"--model is required: {ckpt} has no {sidecar.name} naming its architecture")
    return path, model, pretrained


def store_attrs(backbone, dataset, ckpt_path, pretrained, dtype, templates, views: dict, cmd) -> dict:
    """Root attributes; ``views`` holds train_views, view_seed and test_views (the seed and the train
    transform are recorded only with train views: without them they change nothing in the store)."""
    from pipeline.runtime import sha256_file

    ckpt_sha = sha256_file(ckpt_path) if ckpt_path else None
    train = dataset.splits.get("train")
    with_views = views["train_views"] > 0
    return {
        "format": FORMAT,
        "fingerprint": make_fingerprint(backbone.name, pretrained, ckpt_sha, dataset.classnames, backbone.embed_dim),
        "model": backbone.name, "pretrained": pretrained,
        "checkpoint": str(ckpt_path) if ckpt_path else None, "checkpoint_sha256": ckpt_sha,
        "embed_dim": backbone.embed_dim, "logit_scale": float(backbone.model.logit_scale.exp().item()),
        "classnames": list(dataset.classnames),
        "train_class_counts": list(train.class_counts) if train else [0] * dataset.num_classes,
        "dataset": {"name": dataset.name, "path": str(dataset.root)}, "dataset_fingerprint": dataset.fingerprint,
        "dtype": dtype, "templates": templates, "image_size": backbone.image_size,
        "transform": repr(backbone.eval_transform), "train_views": views["train_views"],
        "view_seed": views["view_seed"] if with_views else None,
        "train_transform": repr(backbone.train_transform) if with_views else None,
        "test_views": views["test_views"], "versions": _versions(), "command": cmd,
    }


def _versions() -> dict:
    out = {}
    for pkg in ("ballad-pipe", "torch", "open_clip_torch", "zarr", "numpy", "webdataset"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def command(ckpt, data, out, model, pretrained, dtype, templates, train_views=0, view_seed=0,
            test_views="none") -> str:
    """The command (less --splits) that reproduces this store; readers name it for an unfinished split."""
    args = ["ballad-pipe", "extract", "--ckpt", "none" if ckpt is None else str(ckpt), "--data", str(data),
            "--out", str(out), "--model", model]
    if pretrained:
        args += ["--pretrained", pretrained]
    args += ["--dtype", dtype, "--templates", templates]
    if train_views:
        args += ["--train-views", str(train_views), "--view-seed", str(view_seed)]
    if test_views != "none":
        args += ["--test-views", test_views]
    return shlex.join(args)
