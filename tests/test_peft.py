"""LIFT's lightweight Phase A (issues 14, 24, 25): every --tune (full, bias-norm, bitfit, layernorm, lora, adaptformer,
adapter, vpt-shallow, vpt-deep, ssf), --classifier text|head,
--loss logit-adjusted; their checkpoints through the factory and extract; resume for every variant."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_phase_a import cli, cli_env, kill_after_first_save, read_log
from test_phase_a import small_data  # noqa: F401  (a fixture)

import stages.phase_a.run as par
from pipeline.errors import UserError
from pipeline.models import create_model
from pipeline.peft import HEAD_KEY, AdaptFormerBlock, lift_width
from pipeline.prior import log_prior
from pipeline.losses import LOSSES, make_loss
from pipeline.runtime import seed_everything
from pipeline.text import tokenize_trimmed
from pipeline.tuning import TUNES, add_tuning, mark_trainable, tuning
from stages.phase_a.config import CLASSIFIERS, PhaseAConfig
from stages.phase_a.model import Towers, cosine_logits, param_digest, text_head, train_step
from stages.phase_a.run import run_phase_a

VIT = dict(model="ballad-tiny-vit", optimizer="adamw", lr=1e-3, weight_decay=0.05, workers=0, shuffle_buffer=50)
CLASSES = ("red circle", "blue square", "green triangle")


def tiny_vit(tune: str = "full", *, classifier: str = "text", seed: int = 0, **kw):
    """ballad-tiny-vit (seed-0 init) with ``tune``'s modules and trainable set, behind Towers, plus prompt tokens."""
    seed_everything(seed)
    bb = create_model("ballad-tiny-vit")
    tokens = tokenize_trimmed(bb.tokenizer, [f"a photo of a {c}." for c in CLASSES])
    add_tuning(bb.model, tune, num_classes=len(CLASSES), **kw)
    mark_trainable(bb.model, tune, text=classifier == "text")
    head = text_head(bb.model, tokens) if classifier == "head" else None
    return bb, Towers(bb.model, head=head), tokens


def images(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g)


def encode(model, x):
    model.eval()
    with torch.no_grad():
        return model.encode_image(x)


def test_lift_width_rule():
    # LIFT's published widths for ViT-B/16 (12 blocks), and the demo's 30 classes on ballad-tiny-vit (6 blocks)
    assert [lift_width(k, 12) for k in (1000, 365, 100)] == [32, 8, 4]
    assert lift_width(8142, 12) == 256  # iNaturalist 2018: configs/lift_inat2018_vit_b16.yaml says so
    assert lift_width(30, 6) == 2 and lift_width(5, 12) == 1


@pytest.mark.parametrize("tune", ["lora", "adaptformer"])
def test_zero_initialised_modules_leave_the_outputs_unchanged(tune, single_thread):
    x, _ = images()
    seed_everything(0)
    model = create_model("ballad-tiny-vit").model
    before = encode(model, x)
    add_tuning(model, tune, num_classes=30)
    added = [n for n, _ in model.named_parameters() if "adaptformer" in n or "parametrizations" in n]
    assert added  # the modules are there, and are zero at initialisation
    assert torch.allclose(encode(model, x), before, atol=1e-5, rtol=0)


def expected_trainable(tune: str, classifier: str, names: list[str]) -> set[str]:
    """The parameter names each variant should train, written out from the rules in pipeline/tuning.py."""
    image = {n for n in names if n.startswith("visual.")}
    blocks = {n for n in image if n.startswith("visual.transformer.resblocks.")}
    norms = (".ln_pre.", ".ln_post.", ".ln_1.", ".ln_2.")
    block_biases = ("attn.in_proj_bias", "attn.out_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias", "ln_1.bias",
                    "ln_2.bias")
    rules = {
        "full": image if classifier == "head" else set(names) - {"logit_scale"},
        "bias-norm": {n for n in image if n.endswith("bias")
                      or (n.endswith(".weight") and any(s in f".{n}" for s in norms))},
        "bitfit": {n for n in blocks if n.endswith(block_biases)},
        "layernorm": {n for n in blocks if n.endswith((".ln_1.weight", ".ln_1.bias", ".ln_2.weight", ".ln_2.bias"))},
        "lora": {n for n in image if ".parametrizations.in_proj_weight.0." in n},
        "adaptformer": {n for n in image if ".adaptformer." in n},
        "adapter": {n for n in image if ".adapter." in n},
        "vpt-shallow": {"visual.transformer.resblocks.0.vpt_prompt"},
        "vpt-deep": {n for n in blocks if n.endswith(".vpt_prompt")},
        "ssf": {n for n in image if ".ssf." in n},
    }
    return rules[tune]


