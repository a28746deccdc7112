"""The recipes' options of Phase A and extract: --train-transform (rebuilt every epoch, on both decode
paths, exact across --resume), --mda-schedule, --eval-transform, the loss from pipeline/losses.py's
registry, and the recipes in configs/ that set them."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_decode import _close, jpeg_data  # noqa: F401  (jpeg_data is a fixture)
from test_phase_a import TINY, read_log, small_data  # noqa: F401  (small_data is a fixture)
from test_tensor_transforms import CROP_MAX, levels

import stages.phase_a.run as par
from cli import main
from pipeline.errors import UserError
from pipeline.losses import LOSSES, make_loss
from pipeline.transforms import SquareRandomResizedCrop, eval_transform, mda_min_scale, normalization, train_transform
from stages.phase_a import PhaseAConfig, param_digest, run_phase_a
from stages.phase_a.data import Transforms
from stages.phase_a.state import last_checkpoint
from store.features import FeatureStore
from store.shards import load_dataset, read_shard

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def config(data, out, **kw) -> PhaseAConfig:
    """3 steps per epoch (⌊117 / 32⌋) of ballad-tiny on the small dataset."""
    return PhaseAConfig(data=str(data), out=str(out), **{**TINY, "batch_size": 32, "epochs": 2, **kw})


def _mda_scale(transform) -> float:
    (crop,) = [t for t in transform.transforms if isinstance(t, SquareRandomResizedCrop)]
    return crop.scale[0]


# -- Phase A: the transforms of each epoch ----------------------------------------------------------------

def test_each_epoch_trains_on_its_own_train_transform_and_scores_with_the_eval_transform(small_data, tmp_path,
                                                                                          monkeypatch):
    seen = {"train": [], "eval": []}
    batches, accuracy = par.train_batches, par.split_accuracy

    def recording_batches(urls, transform, **kw):
        seen["train"].append((kw["epoch"], transform))
        return batches(urls, transform, **kw)

    def recording_accuracy(towers, tokens, urls, transform, **kw):
        seen["eval"].append(transform)
        return accuracy(towers, tokens, urls, transform, **kw)

    monkeypatch.setattr(par, "train_batches", recording_batches)
    monkeypatch.setattr(par, "split_accuracy", recording_accuracy)
    final = run_phase_a(config(small_data, tmp_path / "run", epochs=3, train_transform="mda", mda_schedule="linear",
                               eval_transform="lift", eval_every=3, eval_samples=10))
    assert [e for e, _ in seen["train"]] == [0, 1, 2]
    assert [_mda_scale(t) for _, t in seen["train"]] == pytest.approx([0.08, 0.54, 1.0])  # linear: 0.08 → 1
    from pipeline.models import create_model

    bb = create_model("ballad-tiny")
    lift = repr(eval_transform("lift", bb.image_size, *normalization(bb.eval_transform)))
    assert len(seen["eval"]) == 3 + 2 and {repr(t) for t in seen["eval"]} == {lift}  # 3 val passes, 2 test passes
    meta = json.loads(final.with_suffix(".json").read_text())
    assert (meta["train_transform"], meta["mda_schedule"], meta["eval_transform"]) == ("mda", "linear", "lift")
    assert meta["loss"] == "ce" and meta["loss_params"] == {}


@pytest.mark.parametrize("schedule", ["convex", "concave", "min", "max"])
def test_the_mda_crop_of_each_epoch_follows_the_schedule(tiny_backbone, schedule):
    cfg = PhaseAConfig(data="unused", model="ballad-tiny", epochs=5, train_transform="mda", mda_schedule=schedule)
    made = Transforms(cfg, tiny_backbone)
    assert [_mda_scale(made.train(e)) for e in range(5)] == [mda_min_scale(e, 5, schedule) for e in range(5)]
    assert repr(made.train(2)) == repr(train_transform("mda", 32, *normalization(tiny_backbone.eval_transform),
                                                       epoch=2, epochs=5, mda_schedule=schedule))


@pytest.mark.parametrize("recipe, epoch", [("mda", 0), ("mda", 3), ("lift", 1)])
def test_batches_decoded_on_the_device_draw_the_cpu_paths_crops(jpeg_data, tiny_backbone, recipe, epoch):  # noqa: F811
    """The epoch's transform on ``--decode gpu`` (here on the CPU device): the same order and crops as the
    CPU path's, the pixels within the tolerance of a random crop without jitter."""
    from stages.phase_a.data import train_batches

    cfg = PhaseAConfig(data="unused", model="ballad-tiny", epochs=4, train_transform=recipe)
    transform = Transforms(cfg, tiny_backbone).train(epoch)
    urls = load_dataset(jpeg_data).urls("train")
    batches = []
    for decode_on in (None, CPU):
        torch.manual_seed(5)  # without workers the main process's generator draws: seeded alike
        stream = train_batches(urls, transform, seed=1, epoch=epoch, micro_batch=4, workers=0, shuffle_buffer=8,
                               distributed=False, decode_on=decode_on)
        batches.append([next(stream) for _ in range(6)])
    std = transform.transforms[-1].std
    for (keys_a, x_a, y_a), (keys_b, x_b, y_b) in zip(*batches):
        assert keys_a == keys_b and torch.equal(y_a, y_b)
        diff = levels(x_a, x_b, std)
        assert diff.max() <= CROP_MAX + 1e-3 and diff.mean() <= 1.0


