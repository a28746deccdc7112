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
    with torch.no_grad():
        assert b.model.encode_image(img).shape == (1, b.embed_dim)
        assert b.model.encode_text(b.tokenizer(["a photo of a red triangle."])).shape == (1, b.embed_dim)


def test_transforms_follow_the_official_code(tiny_backbone):
    from torchvision import transforms as T

    train = tiny_backbone.train_transform.transforms
    crop = next(t for t in train if isinstance(t, T.RandomResizedCrop))
    assert crop.scale == (0.5, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train)
    norm = train[-1]
    assert norm.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert norm.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    evals = tiny_backbone.eval_transform.transforms
    assert isinstance(evals[0], T.Resize) and isinstance(evals[1], T.CenterCrop)


def test_named_architecture_without_weights():
    b = create_model("RN50")
    assert b.image_size == 224 and b.embed_dim == 1024 and b.context_length == 77
    with torch.no_grad():
        assert b.model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 1024)


def test_local_checkpoint_loads_and_wrong_architecture_is_refused(tmp_path, tiny_backbone):
    path = tmp_path / "final.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    again = create_model("ballad-tiny", pretrained=str(path))
    for (k, a), b in zip(tiny_backbone.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="does not match architecture RN50"):
        create_model("RN50", pretrained=str(path))


def test_bad_names_and_tags_are_explained():
    with pytest.raises(UserError, match="did you mean .*ViT-B-16"):
        create_model("ViT-B-61")
    with pytest.raises(UserError, match="not a weight tag of RN50 .*openai"):
        create_model("RN50", pretrained="opnai")
    with pytest.raises(UserError, match="no such checkpoint file"):
        create_model("RN50", pretrained="/nope/final.pt")
