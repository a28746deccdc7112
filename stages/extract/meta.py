"""What a feature store records about how it was made: the checkpoint and templates an extract run
resolves from its options (the checkpoint's final.json, every key checked: ``read_checkpoint_meta``),
the store's root attributes, and the command that reproduces it (readers name that command for an
unfinished split)."""
from __future__ import annotations

import json
import shlex
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.errors import UserError
from pipeline.heads import HEAD_INITS, HEAD_INPUTS, PROJECTION
from pipeline.options import none_to_null
from pipeline.schedule import SCHEDULES
from pipeline.tuning import TUNES
from pipeline.validate import COUNT, SHA256, TEXT, Field, check
from pipeline.text import ENSEMBLE_TEMPLATES, template_problem
from pipeline.transforms import EVAL_TRANSFORMS, MDA_SCHEDULES, TRAIN_TRANSFORMS
from stages.extract.config import ExtractConfig
from store.features import FORMAT, LOGIT_SCALE, MAYBE_TEXT, TEMPLATES, make_fingerprint

# final.json as phase-a and pretrain write it beside final.pt (pipeline/validate.py). extract reads the
# model and the pretrained tag, verify the sha256; the rest is checked when present, as files written
# by the other writer or an older version lack some. Phase A's own choices (batchnorm, precision,
# select, classifier, loss) are provenance here, checked as one-line text: naming them would make
# extract import Phase A's config, and DVC re-run every extraction after an edit to Phase A's options.
CHECKPOINT_META = {
    "model": Field("text", low=1), "pretrained": MAYBE_TEXT, "checkpoint": replace(TEXT, optional=True),
    "sha256": replace(SHA256, optional=True),
    "dataset": Field("dict", optional=True, keys={"name": TEXT, "fingerprint": TEXT, "path": TEXT}),
    "classnames": Field("list", optional=True, low=1, items=Field("text", low=1)),
    "template": replace(TEMPLATES.items, optional=True), "steps": replace(COUNT, optional=True),
    "epochs": Field("number", optional=True, low=0), "steps_per_epoch": replace(COUNT, optional=True),
    "logit_scale": replace(LOGIT_SCALE, optional=True),
    "batchnorm": replace(TEXT, optional=True),
    "precision": replace(TEXT, optional=True),
    "schedule": Field("text", optional=True, choices=SCHEDULES),
    "select": replace(TEXT, optional=True), "selected_epoch": replace(COUNT, optional=True),
    "val_acc": Field("number", null=True, optional=True, low=0, high=1),
    "tuning": Field("dict", optional=True, keys={"tune": Field("text", choices=TUNES)}),
    "classifier": replace(TEXT, optional=True), "head_key": MAYBE_TEXT,
    "head_input": Field("text", null=True, optional=True, choices=HEAD_INPUTS),
    "head_init": Field("text", null=True, optional=True, choices=HEAD_INITS),
    "loss": replace(TEXT, optional=True), "la_tau": Field("number", null=True, optional=True, low=0),
    "loss_params": Field("dict", optional=True, items=Field("number")),
    "train_transform": Field("text", optional=True, choices=tuple(TRAIN_TRANSFORMS)),
    "mda_schedule": Field("text", null=True, optional=True, choices=tuple(MDA_SCHEDULES)),
    "eval_transform": Field("text", optional=True, choices=tuple(EVAL_TRANSFORMS)),
    "eval": Field("dict", null=True, optional=True), "bad_samples": replace(COUNT, optional=True),
    "world_size": Field("int", optional=True, low=1), "rank_param_digests": Field("list", optional=True, items=TEXT),
    "config": Field("dict", optional=True),
    "final_loss": Field("number", optional=True), "zero_shot_heldout": Field("dict", optional=True),
    "corpus": Field("dict", optional=True), "seconds_this_attempt": Field("number", optional=True, low=0),
}


def resolve_templates(spec: str, dataset_template: str) -> list[str]:
    """`single` (the dataset's template), `ensemble` (CLIP's, as in the paper) or a file of one per line."""
    if spec == "single":
        return [dataset_template]
    if spec == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--templates {spec}: not 'single', 'ensemble' or an existing file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--templates {spec}: not a UTF-8 text file of templates, one per line") from None
    found = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if why := template_problem(line.strip()):
            raise UserError(f"{path}:{lineno}: template {line.strip()!r} {why}")
        found.append(line.strip())
    if not found:
        raise UserError(f"{path}: no templates in file")
    return found


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
        info = read_checkpoint_meta(sidecar, remedy="fix it, or delete it and pass --model")
        trained = info["model"]
        if model is not None and model != trained:
            raise UserError(f"--model {model}: checkpoint {ckpt} is a {trained} (per {sidecar.name}); "
                            f"pass --model {trained}")
        model = model or trained
        pretrained = pretrained or none_to_null(info.get("pretrained"))  # older final.json files hold "none"
    if model is None:
        raise UserError(f"--model is required: {ckpt} has no {sidecar.name} naming its architecture")
    return path, model, pretrained