# -- Phase A: resume ------------------------------------------------------------------------------------

# In the main process (--workers 0) the resumed run restores the RNG state last.pt saved, so its crops
# are the uninterrupted run's. Loader workers seed their RNG at the epoch's start and skip the consumed
# samples undecoded: the order is the same, the crops after the resume point are not (BALLAD's transform
# alike; stages/phase_a/data.py), so a resume with workers is not checked for equal weights here.
RESUMES = [pytest.param("cpu", 0, id="cpu"), pytest.param("gpu", 0, id="device-decode", marks=pytest.mark.slow)]


@pytest.mark.parametrize("decode, workers", RESUMES)
def test_an_mda_run_killed_mid_way_resumes_to_the_uninterrupted_weights(small_data, tmp_path, monkeypatch,  # noqa: F811
                                                                       single_thread, decode, workers):
    if decode == "gpu":  # this machine may have no GPU: the stage's choice is forced, decoding on the CPU device
        monkeypatch.setattr(par, "decode_on_device", lambda mode, device, urls: True)
    cfg = config(small_data, tmp_path / "whole", epochs=3, save_every=2, select="last", train_transform="mda",
                 eval_transform="lift-plus", workers=workers)
    whole = run_phase_a(cfg)
    save = par.save_last

    def killed_after_step_4(run, state):  # mid epoch 2 (of 3): last.pt holds step 4, as after a kill
        save(run, state)
        if state.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(par, "save_last", killed_after_step_4)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        run_phase_a(cut)
    monkeypatch.setattr(par, "save_last", save)
    resumed = run_phase_a(dataclasses.replace(cut, resume=True))
    assert param_digest(torch.load(resumed, weights_only=True)) == param_digest(torch.load(whole, weights_only=True))
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    ballad = run_phase_a(dataclasses.replace(cfg, out=str(tmp_path / "ballad"), train_transform="ballad"))
    assert param_digest(torch.load(ballad, weights_only=True)) != param_digest(torch.load(whole, weights_only=True))


