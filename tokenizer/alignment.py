"""Contrastive alignment of the tokenizer to frozen teachers (DESIGN §3).

Stage ``visual`` pulls the pooled post-quantisation tokens towards a frozen vision teacher's global
embedding of the same image; stage ``text`` towards a frozen text encoder's embedding of the caption;
stage ``recon`` has no alignment. MedITok's teacher for both is BiomedCLIP
(:data:`BIOMEDCLIP`, an open_clip ``hf-hub:`` model: ViT-B/16 image tower, PubMedBERT text tower,
context 256); :meth:`TeacherConfig.biomedclip` / :meth:`TextEncoderConfig.biomedclip` select it.

``pretrained=None`` builds every teacher with random weights from its ``seed`` (identical on every
rank), which is what tests use; the ``builtin`` kinds are small random stand-ins for the CPU demo
and say so in ``.description``. Nothing here touches the network unless a config names the hub.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizer.distributed import world_size
from tokenizer.errors import InputError

log = logging.getLogger(__name__)

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
"""MedITok's teacher (image and text towers), loaded through open_clip."""

STAGE_WEIGHTS = {"visual": 0.1, "text": 1.0, "recon": 0.0}
"""Default λ per stage (MedITok): 0.1 for the vision teacher, 1.0 for the text encoder."""

BUILTIN_VISION_SIZE = 32
"""Input size of the builtin vision teacher when ``image_size`` is None (cheap on CPU)."""


def _check_choice(owner: str, name: str, value: str, choices) -> None:
    if value not in choices:
        raise InputError(f"{owner}.{name}: expected one of {tuple(choices)}, got {value!r}")


@dataclass
class TeacherConfig:
    """A frozen vision teacher."""

    kind: str = "builtin"
    """"open_clip" (image tower of a CLIP model), "timm" (pooled features) or "builtin" (random timm ViT)."""
    name: str = ""
    """open_clip name / ``hf-hub:`` / ``local-dir:`` id, or timm name; "" = timm's tiny "test_vit"."""
    pretrained: str | None = None
    """None = random init from ``seed``; a local weights file or directory; "hub" = weights by ``name``
    from the hub (an open_clip pretrained tag such as "openai" also works for built-in open_clip names)."""
    image_size: int | None = None
    """Teacher input size; None = the teacher's own (builtin: 32). Set, it resizes ViT position embeddings."""
    embed_dim: int = 64
    """Output width of the builtin teacher (other kinds report their own ``embed_dim``)."""
    seed: int = 0
    """Seed of the random initialisation, so every rank builds the same random teacher."""

    def __post_init__(self) -> None:
        _check_choice("TeacherConfig", "kind", self.kind, ("open_clip", "timm", "builtin"))
        if self.kind == "builtin":
            self.name = self.name or "test_vit"  # 0.3M parameters: cheap on CPU
            self.image_size = self.image_size or BUILTIN_VISION_SIZE
            if self.pretrained is not None:
                raise InputError("TeacherConfig.pretrained: the builtin teacher is random; use kind='timm'")
        if not self.name:
            raise InputError(f"TeacherConfig.name: a {self.kind} model name is required")
        if self.image_size is not None and self.image_size <= 0:
            raise InputError(f"TeacherConfig.image_size: expected a positive size, got {self.image_size}")
        if self.embed_dim <= 0:
            raise InputError(f"TeacherConfig.embed_dim: expected > 0, got {self.embed_dim}")

    @classmethod
    def biomedclip(cls) -> TeacherConfig:
        """MedITok's choice: BiomedCLIP's ViT-B/16 image tower, weights from the hub."""
        return cls(kind="open_clip", name=BIOMEDCLIP, pretrained="hub")


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
        _check_choice("TextEncoderConfig", "kind", self.kind, ("open_clip", "hf", "builtin"))
        _check_choice("TextEncoderConfig", "pooling", self.pooling, ("mean", "cls"))
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


