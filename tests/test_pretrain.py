"""pretrain: the captioned corpus (balanced, never the demo's images), zero-shot far above chance after a
short run, the checkpoint loads through the factory like any local one, determinism, resume, bad options."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import UserError
from stages import shapes
from stages.pretrain.run import batch_indices, lr_at, render_corpus, run_pretrain, zero_shot_accuracy
from stages.pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
# ~10 s of ballad-tiny on one idle core: enough to learn colours and some shapes from captions.
SMALL = dict(corpus_size=1024, steps=120, batch_size=64, warmup=10, eval_size=400, workers=0, save_every=40)
# A few seconds: a run to check files, determinism and resuming on, not what it learns.
TINY = dict(corpus_size=256, steps=12, batch_size=32, warmup=2, eval_size=80, workers=0, save_every=4)


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """final.pt of a SMALL run: one that has learnt something."""
    return run_pretrain(PretrainConfig(out=str(tmp_path_factory.mktemp("pretrain") / "run"), **SMALL))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """final.pt of a TINY run with seed 0 (read-only: tests that write copy or run their own)."""
    return run_pretrain(PretrainConfig(out=str(tmp_path_factory.mktemp("pretrain") / "tiny"), **TINY))


def test_corpus_is_balanced_captioned_and_wider_than_the_demo():
    names = shapes.corpus_classnames()
    assert set(shapes.classnames()) < set(names) and len(names) == 80
    first = [shapes.corpus_sample(0, "pretrain", i) for i in range(len(names))]
    assert [s.label for s in first] == list(range(len(names)))  # every (colour, shape) once per K indices
    for s in first:
        colour, shape = names[s.label].split(" ")
        assert f" {colour} {shape}" in s.caption and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    captions = " ".join(s.caption for s in first)
    for word in (*shapes.SIZES, *shapes.BACKGROUNDS, "with clutter", "on the", "a photo of a"):
        assert word in captions, word
    again = shapes.corpus_sample(0, "pretrain", 7)
    assert again.caption == first[7].caption and np.array_equal(again.image, first[7].image)
    assert not np.array_equal(shapes.corpus_sample(1, "pretrain", 7).image, first[7].image)
    assert shapes.corpus_sample(0, "pretrain", 3, size=64).image.shape == (64, 64, 3)


def test_pretraining_never_draws_a_demo_image(tiny_data):
    """The corpus's random streams are not the demo's, for any pair of seeds; checked on the pixels too."""
    from store.shards import load_dataset, read_shard

    assert not set(shapes.CORPUS_STREAM.values()) & set(shapes.SPLIT_STREAM.values())
    assert len(set(shapes.CORPUS_STREAM.values())) == len(shapes.CORPUS_STREAM)
    info = load_dataset(tiny_data)  # seed 0, the corpus's default seed
    demo = torch.from_numpy(np.stack([
        np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), dtype=np.float32).ravel()
        for split in ("train", "val", "test") for url in info.urls(split) for s in read_shard(url)]))
    for stream in shapes.CORPUS_STREAM:
        corpus = torch.from_numpy(render_corpus(0, stream, 300, 32).images.astype(np.float32).reshape(300, -1))
        nearest = torch.cdist(corpus, demo, p=1).min().item() / demo.shape[1]
        assert nearest > 5, stream  # mean absolute pixel difference to the closest demo image
    train, heldout = (render_corpus(0, s, 200, 32) for s in ("pretrain", "heldout"))
    assert not {a.tobytes() for a in train.images} & {b.tobytes() for b in heldout.images}  # no image in both


def test_schedule_warms_up_then_anneals_and_batches_walk_epoch_permutations():
    cfg = PretrainConfig(steps=100, warmup=10, lr=1.0)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))  # cosine to 0 at step 100
    rows = np.concatenate([batch_indices(0, s, 100, 32) for s in range(3)])  # ⌊100 / 32⌋ = 3 steps per epoch
    assert len(set(rows.tolist())) == 96
    assert np.array_equal(batch_indices(0, 4, 100, 32), batch_indices(0, 4, 100, 32))
    assert not np.array_equal(batch_indices(0, 3, 100, 32), batch_indices(0, 0, 100, 32))  # a new epoch, a new order


@pytest.mark.slow  # trains 120 steps
def test_pretrained_zero_shot_is_far_above_chance_on_held_out_images(pretrained):
    meta = json.loads((pretrained.parent / "final.json").read_text())
    zs = meta["zero_shot_heldout"]
    assert zs["images"] == SMALL["eval_size"] and zs["classes"] == 80 and zs["demo_classes"] == 30
    assert zs["top1"] > 6 / 80 and zs["demo_top1"] > 4 / 30  # ≥ 6× and 4× chance after 120 small steps
    assert meta["steps"] == SMALL["steps"] and meta["final_loss"] < math.log(SMALL["batch_size"])


def test_checkpoint_loads_through_the_factory_like_any_local_checkpoint(tiny_run):
    import open_clip

    from pipeline.models import available_models, create_model
    from pipeline.runtime import sha256_file
    from stages.extract.meta import read_checkpoint_meta
    from stages.phase_a.model import batchnorm_mode

    sd = state(tiny_run)
    meta = read_checkpoint_meta(tiny_run.parent / "final.json")  # every key as extract and verify check them
    assert meta["sha256"] == sha256_file(tiny_run) and meta["model"] == "ballad-tiny"
    bb = create_model("ballad-tiny", pretrained=str(tiny_run))
    assert bb.pretrained == str(tiny_run) and same_weights(bb.model.state_dict(), sd)
    assert "ballad-tiny" in available_models()  # open_clip's own loader takes it too: a plain state dict
    assert same_weights(open_clip.create_model("ballad-tiny", pretrained=str(tiny_run)).state_dict(), sd)
    assert batchnorm_mode("auto", bb.pretrained) == "frozen"  # Phase A keeps the corpus's BatchNorm statistics
    with pytest.raises(UserError, match="does not match architecture ballad-tiny-vit"):
        create_model("ballad-tiny-vit", pretrained=str(tiny_run))

    # the factory-loaded model scores what the run reported: the stage evaluated the weights it saved
    heldout = render_corpus(0, "heldout", TINY["eval_size"], bb.image_size)
    norm = bb.eval_transform.transforms[-1]
    assert zero_shot_accuracy(bb.model, bb.tokenizer, heldout, norm, "cpu") == meta["zero_shot_heldout"]


def test_tokens_no_caption_uses_keep_their_initialisation(tiny_run):
    from pipeline.models import create_model
    from pipeline.runtime import seed_everything

    seed_everything(0)
    init = create_model("ballad-tiny").model.state_dict()["token_embedding.weight"]
    trained = state(tiny_run)["token_embedding.weight"]
    tokenizer = create_model("ballad-tiny").tokenizer
    red, zebra = (int(tokenizer([w])[0, 1]) for w in ("red", "zebra"))
    assert not torch.equal(trained[red], init[red]) and torch.equal(trained[zebra], init[zebra])
    trained_rows = json.loads((tiny_run.parent / "final.json").read_text())["corpus"]["trained_tokens"]
    assert 20 < trained_rows < 100 and int((trained != init).any(dim=1).sum()) == trained_rows


def curve(out):
    """The loss per step in dvclive's plot file."""
    return (out / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text()


def test_same_seed_gives_bit_identical_weights(tiny_run, tmp_path, single_thread):
    from pipeline.runtime import sha256_file

    a = tiny_run
    b, c = (run_pretrain(PretrainConfig(out=str(tmp_path / name), seed=seed, **TINY))
            for name, seed in (("b", 0), ("c", 1)))
    assert same_weights(state(a), state(b)) and not same_weights(state(a), state(c))
    assert sha256_file(a) == sha256_file(b)  # the file too: DVC sees an unchanged checkpoint
    assert curve(a.parent) == curve(b.parent) and len(curve(a.parent).splitlines()) == TINY["steps"] + 1


def test_interrupted_run_resumes_to_the_uninterrupted_weights(tiny_run, tmp_path, single_thread, monkeypatch,
                                                               caplog):
    import stages.pretrain.run as pretrain

    whole = tiny_run
    out = tmp_path / "cut"

    def dies_at_step_7(cfg, step):
        if step == 7:
            raise KeyboardInterrupt  # as a kill: last.pt holds step 4 (--save-every 4)
        return lr_at(cfg, step)

    monkeypatch.setattr(pretrain, "lr_at", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(PretrainConfig(out=str(out), **TINY))
    monkeypatch.undo()
    assert state(out / "last.pt")["step"] == 4 and not (out / "final.pt").exists()

    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_pretrain(PretrainConfig(out=str(out), **TINY))
    with caplog.at_level(logging.INFO, logger="ballad.pretrain"):
        resumed = run_pretrain(PretrainConfig(out=str(out), resume=True, **TINY))
    assert "resuming" in caplog.text and "at step 4 of 12" in caplog.text
    assert same_weights(state(resumed), state(whole))
    assert curve(out) == curve(whole.parent)  # steps 5-6 of the killed run are dropped, 1-4 replayed once

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ballad.pretrain"):  # other settings: a new run, said so
        run_pretrain(PretrainConfig(out=str(out), resume=True, **{**TINY, "lr": 1e-3}))
    assert "--lr 0.005 → 0.001" in caplog.text and "starting a new run from step 0" in caplog.text


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BALLAD_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    args = ["--corpus-size", "512", "--steps", "60", "--batch-size", "32", "--warmup", "5", "--eval-size", "80",
            "--workers", "0", "--save-every", "5"]

    def cli(out, *extra):
        return [sys.executable, "-m", "cli", "pretrain", "--out", str(out), *args, *extra]

    subprocess.run(cli(tmp_path / "whole"), env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "last.pt").exists() and state(out / "last.pt")["step"] >= 10:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final.pt").exists()
    assert 10 <= state(out / "last.pt")["step"] < 60
    subprocess.run(cli(out, "--resume"), env=env, check=True, capture_output=True)
    assert same_weights(state(out / "final.pt"), state(tmp_path / "whole" / "final.pt"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0: must be a whole number ≥ 1"),
    (["--lr", "nan"], "--lr nan: must be finite and > 0"),
    (["--lr", "-1"], "--lr -1.0: must be finite and > 0"),
    (["--weight-decay", "inf"], "--weight-decay inf: must be finite and ≥ 0"),
    (["--warmup", "10", "--steps", "10"], "--warmup 10: must be fewer than --steps 10"),
    (["--batch-size", "1"], "--batch-size 1: must be a whole number ≥ 2 (a contrastive batch needs two pairs)"),
    (["--batch-size", "64", "--corpus-size", "32"], "--batch-size 64: must be at most --corpus-size 32"),
    (["--seed", "-1"], "--seed -1: must be a whole number in [0, 2^32)"),
    (["--seed", str(2**32)], "--seed 4294967296: must be a whole number in [0, 2^32)"),
    (["--eval-size", "0"], "--eval-size 0: must be a whole number ≥ 1"),
    (["--workers", "-1"], "--workers -1: must be a whole number ≥ 0"),
    (["--model", "ballad-tyni"], "--model ballad-tyni: unknown open_clip architecture; did you mean ballad-tiny"),
])
def test_bad_options_give_one_line_errors_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["pretrain", "--out", str(out), *args])
    assert result.exit_code != 0 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert message in result.output
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        run_pretrain(PretrainConfig(out=str(path), **TINY))