def test_resume_needs_the_same_transforms_and_loss(small_data, tmp_path, caplog):  # noqa: F811
    from pipeline.checkpointing import checkpoint

    cfg = config(small_data, tmp_path, resume=True, train_transform="mda", loss="focal")
    path = tmp_path / "last.pt"
    torch.save(checkpoint(cfg, "phase-a", 2, 6, CPU, dataset_fingerprint="fp"), path)
    assert last_checkpoint(cfg, path, 6, "fp")["step"] == 2
    for change, named in (({"train_transform": "lift"}, "--train-transform mda → lift"),
                          ({"mda_schedule": "linear"}, "--mda-schedule convex → linear"),
                          ({"eval_transform": "lift"}, "--eval-transform ballad → lift"),
                          ({"loss": "ce"}, "--loss focal → ce"), ({"focal_gamma": 1.0}, "--focal-gamma 2.0 → 1.0")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ballad.phase_a"):
            assert last_checkpoint(dataclasses.replace(cfg, **change), path, 6, "fp") is None
        assert named in caplog.text


# -- Phase A: the loss ----------------------------------------------------------------------------------

def test_phase_a_trains_with_the_registrys_loss_and_records_its_parameters(small_data, tmp_path):  # noqa: F811
    """focal with γ = 0 is cross-entropy: the same run to rounding; γ = 2 is another run."""
    runs = {}
    for name, kw in (("ce", {}), ("focal0", {"loss": "focal", "focal_gamma": 0.0}),
                     ("focal2", {"loss": "focal", "focal_gamma": 2.0})):
        final = run_phase_a(config(small_data, tmp_path / name, epochs=1, schedule="standard", select="last", **kw))
        runs[name] = ([r["loss"] for r in read_log(tmp_path / name)], torch.load(final, weights_only=True),
                      json.loads(final.with_suffix(".json").read_text()))
    (ce, w_ce, _), (f0, w_f0, meta0), (f2, _, meta2) = runs["ce"], runs["focal0"], runs["focal2"]
    assert f0 == pytest.approx(ce, abs=1e-4) and all(torch.allclose(w_f0[k], w_ce[k], atol=1e-5) for k in w_ce)
    assert f2[0] < ce[0] - 0.1  # (1 − p)^2 weighs every sample's cross-entropy down
    assert meta0["loss"] == "focal" and meta0["loss_params"] == {"focal_gamma": 0.0}
    assert meta2["loss_params"] == {"focal_gamma": 2.0} and meta2["config"]["focal_gamma"] == 2.0


@pytest.mark.parametrize("loss", [n for n in LOSSES if n != "lade"])  # LADE's regulariser is a batch statistic
def test_every_per_sample_loss_accumulates_to_its_full_batch_value(tiny_backbone, loss):
    from stages.phase_a.model import Towers, cosine_logits, set_batchnorm, train_step
    from pipeline.text import tokenize_trimmed

    counts = [9, 3, 1]
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, ["a photo of a cat.", "a photo of a dog.", "a photo of an owl."])
    x, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 0, 1])
    loss_fn = make_loss(PhaseAConfig(data="unused", model="ballad-tiny", loss=loss, ldam_s=5.0), counts)
    towers = Towers(tiny_backbone.model)
    set_batchnorm(towers, "frozen")
    with torch.no_grad():
        image, text = towers(x, tokens)
        want = loss_fn(cosine_logits(image, text, 14.3), y).item()
    assert train_step(towers, tokens, [(x[:2], y[:2]), (x[2:], y[2:])], 14.3, loss_fn) == pytest.approx(want, abs=1e-5)
    towers.zero_grad(set_to_none=True)


# -- Phase A and extract: the options' checks -----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--train-transform", "lift", "--color-jitter", "0"],
     "--color-jitter 0.0: applies to --train-transform ballad only, not lift"),
    (["--train-transform", "mda", "--color-jitter", "0.2"],
     "--color-jitter 0.2: applies to --train-transform ballad only, not mda"),
    (["--mda-schedule", "linear"], "--mda-schedule linear: applies to --train-transform mda only, not ballad"),
    (["--loss", "focal", "--focal-gamma", "-1"], "--focal-gamma -1.0: must be 0 or more and finite"),
    (["--loss", "class-balanced", "--cb-beta", "1"], "--cb-beta 1.0: must be in [0, 1)"),
])
def test_phase_a_refuses_options_of_another_recipe_in_one_line(small_data, tmp_path, args, message):  # noqa: F811
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["phase-a", "--data", str(small_data), "--model", "ballad-tiny", "--out",
                                       str(out), *args])
    assert result.exit_code != 0 and result.output == f"Error: {message}\n" and not out.exists()


