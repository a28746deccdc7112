"""Phase A: exact text truncation and accumulation, checkpoints, resume after SIGKILL, DDP, bad input."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from stages.phase_a.config import PhaseAConfig
from stages.phase_a.model import Towers, param_digest, set_batchnorm, train_step
from stages.phase_a.run import run_phase_a
from stages.phase_a.state import last_checkpoint
from test_images import HOSTILE

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="ballad-tiny", optimizer="adamw", lr=1e-3, weight_decay=0.05, workers=0, shuffle_buffer=50)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """117 train images over 30 classes (8 → 2 per class) in 3 shards; ~4 s per epoch of ballad-tiny on CPU."""
    from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic

    return prepare_synthetic(SyntheticConfig(out=str(tmp_path_factory.mktemp("pa") / "shapes"), max_count=8,
                                             imbalance=4, test_per_class=1, val_per_class=1, shard_size=40))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "phase-a", *args]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "BALLAD_PROGRESS": "0", "PYTHONPATH": str(ROOT)}


def kill_after_first_save(args: list[str], out: Path, tmp_path: Path) -> None:
    """Runs `phase-a args` in a subprocess and SIGKILLs it as soon as it has written ``out``/last.pt."""
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cli(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]


@pytest.mark.parametrize("name", ["ballad-tiny", "RN50"])
def test_truncated_prompts_encode_exactly_like_the_full_context(name):
    from pipeline.models import create_model
    from pipeline.text import class_prompts, encode_text, tokenize_trimmed

    torch.manual_seed(0)
    bb = create_model(name)
    prompts = class_prompts(["red circle", "a very long class name with many words in it", "x"], "a photo of a {}.")
    short = tokenize_trimmed(bb.tokenizer, prompts)
    full = bb.tokenizer(prompts)
    assert short.shape[1] < full.shape[1]
    with torch.no_grad():
        diff = (encode_text(bb.model, short) - bb.model.encode_text(full)).abs().max().item()
    assert diff < 1e-5


def test_micro_batches_give_the_full_batch_gradient(tiny_backbone):
    from pipeline.text import tokenize_trimmed

    model = tiny_backbone.model
    training = model.training
    # With the authors' frozen BatchNorm statistics (--batchnorm frozen, Phase A's mode from pretrained
    # weights) the accumulated gradient equals the full batch's with no special casing in train_step.
    towers = Towers(model)
    set_batchnorm(towers, "frozen")
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, [f"a photo of a {c}." for c in ("cat", "dog", "red fox")])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
    grads = []
    try:
        for split in ([8], [2, 2, 4]):
            model.zero_grad(set_to_none=True)
            loss = train_step(towers, tokens, list(zip(x.split(split), y.split(split))), 14.3)
            grads.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    (loss_full, full), (loss_acc, acc) = grads
    assert loss_full == pytest.approx(loss_acc, abs=1e-5)
    assert len(full) == len(acc) and any(g.abs().sum() > 0 for g in full)
    assert max((a - b).abs().max().item() for a, b in zip(full, acc)) < 1e-5


def step_gradients(towers, tokens, x, y, split) -> tuple[float, dict[str, torch.Tensor]]:
    """One train_step from zero gradients: its loss and every parameter's gradient."""
    towers.zero_grad(set_to_none=True)
    loss = train_step(towers, tokens, list(zip(x.split(split), y.split(split))), 14.3)
    return loss, {n: p.grad.clone() for n, p in towers.named_parameters() if p.grad is not None}


def assert_same_gradients(got, ref) -> None:
    """Each gradient to 1e-5 of its largest entry, or of 1e-3 of the largest anywhere when that is more: a
    gradient that is zero in exact arithmetic (a key bias before softmax) is rounding noise on both sides."""
    assert set(got) == set(ref)
    floor = 1e-3 * max(g.abs().max().item() for g in ref.values())
    worst = max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=floor)).item() for n in ref)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("split", [[8], [2, 2, 4]])
