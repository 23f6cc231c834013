"""Contrastive alignment of the tokenizer to frozen teachers (DESIGN §3).

Stage ``visual`` pulls the pooled post-quantisation tokens towards a frozen vision teacher's global
embedding of the same image; stage ``text`` towards a frozen text encoder's embedding of the caption;
stage ``recon`` has no alignment. MedITok's teacher for both is BiomedCLIP
(:data:`tokenizer.frozen.BIOMEDCLIP`, an open_clip ``hf-hub:`` model: ViT-B/16 image tower, PubMedBERT
text tower, context 256); :meth:`TeacherConfig.biomedclip` /
:meth:`tokenizer.text_encoder.TextEncoderConfig.biomedclip` select it. The text encoders live in
:mod:`tokenizer.text_encoder`; this module holds the vision teacher and the contrastive loss.

``pretrained=None`` builds every teacher with random weights from its ``seed`` (identical on every
rank), which is what tests use; the ``builtin`` kinds are small random stand-ins for the CPU demo
and say so in ``.description``. Nothing here touches the network unless a config names the hub.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizer.distributed import world_size
from tokenizer.errors import InputError
from tokenizer.frozen import BIOMEDCLIP, FrozenModule, check_choice, frozen, open_clip_model, seeded
from tokenizer.text_encoder import TextEncoderConfig

log = logging.getLogger(__name__)

STAGE_WEIGHTS = {"visual": 0.1, "text": 1.0, "recon": 0.0}
"""Default λ per stage (MedITok): 0.1 for the vision teacher, 1.0 for the text encoder."""

BUILTIN_VISION_SIZE = 32
"""Input size of the builtin vision teacher when ``image_size`` is None (cheap on CPU)."""


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
        check_choice("TeacherConfig", "kind", self.kind, ("open_clip", "timm", "builtin"))
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
        check_choice("AlignmentConfig", "stage", self.stage, tuple(STAGE_WEIGHTS))
        if self.weight is not None and self.weight < 0:
            raise InputError(f"AlignmentConfig.weight: expected >= 0, got {self.weight}")
        if self.init_temperature <= 0:
            raise InputError(f"AlignmentConfig.init_temperature: expected > 0, got {self.init_temperature}")
        if self.max_logit_scale <= 0:
            raise InputError(f"AlignmentConfig.max_logit_scale: expected > 0, got {self.max_logit_scale}")


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


class VisionTeacher(FrozenModule):
    """A frozen image encoder: (B, C, H, W) in [-1, 1] → (B, D) l2-normalised global embedding."""

    def __init__(self, backbone: nn.Module, preprocess: ImagePreprocess, description: str) -> None:
        super().__init__()
        self.backbone, self.preprocess, self.description = frozen(backbone), preprocess, description
        with torch.no_grad():
            self.embed_dim = int(self.backbone(torch.zeros(1, 3, preprocess.size, preprocess.size)).shape[-1])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, D) float32 features before l2 normalisation."""
        p = self.preprocess(x)
        return self.backbone(p.to(next(self.backbone.parameters()).dtype)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


def _open_clip_vision(cfg: TeacherConfig) -> VisionTeacher:
    import open_clip

    force = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    model, desc = open_clip_model(cfg.name, cfg.pretrained, cfg.seed, **force)
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
    with seeded(cfg.seed):
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
