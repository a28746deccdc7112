"""Phase A trains as the authors' code does by default, and every departure is a flag (issue 11):
model mode (BatchNorm), colour jitter, the lr schedule, best-epoch selection, precision, the workers
default. Plus issue 16: every option checked before work starts, --resume only for an unfinished run of
the same code, one writer per --out."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings

import pytest
import torch
from test_phase_a import TINY, read_log, small_data  # noqa: F401  (small_data is a fixture)

import stages.phase_a.model as pam
import stages.phase_a.run as par
from stages.phase_a.config import PRECISIONS
from pipeline.errors import UserError
from stages.phase_a import PhaseAConfig, Towers, param_digest, run_phase_a

CPU = torch.device("cpu")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """ballad-tiny's seed-0 initialisation saved as a local checkpoint: 'pretrained' weights."""
    from pipeline.models import create_model
    from pipeline.runtime import seed_everything

    seed_everything(0)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    torch.save(create_model("ballad-tiny").model.state_dict(), path)
    return path


def config(data, out, **kw) -> PhaseAConfig:
    """3 steps per epoch (⌊117 / 32⌋) of ballad-tiny on the small dataset."""
    return PhaseAConfig(data=str(data), out=str(out), **{**TINY, "batch_size": 32, "epochs": 2, **kw})


@pytest.fixture(scope="module")
def random_run(small_data, tmp_path_factory):  # noqa: F811
    """All defaults from a random init: train-mode BatchNorm, the authors' schedule, best-val selection."""
    out = tmp_path_factory.mktemp("random") / "run"
    run_phase_a(config(small_data, out, epochs=3, eval_every=1, eval_samples=30))
    return out


@pytest.fixture(scope="module")
def pretrained_run(small_data, init_weights, tmp_path_factory):  # noqa: F811
    """From 'pretrained' weights (frozen statistics by default), the standard schedule, the last epoch."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    run_phase_a(config(small_data, out, pretrained=str(init_weights), schedule="standard", select="last",
                       eval_every=1, eval_samples=30))
    return out


def epoch_lrs(out) -> dict[int, float]:
    lrs = {}
    for row in read_log(out):
        if "loss" in row:
            assert lrs.setdefault(row["epoch"], row["lr"]) == row["lr"], "lr changed within an epoch"
    return lrs


def torch_cosine(lr: float, epochs: int, step_first: bool) -> list[float]:
    """CosineAnnealingLR(T_max=epochs, eta_min=0): stepped before each epoch (the authors) or after."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": that is the point
        for _ in range(epochs):
            if step_first:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            if not step_first:
                sched.step()
    return lrs


# -- model mode ------------------------------------------------------------------------------------------

def test_batchnorm_mode_resolution():
    assert pam.batchnorm_mode("auto", None) == "train"
    assert pam.batchnorm_mode("auto", "openai") == pam.batchnorm_mode("auto", "/w/final.pt") == "frozen"
    assert pam.batchnorm_mode("frozen", None) == "frozen" and pam.batchnorm_mode("train", "openai") == "train"


def test_pretrained_start_freezes_batchnorm_statistics_through_training_and_evaluations(pretrained_run, init_weights):
    init = torch.load(init_weights, weights_only=True)
    final = torch.load(pretrained_run / "final.pt", weights_only=True)
    assert json.loads((pretrained_run / "final.json").read_text())["batchnorm"] == "frozen"
    stats = [k for k in init if k.endswith(BN_STATS)]
    assert stats and all(torch.equal(final[k], init[k]) for k in stats)  # evaluations at epochs 0, 1 restored eval mode
    affine = [k for k in init if k.startswith("visual.bn1.") and not k.endswith(BN_STATS)]
    assert affine and all(not torch.equal(final[k], init[k]) for k in affine)  # affine parameters still learn


def test_random_init_trains_batchnorm_statistics(random_run, init_weights):
    init = torch.load(init_weights, weights_only=True)  # the same seed-0 initialisation
    final = torch.load(random_run / "final.pt", weights_only=True)
    assert json.loads((random_run / "final.json").read_text())["batchnorm"] == "train"
    assert not torch.equal(final["visual.bn1.running_mean"], init["visual.bn1.running_mean"])


