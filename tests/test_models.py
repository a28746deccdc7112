"""The model factory: embedded ballad-tiny, named architectures without weights, checkpoints, errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.models import create_model


def test_ballad_tiny_is_small_and_embeds_both_modalities(tiny_backbone):
    b = tiny_backbone
    params = sum(p.numel() for p in b.model.parameters())
    assert 1e6 < params < 1e7 and b.image_size == 32 and b.context_length <= 32
    img = b.eval_transform(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
    assert img.shape == (1, 3, 32, 32)
    training = b.model.training  # open_clip builds in train mode, where BatchNorm cannot take one image
    b.model.eval()
    try:
        with torch.no_grad():
            assert b.model.encode_image(img).shape == (1, b.embed_dim)
            assert b.model.encode_text(b.tokenizer(["a photo of a red triangle."])).shape == (1, b.embed_dim)
    finally:
        b.model.train(training)


def test_transforms_follow_the_official_code(tiny_backbone):
    from torchvision import transforms as T

    train = tiny_backbone.train_transform.transforms
    # the authors': crop, flip, then colour jitter (0.4, 0.4, 0.4, hue 0), CLIP normalisation; RGB first
    assert [type(t) for t in train] == [T.Lambda, T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter,
                                        T.ToTensor, T.Normalize]
    crop, jitter, norm = train[1], train[3], train[-1]
    assert crop.scale == (0.5, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    for factor in (jitter.brightness, jitter.contrast, jitter.saturation):
        assert factor == pytest.approx((0.6, 1.4))
    assert jitter.hue is None
    assert norm.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert norm.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    evals = tiny_backbone.eval_transform.transforms
    assert isinstance(evals[0], T.Resize) and isinstance(evals[1], T.CenterCrop)
    assert not any(isinstance(t, (T.ColorJitter, T.RandomHorizontalFlip)) for t in evals)


def test_named_architecture_without_weights():
    b = create_model("RN50")
    assert b.image_size == 224 and b.embed_dim == 1024 and b.context_length == 77
    with torch.no_grad():
        assert b.model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 1024)


@pytest.mark.parametrize("name", ["ballad-tiny", pytest.param("RN50", marks=pytest.mark.slow)])  # RN50: two builds
def test_fp16_weights_are_the_authors_layout(name):
    """OpenAI's convert_weights: Conv/Linear/attention weights and the projections in fp16; BatchNorm,
    LayerNorm (computed in fp32), embeddings and the logit scale stay fp32."""
    from open_clip.transformer import LayerNormFp32

    model = create_model(name, fp16_weights=True).model
    half = {n for n, p in model.named_parameters() if p.dtype == torch.float16}
    for mod_name, mod in model.named_modules():
        own = {f"{mod_name}.{n}".lstrip(".") for n, _ in mod.named_parameters(recurse=False)}
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MultiheadAttention)):
            assert own <= half, mod_name
        elif isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.Embedding)):
            assert not own & half, mod_name
            assert not isinstance(mod, torch.nn.LayerNorm) or isinstance(mod, LayerNormFp32), mod_name
    assert {"text_projection"} <= half and not {"logit_scale", "positional_embedding"} & half
    assert create_model(name).model.visual.conv1.weight.dtype == torch.float32  # the default is untouched


def test_local_checkpoint_loads_and_wrong_architecture_is_refused(tmp_path, tiny_backbone):
    path = tmp_path / "final.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    again = create_model("ballad-tiny", pretrained=str(path))
    for (k, a), b in zip(tiny_backbone.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="does not match architecture RN50"):
        create_model("RN50", pretrained=str(path))


@pytest.mark.parametrize("name, pretrained, message", [
    ("ViT-B-61", None, "did you mean .*ViT-B-16"),
    ("RN50", "opnai", "not a weight tag of RN50 .*openai"),
    ("RN50", "/nope/final.pt", "no such checkpoint file"),
], ids=["misspelt-name", "misspelt-tag", "missing-file"])
def test_bad_names_and_tags_are_explained(name, pretrained, message):
    with pytest.raises(UserError, match=message):
        create_model(name, pretrained=pretrained)