def test_unknown_recipes_from_python_are_one_line_errors(small_data, tmp_path):  # noqa: F811
    from stages.extract.run import extract

    for key, choices in (("train_transform", "ballad, lift, mda"), ("eval_transform", "ballad, lift, lift-plus"),
                         ("mda_schedule", "convex, linear, concave, min, max")):
        with pytest.raises(UserError, match=f"^--{key.replace('_', '-')} bogus: choose one of {choices}$"):
            run_phase_a(config(small_data, tmp_path / "out", **{key: "bogus"}))
    with pytest.raises(UserError, match="^--eval-transform bogus: choose one of ballad, lift, lift-plus$"):
        extract("none", small_data, tmp_path / "s.zarr", model="ballad-tiny", eval_transform="bogus")
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("args, message", [
    (["--train-views", "2", "--train-transform", "mda"],
     "--train-transform mda: LIFT+'s crop depends on the training epoch, which extract has not; pass ballad or lift"),
    (["--train-transform", "lift"], "--train-transform lift: applies to --train-views only, and none are asked for"),
])
def test_extract_refuses_a_train_transform_it_cannot_use_in_one_line(small_data, tmp_path, args,  # noqa: F811
                                                                      message):
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(main, ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", str(small_data),
                                       "--out", str(out), *args])
    assert result.exit_code != 0 and result.output == f"Error: {message}\n" and not out.exists()


# -- extract: the recipes' features and views -----------------------------------------------------------

@pytest.fixture(scope="module")
def lift_store(tmp_path_factory, jpeg_data):  # noqa: F811
    from stages.extract.run import extract

    out = tmp_path_factory.mktemp("lift") / "lift.zarr"
    extract("none", jpeg_data, out, model="ballad-tiny", batch_size=8, workers=0, dtype="float32", train_views=2,
            test_views="five-crop", eval_transform="lift", train_transform="lift", skip_bad=True)
    return FeatureStore.open(out)


def _model():
    """extract's model with --ckpt none: the factory's random init after torch.manual_seed(0)."""
    from pipeline.models import create_model

    torch.manual_seed(0)
    return create_model("ballad-tiny")