def test_accuracy_pass_restores_the_mode_it_found(small_data, tiny_backbone):  # noqa: F811
    from pipeline.text import tokenize_trimmed
    from store.shards import load_dataset

    info = load_dataset(small_data)
    towers = Towers(tiny_backbone.model)
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, [f"a photo of a {c}." for c in info.classnames])
    training = towers.training
    try:
        for mode in ("frozen", "train"):
            pam.set_batchnorm(towers, mode)
            row = pam.split_accuracy(towers, tokens, info.urls("val"), tiny_backbone.eval_transform, samples=30,
                                    batch=16, workers=0, train_counts=info.split("train").class_counts)
            assert 0 <= row["top1"] <= 1
            assert towers.training == (mode == "train") and tiny_backbone.model.visual.bn1.training == (mode == "train")
    finally:
        towers.train(training)


# -- colour jitter ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("jitter", [0.4, 0.0])
def test_phase_a_passes_color_jitter_to_the_train_transform(jitter):
    from torchvision import transforms as T

    from stages.phase_a.data import Transforms

    cfg = PhaseAConfig(data="unused", model="ballad-tiny", color_jitter=jitter)
    bb, _ = pam.build_model(cfg, CPU)
    for epoch in (0, cfg.epochs - 1):  # what each epoch of the run trains on
        found = [t for t in Transforms(cfg, bb).train(epoch).transforms if isinstance(t, T.ColorJitter)]
        assert [t.brightness for t in found] == ([pytest.approx((1 - jitter, 1 + jitter))] if jitter else [])


def test_the_default_transforms_are_the_factorys_the_authors(tiny_backbone):
    """--train-transform ballad and --eval-transform ballad (the defaults) are the model factory's
    transforms, the authors' (pipeline/transforms.py ``build_transforms``), step for step."""
    from stages.phase_a.data import Transforms

    cfg = PhaseAConfig(data="unused", model="ballad-tiny")
    made = Transforms(cfg, tiny_backbone)
    assert repr(made.eval) == repr(tiny_backbone.eval_transform)
    assert all(repr(made.train(e)) == repr(tiny_backbone.train_transform) for e in range(cfg.epochs))


# -- loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ce", "logit-adjusted"])
def test_the_registrys_ce_and_logit_adjusted_losses_are_phase_as_bit_for_bit(tiny_backbone, loss):
    """Phase A's step with the registry's loss (pipeline/losses.py ``make_loss``) gives the very loss and
    gradients of cross-entropy of the logits (+ τ·log prior) written out, with gradient accumulation."""
    import torch.nn.functional as F

    from pipeline.losses import make_loss
    from pipeline.prior import log_prior
    from pipeline.text import tokenize_trimmed

    counts = [5, 2, 1]
    tokens = tokenize_trimmed(tiny_backbone.tokenizer, ["a photo of a cat.", "a photo of a dog.", "a photo of an owl."])
    x, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 0, 1])
    cfg = PhaseAConfig(data="unused", model="ballad-tiny", loss=loss, la_tau=1.5)
    bias = 1.5 * log_prior(counts) if loss == "logit-adjusted" else None
    towers = Towers(tiny_backbone.model)
    pam.set_batchnorm(towers, "frozen")
    results = []
    for loss_fn in (make_loss(cfg, counts, device=CPU), None):
        towers.zero_grad(set_to_none=True)
        if loss_fn is None:  # the loss written out, as Phase A computed it before the registry
            def loss_fn(logits, labels):
                return F.cross_entropy(logits if bias is None else logits + bias, labels)
        value = pam.train_step(towers, tokens, [(x[:2], y[:2]), (x[2:], y[2:])], 14.3, loss_fn)
        results.append((value, {n: p.grad.clone() for n, p in towers.named_parameters() if p.grad is not None}))
    (got, grads), (want, ref) = results
    assert got == want and grads.keys() == ref.keys() and all(torch.equal(grads[n], ref[n]) for n in ref)


# -- schedule --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs", [1, 3, 50])
def test_epoch_lr_is_torch_cosine_stepped_the_authors_way_or_the_standard_way(epochs):
    from pipeline.schedule import epoch_lr

    authors = [epoch_lr(0.2, e, epochs, "authors") for e in range(epochs)]
    standard = [epoch_lr(0.2, e, epochs, "standard") for e in range(epochs)]
    assert authors == pytest.approx(torch_cosine(0.2, epochs, step_first=True), abs=1e-12)
    assert standard == pytest.approx(torch_cosine(0.2, epochs, step_first=False), abs=1e-12)
    assert authors[-1] == 0 and standard[0] == 0.2


