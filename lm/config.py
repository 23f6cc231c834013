"""Configuration of the unified decoder-only LM (:class:`lm.model.DecoderLM`) and its size presets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

from tokenizer.errors import InputError

ATTN_BACKENDS: tuple[str, ...] = ("sdpa", "xformers")


@dataclass
class LMConfig:
    """Architecture of the Llama-style backbone, its image depth head and the training-loss options."""

    dim: int = 256
    """Model width (residual stream size)."""
    n_layers: int = 6
    """Number of backbone transformer blocks."""
    n_heads: int = 8
    """Attention heads (query heads); ``dim`` must be a multiple."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = ``n_heads`` (plain multi-head attention)."""
    mlp_ratio: float = 8 / 3
    """SwiGLU hidden width as a multiple of ``dim`` before rounding (8/3 keeps the parameter count of a 4x MLP)."""
    mlp_multiple_of: int = 32
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    qk_norm: bool = True
    """RMS-normalise queries and keys per head before RoPE (stabilises attention logits)."""
    max_seq_len: int = 1024
    """Longest sequence (prompt + generation) the RoPE tables and caches are built for."""
    depth_layers: int = 1
    """Transformer blocks of the image depth head (1-3) that predicts the K sub-codes of a position."""
    depth_dim: int | None = None
    """Width of the depth head (a multiple of the head dim); None = ``dim``. A narrower head makes each
    of the K sub-code steps of generation cheaper; its inputs are projected from ``dim``."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (training only)."""
    attn_backend: str = "sdpa"
    """``"sdpa"`` (torch scaled_dot_product_attention) or ``"xformers"`` (needs the optional package)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (activation checkpointing)."""
    hf_backbone: str | None = None
    """Local path of a Hugging Face causal LM whose transformer replaces the native backbone (LLM-CXR style);
    ``dim`` / ``n_layers`` / heads are then taken from that model and ignored here."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights (residual outputs are scaled
    by 1/sqrt(2 * n_layers))."""
    z_loss_weight: float = 1e-5
    """Weight of the z-loss ``mean(logsumexp(text_logits)^2)``; 0 disables it."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "mlp_multiple_of")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"LMConfig.{name}: expected a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise InputError(f"LMConfig.dim: {self.dim} is not a multiple of n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise InputError(f"LMConfig: head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise InputError(
                f"LMConfig.n_kv_heads: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if not 1 <= self.depth_layers <= 3:
            raise InputError(f"LMConfig.depth_layers: expected 1..3, got {self.depth_layers}")
        if self.depth_dim is not None and (
            not isinstance(self.depth_dim, int) or self.depth_dim < 1 or self.depth_dim % self.head_dim
        ):
            raise InputError(
                f"LMConfig.depth_dim: expected None or a positive multiple of the head dim {self.head_dim}, "
                f"got {self.depth_dim!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LMConfig.dropout: expected [0, 1), got {self.dropout}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise InputError(
                f"LMConfig.attn_backend: expected one of {ATTN_BACKENDS}, got {self.attn_backend!r}"
            )
        for name in ("mlp_ratio", "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"LMConfig.{name}: expected a positive number, got {value!r}")
        if not (math.isfinite(self.z_loss_weight) and self.z_loss_weight >= 0):
            raise InputError(f"LMConfig.z_loss_weight: expected >= 0, got {self.z_loss_weight}")
        if self.hf_backbone is not None and not isinstance(self.hf_backbone, str):
            raise InputError(
                f"LMConfig.hf_backbone: expected a path string or None, got {self.hf_backbone!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def depth_config(self) -> LMConfig:
        """The config of the depth head's blocks: ``depth_dim`` wide, plain multi-head attention when narrowed."""
        if self.depth_dim is None or self.depth_dim == self.dim:
            return self
        heads = self.depth_dim // self.head_dim
        return replace(self, dim=self.depth_dim, n_heads=heads, n_kv_heads=heads, depth_dim=None)

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: ``mlp_ratio * dim`` rounded up to ``mlp_multiple_of``."""
        raw = int(self.mlp_ratio * self.dim)
        return self.mlp_multiple_of * math.ceil(raw / self.mlp_multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`InputError`."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(
                f"LM config: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}"
            )
        return cls(**d)


def _tiny() -> LMConfig:
    return LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512, depth_layers=1)


def _small() -> LMConfig:
    return LMConfig(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=1024, depth_layers=1, depth_dim=128
    )


def _base() -> LMConfig:
    return LMConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=2048, depth_layers=2)


def _large() -> LMConfig:
    return LMConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048, depth_layers=3)


PRESETS: dict[str, Callable[[], LMConfig]] = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}
"""Named sizes. ``tiny``: tests; ``small``: CPU demo; ``base`` / ``large``: GPU training."""


def lm_config(preset: str = "tiny", **overrides) -> LMConfig:
    """The config of a named preset with field overrides, e.g. ``lm_config("small", depth_layers=2)``."""
    if preset not in PRESETS:
        raise InputError(f"LM preset {preset!r} unknown; expected one of {sorted(PRESETS)}")
    config = PRESETS[preset]()
    known = {f.name for f in fields(LMConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise InputError(f"LM preset overrides: unknown fields {sorted(unknown)}")
    return replace(config, **overrides)