@pytest.mark.parametrize("tune", TUNES)
@pytest.mark.parametrize("classifier", ["text", "head"])
def test_only_the_intended_parameters_receive_gradients(tune, classifier, single_thread):
    bb, towers, tokens = tiny_vit(tune, classifier=classifier)
    x, y = images()
    train_step(towers, tokens, [(x[:2], y[:2]), (x[2:], y[2:])], 14.3)  # with accumulation: the head's own trick
    names = [n for n, _ in bb.model.named_parameters()]
    got = {n for n, p in bb.model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert got == expected_trainable(tune, classifier, names)
    assert (towers.head is not None and towers.head.grad is not None) == (classifier == "head")
    grads = dict(bb.model.named_parameters())
    if tune == "lora":  # B starts at 0, so A's first gradient is 0 and B's is not
        assert all(grads[n].grad.abs().sum() > 0 for n in got if n.endswith(("b_q", "b_v")))
    if tune == "adaptformer":  # the up-projection starts at 0 and learns first
        assert all(grads[n].grad.abs().sum() > 0 for n in got if n.endswith("adaptformer.up.weight"))
    if tune != "full":  # the text tower is frozen and the logit scale is never trained
        assert not any(n.startswith(("transformer.", "token_embedding", "ln_final")) for n in got)


def test_bias_norm_on_a_resnet_tower_trains_batchnorm_affine_and_biases():
    seed_everything(0)
    model = create_model("ballad-tiny").model
    mark_trainable(model, "bias-norm", text=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.bn1.weight" in trained and "visual.bn1.bias" in trained and "visual.attnpool.q_proj.bias" in trained
    assert "visual.conv1.weight" not in trained and "visual.attnpool.q_proj.weight" not in trained
    assert all(n.startswith("visual.") for n in trained)


def test_lora_merged_checkpoint_gives_the_unmerged_outputs(tmp_path, single_thread):
    bb, _, _ = tiny_vit("lora", lora_rank=4)
    with torch.no_grad():  # as after training: B away from its zero start
        for name, p in bb.model.named_parameters():
            if name.endswith(("b_q", "b_v")):
                p.normal_(0, 0.5)
    x, _ = images()
    unmerged = encode(bb.model, x)
    exported = tuning("lora").export(bb.model.state_dict())
    assert not any("parametrizations" in k for k in exported)
    assert set(exported) == set(create_model("ballad-tiny-vit").model.state_dict())  # a plain open_clip state dict
    torch.save(exported, tmp_path / "final.pt")
    merged = create_model("ballad-tiny-vit", pretrained=str(tmp_path / "final.pt")).model
    assert torch.allclose(encode(merged, x), unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(unmerged, encode(create_model("ballad-tiny-vit").model, x), atol=1e-3)


def test_factory_rebuilds_adaptformer_from_the_checkpoint(tmp_path, single_thread):
    bb, _, _ = tiny_vit("adaptformer", adapter_width=4)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if name.endswith("adaptformer.up.weight"):
                p.normal_(0, 0.5)
    x, _ = images()
    torch.save(tuning("adaptformer").export(bb.model.state_dict()), tmp_path / "final.pt")
    rebuilt = create_model("ballad-tiny-vit", pretrained=str(tmp_path / "final.pt")).model
    blocks = rebuilt.visual.transformer.resblocks
    assert all(isinstance(b, AdaptFormerBlock) and b.adaptformer.down.out_features == 4 for b in blocks)
    assert torch.allclose(encode(rebuilt, x), encode(bb.model, x), atol=1e-6, rtol=0)


def test_log_prior_and_the_logit_adjusted_loss_is_cross_entropy_of_shifted_logits(single_thread):
    counts = [50, 10, 0]
    assert log_prior(counts).tolist() == pytest.approx(np.log(np.array([50, 10, 1]) / 61).tolist(), abs=1e-6)
    _, towers, tokens = tiny_vit("full")
    x, y = images()
    bias = make_loss(SimpleNamespace(loss="logit-adjusted", la_tau=1.5), counts)  # train_step's loss_fn
    with torch.no_grad():
        image, text = towers(x, tokens)
        expected = F.cross_entropy(cosine_logits(image, text, 14.3) + 1.5 * torch.log(torch.tensor([50, 10, 1]) / 61), y)
    for split in ([6], [2, 4]):
        towers.zero_grad(set_to_none=True)
        loss = train_step(towers, tokens, list(zip(x.split(split), y.split(split))), 14.3, bias)
        assert loss == pytest.approx(expected.item(), abs=1e-5)
    towers.zero_grad(set_to_none=True)
    assert train_step(towers, tokens, [(x, y)], 14.3) != pytest.approx(expected.item(), abs=1e-3)  # ce differs


def test_head_initialised_from_text_gives_the_zero_shot_logits(single_thread):
    bb, towers, tokens = tiny_vit("bias-norm", classifier="head")
    x, _ = images()
    towers.eval()
    with torch.no_grad():
        image, weights = towers(x, tokens)
        zero_shot = cosine_logits(image, towers.text(tokens), 14.3)
        assert weights is towers.head and torch.allclose(towers.head.norm(dim=1), torch.ones(len(CLASSES)))
        assert torch.allclose(cosine_logits(image, weights, 14.3), zero_shot, atol=1e-5)


# -- stage-level: refusals, options, checkpoints, extract, resume -----------------------------------------

def config(data, out, **kw) -> PhaseAConfig:
    """3 steps per epoch (⌊117 / 32⌋) of ballad-tiny-vit on the small dataset."""
    return PhaseAConfig(data=str(data), out=str(out), **{**VIT, "batch_size": 32, "epochs": 2, **kw})


@pytest.mark.parametrize("tune", [name for name in TUNES if tuning(name).needs_blocks])
def test_resnet_towers_refuse_transformer_tunes_in_one_line(small_data, tmp_path, tune):  # noqa: F811
    from click.testing import CliRunner

    from cli import main

    message = (f"--tune {tune}: needs transformer blocks in the image tower, and the model has a ResNet image "
               "tower; use --tune full or --tune bias-norm")
    with pytest.raises(UserError) as e:
        run_phase_a(config(small_data, tmp_path / "out", model="ballad-tiny", tune=tune))
    assert str(e.value) == message and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["phase-a", "--data", str(small_data), "--model", "RN50", "--tune", tune,
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and result.output == f"Error: {message}\n"


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--adapter-width", "0"], "--adapter-width 0: must be at least 1"),
    (["--la-tau", "-1"], "--la-tau -1.0: must be 0 or more and finite"),
    (["--la-tau", "nan"], "--la-tau nan: must be 0 or more and finite"),
])
def test_new_options_are_checked_before_work_starts(small_data, tmp_path, args, message):  # noqa: F811
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["phase-a", "--data", str(small_data), "--model", "ballad-tiny-vit",
                                       "--out", str(out), *args])
    assert result.output == f"Error: {message}\n" and not out.exists()
    for key in ("tune", "classifier", "loss"):
        with pytest.raises(UserError, match=f"^--{key} bogus: choose one of "):
            run_phase_a(config(small_data, out, **{key: "bogus"}))


def test_cli_choices_and_defaults_are_the_stages(monkeypatch):
    from click.testing import CliRunner

    from cli import main
    from cli.phase_a import phase_a

    params = {p.name: p for p in phase_a.params}
    assert tuple(params["tune"].type.choices) == TUNES and tuple(params["classifier"].type.choices) == CLASSIFIERS
    assert tuple(params["loss"].type.choices) == tuple(LOSSES)
    seen = []
    monkeypatch.setattr(par, "run_phase_a", lambda cfg: seen.append(cfg) or "final.pt")
    result = CliRunner().invoke(main, ["phase-a", "--data", "d", "--model", "m"])
    assert result.exit_code == 0, result.output
    assert seen == [PhaseAConfig(data="d", model="m")]  # every CLI default is the stage's


def test_head_run_writes_the_head_into_final_pt_and_extract_stores_it(small_data, tmp_path,  # noqa: F811
                                                                     single_thread):
    import zarr

    from stages.extract.run import extract

    out = tmp_path / "run"
    final = run_phase_a(config(small_data, out, epochs=1, schedule="standard", tune="adaptformer", classifier="head",
                               head_input="projection", loss="logit-adjusted", select="last"))  # pre-projection: test_heads
    meta = json.loads(final.with_suffix(".json").read_text())
    assert meta["classifier"] == "head" and meta["head_key"] == HEAD_KEY and meta["loss"] == "logit-adjusted"
    assert meta["tuning"] == {"tune": "adaptformer", "adapter_width": 2, "adapter_width_rule": True, "blocks": 6,
                              "module_params": meta["tuning"]["module_params"],
                              "trainable_params": meta["tuning"]["trainable_params"]}
    saved = torch.load(final, weights_only=True)
    head = saved[HEAD_KEY]
    branches = sum(t.numel() for k, t in saved.items() if ".adaptformer." in k)
    assert meta["tuning"]["module_params"] == branches > 0  # the branches alone, the text tower frozen
    assert meta["tuning"]["trainable_params"] == branches + head.numel()
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    assert torch.equal(head, last[HEAD_KEY])
    bb = create_model("ballad-tiny-vit", pretrained=str(final))
    assert torch.equal(bb.head, head)
    with pytest.raises(UserError, match="classifier head has 30 classes, the dataset 10"):
        bb.class_head(10)

    store = tmp_path / "store.zarr"
    extract(str(final), small_data, store, splits=["test"], batch_size=64, workers=0)
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["classifier"] == "head"
    assert np.allclose(root["text/embeddings"][:], F.normalize(head.float(), dim=-1).numpy(), atol=1e-6)
    # the stored features are the adaptformer model's (rebuilt by the factory from final.pt)
    feats = root["test/image"][:]
    assert feats.shape[1] == bb.embed_dim and np.isfinite(feats).all()
    # the same seed-0 initialisation without Phase A: the prompts' text embeddings, which the head started from
    extract("none", small_data, tmp_path / "zs.zarr", model="ballad-tiny-vit", splits=["test"], batch_size=64,
            workers=0)
    zero_shot = zarr.open_group(str(tmp_path / "zs.zarr"), mode="r")
    assert zero_shot.attrs["classifier"] == "text"
    assert not np.allclose(zero_shot["text/embeddings"][:], root["text/embeddings"][:], atol=1e-3)  # it trained


# Each case trains two epochs twice (whole, then cut and resumed); make test-fast keeps one: PEFT modules and a
# head to restore.
VARIANTS = [pytest.param("full", "text", "ce", marks=pytest.mark.slow),
            pytest.param("bias-norm", "head", "logit-adjusted", marks=pytest.mark.slow),
            ("lora", "head", "ce"),
            pytest.param("adaptformer", "text", "logit-adjusted", marks=pytest.mark.slow),
            *(pytest.param(*case, marks=pytest.mark.slow) for case in [  # issue 25's modules, held in last.pt
                ("adapter", "text", "ce"), ("vpt-shallow", "head", "ce"), ("vpt-deep", "text", "logit-adjusted"),
                ("ssf", "head", "ce")])]


@pytest.mark.parametrize("tune, classifier, loss", VARIANTS)
def test_every_variant_resumes_to_the_uninterrupted_run(small_data, tmp_path, monkeypatch, single_thread,  # noqa: F811
                                                        tune, classifier, loss):
    cfg = config(small_data, tmp_path / "whole", save_every=2, select="last", tune=tune, classifier=classifier,
                 loss=loss, lora_rank=4)
    whole = run_phase_a(cfg)

    save = par.save_last

    def killed_after_step_4(run, state):  # mid epoch 2: last.pt holds step 4, as after a kill
        save(run, state)
        if state.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(par, "save_last", killed_after_step_4)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        run_phase_a(cut)
    assert not (tmp_path / "cut" / "final.pt").exists()
    monkeypatch.setattr(par, "save_last", save)
    resumed = run_phase_a(dataclasses.replace(cut, resume=True))

    assert param_digest(torch.load(resumed, weights_only=True)) == param_digest(torch.load(whole, weights_only=True))
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    meta = json.loads(resumed.with_suffix(".json").read_text())
    assert meta["tuning"]["tune"] == tune and meta["classifier"] == classifier and meta["loss"] == loss
    assert {k: meta["config"][k] for k in ("tune", "lora_rank", "adapter_width", "classifier", "loss", "la_tau")} == {
        "tune": tune, "lora_rank": 4, "adapter_width": None, "classifier": classifier, "loss": loss, "la_tau": 1.0}
    assert (HEAD_KEY in torch.load(resumed, weights_only=True)) == (classifier == "head")


@pytest.mark.slow
def test_adaptformer_head_resumes_after_sigkill(small_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["--data", str(small_data), "--model", "ballad-tiny-vit", "--out", str(out), "--epochs", "1",
            "--schedule", "standard", "--batch-size", "16", "--save-every", "2", "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0",
            "--shuffle-buffer", "50", "--tune", "adaptformer", "--classifier", "head", "--loss", "logit-adjusted"]
    kill_after_first_save(args, out, tmp_path)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert 2 <= saved["step"] < 7 and HEAD_KEY in saved["model"]
    resumed = subprocess.run(cli(*args, "--resume"), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {saved['step']} of 7" in resumed.stderr
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 8))
    meta = json.loads((out / "final.json").read_text())
    assert meta["tuning"]["tune"] == "adaptformer" and meta["classifier"] == "head" and math.isclose(
        meta["config"]["la_tau"], 1.0)


# -- LIFT's bias sets and the rank rule (issue 24) ---------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b16():
    """open_clip's ViT-B/16 built without weights (offline): the tower LIFT's counts are stated for."""
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None)


