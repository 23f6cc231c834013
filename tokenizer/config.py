"""Configuration of the image tokenizer network: quantizer, architecture, presets.

Every field has a docstring and is validated in ``__post_init__``; a config survives a JSON round
trip through :meth:`TokenizerConfig.to_dict` / :meth:`TokenizerConfig.from_dict`, which is how it is
stored inside a checkpoint (``config.json``). Named sizes live in :data:`PRESETS`; experiments start
from a preset and override single fields with :func:`create_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenizer.data.intensity import PreprocessConfig
from tokenizer.errors import InputError
from tokenizer.text_encoder import TextEncoderConfig

QUANTIZER_KINDS = ("vq", "fsq", "lfq")
"""Quantizer families: multi-codebook VQ, finite scalar quantization, lookup-free quantization."""

ARCHITECTURES = ("cnn", "vit")
"""Encoder/decoder families; ``tokenizer.model.ARCHITECTURES`` maps each name to its classes."""

CONFIG_VERSION = 1
"""Version of the ``config.json`` schema written by this code."""


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass
class QuantizerConfig:
    """Multi-codebook quantizer: K independent sub-codebooks, each of V entries of width d."""

    kind: str = "vq"
    """Quantizer family: ``"vq"`` (learned codebooks), ``"fsq"`` or ``"lfq"`` (implicit codebooks)."""
    num_codebooks: int = 8
    """K, the number of independent sub-codebooks; each position of the grid carries K codes."""
    codebook_size: int = 4096
    """V, entries per sub-codebook (``prod(fsq_levels)`` for FSQ, ``2 ** codebook_dim`` for LFQ)."""
    codebook_dim: int = 8
    """d, width of one sub-code; the latent has K*d channels."""
    beta: float = 0.25
    """VQ and LFQ: commitment loss weight (beta); LFQ's entropy loss has ``lfq_entropy_weight``."""
    cosine: bool = True
    """VQ only: l2-normalise features and codes and look codes up by cosine similarity."""
    kmeans_init: bool = False
    """VQ only: initialise each codebook by k-means on the first training batch."""
    kmeans_iters: int = 10
    """VQ only: k-means iterations for ``kmeans_init``."""
    dead_code_threshold: float = 0.0
    """VQ only: restart codes whose EMA cluster size falls below this (0 disables restarts)."""
    rotation_trick: bool = False
    """VQ only: pass gradients through the quantizer with the rotation trick instead of the STE."""
    ema_decay: float = 0.99
    """VQ only: decay of the exponential moving average codebook update."""
    learnable_codebook: bool = False
    """VQ only: learn the codebook by gradient (codebook loss) instead of EMA; needs ``cosine=False``."""
    library_train_step: bool = False
    """VQ only: train through the library's ``VectorQuantize.forward`` instead of this package's equivalent
    gather-based EMA step (same codes and updates, tested; the library's one-hot matmuls cost more on CPU)."""
    sync_codebook: bool | None = None
    """VQ only: all-reduce codebook statistics across processes; None = whenever a process group of more than
    one rank is running at that step."""
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    """FSQ only: quantisation levels per dimension; their count is d and their product is V."""
    lfq_entropy_weight: float = 0.1
    """LFQ only: weight of the entropy auxiliary loss."""

    def __post_init__(self) -> None:
        self.fsq_levels = tuple(self.fsq_levels)
        name = "QuantizerConfig"
        if self.kind not in QUANTIZER_KINDS:
            raise InputError(f"{name}.kind: expected one of {QUANTIZER_KINDS}, got {self.kind!r}")
        for key in ("num_codebooks", "codebook_size", "codebook_dim", "kmeans_iters"):
            if getattr(self, key) < 1:
                raise InputError(f"{name}.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.codebook_size > 65536:
            raise InputError(
                f"{name}.codebook_size: at most 65536 (codes are stored as uint16), got {self.codebook_size}"
            )
        if self.beta < 0 or self.dead_code_threshold < 0 or self.lfq_entropy_weight < 0:
            raise InputError(f"{name}: beta, dead_code_threshold and lfq_entropy_weight must be >= 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise InputError(f"{name}.ema_decay: expected a value in (0, 1), got {self.ema_decay}")
        if self.kind == "vq" and self.cosine and self.learnable_codebook:
            raise InputError(
                f"{name}.learnable_codebook: not supported with cosine=True (use the EMA update)"
            )
        if self.kind == "fsq":
            if len(self.fsq_levels) != self.codebook_dim or any(lv < 3 for lv in self.fsq_levels):
                raise InputError(
                    f"{name}.fsq_levels: expected {self.codebook_dim} levels (codebook_dim), each >= 3, "
                    f"got {self.fsq_levels}"
                )
            if math.prod(self.fsq_levels) != self.codebook_size:
                raise InputError(
                    f"{name}.codebook_size: FSQ needs prod(fsq_levels) = {math.prod(self.fsq_levels)}, "
                    f"got {self.codebook_size}"
                )
        if self.kind == "lfq" and self.codebook_size != 2**self.codebook_dim:
            raise InputError(
                f"{name}.codebook_size: LFQ needs 2 ** codebook_dim = {2**self.codebook_dim}, got {self.codebook_size}"
            )

    @property
    def latent_dim(self) -> int:
        """Channels of the latent the quantizer consumes: K * d."""
        return self.num_codebooks * self.codebook_dim


@dataclass
class TokenizerConfig:
    """The image tokenizer: encoder -> K*d latent -> multi-codebook quantizer -> decoder."""

    architecture: str = "cnn"
    """Encoder/decoder family, a key of ``tokenizer.model.ARCHITECTURES`` (``"cnn"`` or ``"vit"``)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Input preprocessing; its ``image_size`` and ``channels`` fix the network input shape."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """The quantizer between encoder and decoder."""
    downsample: int = 16
    """Spatial reduction from image to code grid (a power of two): grid = image_size / downsample."""
    channels: tuple[int, ...] = (64, 128, 256, 256, 512)
    """CNN only: width of each resolution level, finest first; missing levels repeat the last width."""
    num_res_blocks: int = 2
    """CNN only: residual blocks per resolution level in the encoder (the decoder uses one more)."""
    patch_size: int = 1
    """CNN only: space-to-depth stem; the encoder pixel-unshuffles its input by this factor (a power of two
    dividing ``downsample``) and the decoder pixel-shuffles its output, so no layer runs at full resolution."""
    encoder_name: str = "vitamin_large_256"
    """ViT only: timm model name of the encoder (built with random weights; see model.load_encoder_weights)."""
    decoder_width: int = 1024
    """ViT only: token width of the transformer decoder."""
    decoder_depth: int = 24
    """ViT only: transformer blocks in the decoder."""
    decoder_heads: int = 16
    """ViT only: attention heads in the decoder."""
    embed_dim: int | None = None
    """Width of the alignment head (LN -> Linear on pooled quantized features); None = no head."""
    text_encoder: TextEncoderConfig | None = None
    """Frozen text encoder used by ``embed_text`` (stage ``text``); None = none."""
    grad_checkpointing: bool = False
    """Recompute encoder/decoder block activations in the backward pass to save memory."""
    version: int = CONFIG_VERSION
    """Schema version of this config (written into checkpoints)."""

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        name = "TokenizerConfig"
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"{name}.architecture: expected one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if not isinstance(self.preprocess, PreprocessConfig):
            raise InputError(
                f"{name}.preprocess: expected a PreprocessConfig, got {type(self.preprocess).__name__}"
            )
        if not isinstance(self.quantizer, QuantizerConfig):
            raise InputError(
                f"{name}.quantizer: expected a QuantizerConfig, got {type(self.quantizer).__name__}"
            )
        if not _is_power_of_two(self.downsample):
            raise InputError(f"{name}.downsample: expected a power of two, got {self.downsample}")
        size = self.preprocess.image_size
        if size % self.downsample:
            raise InputError(
                f"{name}.downsample: preprocess.image_size {size} is not divisible by downsample {self.downsample}"
            )
        if not self.channels or any(c < 1 for c in self.channels):
            raise InputError(f"{name}.channels: expected positive widths, got {self.channels}")
        if not _is_power_of_two(self.patch_size) or self.downsample % self.patch_size:
            raise InputError(
                f"{name}.patch_size: expected a power of two dividing downsample {self.downsample}, got {self.patch_size}"
            )
        levels = self.num_levels
        if self.architecture == "cnn" and len(self.channels) > levels:
            raise InputError(
                f"{name}.channels: downsample {self.downsample} gives {levels} resolution levels, "
                f"got {len(self.channels)} widths {self.channels}"
            )
        if self.num_res_blocks < 1:
            raise InputError(f"{name}.num_res_blocks: expected >= 1, got {self.num_res_blocks}")
        if self.decoder_depth < 1 or self.decoder_heads < 1 or self.decoder_width % self.decoder_heads:
            raise InputError(
                f"{name}: decoder_depth and decoder_heads must be >= 1 and decoder_width divisible by "
                f"decoder_heads, got width {self.decoder_width}, depth {self.decoder_depth}, heads {self.decoder_heads}"
            )
        if self.embed_dim is not None and self.embed_dim < 1:
            raise InputError(f"{name}.embed_dim: expected a positive width or None, got {self.embed_dim}")
        if self.text_encoder is not None and not isinstance(self.text_encoder, TextEncoderConfig):
            raise InputError(
                f"{name}.text_encoder: expected a TextEncoderConfig or None, got {type(self.text_encoder).__name__}"
            )
        if self.version != CONFIG_VERSION:
            raise InputError(f"{name}.version: this code reads version {CONFIG_VERSION}, got {self.version}")

    @property
    def num_levels(self) -> int:
        """CNN only: resolution levels between the stem and the code grid, log2(downsample / patch_size) + 1."""
        return (self.downsample // self.patch_size).bit_length()

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        side = self.preprocess.image_size // self.downsample
        return side, side

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists once dumped)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        """Inverse of :meth:`to_dict`; unknown keys or wrong types raise InputError naming the key."""
        return _dataclass_from_dict(cls, data, "TokenizerConfig")


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (ValueError, TypeError) as error:
        raise InputError(f"{where}: {error}") from error


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting JSON lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except InputError as error:
                errors.append(str(error))
        raise InputError(errors[0] if len(errors) == 1 else f"{where}: no type of {hint} accepts {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _dataclass_from_dict(hint, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise InputError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [
                _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_hint = args[0] if args else Any
            items = [_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _convert_scalar(value, hint, where)


def _convert_scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is type(None):
        ok = value is None
    else:  # Any or a type this converter does not know: accepted as is
        return value
    if not ok:
        raise InputError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _tiny() -> TokenizerConfig:
    """Tests and notebooks: 32 px, 8x8 grid, K=2 x V=16 x d=4; seconds on CPU."""
    return TokenizerConfig(
        architecture="cnn",
        preprocess=PreprocessConfig(image_size=32, channels=3),
        quantizer=QuantizerConfig(num_codebooks=2, codebook_size=16, codebook_dim=4),
        downsample=4,
        channels=(8, 16),
        num_res_blocks=1,
    )


def _small() -> TokenizerConfig:
    """CPU demo: 128 px, CNN with a 4x space-to-depth stem, 8x down -> 16x16 grid, K=8 x V=1024 x d=8.

    Wide and shallow on purpose: on phantoms at 128², 400 steps give 24.6 dB against 20.9 dB for the narrow
    four-level (8, 16, 32, 64) network it replaced, at 10% less time per step (docs/BENCHMARKS.md).
    """
    return TokenizerConfig(
        architecture="cnn",
        preprocess=PreprocessConfig(image_size=128, channels=3),
        quantizer=QuantizerConfig(num_codebooks=8, codebook_size=1024, codebook_dim=8),
        downsample=8,
        patch_size=4,
        channels=(64, 128),
        num_res_blocks=1,
    )


def _base() -> TokenizerConfig:
    """256 px, timm ViT-B/16 encoder + ViT-B decoder, 16x16 grid, K=8 x V=4096 x d=8."""
    return TokenizerConfig(
        architecture="vit",
        preprocess=PreprocessConfig(image_size=256, channels=3),
        quantizer=QuantizerConfig(num_codebooks=8, codebook_size=4096, codebook_dim=8),
        downsample=16,
        encoder_name="vit_base_patch16_224",
        decoder_width=768,
        decoder_depth=12,
        decoder_heads=12,
    )


def _large() -> TokenizerConfig:
    """MedITok scale: ViTamin-L encoder (timm vitamin_large_256), 16x down, K=8 x V=4096 x d=8, ViT-L decoder."""
    return TokenizerConfig(
        architecture="vit",
        preprocess=PreprocessConfig(image_size=256, channels=3),
        quantizer=QuantizerConfig(num_codebooks=8, codebook_size=4096, codebook_dim=8),
        downsample=16,
        encoder_name="vitamin_large_256",
        decoder_width=1024,
        decoder_depth=24,
        decoder_heads=16,
    )


PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "tiny": _tiny,
    "small": _small,
    "base": _base,
    "large": _large,
}
"""Named sizes; each entry builds a fresh config."""


def create_config(preset: str = "tiny", **overrides: Any) -> TokenizerConfig:
    """A preset with overrides applied and validated.

    Args:
        preset: a key of :data:`PRESETS`.
        **overrides: field values by name; nested fields either dotted
            (``**{"quantizer.codebook_size": 32}``) or as a mapping (``quantizer={"codebook_size": 32}``),
            which is merged into the preset's section. Dataclass values replace the section.

    Raises:
        InputError: unknown preset, unknown key, wrong type or invalid value.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown tokenizer preset {preset!r}; expected one of {sorted(PRESETS)}")
    data = PRESETS[preset]().to_dict()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise InputError(
                    f"override {key!r}: {'.'.join(parents[: depth + 1])!r} is not a config section"
                )
            node = node[part]
        if leaf not in node:
            raise InputError(f"override {key!r}: unknown key {leaf!r}; expected some of {sorted(node)}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and isinstance(node[leaf], dict):
            node[leaf] = _merge(node[leaf], value)
        else:
            node[leaf] = value
    return TokenizerConfig.from_dict(data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
