"""Stages `export` and `predict`: one self-describing directory holding everything needed to classify images.

Layout::

    NAME.bundle/
      bundle.json          format, model (name, open_clip config, checkpoint sha256, head_input: the image
                           feature the store holds, pipeline/heads.py), adapter (its training
                           config: λ, form, position, …) or null, classnames, templates, logit_scale,
                           feature_dtype, transform, the store's fingerprint, sha256 of the two files below
      model.safetensors    the CLIP state dict (the Phase A checkpoint's tensors)
      head.safetensors     adapter.* (the adapter's state dict) and text_embeddings [K, D] float32 (D: the
                           feature's dimensions; a Phase A head's weights when it has one)

Tensors are safetensors and metadata JSON, so opening a bundle never unpickles anything. Export refuses
parts that do not belong together: the checkpoint must be the one the store was extracted from
(sha256), and the adapter must have been trained on that store (fingerprint: architecture,
checkpoint, class list, embed dim). Loading checks each tensor file against bundle.json's sha256.

Predictions run through the functions extraction and evaluation use (pipeline.encode.image_features,
stages.adapter.embed_all, stages.evaluate.score.adapter_logits), with features rounded to the store's dtype,
so a bundle predicts on the test images what `evaluate` reports. ``tta`` (`predict --tta MODE`) builds
the test-time views of `extract --test-views MODE` with the same function (pipeline.views.tta_views)
and averages their logits as `evaluate --tta mean` does (stages.evaluate.score.view_logits).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.heads import HEAD_INPUTS, PROJECTION, feature_dim, feature_model, resolved_head_input, text_to_head
from pipeline.images import MAX_PIXELS, BadImage, open_image, read_file
from pipeline.options import none_to_null
from pipeline.runtime import pick_device, sha256_file
from pipeline.transforms import EVAL_TRANSFORMS, with_recipes
from pipeline.validate import SHA256, TEXT, Field, check
from stages.adapter.config import FORMS, POSITIONS
from stages.bundle.config import PredictConfig
from store.features import DTYPES, LOGIT_SCALE, MAYBE_TEXT, TEMPLATES

FORMAT = "ballad-bundle/1"
META_FILE = "bundle.json"
MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
# What bundle.json may hold (pipeline/validate.py), checked by ``read_meta``: the sha256 records cover
# the tensor files, not bundle.json itself, and its numbers and names go straight into the model.
BUNDLE_META = {
    "model": Field("dict", keys={"name": Field("text", low=1), "config": Field("dict", null=True, optional=True),
                                 "pretrained": MAYBE_TEXT, "checkpoint": MAYBE_TEXT,
                                 "checkpoint_sha256": replace(SHA256, null=True, optional=True),
                                 "embed_dim": Field("int", optional=True, low=1),
                                 "head_input": Field("text", optional=True, choices=HEAD_INPUTS)}),
    "adapter": Field("dict", null=True, keys={"file": TEXT, "sha256": SHA256, "config": Field("dict", keys={
        "lam": Field("number", low=0, high=1), "form": Field("text", choices=FORMS),
        "position": Field("text", choices=POSITIONS)})}),
    "classnames": Field("list", low=1, unique=True, items=Field("text", low=1)),
    "templates": TEMPLATES, "logit_scale": LOGIT_SCALE, "feature_dtype": Field("text", choices=DTYPES),
    "eval_recipe": Field("text", optional=True, choices=tuple(EVAL_TRANSFORMS)),  # extract --eval-transform's
    "transform": Field("dict", keys={  # and on load, equal to the one the model builds
        "resize_shorter_side": Field("int", low=1), "interpolation": TEXT,
        "center_crop": Field("list", length=2, items=Field("int", low=1)),
        "mean": Field("list", low=1, items=Field("number")),
        "std": Field("list", low=1, items=Field("number", low=0, above=True))}),
    "store": Field("dict", null=True, optional=True, keys={"path": TEXT, "fingerprint": Field("dict")}),
    "files": Field("dict", keys={MODEL_FILE: SHA256, HEAD_FILE: SHA256}),
}


# ---------------------------------------------------------------- export
def export(ckpt, adapter, features, out) -> dict:
    """Write the bundle ``out`` from a checkpoint, an adapter file (or None, also written ``"none"``: the
    store as it is) and their feature store."""
    from safetensors.torch import save_file

    from pipeline.models import _open_clip, create_model
    from stages.adapter import load_adapter
    from store.features import FeatureStore

    adapter, out = none_to_null(adapter), Path(out)
    if out.exists() and not (out / META_FILE).is_file():
        raise UserError(f"--out {out}: exists and is not a bundle; choose another --out")
    store = FeatureStore.open(features)
    fp = store.fingerprint
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise UserError(f"--ckpt {ckpt}: no such checkpoint file")
    sha, theirs = sha256_file(ckpt), fp.get("checkpoint_sha256")
    if sha != theirs:
        raise UserError(f"--ckpt {ckpt}: not the checkpoint {features} was extracted from (sha256 {sha[:12]}…, "
                        f"store: {theirs[:12] + '…' if theirs else 'no checkpoint file'})")
    # refuses tensors of another architecture; the eval transform the store's features were made with
    recipe = store.meta.get("eval_recipe", "ballad")
    backbone = with_recipes(create_model(fp["model"], pretrained=str(ckpt)), recipe, "ballad")
    head_input = store.meta.get("head_input", PROJECTION)  # stores from before --head-input hold the embedding
    dim = _feature_dim(backbone, head_input, f"--features {features}")
    if dim != store.embed_dim:
        raise UserError(f"--features {features}: holds {store.embed_dim}-d features, {fp['model']} gives "
                        f"{dim}-d ones at {head_input}")
    if store.meta.get("transform", repr(backbone.eval_transform)) != repr(backbone.eval_transform):
        raise UserError(f"--features {features}: extracted with another eval transform than {fp['model']} has now")
    head = load_adapter(adapter, store, features)  # refuses an adapter trained on another store
    meta = {
        "format": FORMAT,
        "model": {"name": fp["model"], "config": _open_clip().get_model_config(fp["model"]),
                  "pretrained": fp.get("pretrained"), "checkpoint": str(ckpt), "checkpoint_sha256": sha,
                  "embed_dim": backbone.embed_dim, "head_input": head_input},
        "eval_recipe": recipe,
        "adapter": _adapter_record(adapter),
        "classnames": store.classnames, "templates": store.templates, "logit_scale": store.logit_scale,
        "feature_dtype": store.meta.get("dtype", "float32"), "transform": transform_settings(backbone.eval_transform),
        "store": {"path": str(features), "fingerprint": fp},
    }
    tensors = {f"adapter.{k}": v for k, v in head.state_dict().items()}
    tensors["text_embeddings"] = torch.from_numpy(store.text_embeddings())
    with _replace_dir(out) as tmp:
        # safetensors refuses tensors that share storage (tied weights), so each is saved as its own copy.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in backbone.model.state_dict().items()},
                  tmp / MODEL_FILE)
        save_file(tensors, tmp / HEAD_FILE)
        meta["files"] = {name: sha256_file(tmp / name) for name in (MODEL_FILE, HEAD_FILE)}
        for name in meta["files"]:
            (tmp / name).chmod(0o644)  # safetensors writes 0600 files, which would hide them from other users
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _adapter_record(adapter) -> dict | None:
    """The adapter file's name, sha256 and training config (λ, form, position, …); None without one."""
    if adapter is None:
        return None
    config = torch.load(adapter, map_location="cpu", weights_only=True)["config"]  # load_adapter checked the file
    return {"file": str(adapter), "sha256": sha256_file(adapter), "config": config}