def test_phase_a_runs_each_epoch_at_the_schedules_lr(random_run, pretrained_run):
    lr = TINY["lr"]
    assert list(epoch_lrs(random_run).values()) == pytest.approx(torch_cosine(lr, 3, step_first=True), abs=1e-12)
    assert list(epoch_lrs(pretrained_run).values()) == pytest.approx(torch_cosine(lr, 2, step_first=False), abs=1e-12)


@pytest.mark.parametrize("epochs, schedule, zero", [(1, "authors", [1]), (2, "authors", [2]), (50, "authors", [50]),
                                                    (1, "standard", []), (50, "standard", []),
                                                    (10**9, "authors", [10**9 - 3, 10**9 - 2, 10**9 - 1, 10**9])])
def test_the_epochs_at_lr_0_are_those_the_schedule_gives_lr_0(epochs, schedule, zero):
    """Found by bisection, so that even 2^63 − 1 epochs (the largest --epochs) take no time."""
    from pipeline.schedule import epoch_lr, zero_lr_epochs

    assert list(zero_lr_epochs(epochs, schedule)) == zero
    assert [e + 1 for e in range(max(0, epochs - 60), epochs) if epoch_lr(0.2, e, epochs, schedule) == 0] == zero[-60:]
    assert len(zero_lr_epochs(2**63 - 1, schedule)) > 0


