"""GAN discriminators for tokenizer training.

``patchgan``: the VQGAN N-layer PatchGAN (cheap default for small presets), batch or spectral norm.
``dino``: MedITok's discriminator, frozen DINOv2-S features from several blocks with small trainable
conv heads. Both map (B, C, H, W) images in [-1, 1] to a tensor of logits (B, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from tokenizer.errors import InputError
from tokenizer.model import create_timm_model

NORMS = ("batch", "spectral")
"""Normalisation choices of the PatchGAN."""


@dataclass
class DiscriminatorConfig:
    """Which discriminator and its sizes."""

    kind: str = "patchgan"
    """A key of :data:`DISCRIMINATORS`: ``"patchgan"`` or ``"dino"``."""
    in_channels: int = 3
    """Channels of the images judged (the tokenizer's ``preprocess.channels``)."""
    base_channels: int = 64
    """PatchGAN: width of the first conv; doubles per layer up to 8x."""
    num_layers: int = 3
    """PatchGAN: strided conv layers (receptive field grows with it)."""
    norm: str = "batch"
    """PatchGAN: ``"batch"`` (VQGAN) or ``"spectral"`` normalisation."""
    backbone: str = "vit_small_patch14_dinov2"
    """DINO: timm name of the frozen feature network."""
    pretrained: str | None = None
    """DINO: None = random backbone; a local .safetensors file or a hub id (see model.create_timm_model)."""
    input_size: int = 224
    """DINO: side the images are resized to (a multiple of the backbone's patch size 14)."""
    feature_blocks: tuple[int, ...] = (2, 5, 8, 11)
    """DINO: indices of the transformer blocks whose tokens feed a head."""
    head_channels: int = 128
    """DINO: hidden width of each trainable head."""

    def __post_init__(self) -> None:
        self.feature_blocks = tuple(self.feature_blocks)
        name = "DiscriminatorConfig"
        if self.kind not in DISCRIMINATORS:
            raise InputError(f"{name}.kind: expected one of {sorted(DISCRIMINATORS)}, got {self.kind!r}")
        if self.norm not in NORMS:
            raise InputError(f"{name}.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.in_channels < 1 or self.base_channels < 1 or self.num_layers < 1 or self.head_channels < 1:
            raise InputError(f"{name}: in_channels, base_channels, num_layers and head_channels must be >= 1")
        if self.input_size < 14 or self.input_size % 14:
            raise InputError(f"{name}.input_size: expected a multiple of 14, got {self.input_size}")
        if not self.feature_blocks or min(self.feature_blocks) < 0:
            raise InputError(
                f"{name}.feature_blocks: expected non-negative block indices, got {self.feature_blocks}"
            )


class PatchGANDiscriminator(nn.Module):
    """VQGAN NLayerDiscriminator: (B, C, H, W) -> (B, 1, H', W') patch logits.

    conv4x4/2 -> LReLU, then ``num_layers - 1`` x [conv4x4/2 -> norm -> LReLU], conv4x4/1 -> norm ->
    LReLU, conv4x4/1 -> 1 channel. With spectral norm every conv is spectrally normalised instead.
    """

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        spectral = config.norm == "spectral"

        def conv(cin: int, cout: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=bias or spectral)
            nn.init.normal_(layer.weight, 0.0, 0.02)
            return spectral_norm(layer) if spectral else layer

        def norm(channels: int) -> nn.Module:
            if spectral:
                return nn.Identity()
            layer = nn.BatchNorm2d(channels)
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
            return layer

        width = config.base_channels
        layers: list[nn.Module] = [conv(config.in_channels, width, 2, True), nn.LeakyReLU(0.2)]
        for index in range(1, config.num_layers + 1):
            previous, width = width, config.base_channels * min(2**index, 8)
            stride = 2 if index < config.num_layers else 1
            layers += [conv(previous, width, stride, False), norm(width), nn.LeakyReLU(0.2)]
        layers.append(conv(width, 1, 1, True))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 features + trainable heads: (B, C, H, W) in [-1, 1] -> (B, L * h * w) logits.

    The image is mapped to [0, 1], resized to ``input_size``, normalised with the backbone's own
    mean/std; tokens of each block in ``feature_blocks`` go through a head conv1x1 -> GroupNorm ->
    LReLU -> conv3x3 -> 1 channel. The backbone is frozen and always in eval mode, but gradients
    flow through it to the input (the generator's update needs them).
    """

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.backbone = create_timm_model(
            config.backbone, config.pretrained, num_classes=0, img_size=config.input_size
        )
        depth = len(getattr(self.backbone, "blocks", ()))
        if max(config.feature_blocks) >= depth:
            raise InputError(
                f"DiscriminatorConfig.feature_blocks: {config.backbone!r} has {depth} blocks, got {config.feature_blocks}"
            )
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        data_cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.feature_blocks = list(config.feature_blocks)
        self.input_size = config.input_size
        width, hidden = self.backbone.embed_dim, config.head_channels
        self.heads = nn.ModuleList(
            nn.Sequential(
                spectral_norm(nn.Conv2d(width, hidden, 1)),
                nn.GroupNorm(_groups(hidden), hidden),
                nn.LeakyReLU(0.2),
                spectral_norm(nn.Conv2d(hidden, 1, 3, padding=1)),
            )
            for _ in self.feature_blocks
        )

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise InputError(f"DinoDiscriminator: expected 1 or 3 channels, got {x.shape[1]}")
        x = (x + 1.0) * 0.5
        if tuple(x.shape[2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone.forward_intermediates(
            self._prepare(x), indices=self.feature_blocks, intermediates_only=True, output_fmt="NCHW"
        )  # list of (B, D, h, w)
        logits = [head(feat).flatten(1) for head, feat in zip(self.heads, features, strict=True)]
        return torch.cat(logits, dim=1)


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


DISCRIMINATORS: dict[str, Callable[[DiscriminatorConfig], nn.Module]] = {
    "patchgan": PatchGANDiscriminator,
    "dino": DinoDiscriminator,
}
"""Discriminator class per ``DiscriminatorConfig.kind``."""


def build_discriminator(config: DiscriminatorConfig) -> nn.Module:
    """The discriminator named by ``config.kind``."""
    return DISCRIMINATORS[config.kind](config)