def _feature_dim(backbone, head_input: str, where: str) -> int:
    """Dimensions of the features at ``head_input`` (pipeline/heads.py), which ``where`` names; a
    pre-projection feature on a tower without a projection is refused."""
    if head_input not in HEAD_INPUTS or resolved_head_input(backbone.model, head_input) != head_input:
        raise UserError(f"{where}: its features are at head input {head_input!r}, which {backbone.name} does not have")
    return feature_dim(backbone.model, head_input, backbone.embed_dim)


def transform_settings(transform) -> dict:
    """What the eval transform does, read off its steps: bundles record it and `load` checks it."""
    steps = {type(t).__name__: t for t in transform.transforms}
    resize, crop, norm = steps["Resize"], steps["CenterCrop"], steps["Normalize"]
    return {"resize_shorter_side": resize.size, "interpolation": resize.interpolation.value,
            "center_crop": list(crop.size), "mean": list(norm.mean), "std": list(norm.std)}


@contextlib.contextmanager
def _replace_dir(out: Path):
    """Yield an empty directory beside ``out`` that replaces it once the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from other users
    try:
        yield tmp
        old = out.with_name(f"{tmp.name}.old")
        if out.exists():
            out.rename(old)  # a crash from here on leaves a whole bundle at `out` or at `old`
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- load and predict
class Bundle:
    """A loaded bundle: ``predict`` PIL images → top-k (class name, probability), best first."""

    def __init__(self, path: Path, meta: dict, backbone, adapter, text: torch.Tensor, device):
        self.path, self.meta, self.backbone, self.adapter, self.device = path, meta, backbone, adapter, device
        self.head_input = meta["model"].get("head_input", PROJECTION)  # the feature the store and text are at
        self.classnames: list[str] = list(meta["classnames"])
        self.text = text.to(device)  # [K, D] L2-normalised class embeddings, before any text adapter
        self.feature_dtype = getattr(torch, meta["feature_dtype"])

    @classmethod
    def load(cls, path, device=None) -> "Bundle":
        from safetensors.torch import load_file

        from pipeline.models import create_model
        from stages.adapter import Adapter

        path = Path(path)
        meta = read_meta(path)
        for name in (MODEL_FILE, HEAD_FILE):
            if not (path / name).is_file():
                raise UserError(f"{path / name}: missing from the bundle")
            if sha256_file(path / name) != meta["files"].get(name):
                raise UserError(f"{path / name}: does not belong to this bundle (sha256 differs from {META_FILE})")
        dev = pick_device(device)
        recipe = meta.get("eval_recipe", "ballad")  # bundles from before the recipes: the factory's (ballad)
        backbone = with_recipes(create_model(meta["model"]["name"], pretrained=str(path / MODEL_FILE), device=dev),
                                recipe, "ballad")
        if transform_settings(backbone.eval_transform) != meta["transform"]:
            raise UserError(f"{path / META_FILE}: transform {meta['transform']} is not the one this version of "
                            f"{meta['model']['name']} builds")
        head = load_file(path / HEAD_FILE)
        text, names = head["text_embeddings"], meta["classnames"]
        dim = _feature_dim(backbone, meta["model"].get("head_input", PROJECTION), str(path / META_FILE))
        if tuple(text.shape) != (len(names), dim):
            raise UserError(f"{path / HEAD_FILE}: text_embeddings are {tuple(text.shape)}, expected "
                            f"({len(names)}, {dim}) for the bundle's classes and model")
        c = meta["adapter"]["config"] if meta["adapter"] else {}
        adapter = Adapter(dim, meta["logit_scale"], **{k: c.get(k) for k in ("lam", "form", "position")})
        state = {k.removeprefix("adapter."): v for k, v in head.items() if k.startswith("adapter.")}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in adapter.state_dict().items()}:
            kind = f"a {c['position']} {c['form']} adapter of {dim} dims" if c else "no adapter"
            raise UserError(f"{path / HEAD_FILE}: holds the adapter tensors {shapes or 'none'}, but {META_FILE} "
                            f"describes {kind}; re-export the bundle")
        adapter.load_state_dict(state)
        return cls(path, meta, backbone, adapter.to(dev).eval(), text, dev)

    def set_classes(self, names) -> None:
        """Predict among ``names``: the bundle's classes keep their stored embeddings, new ones go through
        the text tower with the bundle's templates, mapped to the bundle's head input as a text-initialised
        head is (pipeline/heads.py ``text_to_head``; the visual adapter applies as before)."""
        from pipeline.encode import text_embeddings

        names = list(names)
        twice = [n for n, c in Counter(names).items() if c > 1]
        if twice:
            raise UserError(f"class names must be unique: {twice[0]!r} is listed {names.count(twice[0])} times")
        known = dict(zip(self.classnames, self.text))
        new = [n for n in names if n not in known]
        if new:
            emb, _ = text_embeddings(self.backbone, new, self.meta["templates"], self.device)
            emb = text_to_head(self.backbone.model, torch.from_numpy(emb).to(self.device), self.head_input)
            known.update(zip(new, emb))
        self.classnames, self.text = names, torch.stack([known[n] for n in names])

    def logits(self, images, tta: str = "none") -> torch.Tensor:
        """[N, K] class logits (on the CPU) of PIL images, computed as extract + evaluate compute them.

        ``tta``: none, or an `extract --test-views` mode whose views' logits are averaged.
        """
        from pipeline.encode import image_features, split_transform, view_features
        from pipeline.views import tta_views
        from stages.adapter import embed_all
        from stages.evaluate.score import adapter_logits, view_logits

        model = feature_model(self.backbone.model.eval(), self.head_input)
        with torch.inference_mode():
            if tta == "none":
                batch = torch.stack([self.backbone.eval_transform(im) for im in images])
                feats = image_features(model, batch, self.device, self.feature_dtype)
                return adapter_logits(self.adapter, embed_all(self.adapter, feats), self.text)
            per_image, normalize = split_transform(self.backbone.eval_transform)
            views = tta_views(per_image, tta, self.meta.get("eval_recipe", "ballad"))
            feats = view_features(model, torch.stack([views(im) for im in images]), self.device, self.feature_dtype,
                                  normalize, batch_size=len(images))
            return view_logits(self.adapter, feats, self.text)

    def predict(self, images, top_k: int = 5, batch_size: int = 64, tta: str = "none") -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` (class name, probability) pairs, best first (``tta``: see ``logits``)."""
        PredictConfig(bundle=str(self.path), top_k=top_k, batch_size=batch_size, tta=tta).check()
        images, out = list(images), []
        for i in range(0, len(images), batch_size):
            probs = self.logits(images[i:i + batch_size], tta).float().softmax(dim=1)
            p, c = probs.topk(min(top_k, probs.shape[1]), dim=1)
            out += [[(self.classnames[j], float(q)) for j, q in zip(cs, ps)] for cs, ps in zip(c.tolist(), p.tolist())]
        return out