def test_a_run_in_which_no_epoch_trains_is_refused_and_two_epochs_run(small_data, tmp_path, caplog):  # noqa: F811
    """Issue 22: `--epochs 1` on the authors' schedule ran its one epoch at lr 0 and reported success."""
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "out"
    args = ["phase-a", "--data", str(small_data), "--model", "ballad-tiny", "--out", str(out), "--optimizer", "adamw",
            "--lr", "1e-3", "--weight-decay", "0.05", "--workers", "0", "--shuffle-buffer", "50", "--batch-size", "32"]
    result = CliRunner().invoke(main, [*args, "--epochs", "1"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert result.output == ("Error: --epochs 1: with --schedule authors every epoch would run at lr 0 and no weight "
                             "would change (the authors' schedule keeps the last epoch at lr 0); pass --epochs 2 or "
                             "more, or --schedule standard\n")
    assert not out.exists()
    with caplog.at_level(logging.INFO, logger="ballad.schedule"):
        result = CliRunner().invoke(main, [*args, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "epoch 2 of 2 runs at lr 0, where the cosine has reached 0 (with --schedule authors" in caplog.text
    assert list(epoch_lrs(out).values()) == pytest.approx([1e-3 / 2, 0.0], abs=1e-12)


# -- best-epoch selection --------------------------------------------------------------------------------

def test_best_val_selects_the_best_epoch_on_the_full_val_split(random_run):
    meta = json.loads((random_run / "final.json").read_text())
    rows = read_log(random_run)
    vals = [r for r in rows if "val_acc" in r]
    assert [r["epoch"] for r in vals] == [1, 2, 3]
    best = max(vals, key=lambda r: r["val_acc"])  # the first of equals: ties keep the earlier epoch
    assert meta["select"] == "best-val"
    assert (meta["selected_epoch"], meta["val_acc"]) == (best["epoch"], best["val_acc"])
    chosen = torch.load(random_run / "best.pt", weights_only=True)
    assert chosen["epoch"] == best["epoch"]
    assert param_digest(torch.load(random_run / "final.pt", weights_only=True)) == param_digest(chosen["model"])
    assert meta["eval"] == next(r for r in rows if "test_acc" in r and r["epoch"] == best["epoch"])


class ScriptedVal:
    """Stands in for split_accuracy: scripted val accuracies; records the weights each epoch ended with."""

    def __init__(self, accuracies):
        self.accuracies, self.digests = list(accuracies), {}

    def __call__(self, towers, tokens, urls, transform, *, samples, desc, **kw):
        assert desc == "phase-a val" and samples == 30  # the full val split (1 image per class)
        epoch = len(self.digests) + 1
        self.digests[epoch] = param_digest(towers.clip.state_dict())
        return {"top1": self.accuracies[epoch - 1], "many": None, "medium": None, "few": None}


@pytest.mark.slow  # three epochs
def test_final_weights_are_the_best_epochs_and_ties_keep_the_earlier(small_data, tmp_path, monkeypatch):  # noqa: F811
    val = ScriptedVal([0.5, 0.7, 0.7])
    monkeypatch.setattr(par, "split_accuracy", val)
    final = run_phase_a(config(small_data, tmp_path / "run", epochs=3, schedule="standard"))
    meta = json.loads((tmp_path / "run" / "final.json").read_text())
    assert (meta["selected_epoch"], meta["val_acc"]) == (2, 0.7)
    assert param_digest(torch.load(final, weights_only=True)) == val.digests[2] != val.digests[3]
    assert meta["rank_param_digests"] == [val.digests[3]]  # the ranks' check is on the weights training ended with


@pytest.mark.slow  # three epochs, then a resumed run
def test_a_kill_between_last_and_best_checkpoint_keeps_the_best_weights(small_data, tmp_path, monkeypatch,  # noqa: F811
                                                                        caplog):
    val = ScriptedVal([0.7, 0.9, 0.6])
    monkeypatch.setattr(par, "split_accuracy", val)
    save_best, calls = par.save_best, []

    def killed_on_second_best(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # epoch 2 is the new best: last.pt holds it, best.pt still holds epoch 1
        save_best(*args)

    monkeypatch.setattr(par, "save_best", killed_on_second_best)
    cfg = config(small_data, tmp_path / "run", epochs=3, save_every=100)
    with pytest.raises(KeyboardInterrupt):
        run_phase_a(cfg)
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1

    monkeypatch.setattr(par, "save_best", save_best)
    with caplog.at_level(logging.INFO, logger="ballad.phase_a"):
        final = run_phase_a(dataclasses.replace(cfg, resume=True))
    assert "at step 6 of 9" in caplog.text
    assert json.loads((tmp_path / "run" / "final.json").read_text())["selected_epoch"] == 2
    assert param_digest(torch.load(final, weights_only=True)) == val.digests[2] != val.digests[3]
    assert epoch_lrs(tmp_path / "run") == pytest.approx(dict(enumerate(torch_cosine(TINY["lr"], 3, True), 1)))


def test_select_best_val_needs_a_val_split(small_data, tmp_path):  # noqa: F811
    data = shutil.copytree(small_data, tmp_path / "noval")
    meta = json.loads((data / "dataset.json").read_text())
    del meta["splits"]["val"]
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="--select best-val: .*dataset.json has no val split; pass --select last"):
        run_phase_a(config(data, tmp_path / "out", select="best-val"))
    assert par.selection(config(data, tmp_path / "out"), par.load_dataset(data)) == "last"  # auto


# -- precision -------------------------------------------------------------------------------------------

def test_fp16_weights_are_refused_on_cpu_before_any_work(small_data, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="^--precision fp16-weights: .*CUDA") as e:
        run_phase_a(config(small_data, tmp_path / "out", precision="fp16-weights", device="cpu"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_fp16_weights_train_in_fp16_without_a_master_copy(tiny_backbone):
    """The authors' numerics, checked on CPU (whose fp16 kernels suffice for ballad-tiny): fp16 weights,
    gradients and momentum, logits in fp32, and one SGD step at lr 1e-5 that rounds to nothing in fp16
    where the fp32 weights move."""
    from pipeline.text import tokenize_trimmed

    tokens = tokenize_trimmed(tiny_backbone.tokenizer, ["a photo of a cat.", "a photo of a dog."])
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1])
    unchanged = {}
    for precision in PRECISIONS:
        cfg = PhaseAConfig(data="unused", model="ballad-tiny", precision=precision)
        bb, _ = pam.build_model(cfg, CPU)
        towers = Towers(bb.model, precision)
        pam.set_batchnorm(towers, "frozen")
        conv = bb.model.visual.conv1.weight
        before = conv.detach().clone()
        opt = pam.make_optimizer(cfg, bb.model)
        image, text = towers(x, tokens)
        assert pam.cosine_logits(image, text, 100.0).dtype == torch.float32
        loss = pam.train_step(towers, tokens, [(x, y)], 100.0)
        assert torch.isfinite(torch.tensor(loss)) and conv.grad.dtype == conv.dtype
        opt.step()
        assert opt.state[conv]["momentum_buffer"].dtype == conv.dtype  # the optimizer holds these very tensors
        unchanged[precision] = (conv.detach() == before).float().mean().item()
        assert conv.dtype == (torch.float16 if precision == "fp16-weights" else torch.float32)
    assert unchanged["fp16-weights"] > 0.9 and unchanged["fp32"] < 0.25  # here: 100% and 5%


# -- workers default -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (16, 4)])
def test_workers_default_is_capped_at_the_usable_cores(monkeypatch, cores, expected):
    import click

    from cli.phase_a import phase_a

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert PhaseAConfig(data="d", model="m").workers == expected
    option = next(p for p in phase_a.params if p.name == "workers")
    assert option.get_default(click.Context(phase_a), call=True) == expected


# -- options, resume, lock (issue 16) --------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "--lr -1.0: must be above 0 and finite"),
    (["--lr", "nan"], "--lr nan: must be above 0 and finite"),
    (["--lr", "inf"], "--lr inf: must be above 0 and finite"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be 0 or more and finite"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1) and finite"),
    (["--logit-scale", "0"], "--logit-scale 0.0: must be above 0 and at most 10000 (what a feature store accepts)"),
    (["--logit-scale", "inf"], "--logit-scale inf: must be above 0 and at most 10000 (what a feature store "
                                   "accepts)"),
    (["--logit-scale", "20000"], "--logit-scale 20000.0: must be above 0 and at most 10000 (what a feature store "
                                 "accepts)"),
    (["--color-jitter", "-0.5"], "--color-jitter -0.5: must be 0 (off) or more and finite"),
    (["--color-jitter", "nan"], "--color-jitter nan: must be 0 (off) or more and finite"),
    (["--workers", "-1"], "--workers -1: must be 0 or more"),
    (["--shuffle-buffer", "-1"], "--shuffle-buffer -1: must be 0 or more"),
    (["--eval-every", "-1"], "--eval-every -1: must be 0 or more"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--micro-batch", "0"], "--micro-batch 0: must be at least 1"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--eval-samples", "0"], "--eval-samples 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be a whole number in [0, 2^32)"),
])
def test_every_option_is_checked_before_work_starts(small_data, tmp_path, args, message):  # noqa: F811
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["phase-a", "--data", str(small_data), "--model", "ballad-tiny",
                                       "--out", str(out), *args])
    assert result.exit_code != 0 and result.output == f"Error: {message}\n"
    assert not out.exists()