def test_text_chunks_give_the_same_loss_and_gradients(tiny_backbone, split):
    from pipeline.text import tokenize_trimmed

    model, training = tiny_backbone.model, tiny_backbone.model.training
    prompts = [f"a photo of a {a} {b}." for a in ("red", "striped", "small", "Quercus", "dark green", "tiny")
               for b in ("fox", "agrifolia", "cat", "square")]  # 24 prompts of several lengths
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, prompts)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, len(prompts), (8,), generator=g)
    towers = Towers(model)
    set_batchnorm(towers, "frozen")
    try:
        ref_loss, ref = step_gradients(towers, tokens, x, y, split)
        assert any(n.startswith("clip.visual.") for n in ref) and any(n.startswith("clip.transformer.") for n in ref)
        assert all(ref[n].abs().max() > 0 for n in ref if not n.startswith("clip.visual."))
        for chunk in (1, 3, 7, len(prompts)):
            towers.text_chunk = chunk
            loss, got = step_gradients(towers, tokens, x, y, split)
            assert loss == pytest.approx(ref_loss, rel=1e-6)
            assert_same_gradients(got, ref)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)


@pytest.mark.parametrize("variant", ["grad-checkpointing", "frozen text tower"])
def test_text_chunks_with_checkpointing_and_a_frozen_text_tower(variant):
    from pipeline.models import create_model
    from pipeline.tuning import add_tuning, mark_trainable
    from pipeline.text import tokenize_trimmed

    torch.manual_seed(0)
    bb = create_model("ballad-tiny-vit")
    if variant == "grad-checkpointing":
        bb.model.set_grad_checkpointing(True)
    else:  # --tune bias-norm: the text tower does not train, its chunks only bound the no-grad pass
        add_tuning(bb.model, "bias-norm", num_classes=10)
        mark_trainable(bb.model, "bias-norm", text=False)
    tokens = tokenize_trimmed(bb.tokenizer, [f"a photo of a {c} {i}." for c in ("fox", "red oak") for i in range(5)])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    towers = Towers(bb.model)
    set_batchnorm(towers, "frozen")
    ref_loss, ref = step_gradients(towers, tokens, x, y, [2, 4])
    assert any(n.startswith("clip.transformer.") for n in ref) == (variant == "grad-checkpointing")
    towers.text_chunk = 3
    loss, got = step_gradients(towers, tokens, x, y, [2, 4])
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_same_gradients(got, ref)


def test_a_head_initialised_in_text_chunks_is_the_whole_one(tiny_backbone):
    from pipeline.text import tokenize_trimmed
    from stages.phase_a.model import text_head

    prompts = [f"a photo of a {c} {i}." for c in ("fox", "oak") for i in range(5)]
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, prompts)
    whole = text_head(tiny_backbone.model, tokens)
    assert whole.shape[0] == 10 and (text_head(tiny_backbone.model, tokens, 3) - whole).abs().max() < 1e-6


@pytest.mark.slow
def test_a_run_in_text_chunks_ends_with_the_same_weights(small_data, tmp_path, single_thread):
    # SGD at a modest lr with frozen BatchNorm statistics, so that rounding stays rounding: AdamW turns the noise
    # of a gradient that is zero in exact arithmetic (the attention pool's key bias) into steps of size lr, and
    # a random init trained fast in train mode amplifies 1e-7 into 1e-3 within 14 steps, chunks or not.
    states, recipe = [], {**TINY, "optimizer": "sgd", "lr": 0.01, "batchnorm": "frozen"}
    for chunk in (None, 7):  # 30 classes: chunks of 7, 7, 7, 7, 2
        out = tmp_path / f"chunk{chunk}"
        run_phase_a(PhaseAConfig(data=str(small_data), out=str(out), epochs=2, batch_size=16, micro_batch=8,
                                 text_chunk=chunk, select="last", **recipe))
        states.append(torch.load(out / "final.pt", weights_only=True))
    (ref, got), start = states, create_model_state()
    assert set(ref) == set(got)
    worst = max(((ref[k].float() - got[k].float()).abs().max() / ref[k].float().abs().max().clamp(min=1e-3)).item()
                for k in ref)
    assert worst < 1e-5, worst
    assert any(not torch.equal(ref[k], start[k]) for k in ref if k.startswith("transformer."))  # the text tower trained