def read_meta(path: Path) -> dict:
    """A bundle's bundle.json, every key checked (``Bundle.load`` and ``verify`` read it)."""
    file = path / META_FILE
    if not file.is_file():
        raise UserError(f"{path}: not a bundle (no {META_FILE}; `ballad-pipe export` writes one)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: malformed ({e.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file}: not a {FORMAT} bundle description")
    return check(meta, BUNDLE_META, str(file), remedy="re-export the bundle (`ballad-pipe export`)")


# ---------------------------------------------------------------- files
def read_classes(path) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read class names ({e.__class__.__name__})") from None
    if not names:
        raise UserError(f"{path}: no class names (one per line)")
    return names


def image_files(inputs) -> list[Path]:
    """Named files as given, plus every file with an image extension under named directories (sorted)."""
    from PIL import Image

    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
        else:
            files.append(p)  # missing or unreadable: reported when read
    return files


def predict_files(bundle: Bundle, paths, top_k: int = 5, batch_size: int = 64, tta: str = "none",
                  max_pixels: int = MAX_PIXELS):
    """Yield (path, predictions, None) or (path, None, why it is unreadable) per path, in order,
    ``batch_size`` images at a time; images are decoded as store.stream decodes shard images."""
    for i in range(0, len(paths), batch_size):
        chunk, images, errors = paths[i:i + batch_size], [], {}
        for p in chunk:
            try:
                images.append(open_image(read_file(p), str(p), max_pixels))
            except BadImage as e:
                errors[p] = e.reason
        preds = iter(bundle.predict(images, top_k, batch_size, tta) if images else [])
        for p in chunk:
            yield (p, None, errors[p]) if p in errors else (p, next(preds), None)