def test_unknown_choices_from_python_are_one_line_errors(small_data, tmp_path):  # noqa: F811
    for key in ("schedule", "batchnorm", "select", "precision", "optimizer"):
        with pytest.raises(UserError, match=f"^--{key} bogus: choose one of "):
            run_phase_a(config(small_data, tmp_path / "out", **{key: "bogus"}))


def test_resume_starts_over_after_a_finished_run_or_another_code_version(small_data, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    cfg = config(small_data, out, epochs=1, batch_size=58, select="last", schedule="standard", resume=True)
    run_phase_a(cfg)  # 2 steps
    last = torch.load(out / "last.pt", weights_only=True)
    with caplog.at_level(logging.INFO, logger="ballad.phase_a"):
        run_phase_a(cfg)
        assert "is a finished run (step 2 of 2): starting a new run from step 0" in caplog.text
        assert [r["step"] for r in read_log(out)] == [1, 2]  # retrained, the old rows gone

        caplog.clear()
        torch.save({**last, "step": 1}, out / "last.pt")  # an unfinished run of this code continues
        run_phase_a(cfg)
        assert "resuming" in caplog.text and "at step 1 of 2" in caplog.text

        caplog.clear()
        torch.save({**last, "step": 1, "source_digest": "0" * 64}, out / "last.pt")  # ... of other code does not
        run_phase_a(cfg)
        assert "written by another version of the code" in caplog.text and "resuming" not in caplog.text
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_a_second_writer_of_the_same_out_gets_a_one_line_error(small_data, tmp_path):  # noqa: F811
    from pipeline.locks import exclusive_lock

    out = tmp_path / "run"
    with exclusive_lock(out):
        with pytest.raises(UserError, match=r"^--out .*run: process \d+ is writing it") as e:
            run_phase_a(config(small_data, out))
    assert "\n" not in str(e.value) and not (out / "last.pt").exists()