def create_model_state() -> dict[str, torch.Tensor]:
    """ballad-tiny's weights as Phase A's run starts from them (seed 0, random init)."""
    from pipeline.runtime import seed_everything
    from pipeline.models import create_model

    seed_everything(0)
    return create_model("ballad-tiny").model.state_dict()


def test_resumed_epoch_continues_the_same_sample_order(small_data, tiny_backbone):
    from stages.phase_a.data import train_batches
    from store.shards import load_dataset

    urls = load_dataset(small_data).urls("train")
    for workers in (0, 2):
        def keys(consumed, n):
            it = train_batches(urls, tiny_backbone.eval_transform, seed=3, epoch=1, micro_batch=4, workers=workers,
                               shuffle_buffer=20, distributed=False, consumed=consumed)
            return [list(next(it)[0]) for _ in range(n)]

        assert keys(0, 8)[5:] == keys(5, 3)
        assert keys(0, 3) != keys(5, 3)


def test_train_writes_log_checkpoints_and_an_open_clip_state_dict(small_data, tmp_path, caplog):
    from pipeline.models import create_model
    from pipeline.runtime import seed_everything, sha256_file

    out = tmp_path / "run"
    final = run_phase_a(PhaseAConfig(data=str(small_data), out=str(out), epochs=2, batch_size=16, eval_every=2,
                                     eval_samples=30, select="last", **TINY))
    rows = read_log(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "test_acc" in r]
    assert [r["step"] for r in steps] == list(range(1, 15))  # ⌊117 / 16⌋ = 7 steps per epoch
    assert len({r["lr"] for r in steps[:7]}) == len({r["lr"] for r in steps[7:]}) == 1  # stepped per epoch
    assert [r["epoch"] for r in evals] == [0, 2] and all(r["images_per_s"] > 0 for r in steps)
    assert not any("val_acc" in r for r in rows)  # --select last: no validation passes
    assert sum(r["loss"] for r in steps[-4:]) < sum(r["loss"] for r in steps[:4])

    meta = json.loads((out / "final.json").read_text())
    assert meta["sha256"] == sha256_file(final) and meta["steps"] == 14 and meta["eval"] == evals[-1]
    assert meta["select"] == "last" and meta["selected_epoch"] == 2 and meta["val_acc"] is None
    assert meta["rank_param_digests"] == [param_digest(torch.load(final, weights_only=True))]
    trained = create_model("ballad-tiny", pretrained=str(final)).model.state_dict()
    seed_everything(0)
    init = create_model("ballad-tiny").model.state_dict()
    assert torch.equal(trained["logit_scale"], init["logit_scale"])  # held fixed
    assert not torch.equal(trained["visual.conv1.weight"], init["visual.conv1.weight"])
    assert not torch.equal(trained["token_embedding.weight"], init["token_embedding.weight"])
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 14 and last["config"]["epochs"] == 2 and "torch" in last["rng"]

    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_phase_a(PhaseAConfig(data=str(small_data), out=str(out), epochs=2, batch_size=16, select="last", **TINY))
    unfinished = out / "unfinished.pt"  # as if killed after step 9
    torch.save({**last, "step": 9}, unfinished)
    same = PhaseAConfig(data=str(small_data), out=str(out), epochs=2, batch_size=16, select="last", resume=True, **TINY)
    fingerprint = meta["dataset"]["fingerprint"]
    assert last_checkpoint(same, unfinished, 14, fingerprint)["step"] == 9
    other = PhaseAConfig(data=str(small_data), out=str(out), epochs=2, batch_size=16, select="last", resume=True,
                         **{**TINY, "lr": 2e-3})
    with caplog.at_level(logging.WARNING, logger="ballad.phase_a"):
        assert last_checkpoint(other, unfinished, 14, fingerprint) is None  # as after a params edit
        assert last_checkpoint(same, unfinished, 14, "another dataset") is None
    assert "--lr 0.001 → 0.002" in caplog.text and "is another dataset" in caplog.text


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_the_saved_step(small_data, tmp_path, caplog):
    out = tmp_path / "run"
    args = ["--data", str(small_data), "--model", "ballad-tiny", "--out", str(out), "--epochs", "1", "--schedule",
            "standard", "--batch-size", "16", "--save-every", "2", "--optimizer", "adamw", "--lr", "1e-3",
            "--weight-decay", "0.05", "--workers", "0", "--shuffle-buffer", "50"]
    kill_after_first_save(args, out, tmp_path)
    assert not (out / "final.pt").exists()
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 2 <= saved < 7
    before = [r for r in read_log(out) if r["step"] <= saved]

    with caplog.at_level(logging.INFO, logger="ballad.phase_a"):
        run_phase_a(PhaseAConfig(data=str(small_data), out=str(out), epochs=1, schedule="standard", batch_size=16,
                                 save_every=2, resume=True, **TINY))
    assert f"at step {saved} of 7" in caplog.text
    rows = read_log(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 8))  # each step once: no restart, no gap
    assert rows[:saved] == before and [r["step"] for r in rows if "val_acc" in r] == [7]
    meta = json.loads((out / "final.json").read_text())
    assert meta["steps"] == 7 and meta["select"] == "best-val" and meta["selected_epoch"] == 1