@pytest.mark.parametrize("tune, count", [("bitfit", 101_376), ("layernorm", 36_864)])
def test_lift_bias_sets_have_the_papers_counts_on_vit_b16(vit_b16, tune, count):
    record = add_tuning(vit_b16, tune, num_classes=1000)
    mark_trainable(vit_b16, tune, text=True)
    trained = {n for n, p in vit_b16.named_parameters() if p.requires_grad}
    assert record["module_params"] == count == sum(p.numel() for p in vit_b16.parameters() if p.requires_grad)
    assert all(n.startswith("visual.transformer.resblocks.") for n in trained)  # not ln_pre / ln_post, no text
    assert any(n.endswith("ln_2.bias") for n in trained)


def test_bias_norm_is_the_union_of_the_lift_sets_and_more(vit_b16):
    sets = {}
    for tune in ("bias-norm", "bitfit", "layernorm"):
        mark_trainable(vit_b16, tune, text=False)
        sets[tune] = {n for n, p in vit_b16.named_parameters() if p.requires_grad}
    assert sets["bitfit"] | sets["layernorm"] < sets["bias-norm"]
    assert {"visual.ln_pre.weight", "visual.ln_post.bias"} <= sets["bias-norm"] - sets["bitfit"] - sets["layernorm"]


def test_lora_rank_defaults_to_lifts_width_rule(single_thread):
    seed_everything(0)
    model = create_model("ballad-tiny-vit").model
    blocks = len(model.visual.transformer.resblocks)
    record = add_tuning(model, "lora", num_classes=30)
    rank = lift_width(30, blocks)
    assert record["lora_rank"] == rank and record["lora_rank_rule"] and record["lora_scaling"] == 1 / rank
    width = model.visual.transformer.width
    assert record["module_params"] == blocks * 4 * rank * width  # A and B for q and v in every block
    assert add_tuning(create_model("ballad-tiny-vit").model, "lora", num_classes=30, lora_rank=3)["lora_rank"] == 3


def test_every_tune_is_one_registry_entry_named_in_the_help():
    from pipeline.tuning import REGISTRY, TUNE_HELP

    assert TUNES == tuple(REGISTRY) and "bias" not in TUNES
    assert all(f"{name}: " in TUNE_HELP for name in TUNES)
    with pytest.raises(UserError, match=r"^--tune bias: choose one of full, bias-norm, "):
        tuning("bias")
