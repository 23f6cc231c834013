"""The image tokenizer network: encoder -> K*d latent -> multi-codebook quantizer -> decoder.

Two backbone families, chosen by ``TokenizerConfig.architecture`` through :data:`ARCHITECTURES`:
``"cnn"`` (VQGAN-style residual conv encoder/decoder) and ``"vit"`` (a timm ViT-family encoder,
e.g. ViTamin-L as in MedITok, and a plain transformer decoder with a pixel-shuffle head).
The module takes one config and does no file I/O; pretrained encoder weights are loaded afterwards
with :func:`load_encoder_weights`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokenizer.config import TokenizerConfig
from tokenizer.errors import InputError
from tokenizer.quantizer import MultiCodebookQuantizer, QuantizerOutput

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class TokenizerOutput:
    """Everything one training step needs from the tokenizer."""

    reconstruction: Tensor
    """(B, C, H, W) decoded image, nominally in [-1, 1] (not clamped)."""
    codes: Tensor
    """(B, K, h, w) long codes."""
    quantized: Tensor
    """(B, K*d, h, w) quantized latent (input of the decoder and of the alignment head)."""
    vq_loss: Tensor
    """Scalar quantizer loss (commitment * beta for VQ)."""
    perplexity: Tensor
    """(K,) code perplexity per sub-codebook over the batch."""
    usage: Tensor
    """(K,) fraction of each sub-codebook used in the batch."""


def _run_blocks(blocks: Iterable[nn.Module], x: Tensor, use_checkpoint: bool) -> Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    return x


def _num_groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _level_widths(config: TokenizerConfig) -> list[int]:
    """Width of each resolution level, finest first; levels past ``channels`` repeat its last width."""
    return [config.channels[min(i, len(config.channels) - 1)] for i in range(config.num_levels)]


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 when widths differ) skip; (B, Ci, H, W) -> (B, Co, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_channels), in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_num_groups(out_channels), out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CNNEncoder(nn.Module):
    """VQGAN-style encoder: (B, C, H, W) -> (B, K*d, H/f, W/f), f = ``downsample``.

    With ``patch_size`` p > 1 the input is first pixel-unshuffled to (B, C*p*p, H/p, W/p).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = _level_widths(config)
        self.patch = config.patch_size
        in_channels = config.preprocess.channels * self.patch**2
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        width = widths[0]
        for level, level_width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, level_width))
                width = level_width
            if level < len(widths) - 1:
                blocks.append(Downsample(width))
        blocks.append(ResBlock(width, width))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(_num_groups(width), width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, config.quantizer.latent_dim, 3, padding=1)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        h = _run_blocks(self.blocks, h, self.grad_checkpointing and self.training)
        return self.conv_out(F.silu(self.norm_out(h)))


class CNNDecoder(nn.Module):
    """VQGAN-style decoder: (B, K*d, h, w) -> (B, C, h*f, w*f), one more residual block per level."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = _level_widths(config)
        width = widths[-1]
        self.conv_in = nn.Conv2d(config.quantizer.latent_dim, width, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(width, width)]
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(width, widths[level]))
                width = widths[level]
            if level > 0:
                blocks.append(Upsample(width))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(_num_groups(width), width, eps=1e-6)
        self.patch = config.patch_size
        self.conv_out = nn.Conv2d(width, config.preprocess.channels * self.patch**2, 3, padding=1)
        self.grad_checkpointing = False

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, quantized: Tensor) -> Tensor:
        h = self.conv_in(quantized)
        h = _run_blocks(self.blocks, h, self.grad_checkpointing and self.training)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def _timm_kwargs(config: TokenizerConfig) -> dict[str, int]:
    return {
        "num_classes": 0,
        "img_size": config.preprocess.image_size,
        "in_chans": config.preprocess.channels,
    }


class ViTEncoder(nn.Module):
    """timm ViT-family encoder + LN + Linear to the latent: (B, C, H, W) -> (B, K*d, h, w)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        import timm  # imported here: the CNN presets and tokenize_image never pay for timm

        self.backbone = timm.create_model(config.encoder_name, pretrained=False, **_timm_kwargs(config))
        grid = tuple(getattr(getattr(self.backbone, "patch_embed", None), "grid_size", ()))
        if grid != config.grid:
            raise InputError(
                f"TokenizerConfig.encoder_name: {config.encoder_name!r} at {config.preprocess.image_size} px gives a "
                f"token grid {grid or 'unknown'}, but downsample {config.downsample} needs {config.grid}"
            )
        self.num_prefix_tokens = getattr(self.backbone, "num_prefix_tokens", 0)
        width = self.backbone.num_features
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.quantizer.latent_dim)
        self.grid = config.grid

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.backbone.set_grad_checkpointing(enabled)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(x)[:, self.num_prefix_tokens :]  # (B, h*w, D)
        latent = self.proj(self.norm(tokens))  # (B, h*w, K*d)
        return latent.transpose(1, 2).unflatten(2, self.grid)