def one_shard_dataset(src: Path, dst: Path, copies: int) -> Path:
    """``src``'s first train shard, listed ``copies`` times (as separate files) in a new dataset."""
    from store.shards import read_shard

    copy_data(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    counts = [0] * len(meta["classnames"])
    for sample in read_shard(dst / "train" / "shard-000000.tar"):
        counts[sample.label] += copies
    for i in range(1, copies):
        shutil.copy(dst / "train" / "shard-000000.tar", dst / "train" / f"copy-{i}.tar")
    meta["splits"]["train"] = {"shards": ["train/shard-000000.tar"] + [f"train/copy-{i}.tar" for i in range(1, copies)],
                               "num_samples": sum(counts), "class_counts": counts, "skipped": []}
    (dst / "dataset.json").write_text(json.dumps(meta))
    rerecord_shards(dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("chunks, sgd", [([], {}), (["--text-chunk", "7"], {"optimizer": "sgd", "lr": 0.01,
                                                                               "batchnorm": "frozen"})],
                         ids=["whole", "text-chunk"])
def test_two_process_ddp_matches_a_single_process_run(small_data, tmp_path, chunks, sgd):
    # Rank r reads shard r. With two identical shards (and the same seed) both ranks draw the same samples and
    # crops, so DDP over 2 × 8 images must reproduce a single process taking 8 of them per step. Both select
    # the best epoch on val, which the main process alone evaluates while the other waits for the next step.
    # With --text-chunk the DDP processes take the text tower's gradient in chunks of 7 of the 30 prompts, every
    # chunk but the last outside the synchronising backward; the single process takes it whole. That run trains
    # as test_a_run_in_text_chunks_ends_with_the_same_weights does, so that rounding stays rounding.
    twice, once = one_shard_dataset(small_data, tmp_path / "twice", 2), one_shard_dataset(small_data, tmp_path / "once", 1)
    recipe = ["--model", "ballad-tiny", "--epochs", "2", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay",
              "0.05", "--workers", "0", "--shuffle-buffer", "50"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cli", "phase-a", "--data", str(twice), "--batch-size", "16", *recipe, *chunks,
                          *(f"--{k.replace('_', '-')}={v}" for k, v in sgd.items()),
                          "--out", str(tmp_path / "ddp")], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes, so both runs use the same kernels
    try:
        run_phase_a(PhaseAConfig(data=str(once), out=str(tmp_path / "single"), epochs=2, batch_size=8,
                                 **{**TINY, **sgd}))
    finally:
        torch.set_num_threads(threads)

    meta = json.loads((tmp_path / "ddp" / "final.json").read_text())
    digests = meta["rank_param_digests"]
    assert meta["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert meta["select"] == "best-val" and meta["selected_epoch"] in (1, 2)
    ddp_state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]  # where training ended
    assert digests[0] == param_digest(ddp_state)
    a = [r["loss"] for r in read_log(tmp_path / "ddp") if "loss" in r]
    b = [r["loss"] for r in read_log(tmp_path / "single") if "loss" in r]
    assert len(a) == len(b) == 10  # ⌊80 / 16⌋ = ⌊40 / 8⌋ = 5 steps per epoch
    assert a == pytest.approx(b, abs=1e-4) and a[0] != a[-1]
    single_state = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    assert max((ddp_state[k] - single_state[k]).abs().max().item() for k in ddp_state) < 1e-4


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rerecord_shards(data: Path) -> None:
    """Record the shards' new sizes and hashes in dataset.json after a test rewrote them on purpose."""
    from pipeline.runtime import sha256_file

    meta = json.loads((data / "dataset.json").read_text())
    for split in meta["splits"].values():
        paths = [data / rel for rel in split["shards"]]
        if split.get("shard_bytes") is not None:
            split["shard_bytes"] = [p.stat().st_size for p in paths]
        if split.get("shard_sha256") is not None:
            split["shard_sha256"] = [sha256_file(p) for p in paths]
    (data / "dataset.json").write_text(json.dumps(meta))


def test_bad_input_gives_one_line_errors(small_data, tmp_path):
    from click.testing import CliRunner

    from cli import main

    def fails(match, data=small_data, **kw):
        cfg = PhaseAConfig(data=str(data), out=str(tmp_path / "out"),
                           **{**TINY, "epochs": 1, "schedule": "standard", "batch_size": 16, **kw})
        with pytest.raises(UserError, match=match) as e:
            run_phase_a(cfg)
        assert "\n" not in str(e.value)

    fails("did you mean ballad-tiny", model="ballad-tiyn")
    fails("--batch-size 500: larger than the 117", batch_size=500)
    fails("--micro-batch 5: must divide the per-process batch of 16", micro_batch=5)
    bad_ckpt = tmp_path / "other.pt"
    torch.save({"logit_scale": torch.zeros(()), "visual.conv1.weight": torch.zeros(1)}, bad_ckpt)
    fails("does not match architecture ballad-tiny", pretrained=str(bad_ckpt))

    data = copy_data(small_data, tmp_path / "missing")
    (data / "train" / "shard-000001.tar").unlink()
    fails("shard-000001.tar: shard listed in dataset.json is missing", data=data)
    (data / "train" / "shard-000001.tar").write_bytes(b"")
    fails("shard-000001.tar: empty shard", data=data)

    data = copy_data(small_data, tmp_path / "inconsistent")
    meta = json.loads((data / "dataset.json").read_text())
    counts = meta["splits"]["train"]["class_counts"]
    counts[0], counts[1] = counts[0] - 1, counts[1] + 1
    (data / "dataset.json").write_text(json.dumps(meta))
    fails("split 'train' lists .* samples of class 0 .* but its shards hold", data=data)

    result = CliRunner().invoke(main, ["phase-a", "--data", str(tmp_path / "nowhere"), "--model", "ballad-tiny"])
    assert result.exit_code != 0 and result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_corrupt_samples_fail_or_are_skipped_and_counted_with_skip_bad(small_data, tmp_path, tiny_backbone):
    from stages.phase_a.data import BadSampleCounter, train_batches
    from store.shards import Sample, load_dataset, read_shard, write_shard

    data = copy_data(small_data, tmp_path / "corrupt")
    shard = data / "train" / "shard-000000.tar"
    bad_keys = {s.key for s in read_shard(shard)}
    write_shard(shard, [Sample(s.key, s.ext, b"not an image", s.label) for s in read_shard(shard)])
    rerecord_shards(data)  # a whole shard of undecodable images, not a damaged file

    counter = BadSampleCounter()
    it = train_batches(load_dataset(data).urls("train"), tiny_backbone.eval_transform, seed=0, epoch=0, micro_batch=8,
                       workers=2, shuffle_buffer=20, distributed=False, skip_bad=True, on_bad=counter)
    seen = {k for _ in range(12) for k in next(it)[0]}
    it.close()  # stops the workers now: left to the garbage collector, torch waits 5 s for each
    assert len(seen) == 117 - len(bad_keys) and not seen & bad_keys and counter.value >= len(bad_keys)

    with pytest.raises(UserError, match="sample 'train_0000[0-3][0-9]' in .*shard-000000.tar: unreadable") as e:
        run_phase_a(PhaseAConfig(data=str(data), out=str(tmp_path / "stops"), epochs=1, schedule="standard",
                                 batch_size=16,
                                 **{**TINY, "workers": 1}))
    assert "\n" not in str(e.value)


def _hostile_copy(small_data, dst: Path, split: str, kind: str) -> tuple[Path, Path]:
    """small_data with every image of the split's first shard replaced by a HOSTILE one: (data, that shard)."""
    from store.shards import Sample, read_shard, write_shard

    suffix, image, _ = HOSTILE[kind]
    data = copy_data(small_data, dst)
    shard = data / split / "shard-000000.tar"
    write_shard(shard, [Sample(s.key, suffix, image, s.label) for s in read_shard(shard)])
    rerecord_shards(data)
    return data, shard


def _phase_a_cli(data: Path, out: Path, *args: str):
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, ["phase-a", "--data", str(data), "--out", str(out), "--model", "ballad-tiny",
                                     "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "1", "--schedule", "standard",
                                     "--batch-size", "16", "--workers", "1", "--shuffle-buffer", "50", "--device",
                                     "cpu", *args])


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_train_image_stops_phase_a_with_one_line(small_data, tmp_path, kind):
    data, shard = _hostile_copy(small_data, tmp_path / "data", "train", kind)
    result = _phase_a_cli(data, tmp_path / "out")  # decoded in a loader worker
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert re.fullmatch(rf"Error: sample 'train_\d+' in {re.escape(str(shard))}: unreadable image "
                        rf"\({re.escape(HOSTILE[kind][2])}\); pass --skip-bad to skip unreadable images\n",
                        result.output), result.output
    assert not (tmp_path / "out" / "final.pt").exists()


def test_phase_a_skip_bad_and_max_pixels_in_training_and_validation(small_data, tmp_path):
    data, _ = _hostile_copy(small_data, tmp_path / "train_bad", "train", "bomb")
    result = _phase_a_cli(data, tmp_path / "skipped", "--skip-bad")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "skipped" / "final.json").read_text())
    assert meta["bad_samples"] >= 1 and meta["config"]["skip_bad"] is True
    data, shard = _hostile_copy(small_data, tmp_path / "val_bad", "val", "truncated")
    result = _phase_a_cli(data, tmp_path / "val")  # trains the epoch, then its validation meets the image
    assert result.exit_code != 0 and re.fullmatch(rf"Error: sample 'val_\d+' in {re.escape(str(shard))}: unreadable "
                                                  r"image \(truncated file\); pass --skip-bad to skip unreadable "
                                                  r"images\n", result.output), result.output
    result = _phase_a_cli(small_data, tmp_path / "small", "--max-pixels", "1023")  # 32 × 32 images
    assert result.exit_code != 0 and "unreadable image (decompression bomb: 32×32 = 1,024 pixels, above " \
                                     "--max-pixels 1,023)" in result.output and result.output.count("\n") == 1
    result = _phase_a_cli(small_data, tmp_path / "zero", "--max-pixels", "0")
    assert result.exit_code != 0 and result.output == "Error: --max-pixels 0: must be at least 1\n"


def test_non_finite_loss_stops_with_a_clear_message(small_data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="step 1: loss is nan; stopped without updating the weights"):
        run_phase_a(PhaseAConfig(data=str(small_data), out=str(out), epochs=1, schedule="standard", batch_size=16,
                                 loss="logit-adjusted", la_tau=1e39, **TINY))
    assert not (out / "final.pt").exists() and not (out / "last.pt").exists()
