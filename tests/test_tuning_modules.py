"""The tuning modules of issue 25 (pipeline/vpt.py, ssf.py, peft.py's adapter) and --tune-blocks: where they
start, what they add (counted against hand formulas on ballad-tiny-vit), their checkpoints through the factory,
and a Phase A run with each, reloaded the way extract loads it."""
from __future__ import annotations

import json

import pytest
import torch
from test_peft import config, encode, images
from test_phase_a import small_data  # noqa: F401  (a fixture)

from pipeline.errors import UserError
from pipeline.models import create_model
from pipeline.peft import AdapterBlock, lift_width
from pipeline.runtime import seed_everything
from pipeline.tuning import add_tuning, mark_trainable, tuning
from pipeline.vpt import PromptedBlock, prompt_count
from stages.phase_a.run import run_phase_a

NEW = ("vpt-shallow", "vpt-deep", "ssf", "adapter")
K = 30  # classes


def fresh(seed: int = 0):
    seed_everything(seed)
    return create_model("ballad-tiny-vit").model


def dims(model) -> tuple[int, int, int]:
    """(d, L, MLP width) of the image tower."""
    blocks = model.visual.transformer.resblocks
    return blocks[0].mlp.c_fc.weight.shape[1], len(blocks), blocks[0].mlp.c_fc.weight.shape[0]


def perturb(model) -> None:
    """Move every trainable tensor away from its start, as training would (the adapter's zero up-projection too)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_prompt_rule_is_lift_plus():
    # 2^max(0, ⌊log2(K / L)⌋): ViT-B/16 on ImageNet-LT 64, Places-LT 16, CIFAR-100-LT 8; the demo (30, 6) 4
    assert [prompt_count(k, 12) for k in (1000, 365, 100)] == [64, 16, 8]
    assert prompt_count(30, 6) == 4 and prompt_count(5, 12) == 1


@pytest.mark.parametrize("tune_blocks", [None, 2])
def test_adapter_starts_at_the_pretrained_model(tune_blocks, single_thread):
    x, _ = images()
    model = fresh()
    before = encode(model, x)
    add_tuning(model, "adapter", num_classes=K, tune_blocks=tune_blocks)
    tuned = [i for i, b in enumerate(model.visual.transformer.resblocks) if isinstance(b, AdapterBlock)]
    assert tuned == ([0, 1, 2, 3, 4, 5] if tune_blocks is None else [4, 5])
    assert torch.equal(encode(model, x), before)  # up-projection zero: exactly the pretrained outputs
    perturb_up = model.visual.transformer.resblocks[tuned[0]].adapter.up.weight
    with torch.no_grad():
        perturb_up.normal_(0, 0.5)
    assert not torch.allclose(encode(model, x), before, atol=1e-4)  # and the branch is in the forward pass


def block_lengths(model, x) -> list[int]:
    """The token count each image-tower block outputs, and last the transformer's."""
    lengths, hooks = [], []
    for b in [*model.visual.transformer.resblocks, model.visual.transformer]:
        hooks.append(b.register_forward_hook(lambda m, i, out: lengths.append(out.shape[1])))
    encode(model, x)
    for h in hooks:
        h.remove()
    return lengths


@pytest.mark.parametrize("tune, tune_blocks, prompted", [
    ("vpt-shallow", None, [0]), ("vpt-deep", None, [0, 1, 2, 3, 4, 5]),
    ("vpt-shallow", 2, [4]), ("vpt-deep", 2, [4, 5])])
def test_prompts_join_and_leave_the_sequence(tune, tune_blocks, prompted, single_thread):
    x, y = images()
    model = fresh()
    n = model.visual.positional_embedding.shape[0]  # class token + patches
    plain = encode(model, x)
    record = add_tuning(model, tune, num_classes=K, tune_blocks=tune_blocks)
    mark_trainable(model, tune, text=False, tune_blocks=tune_blocks)
    p = prompt_count(K, 6 if tune_blocks is None else tune_blocks)
    assert record["prompt_tokens"] == p and record["prompted_blocks"] == len(prompted)
    blocks = model.visual.transformer.resblocks
    assert [i for i, b in enumerate(blocks) if isinstance(b, PromptedBlock)] == prompted
    # n tokens before the first prompted block, n + P from it on (deep: each block's P replace the last ones),
    # and the transformer hands the pool its n tokens
    assert block_lengths(model, x) == [n] * prompted[0] + [n + p] * (6 - prompted[0]) + [n]
    out = encode(model, x)
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-4)  # the prompts take part
    model.train()
    model.encode_image(x).sum().backward()
    got = {name for name, q in model.named_parameters() if q.grad is not None}
    assert got == {f"visual.transformer.resblocks.{i}.vpt_prompt" for i in prompted}
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in got)


@pytest.mark.parametrize("tune_blocks", [None, 3])
def test_module_params_match_the_hand_formulas(tune_blocks):
    d, blocks, mlp = dims(fresh())
    k = blocks if tune_blocks is None else tune_blocks
    w = lift_width(K, k)
    p = prompt_count(K, k)
    expected = {
        "vpt-shallow": p * d,
        "vpt-deep": k * p * d,
        "ssf": k * 2 * (3 * d + d + mlp + d),  # γ and β after q/k/v, out_proj, c_fc, c_proj
        "adapter": k * (2 * d + d * w + w + w * d + d),  # LayerNorm, down (with bias), up (with bias)
        "adaptformer": k * (2 * d + d * w + w + w * d + d + 1),  # and the scale
        "lora": k * 4 * lift_width(K, k) * d,
        "bitfit": k * (3 * d + d + mlp + d + 2 * d),
        "layernorm": k * 4 * d,
    }
    for tune, count in expected.items():
        model = fresh()
        record = add_tuning(model, tune, num_classes=K, tune_blocks=tune_blocks)
        mark_trainable(model, tune, text=True, tune_blocks=tune_blocks)
        assert record["module_params"] == count == sum(q.numel() for q in model.parameters() if q.requires_grad), tune
        assert record["blocks"] == k


