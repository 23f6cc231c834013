"""Frozen caption encoders: the ``text`` alignment stage's teacher (DESIGN §3) and ``ImageTokenizer.embed_text``.

Kinds: open_clip text towers, Hugging Face BERT-family models, and a builtin hashed bag of words (a
random stand-in for tests and the CPU demo). ``pretrained=None`` builds an encoder with random weights
from its ``seed``; :meth:`TextEncoderConfig.biomedclip` selects BiomedCLIP's PubMedBERT text tower.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizer.errors import InputError
from tokenizer.frozen import BIOMEDCLIP, FrozenModule, check_choice, frozen, open_clip_model, seeded

log = logging.getLogger(__name__)


@dataclass
class TextEncoderConfig:
    """A frozen text encoder for captions."""

    kind: str = "builtin"
    """"open_clip" (text tower), "hf" (Hugging Face BERT-family AutoModel) or "builtin" (hashed words)."""
    name: str = ""
    """open_clip name / ``hf-hub:`` id, or HF hub id / local directory of the architecture and tokenizer."""
    pretrained: str | None = None
    """None = random init from ``seed``; a local weights file/directory; "hub" = weights by ``name``
    (HF: a local directory or hub id holding weights and tokenizer)."""
    context_length: int = 256
    """Tokens kept per caption (also capped by the model's own maximum)."""
    embed_dim: int = 64
    """Output width of the builtin encoder."""
    pooling: str = "mean"
    """HF only: "mean" over the attention mask or "cls" (first token)."""
    cache_size: int = 4096
    """Captions whose embeddings are kept (LRU); 0 disables the cache."""
    num_buckets: int = 4096
    """Builtin only: hash buckets of the bag of words."""
    seed: int = 0
    """Seed of the random initialisation / builtin tables."""

    def __post_init__(self) -> None:
        check_choice("TextEncoderConfig", "kind", self.kind, ("open_clip", "hf", "builtin"))
        check_choice("TextEncoderConfig", "pooling", self.pooling, ("mean", "cls"))
        if self.kind == "builtin" and self.pretrained is not None:
            raise InputError("TextEncoderConfig.pretrained: the builtin encoder is random; use kind='hf'")
        if self.kind != "builtin" and not self.name:
            raise InputError(f"TextEncoderConfig.name: a {self.kind} model name is required")
        for name in ("context_length", "embed_dim", "num_buckets"):
            if getattr(self, name) <= 0:
                raise InputError(f"TextEncoderConfig.{name}: expected > 0, got {getattr(self, name)}")
        if self.cache_size < 0:
            raise InputError(f"TextEncoderConfig.cache_size: expected >= 0, got {self.cache_size}")

    @classmethod
    def biomedclip(cls) -> TextEncoderConfig:
        """MedITok's choice: BiomedCLIP's PubMedBERT text tower (context 256), weights from the hub."""
        return cls(kind="open_clip", name=BIOMEDCLIP, pretrained="hub")


class TextEncoder(FrozenModule):
    """A frozen caption encoder: list of B strings → (B, D) l2-normalised embeddings.

    Subclasses implement ``_encode``; this class de-duplicates a batch and keeps an LRU cache of
    ``cache_size`` captions (captions repeat a lot), so a caption is encoded once.
    """

    def __init__(self, cfg: TextEncoderConfig, embed_dim: int, description: str) -> None:
        super().__init__()
        self.config, self.embed_dim, self.description = cfg, embed_dim, description
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise InputError(
                f"text encoder: expected a non-empty list of strings, got {type(texts).__name__}"
            )
        unique = list(dict.fromkeys(texts))
        found = {t: self._cache[t] for t in unique if t in self._cache}
        for t in found:
            self._cache.move_to_end(t)
        missing = [t for t in unique if t not in found]
        if missing:
            rows = F.normalize(self._encode(missing).float(), dim=-1)
            found.update((t, row.clone()) for t, row in zip(missing, rows, strict=True))
            if self.config.cache_size:
                self._cache.update((t, found[t]) for t in missing)
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        device = self._device()
        return torch.stack([found[t].to(device) for t in texts])


class _OpenClipText(TextEncoder):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        import open_clip

        model, desc = open_clip_model(cfg.name, cfg.pretrained, cfg.seed)
        model.visual = None  # the image tower is not needed to embed text
        length = min(cfg.context_length, int(getattr(model, "context_length", cfg.context_length)))
        local = cfg.pretrained not in (None, "hub") and Path(cfg.pretrained).is_dir()
        tokenizer = open_clip.get_tokenizer(
            f"local-dir:{cfg.pretrained}" if local else cfg.name, context_length=length
        )
        with torch.no_grad():
            dim = int(model.encode_text(tokenizer([""])).shape[-1])
        super().__init__(cfg, dim, desc)
        self.model, self.tokenizer = frozen(model), tokenizer

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self._device()))


class _HFText(TextEncoder):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = cfg.name if cfg.pretrained in (None, "hub") else cfg.pretrained
        code = {"trust_remote_code": False}  # configs naming Python code are refused, never run (no prompt)
        tokenizer = AutoTokenizer.from_pretrained(source, **code)
        if cfg.pretrained is None:
            with seeded(cfg.seed):
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, **code), **code)
            desc = f"hf {cfg.name} ({cfg.pooling} pooling), RANDOM weights (seed {cfg.seed})"
        else:
            model = AutoModel.from_pretrained(source, use_safetensors=True, **code)
            desc = f"hf {source} ({cfg.pooling} pooling)"
        limits = [cfg.context_length, getattr(model.config, "max_position_embeddings", None)]
        limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else None)
        super().__init__(cfg, int(model.config.hidden_size), desc)
        self.model, self.tokenizer = frozen(model), tokenizer
        self.max_length = min(n for n in limits if n)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self._device()) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


class _HashedBagOfWords(TextEncoder):
    """Random stand-in text encoder that keeps word overlap and needs no files.

    word → stable hash bucket → row of a fixed random table (seeded) → mean over the words →
    fixed random linear map → l2. Two captions sharing words get correlated embeddings.
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        d = cfg.embed_dim
        desc = (
            f"builtin: RANDOM hashed bag of words ({cfg.num_buckets} buckets, dim {d}, seed {cfg.seed}) — "
            "a stand-in, not a pretrained text encoder"
        )
        super().__init__(cfg, d, desc)
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("table", torch.randn(cfg.num_buckets, d, generator=g), persistent=False)
        self.register_buffer("proj", torch.randn(d, d, generator=g) / math.sqrt(d), persistent=False)

    def _bucket(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.config.num_buckets

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for text in texts:
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.config.context_length] or [""]
            offsets.append(len(ids))
            ids.extend(self._bucket(w) for w in words)
        device = self.table.device
        bags = F.embedding_bag(
            torch.tensor(ids, device=device), self.table, torch.tensor(offsets, device=device), mode="mean"
        )
        return bags @ self.proj


_TEXT_BUILDERS = {"open_clip": _OpenClipText, "hf": _HFText, "builtin": _HashedBagOfWords}


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The frozen text encoder described by ``cfg`` (random weights when ``cfg.pretrained`` is None)."""
    encoder = _TEXT_BUILDERS[cfg.kind](cfg)
    log.info("text encoder: %s (embed_dim %d)", encoder.description, encoder.embed_dim)
    return encoder