@dataclass
class AlignmentConfig:
    """Which alignment a tokenizer stage trains with, and the contrastive loss settings."""

    stage: str = "visual"
    """"visual" (vision teacher), "text" (text encoder of the caption) or "recon" (none)."""
    weight: float | None = None
    """λ of the contrastive term; None means the stage's default in :data:`STAGE_WEIGHTS`
    (0.1 visual, 1.0 text, 0.0 recon), read through :attr:`effective_weight`."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Vision teacher of stage ``visual``."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text encoder of stage ``text``."""
    init_temperature: float = 0.07
    """Initial softmax temperature τ (logit scale 1/τ)."""
    max_logit_scale: float = 100.0
    """Upper clamp of the learnable logit scale 1/τ."""
    gather_negatives: bool = True
    """Under torch.distributed, use every rank's batch as negatives."""

    @property
    def effective_weight(self) -> float:
        """λ: the configured weight, or the stage's default when none is set."""
        return STAGE_WEIGHTS[self.stage] if self.weight is None else self.weight

    def __post_init__(self) -> None:
        _check_choice("AlignmentConfig", "stage", self.stage, tuple(STAGE_WEIGHTS))
        if self.weight is not None and self.weight < 0:
            raise InputError(f"AlignmentConfig.weight: expected >= 0, got {self.weight}")
        if self.init_temperature <= 0:
            raise InputError(f"AlignmentConfig.init_temperature: expected > 0, got {self.init_temperature}")
        if self.max_logit_scale <= 0:
            raise InputError(f"AlignmentConfig.max_logit_scale: expected > 0, got {self.max_logit_scale}")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a random initialisation from ``seed`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class _FrozenModule(nn.Module):
    """A module that stays in eval mode whatever ``.train()`` its parent calls."""

    def train(self, mode: bool = True) -> _FrozenModule:
        return super().train(False)


# ---------------------------------------------------------------------------------------------- vision
class ImagePreprocess(nn.Module):
    """The teacher's own preprocessing, applied to tokenizer inputs.

    (B, C, H, W) in [-1, 1] with C in {1, 3} → (B, 3, S, S): grey repeated to 3 channels, mapped to
    [0, 1], shortest side resized to ``S / crop_pct`` and centre-cropped to S (``squash`` resizes
    straight to S), then normalised with the teacher's mean / std.
    """

    def __init__(
        self,
        size: int,
        mean,
        std,
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
        resize_mode: str = "shortest",
    ) -> None:
        super().__init__()
        self.size, self.crop_pct, self.resize_mode = int(size), float(crop_pct), resize_mode
        self.interpolation = (
            interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bilinear"
        )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"teacher input: expected (B, 1 or 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = ((x.float() + 1) / 2).expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            target = (self.size, self.size)
        else:
            scale = math.floor(self.size / self.crop_pct) / min(h, w)
            target = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        if target != (h, w):
            smooth = self.interpolation != "nearest"
            x = F.interpolate(
                x,
                size=target,
                mode=self.interpolation,
                antialias=smooth and target[0] < h,
                align_corners=False if smooth else None,
            ).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return (x - self.mean) / self.std


class VisionTeacher(_FrozenModule):
    """A frozen image encoder: (B, C, H, W) in [-1, 1] → (B, D) l2-normalised global embedding."""

    def __init__(self, backbone: nn.Module, preprocess: ImagePreprocess, description: str) -> None:
        super().__init__()
        self.backbone, self.preprocess, self.description = _frozen(backbone), preprocess, description
        with torch.no_grad():
            self.embed_dim = int(self.backbone(torch.zeros(1, 3, preprocess.size, preprocess.size)).shape[-1])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, D) float32 features before l2 normalisation."""
        p = self.preprocess(x)
        return self.backbone(p.to(next(self.backbone.parameters()).dtype)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


def _open_clip_model(name: str, pretrained: str | None, seed: int, **force):
    """An open_clip model (random when ``pretrained`` is None) and a description of its weights."""
    import open_clip

    common = dict(pretrained_image=False, pretrained_text=False, **force)
    path = Path(pretrained) if pretrained not in (None, "hub") else None
    with _seeded(seed):
        if pretrained is None:
            return open_clip.create_model(
                name, load_weights=False, **common
            ), f"open_clip {name}, RANDOM weights"
        if pretrained == "hub":
            model = open_clip.create_model(name, require_pretrained=True, **common)
        elif path.is_dir():
            model = open_clip.create_model(f"local-dir:{path}", require_pretrained=True, **common)
        elif path.is_file():
            model = open_clip.create_model(name, load_weights=False, **common)
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        elif pretrained in open_clip.list_pretrained_tags_by_model(name):
            model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, **common)
        else:
            raise InputError(
                f"pretrained={pretrained!r} for open_clip {name!r}: no such file, directory or tag"
            )
    return model, f"open_clip {name}, weights {pretrained}"


def _open_clip_vision(cfg: TeacherConfig) -> VisionTeacher:
    import open_clip

    force = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    model, desc = _open_clip_model(cfg.name, cfg.pretrained, cfg.seed, **force)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    resize_mode = "squash" if pp.get("resize_mode") == "squash" else "shortest"
    if pp.get("resize_mode") == "longest":
        log.warning("open_clip %s: resize_mode 'longest' is applied as 'shortest' + centre crop", cfg.name)
    preprocess = ImagePreprocess(
        size, pp["mean"], pp["std"], pp.get("interpolation", "bicubic"), 1.0, resize_mode
    )
    return VisionTeacher(model.visual, preprocess, desc)


def _timm_model(cfg: TeacherConfig, num_classes: int) -> tuple[nn.Module, str]:
    import timm

    kwargs: dict = {"num_classes": num_classes}
    name, desc = cfg.name, f"timm {cfg.name}, RANDOM weights (seed {cfg.seed})"
    if cfg.pretrained is None:
        kwargs["pretrained"] = False
    elif cfg.pretrained == "hub":
        kwargs["pretrained"], desc = True, f"timm {cfg.name}, hub weights"
    elif Path(cfg.pretrained).is_dir():
        name, kwargs["pretrained"], desc = f"local-dir:{cfg.pretrained}", True, f"timm {cfg.pretrained}"
    elif Path(cfg.pretrained).is_file():
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(cfg.pretrained)})
        desc = f"timm {cfg.name}, weights {cfg.pretrained}"
    else:
        raise InputError(f"TeacherConfig.pretrained={cfg.pretrained!r}: no such file or directory")
    with _seeded(cfg.seed):
        if cfg.image_size is not None:
            try:
                return timm.create_model(name, img_size=cfg.image_size, **kwargs), desc
            except TypeError:  # convolutional models take any size and have no img_size argument
                pass
        return timm.create_model(name, **kwargs), desc


def _timm_vision(cfg: TeacherConfig) -> VisionTeacher:
    builtin = cfg.kind == "builtin"
    model, desc = _timm_model(cfg, num_classes=cfg.embed_dim if builtin else 0)
    if builtin:
        desc = (
            f"builtin: timm {cfg.name}, RANDOM weights (seed {cfg.seed}), {cfg.image_size} px, not pretrained"
        )
    pc = model.pretrained_cfg
    preprocess = ImagePreprocess(
        cfg.image_size or pc.get("input_size", (3, 224, 224))[-1],
        pc.get("mean", (0.485, 0.456, 0.406)),
        pc.get("std", (0.229, 0.224, 0.225)),
        pc.get("interpolation", "bicubic"),
        pc.get("crop_pct", 1.0) or 1.0,
    )
    return VisionTeacher(model, preprocess, desc)


_VISION_BUILDERS = {"open_clip": _open_clip_vision, "timm": _timm_vision, "builtin": _timm_vision}


def build_vision_teacher(cfg: TeacherConfig) -> VisionTeacher:
    """The frozen vision teacher described by ``cfg`` (random weights when ``cfg.pretrained`` is None)."""
    teacher = _VISION_BUILDERS[cfg.kind](cfg)
    log.info("vision teacher: %s (embed_dim %d)", teacher.description, teacher.embed_dim)
    return teacher


# ---------------------------------------------------------------------------------------------- text
class TextEncoder(_FrozenModule):
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

        model, desc = _open_clip_model(cfg.name, cfg.pretrained, cfg.seed)
        model.visual = None  # the image tower is not needed to embed text
        length = min(cfg.context_length, int(getattr(model, "context_length", cfg.context_length)))
        local = cfg.pretrained not in (None, "hub") and Path(cfg.pretrained).is_dir()
        tokenizer = open_clip.get_tokenizer(
            f"local-dir:{cfg.pretrained}" if local else cfg.name, context_length=length
        )
        with torch.no_grad():
            dim = int(model.encode_text(tokenizer([""])).shape[-1])
        super().__init__(cfg, dim, desc)
        self.model, self.tokenizer = _frozen(model), tokenizer

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self._device()))


class _HFText(TextEncoder):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = cfg.name if cfg.pretrained in (None, "hub") else cfg.pretrained
        code = {"trust_remote_code": False}  # configs naming Python code are refused, never run (no prompt)
        tokenizer = AutoTokenizer.from_pretrained(source, **code)
        if cfg.pretrained is None:
            with _seeded(cfg.seed):
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, **code), **code)
            desc = f"hf {cfg.name} ({cfg.pooling} pooling), RANDOM weights (seed {cfg.seed})"
        else:
            model = AutoModel.from_pretrained(source, use_safetensors=True, **code)
            desc = f"hf {source} ({cfg.pooling} pooling)"
        limits = [cfg.context_length, getattr(model.config, "max_position_embeddings", None)]
        limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else None)
        super().__init__(cfg, int(model.config.hidden_size), desc)
        self.model, self.tokenizer = _frozen(model), tokenizer
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


# ---------------------------------------------------------------------------------------------- loss
class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows of every rank; backward sums the gradient over ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on this rank's rows
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of ``x`` (n_r, ...) from every rank, concatenated in rank order, and this rank's offset.

    Without an initialised process group (or with one rank) returns ``(x, 0)``. Ranks may hold
    different numbers of rows. Gradients flow back to the local rows from every rank's use of them.
    """
    if world_size() == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    return _AllGatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with a learnable temperature (CLIP).

    With a, b the l2-normalised rows of ``image_emb`` and ``target_emb``, s = min(exp(θ), s_max)
    the logit scale (θ = ``logit_scale``, initialised to log(1/τ₀)) and N the (global) batch::

        L = ½ [ CE(s · a bᵀ, y) + CE(s · b aᵀ, y) ],   y_i = i

    Under torch.distributed with ``gather_negatives``, each rank scores its rows against the
    gathered rows of all ranks (labels offset by the rank's position), gradients flowing back
    through the gather; the DDP average of the per-rank losses then equals the loss of the
    concatenated batch. The clamp stops the gradient of θ while s sits at s_max.
    """

    def __init__(self, config: AlignmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AlignmentConfig()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.config.init_temperature)))

    def scale(self) -> torch.Tensor:
        """The current logit scale s = min(exp(θ), max_logit_scale) (scalar tensor)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, image_emb: torch.Tensor, target_emb: torch.Tensor) -> torch.Tensor:
        """image_emb (B, D), target_emb (B, D) → scalar loss."""
        if image_emb.ndim != 2 or image_emb.shape != target_emb.shape:
            raise InputError(
                f"contrastive loss: expected two (B, D) tensors of the same shape, got "
                f"{tuple(image_emb.shape)} and {tuple(target_emb.shape)}"
            )
        a = F.normalize(image_emb.float(), dim=-1)
        b = F.normalize(target_emb.float(), dim=-1)
        a_all, b_all, offset = a, b, 0
        if self.config.gather_negatives:
            (a_all, offset), (b_all, _) = gather_with_grad(a), gather_with_grad(b)
        labels = torch.arange(a.shape[0], device=a.device) + offset
        s = self.scale()
        return 0.5 * (F.cross_entropy(s * a @ b_all.T, labels) + F.cross_entropy(s * b @ a_all.T, labels))


# ---------------------------------------------------------------------------------------------- zero-shot
def class_prompts(classnames: list[str], template: str = "a medical image showing {}.") -> list[str]:
    """One prompt per class name, ``template`` with ``{}`` replaced by the name."""
    if "{}" not in template:
        raise InputError(f"class_prompts: template {template!r} has no '{{}}' for the class name")
    return [template.format(name) for name in classnames]


def zero_shot_logits(
    image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """Cosine-similarity logits: image_emb (B, D), class_emb (C, D) → (B, C), scaled by ``logit_scale``."""
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise InputError(
            f"zero_shot_logits: expected (B, D) and (C, D), got {tuple(image_emb.shape)} "
            f"and {tuple(class_emb.shape)}"
        )
    return logit_scale * F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