@pytest.mark.parametrize("tune", NEW)
def test_checkpoint_round_trip_gives_the_same_outputs(tune, tmp_path, single_thread):
    x, _ = images()
    model = fresh()
    add_tuning(model, tune, num_classes=K, tune_blocks=4)
    mark_trainable(model, tune, text=False, tune_blocks=4)
    perturb(model)
    exported = tuning(tune).export(model.state_dict())
    plain = set(fresh().state_dict())
    if tune == "ssf":  # merged: a plain open_clip state dict
        assert set(exported) == plain
    else:  # rebuilt on load: the plain tensors and the module's, in the tuned blocks only
        assert plain < set(exported)
        assert all(k.startswith(("visual.transformer.resblocks.2.", "visual.transformer.resblocks.3.",
                                 "visual.transformer.resblocks.4.", "visual.transformer.resblocks.5."))
                   for k in set(exported) - plain)
    torch.save(exported, tmp_path / "final.pt")
    loaded = create_model("ballad-tiny-vit", pretrained=str(tmp_path / "final.pt")).model
    assert torch.allclose(encode(loaded, x), encode(model, x), atol=1e-6, rtol=0)
    assert not torch.allclose(encode(fresh(), x), encode(model, x), atol=1e-3)


def test_ssf_merges_into_the_layers_it_follows(single_thread):
    from pipeline.ssf import SSF, merge_ssf

    model = fresh()
    add_tuning(model, "ssf", num_classes=K)
    state = model.state_dict()
    block = "visual.transformer.resblocks.1."
    scale, shift = state[block + "ssf.mlp_in.scale"], state[block + "ssf.mlp_in.shift"]
    merged = merge_ssf(state)
    x = torch.randn(5, scale.shape[0] // 4)
    plain = torch.nn.functional.linear(x, state[block + "mlp.c_fc.weight"], state[block + "mlp.c_fc.bias"])
    assert torch.allclose(torch.nn.functional.linear(x, merged[block + "mlp.c_fc.weight"],
                                                     merged[block + "mlp.c_fc.bias"]), plain * scale + shift, atol=1e-5)
    assert SSF(8).scale.mean().item() == pytest.approx(1, abs=0.05)  # LIFT+'s γ ~ N(1, 0.02)


def test_tune_blocks_is_refused_where_it_means_nothing():
    with pytest.raises(UserError, match=r"^--tune-blocks 2: --tune bias-norm trains the whole image tower; use it "
                                        r"with --tune bitfit, "):
        add_tuning(fresh(), "bias-norm", num_classes=K, tune_blocks=2)
    with pytest.raises(UserError, match=r"^--tune-blocks 7: must be between 1 and the image tower's 6 blocks$"):
        add_tuning(fresh(), "adapter", num_classes=K, tune_blocks=7)


def test_tune_blocks_is_checked_before_work_starts(small_data, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["phase-a", "--data", str(small_data), "--model", "ballad-tiny-vit",
                                       "--out", str(out), "--tune", "ssf", "--tune-blocks", "0"])
    assert result.output == "Error: --tune-blocks 0: must be at least 1\n" and not out.exists()


# A Phase A epoch with each (3 steps), reloaded as extract does; make test-fast keeps one
RUNS = [("adapter", 2), pytest.param("vpt-shallow", None, marks=pytest.mark.slow),
        pytest.param("vpt-deep", 3, marks=pytest.mark.slow), pytest.param("ssf", None, marks=pytest.mark.slow)]


@pytest.mark.parametrize("tune, tune_blocks", RUNS)
def test_a_phase_a_run_trains_and_reloads_through_extracts_loader(small_data, tmp_path, tune,  # noqa: F811
                                                                  tune_blocks, single_thread):
    from stages.extract.meta import resolve_checkpoint

    out = tmp_path / "run"
    final = run_phase_a(config(small_data, out, epochs=1, schedule="standard", select="last", tune=tune,
                               tune_blocks=tune_blocks))
    meta = json.loads(final.with_suffix(".json").read_text())
    k = 6 if tune_blocks is None else tune_blocks
    assert meta["tuning"]["tune"] == tune and meta["tuning"]["blocks"] == k
    assert meta["config"]["tune_blocks"] == tune_blocks
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    added = {n for n in last if any(m in n for m in (".vpt_prompt", ".ssf.", ".adapter."))}
    assert sum(last[n].numel() for n in added) == meta["tuning"]["module_params"] == meta["tuning"]["trainable_params"]

    path, model, pretrained = resolve_checkpoint(str(final), None, None)  # extract's reading of final.json
    loaded = create_model(model, pretrained=str(path)).model
    trained = fresh()  # the run's model rebuilt by hand from last.pt: the weights final.pt was exported from
    add_tuning(trained, tune, num_classes=K, tune_blocks=tune_blocks)
    trained.load_state_dict(last)
    x, _ = images()
    assert torch.allclose(encode(loaded, x), encode(trained, x), atol=1e-6, rtol=0)
    start = fresh()
    add_tuning(start, tune, num_classes=K, tune_blocks=tune_blocks)
    assert any(not torch.equal(last[n], start.state_dict()[n]) for n in added)  # the module trained