def recorded_head_input(ckpt_path: Path | None) -> str:
    """The feature the checkpoint's head reads, as its final.json records it (pipeline/heads.py); the
    projected embedding without a checkpoint, a final.json or the key (files from before --head-input)."""
    sidecar = None if ckpt_path is None else Path(ckpt_path).with_suffix(".json")
    if sidecar is None or not sidecar.is_file():
        return PROJECTION
    info = read_checkpoint_meta(sidecar, remedy="fix it, or delete it and pass --model")
    return info.get("head_input") or PROJECTION


def read_checkpoint_meta(path: Path, spec=CHECKPOINT_META, remedy: str = "") -> dict:
    """The final.json at ``path``, every key checked against ``spec``: a one-line UserError naming the
    file and the key, then ``remedy``, otherwise."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed checkpoint description ({' '.join(str(e).split())})"
                        + (f"; {remedy}" if remedy else "")) from None
    return check(info, spec, str(path), remedy=remedy)


def store_attrs(backbone, dataset, ckpt_path, pretrained, cfg: ExtractConfig, templates, decode: dict,
                head_input: str = PROJECTION) -> dict:
    """Root attributes. The view seed and the train transform are recorded only with train views
    (without them they change nothing in the store), as the train recipe (--train-transform by name;
    the eval recipe: --eval-transform's); ``decode`` says where each split of this run is decoded
    (``cpu`` or ``gpu``, --decode). ``head_input``: the feature the images are stored at (pipeline/heads.py), whose
    dimensions are the store's ``embed_dim``."""
    from pipeline.heads import feature_dim
    from pipeline.runtime import sha256_file

    ckpt_sha = sha256_file(ckpt_path) if ckpt_path else None
    train = dataset.splits.get("train")
    with_views = cfg.train_views > 0
    dim = feature_dim(backbone.model, head_input, backbone.embed_dim)
    return {
        "format": FORMAT,
        "fingerprint": make_fingerprint(backbone.name, pretrained, ckpt_sha, dataset.classnames, dim),
        "model": backbone.name, "pretrained": pretrained,
        "checkpoint": str(ckpt_path) if ckpt_path else None, "checkpoint_sha256": ckpt_sha,
        "embed_dim": dim, "head_input": head_input, "logit_scale": float(backbone.model.logit_scale.exp().item()),
        "classnames": list(dataset.classnames), "taxonomy": dataset.taxonomy,
        "train_class_counts": list(train.class_counts) if train else [0] * dataset.num_classes,
        "dataset": {"name": dataset.name, "path": str(dataset.root)}, "dataset_fingerprint": dataset.fingerprint,
        "dtype": cfg.dtype, "templates": templates, "image_size": backbone.image_size,
        "transform": repr(backbone.eval_transform), "train_views": cfg.train_views,
        "view_seed": cfg.view_seed if with_views else None,
        "train_transform": repr(backbone.train_transform) if with_views else None,
        "eval_recipe": cfg.eval_transform, "train_recipe": cfg.train_transform if with_views else None,
        "test_views": cfg.test_views, "decode": decode, "versions": _versions(),
        "command": command(cfg, backbone.name, pretrained),
    }


def _versions() -> dict:
    out = {}
    for pkg in ("ballad-pipe", "torch", "torchvision", "open_clip_torch", "zarr", "numpy", "webdataset"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def command(cfg: ExtractConfig, model: str, pretrained: str | None) -> str:
    """The command (less --splits) that reproduces this store; readers name it for an unfinished split."""
    ckpt = none_to_null(cfg.ckpt)
    args = ["ballad-pipe", "extract", "--ckpt", "none" if ckpt is None else str(ckpt), "--data", str(cfg.data),
            "--out", str(cfg.out), "--model", model]
    if pretrained:
        args += ["--pretrained", pretrained]
    args += ["--dtype", cfg.dtype, "--templates", cfg.templates]
    if cfg.train_views:
        args += ["--train-views", str(cfg.train_views), "--view-seed", str(cfg.view_seed)]
        if cfg.train_transform != "ballad":
            args += ["--train-transform", cfg.train_transform]
    if cfg.eval_transform != "ballad":
        args += ["--eval-transform", cfg.eval_transform]
    if cfg.test_views != "none":
        args += ["--test-views", cfg.test_views]
    if cfg.decode != "auto":
        args += ["--decode", cfg.decode]
    return shlex.join(args)
