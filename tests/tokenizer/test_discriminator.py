"""Discriminators: shapes, norms, frozen DINO backbone, weight loading, registry."""

import pytest
import torch
from safetensors.torch import save_file

from tokenizer.discriminator import (
    DISCRIMINATORS,
    DinoDiscriminator,
    DiscriminatorConfig,
    PatchGANDiscriminator,
    build_discriminator,
)
from tokenizer.errors import InputError
from tokenizer.model import create_timm_model

DINO_TINY = {"kind": "dino", "input_size": 28, "feature_blocks": (1, 3), "head_channels": 16}


@pytest.mark.parametrize("norm", ["batch", "spectral"])
def test_patchgan_shapes_and_gradients(norm):
    disc = build_discriminator(DiscriminatorConfig(norm=norm, base_channels=16, in_channels=1))
    assert isinstance(disc, PatchGANDiscriminator)
    x = (torch.rand(2, 1, 64, 64) * 2 - 1).requires_grad_()
    logits = disc(x)
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    assert has_batch_norm == (norm == "batch")
    if norm == "spectral":
        assert all(hasattr(m, "parametrizations") for m in disc.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.fixture(scope="module")
def dino() -> DinoDiscriminator:
    return build_discriminator(DiscriminatorConfig(**DINO_TINY))


def test_dino_frozen_backbone_trainable_heads(dino):
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    logits = dino(x)
    assert logits.shape == (2, 2 * 2 * 2)  # two blocks x (28 / 14)^2 positions
    logits.mean().backward()
    assert x.grad.abs().sum() > 0  # the generator gets a gradient through the frozen backbone
    assert all(p.grad is None for p in dino.backbone.parameters())
    assert all(p.grad is not None for p in dino.heads.parameters())
    assert not dino.train().backbone.training
    gray = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(dino(gray), dino(gray.expand(-1, 3, -1, -1)))


def test_dino_normalises_with_backbone_statistics(dino):
    white = torch.ones(1, 3, 28, 28)
    prepared = dino._prepare(white)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(prepared[0, :, 0, 0], expected)


def test_dino_backbone_from_local_safetensors(tmp_path):
    source = create_timm_model("vit_small_patch14_dinov2", None, num_classes=0, img_size=28)
    path = tmp_path / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    disc = DinoDiscriminator(DiscriminatorConfig(**DINO_TINY, pretrained=str(path)))
    torch.testing.assert_close(disc.backbone.pos_embed, source.pos_embed)
    with pytest.raises(InputError, match="file not found"):
        DinoDiscriminator(DiscriminatorConfig(**DINO_TINY, pretrained=str(tmp_path / "none.safetensors")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "stylegan"}, "kind"),
        ({"norm": "layer"}, "norm"),
        ({"input_size": 30}, "multiple of 14"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(InputError, match=message):
        DiscriminatorConfig(**overrides)


def test_feature_blocks_must_exist():
    with pytest.raises(InputError, match="12 blocks"):
        DinoDiscriminator(DiscriminatorConfig(**{**DINO_TINY, "feature_blocks": (12,)}))


def test_registry():
    assert {"patchgan": PatchGANDiscriminator, "dino": DinoDiscriminator} == DISCRIMINATORS