def test_extract_stores_the_recipes_features_views_and_names(lift_store, jpeg_data):  # noqa: F811
    from test_extract import _image as image
    from torchvision import transforms as T

    from pipeline.views import view_rng_seed

    bb = _model()
    model, norm = bb.model.eval(), normalization(bb.eval_transform)
    lift_eval, lift_train = eval_transform("lift", 32, *norm), train_transform("lift", 32, *norm)
    meta = lift_store.meta
    assert (meta["eval_recipe"], meta["train_recipe"]) == ("lift", "lift") and meta["transform"] == repr(lift_eval)
    assert meta["train_transform"] == repr(lift_train)
    assert "--train-transform lift" in meta["command"] and "--eval-transform lift" in meta["command"]
    data = load_dataset(jpeg_data)
    val = [s for url in data.urls("val") for s in read_shard(url) if s.key != "v003"]  # v003: unreadable, skipped
    train = [s for url in data.urls("train") for s in read_shard(url)]
    img = image(val[2])
    crops = T.Compose([T.Resize(32 + 24, interpolation=T.InterpolationMode.BILINEAR), T.FiveCrop(32)])(img)
    normalize = lift_eval.transforms[-1]
    torch.manual_seed(view_rng_seed(0, train[1].key, 1))
    view = lift_train(image(train[1]))
    with torch.inference_mode():
        plain = model.encode_image(lift_eval(img)[None])[0]
        tta = model.encode_image(torch.stack([normalize(T.functional.to_tensor(c)) for c in crops]))
        view = model.encode_image(view[None])[0]
    assert list(lift_store.keys("val"))[2] == val[2].key and list(lift_store.keys("train"))[1] == train[1].key
    torch.testing.assert_close(torch.from_numpy(lift_store.features("val")[0][2]), plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lift_store.tta_features("val")[:, 2]), tta, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lift_store.views("train")[1, 1]), view, atol=1e-5, rtol=1e-4)
    with torch.inference_mode():  # and not the ballad recipe's
        ballad = model.encode_image(bb.eval_transform(img)[None])[0]
    assert not torch.allclose(torch.from_numpy(lift_store.features("val")[0][2]), ballad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_extract_decoded_on_the_device_stores_the_recipes_as_the_cpu_path(lift_store, jpeg_data, tmp_path,  # noqa: F811
                                                                          monkeypatch, single_thread):
    import stages.extract.run
    from stages.extract.run import extract

    monkeypatch.setattr(stages.extract.run, "decode_on_device", lambda mode, device, urls: mode == "gpu")
    out = tmp_path / "gpu.zarr"
    extract("none", jpeg_data, out, model="ballad-tiny", batch_size=8, workers=0, dtype="float32", train_views=2,
            test_views="five-crop", eval_transform="lift", train_transform="lift", skip_bad=True, decode="gpu")
    gpu = FeatureStore.open(out)
    assert gpu.meta["eval_recipe"] == "lift" and gpu.meta["decode"] == {"train": "gpu", "val": "gpu"}
    for split in ("train", "val"):
        assert list(gpu.keys(split)) == list(lift_store.keys(split))
        _close(lift_store.features(split)[0], gpu.features(split)[0])
    _close(lift_store.views("train"), gpu.views("train"))
    _close(lift_store.tta_features("val"), gpu.tta_features("val"))


def test_resuming_a_store_with_another_eval_transform_is_refused(lift_store, jpeg_data, tmp_path):  # noqa: F811
    """The eval transform decides every stored feature: a store of another one is not resumed or kept."""
    import shutil

    from stages.extract.run import extract

    store = tmp_path / "lift.zarr"
    shutil.copytree(lift_store.path, store)
    with pytest.raises(UserError, match=r"holds a store made with another eval_recipe \(lift\); .* --overwrite"):
        extract("none", jpeg_data, store, model="ballad-tiny", splits=["val"], workers=0, dtype="float32",
                train_views=2, test_views="five-crop", eval_transform="lift-plus", train_transform="lift",
                skip_bad=True)


# -- the recipes in configs/ ----------------------------------------------------------------------------

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _options(section: dict | None) -> dict:
    return {k.replace("-", "_"): v for k, v in (section or {}).items()}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_checks_and_extracts_with_the_eval_transform_phase_a_scored_with(path):
    from stages.extract.config import ExtractConfig

    params = yaml.safe_load(path.read_text())
    phase_a = PhaseAConfig(data="d", model=params["model"]["name"], **_options(params["phase_a"]))
    phase_a.check()
    extract = ExtractConfig(ckpt=None, data="d", out="o", **_options(params["extract"]), **_options(params["views"]))
    extract.check()
    assert extract.eval_transform == phase_a.eval_transform, path.name


LIFT_PLUS = sorted((ROOT / "configs").glob("lift_plus_*.yaml"))


def test_the_lift_plus_recipes_cover_lift_plus_datasets_and_backbones():
    names = {p.stem.removeprefix("lift_plus_") for p in LIFT_PLUS}
    assert names == {"imagenet_lt_vit_b16", "imagenet_lt_vit_l14", "places_lt_vit_b16", "cifar100_lt_ir100_vit_b16",
                     "cifar100_lt_ir50_vit_b16", "cifar100_lt_ir10_vit_b16", "inat2018_vit_b16"}
    for path in LIFT_PLUS:  # the CIFAR recipes' imbalance is their name's, each in a data folder of its own
        params = yaml.safe_load(path.read_text())
        if "cifar" in path.stem:
            ratio = path.stem.split("_ir")[1].split("_")[0]
            assert f"--imbalance {ratio} " in params["data"]["args"] and params["data"]["dir"].endswith(f"-ir{ratio}")
    dirs = [yaml.safe_load(p.read_text())["data"]["dir"] for p in LIFT_PLUS if "cifar" in p.stem]
    assert len(set(dirs)) == len(dirs)


def test_the_lift_plus_recipes_anneal_as_lift_plus_cosine():
    """LIFT+'s CosineAnnealingLR(T_max = epochs) stepped after each epoch, over its epochs (15 on
    iNaturalist 2018, else 5): the recipes' per-epoch lr, epoch by epoch."""
    from pipeline.schedule import epoch_lr

    for path in LIFT_PLUS:
        section = yaml.safe_load(path.read_text())["phase_a"]
        epochs, lr = section["epochs"], section["lr"]
        assert epochs == (15 if "inat" in path.stem else 5), path.name
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        for epoch in range(epochs):
            assert epoch_lr(lr, epoch, epochs, section["schedule"]) == pytest.approx(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