class ViTDecoder(nn.Module):
    """Transformer decoder with a pixel-shuffle head: (B, K*d, h, w) -> (B, C, h*p, w*p), p = downsample."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        width, patch = config.decoder_width, config.downsample
        height, grid_w = config.grid
        self.patch = patch
        from timm.models import vision_transformer as vit

        self.proj_in = nn.Linear(config.quantizer.latent_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, height * grid_w, width))
        self.blocks = nn.ModuleList(
            vit.Block(width, config.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.preprocess.channels * patch * patch)
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_transformer_weights)

    @property
    def last_layer(self) -> Tensor:
        return self.head.weight

    def forward(self, quantized: Tensor) -> Tensor:
        height, width = quantized.shape[2:]
        x = self.proj_in(quantized.flatten(2).transpose(1, 2)) + self.pos_embed  # (B, h*w, W)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing and self.training)
        pixels = self.head(self.norm(x))  # (B, h*w, C*p*p)
        return F.pixel_shuffle(pixels.transpose(1, 2).unflatten(2, (height, width)), self.patch)


def _init_transformer_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


ARCHITECTURES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "cnn": (CNNEncoder, CNNDecoder),
    "vit": (ViTEncoder, ViTDecoder),
}
"""(encoder class, decoder class) per ``TokenizerConfig.architecture``."""


def _align_head(latent_dim: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(latent_dim), nn.Linear(latent_dim, embed_dim))


class ImageTokenizer(nn.Module):
    """Images in [-1, 1] <-> (B, K, h, w) code grids, plus an alignment head for contrastive training.

    Contract (eval mode): ``decode_codes(encode_to_codes(x)) == decode(quantize(encode(x)).quantized)``
    exactly, and the same image always gives the same codes.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        encoder_cls, decoder_cls = ARCHITECTURES[config.architecture]
        self.encoder = encoder_cls(config)
        self.quantizer = MultiCodebookQuantizer(config.quantizer)
        self.decoder = decoder_cls(config)
        latent = config.quantizer.latent_dim
        self.align_head = _align_head(latent, config.embed_dim) if config.embed_dim is not None else None
        self.text_encoder: nn.Module | None = None
        if config.text_encoder is not None:
            from tokenizer.text_encoder import build_text_encoder

            self.text_encoder = build_text_encoder(config.text_encoder)
            text_dim = self.text_encoder.embed_dim
            if config.embed_dim is not None and text_dim != config.embed_dim:
                raise InputError(
                    f"TokenizerConfig.embed_dim is {config.embed_dim} but the text encoder embeds to {text_dim}"
                )
        self.set_grad_checkpointing(config.grad_checkpointing)

    # ---- shapes and checks -------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        return self.config.grid

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output layer (the adaptive GAN weight differentiates w.r.t. it)."""
        return self.decoder.last_layer

    def _check_images(self, x: Tensor) -> None:
        pre = self.config.preprocess
        expected = f"(B, {pre.channels}, {pre.image_size}, {pre.image_size})"
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise InputError(f"images: expected a float tensor {expected} in [-1, 1], got {type(x).__name__}")
        if (
            x.ndim != 4
            or x.shape[1] != pre.channels
            or tuple(x.shape[2:]) != (pre.image_size, pre.image_size)
        ):
            raise InputError(f"images: expected shape {expected} (channels, size), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError("images: contain NaN or infinite values; expected finite values in [-1, 1]")

    def _check_codes(self, codes: Tensor) -> None:
        q = self.config.quantizer
        expected = f"(B, {q.num_codebooks}, {self.grid[0]}, {self.grid[1]})"
        if (
            not isinstance(codes, Tensor)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
        ):
            raise InputError(
                f"codes: expected an integer tensor {expected}, got {getattr(codes, 'dtype', type(codes))}"
            )
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (q.num_codebooks, *self.grid):
            raise InputError(f"codes: expected shape {expected}, got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= q.codebook_size):
            raise InputError(
                f"codes: expected values in [0, {q.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )

    # ---- the pipeline ------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, K*d, h, w) latent."""
        self._check_images(x)
        return self.encoder(x)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        """(B, K*d, h, w) latent -> QuantizerOutput (quantized fp32, codes (B, K, h, w), loss, stats)."""
        return self.quantizer(z)

    def decode(self, quantized: Tensor) -> Tensor:
        """(B, K*d, h, w) quantized latent -> (B, C, H, W) images."""
        latent = self.config.quantizer.latent_dim
        if quantized.ndim != 4 or quantized.shape[1] != latent or tuple(quantized.shape[2:]) != self.grid:
            raise InputError(
                f"quantized: expected shape (B, {latent}, {self.grid[0]}, {self.grid[1]}), got {tuple(quantized.shape)}"
            )
        return self.decoder(quantized)

    @torch.no_grad()
    def encode_to_codes(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, K, h, w) long codes (fast inference look-up)."""
        return self.quantizer.codes(self.encode(x))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, K, h, w) integer codes -> (B, C, H, W) images."""
        self._check_codes(codes)
        return self.decode(self.quantizer.embed(codes))

    def forward(self, x: Tensor) -> TokenizerOutput:
        """Encode, quantize and decode a batch of (B, C, H, W) images in [-1, 1]."""
        quant = self.quantize(self.encode(x))
        reconstruction = self.decode(quant.quantized)
        return TokenizerOutput(
            reconstruction, quant.codes, quant.quantized, quant.loss, quant.perplexity, quant.usage
        )

    # ---- alignment ---------------------------------------------------------------------------
    def image_embedding(self, quantized: Tensor) -> Tensor:
        """(B, K*d, h, w) quantized latent -> (B, embed_dim) l2-normalised (mean pool -> LN -> Linear)."""
        if self.align_head is None:
            raise InputError(
                "image_embedding: config.embed_dim is None; set it or call reset_align_head(dim)"
            )
        pooled = quantized.mean(dim=(2, 3)).to(self.align_head[1].weight.dtype)  # (B, K*d)
        return F.normalize(self.align_head(pooled), dim=-1)

    @torch.no_grad()
    def embed_image(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, embed_dim) l2-normalised image embeddings."""
        return self.image_embedding(self.quantizer.embed(self.encode_to_codes(x)))

    def reset_align_head(self, embed_dim: int) -> None:
        """Replace the alignment head by a fresh one of width ``embed_dim`` (stage 2 drops stage 1's)."""
        if embed_dim < 1:
            raise InputError(f"reset_align_head: expected a positive embed_dim, got {embed_dim}")
        reference = self.decoder.last_layer
        head = _align_head(self.config.quantizer.latent_dim, embed_dim)
        self.align_head = head.to(device=reference.device, dtype=reference.dtype)
        self.config = dataclasses.replace(self.config, embed_dim=embed_dim)

    def embed_text(self, texts: list[str]) -> Tensor:
        """List of B captions -> (B, D) l2-normalised text embeddings from the frozen text encoder."""
        if self.text_encoder is None:
            raise InputError("embed_text: this tokenizer has no text encoder (config.text_encoder is None)")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("embed_text: expected a list of strings")
        return self.text_encoder(list(texts))

    # ---- training switches -------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder/decoder block activations during backward (training only)."""
        if isinstance(self.encoder, ViTEncoder):
            self.encoder.set_grad_checkpointing(enabled)
        else:
            self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def train(self, mode: bool = True) -> ImageTokenizer:
        super().train(mode)
        if self.text_encoder is not None:  # frozen: never dropout
            self.text_encoder.eval()
        return self


def create_timm_model(name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """Build a timm model with random weights or weights from a local file or the Hugging Face hub.

    Args:
        name: timm architecture name, e.g. ``"vit_small_patch14_dinov2"``.
        pretrained: None for random weights; a local weights file (``.safetensors``, or ``.pth``/``.pt``/
            ``.bin`` read with ``weights_only=True``); otherwise a hub id such as
            ``"timm/vit_small_patch14_dinov2.lvd142m"``. timm adapts position embeddings to ``img_size``.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``img_size``, ``in_chans``, ...).
    """
    import timm

    if pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(pretrained).expanduser()
    if path.is_file():
        overlay = {"file": str(path)}
    elif pretrained.endswith(_WEIGHT_SUFFIXES) or path.is_absolute() or pretrained.startswith("."):
        raise InputError(f"pretrained weights {pretrained!r}: file not found")
    else:
        overlay = {"hf_hub_id": pretrained}
    logger.info("loading %s weights from %s", name, pretrained)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def load_encoder_weights(tokenizer: ImageTokenizer, source: str) -> None:
    """Initialise a ViT tokenizer's timm encoder from pretrained weights (see :func:`create_timm_model`)."""
    if not isinstance(tokenizer.encoder, ViTEncoder):
        raise InputError(
            f"load_encoder_weights: architecture {tokenizer.config.architecture!r} has no timm encoder"
        )
    pretrained = create_timm_model(tokenizer.config.encoder_name, source, **_timm_kwargs(tokenizer.config))
    tokenizer.encoder.backbone.load_state_dict(pretrained.state_dict())


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
