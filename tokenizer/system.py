"""The tokenizer training system: losses, the two optimizers, schedules, EMA and logging.

One LightningModule serves the three stages (``recon``, ``visual``, ``text``): the stage only decides which
alignment target (none, a frozen vision teacher, a frozen text encoder) the pooled tokens are pulled towards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.alignment import AlignmentConfig, ContrastiveLoss, build_vision_teacher
from tokenizer.config import TokenizerConfig
from tokenizer.discriminator import DiscriminatorConfig, build_discriminator
from tokenizer.guard import LossGuard
from tokenizer.losses import (
    LossConfig,
    ReconstructionLoss,
    adaptive_gan_weight,
    gan_ramp,
    hinge_d_loss,
    hinge_g_loss,
)
from tokenizer.model import ImageTokenizer
from tokenizer.text_encoder import build_text_encoder

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW for the tokenizer and the discriminator (MedITok values), warm-up then cosine to ``min_lr_ratio``."""

    lr: float = 5e-4
    """Tokenizer peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Tokenizer AdamW betas."""
    weight_decay: float = 0.02
    """Tokenizer AdamW weight decay (not applied to norms, biases and codebooks)."""
    disc_lr: float = 2e-5
    """Discriminator peak learning rate."""
    disc_betas: tuple[float, float] = (0.5, 0.9)
    """Discriminator AdamW betas."""
    disc_weight_decay: float = 0.2
    """Discriminator AdamW weight decay."""
    warmup_steps: int = 500
    """Linear warm-up steps for both optimizers."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    grad_clip: float = 10.0
    """Gradient-norm clip for the tokenizer (0 disables)."""
    skip_nonfinite: bool = True
    """Skip (and log) a step whose loss is NaN/Inf, or a spike (see ``spike_factor``), instead of applying it."""
    spike_factor: float = 10.0
    """With ``skip_nonfinite``: also skip a step whose loss exceeds this many times the running mean of
    accepted losses (after 100 accepted steps); 0 disables spike detection."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, disc_lr={self.disc_lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)
        self.disc_betas = tuple(self.disc_betas)


@dataclass
class TokenizerTrainConfig:
    """Everything the training system needs; saved inside every Lightning checkpoint as plain data."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1000
    """Length of the schedule in optimizer steps."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the tokenizer weights (e.g. 0.999); exported instead of the raw weights."""


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; never on norms, biases, embeddings or codebooks."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "codebook" not in name and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(system: L.LightningModule, groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW over parameter groups, fused (one kernel for all tensors) when every parameter is on the CPU or a
    CUDA device and no fp16 grad scaler is in use (a fused step unscales inside, after our clipping): on the CPU
    a fused step of the ``small`` LM takes a fifth of the per-tensor loop's time (docs/BENCHMARKS.md).
    Clip its gradients with :func:`clip_grad_norm`, not Lightning's ``clip_gradients``."""
    scaler = (
        system._trainer is not None and getattr(system.trainer.precision_plugin, "scaler", None) is not None
    )
    fused = not scaler and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def clip_grad_norm(system: L.LightningModule, parameters, max_norm: float) -> None:
    """Clip gradients to a global norm. Not Lightning's ``clip_gradients``: it refuses a fused optimizer under
    mixed precision (bf16 too, which has no scaler) and any norm clipping under FSDP. Under FSDP the root
    module's ``clip_grad_norm_`` takes the norm over every shard (of all the system's parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = system.trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel):
        root.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class TokenizerSystem(L.LightningModule):
    """VQ-GAN training with contrastive alignment, manual optimisation, two optimizers."""

    def __init__(self, config: TokenizerTrainConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = train_config_from_dict(config)
        self.config = config
        self.save_hyperparameters({"config": train_config_to_dict(config)})
        self.automatic_optimization = False
        self.model = ImageTokenizer(config.model)
        self.recon_loss = ReconstructionLoss(config.loss)
        self.discriminator = build_discriminator(config.discriminator)
        self.align_loss = ContrastiveLoss(config.alignment) if config.alignment.stage != "recon" else None
        self.teacher = (
            build_vision_teacher(config.alignment.teacher) if config.alignment.stage == "visual" else None
        )
        self.text_encoder = (
            build_text_encoder(config.alignment.text_encoder) if config.alignment.stage == "text" else None
        )
        target = self.teacher or self.text_encoder
        if target is not None and self.model.config.embed_dim != target.embed_dim:
            self.model.reset_align_head(target.embed_dim)
        self.ema = None
        if config.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay)
            )
        self.skipped_steps = 0
        self.loss_guard = LossGuard(config.optim.spike_factor)
        # Frozen networks (teacher, text encoder, LPIPS) are rebuilt from their sources, not checkpointed.
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = self.frozen_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(frozen)]:
            del state[key]

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of modules that never train."""
        return tuple(
            f"{name}."
            for name, module in self.named_modules()
            if name and "." not in name and not any(p.requires_grad for p in module.parameters())
        ) + ("recon_loss.lpips.", "model.text_encoder.")

    # ------------------------------------------------------------------------------------------ setup
    def configure_optimizers(self):
        o = self.config.optim
        groups_g = param_groups(self.model, o.weight_decay) + self._align_params()
        opt_g = adamw(self, groups_g, lr=o.lr, betas=o.betas)
        groups_d = param_groups(self.discriminator, o.disc_weight_decay)
        opt_d = adamw(self, groups_d, lr=o.disc_lr, betas=o.disc_betas)
        total = self.config.max_steps

        def lam(step: int) -> float:
            return cosine_schedule(step, o.warmup_steps, total, o.min_lr_ratio)

        # The discriminator's learning rate is set from the global step in training_step: it steps only
        # once the GAN starts, and a LambdaLR stepped without its optimizer warns and drifts.
        return [opt_g, opt_d], [torch.optim.lr_scheduler.LambdaLR(opt_g, lam)]

    def _align_params(self) -> list[dict]:
        if self.align_loss is None:
            return []
        return [{"params": list(self.align_loss.parameters()), "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        sched_g = self.lr_schedulers()
        x = batch["image"]
        step = self.global_step

        kept = self._copy_buffers() if self.config.optim.skip_nonfinite else None
        losses, out = self.generator_losses(x, batch.get("caption"), step)
        if self.config.optim.skip_nonfinite:
            why = self.loss_guard.judge(losses["loss"])
            if why is not None:
                self._restore_buffers(kept)  # the forward pass already moved the codebook EMA: undo it
                self._skip(step, losses, why)
                return
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        if self.config.optim.grad_clip:
            params = [p for group in opt_g.param_groups for p in group["params"]]
            clip_grad_norm(self, params, self.config.optim.grad_clip)
        opt_g.step()
        sched_g.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

        if self._gan_active(step):
            o = self.config.optim
            for group in opt_d.param_groups:
                group["lr"] = o.disc_lr * cosine_schedule(
                    step, o.warmup_steps, self.config.max_steps, o.min_lr_ratio
                )
            d_loss = self.discriminator_loss(x, out.reconstruction.detach())
            if torch.isfinite(d_loss):
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                # The raw optimizer: Lightning counts wrapped steps as global steps, and one batch is one step.
                opt_d.optimizer.step()
            losses["d_loss"] = d_loss.detach()
        self._log_step(losses, out, x.shape[0])

    def generator_losses(self, x: torch.Tensor, captions: list[str] | None, step: int):
        """All generator-side losses for one batch; returns (dict of scalars, model output)."""
        out = self.model(x)
        rec = self.recon_loss(out.reconstruction, x)
        losses = {k: v for k, v in rec.items()}
        total = rec["loss"] + self.config.loss.vq_weight * out.vq_loss
        losses["vq"] = out.vq_loss.detach()
        if self._gan_active(step):
            g = hinge_g_loss(self.discriminator(out.reconstruction))
            weight = adaptive_gan_weight(rec["loss"], g, self.model.last_layer, self.config.loss)
            ramp = gan_ramp(step, self.config.loss.gan_start, self.config.loss.gan_ramp_steps)
            total = total + ramp * weight * g
            losses["g_loss"], losses["gan_weight"] = g.detach(), torch.as_tensor(ramp * weight)
        if self.align_loss is not None:
            target = self._alignment_target(x, captions)
            emb = self.model.image_embedding(out.quantized)
            align = self.align_loss(emb, target)
            total = total + self.config.alignment.effective_weight * align
            losses["align"] = align.detach()
            losses["logit_scale"] = self.align_loss.logit_scale.detach().exp()
        losses["loss"] = total
        return losses, out

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.discriminator(real), self.discriminator(fake))

    @torch.no_grad()
    def _alignment_target(self, x: torch.Tensor, captions: list[str] | None) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher(x.float())
        if not captions or any(not isinstance(c, str) for c in captions):
            raise ValueError("stage 'text' needs a caption for every image: the data gave none")
        return self.text_encoder(list(captions)).to(x.device)

    def _gan_active(self, step: int) -> bool:
        return self.config.loss.gan_weight > 0 and step >= self.config.loss.gan_start

    def _copy_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of what a forward pass changes without an optimizer (codebook EMA, norm statistics)."""
        return {name: b.detach().clone() for name, b in self.named_buffers()}

    @torch.no_grad()
    def _restore_buffers(self, kept: dict[str, torch.Tensor]) -> None:
        for name, b in self.named_buffers():
            b.copy_(kept[name])

    def _skip(self, step: int, losses: dict, why: str) -> None:
        self.skipped_steps += 1
        values = {k: float(v) for k, v in losses.items()}
        log.warning("step %d: %s, losses %s; step skipped (%d so far)", step, why, values, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))

    def _log_step(self, losses: dict, out, batch_size: int) -> None:
        scalars = {f"train/{k}": v.float() if torch.is_tensor(v) else float(v) for k, v in losses.items()}
        for k, (u, p) in enumerate(zip(out.usage.tolist(), out.perplexity.tolist(), strict=True)):
            scalars[f"codebook/usage_{k}"] = u
            scalars[f"codebook/perplexity_{k}"] = p
        scalars["lr"] = self.optimizers()[0].param_groups[0]["lr"]
        self.log_dict(scalars, batch_size=batch_size, sync_dist=False)
        self.log("loss", losses["loss"].detach(), prog_bar=True, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        model = self.export_model()
        codes = model.encode_to_codes(x)
        rec = model.decode_codes(codes).float().clamp(-1, 1)
        mse = F.mse_loss(rec, x.float(), reduction="none").flatten(1).mean(1)
        psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
        self.log("val/psnr", psnr.mean(), batch_size=x.shape[0], sync_dist=True, prog_bar=True)
        if batch_idx == 0:
            self._save_grid(x, rec)

    def _save_grid(self, x: torch.Tensor, rec: torch.Tensor) -> None:
        if not self.trainer.is_global_zero or self.trainer.log_dir is None:
            return
        from torchvision.utils import save_image

        n = min(8, x.shape[0])
        grid = torch.cat([x[:n], rec[:n]]).float().add(1).div(2).clamp(0, 1)
        path = Path(self.trainer.default_root_dir) / "images" / f"recon_step{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path, nrow=n)

    def export_model(self) -> ImageTokenizer:
        """The weights to ship: the EMA copy when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.model


# ---------------------------------------------------------------------------------------------- config I/O
def train_config_to_dict(config: TokenizerTrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["model"] = config.model.to_dict()
    return d


def train_config_from_dict(d: dict) -> TokenizerTrainConfig:
    from tokenizer.alignment import TeacherConfig
    from tokenizer.text_encoder import TextEncoderConfig

    align = dict(d.get("alignment", {}))
    align["teacher"] = TeacherConfig(**align.get("teacher", {}))
    align["text_encoder"] = TextEncoderConfig(**align.get("text_encoder", {}))
    return TokenizerTrainConfig(
        model=TokenizerConfig.from_dict(d["model"]),
        loss=LossConfig(**d.get("loss", {})),
        discriminator=DiscriminatorConfig(**d.get("discriminator", {})),
        alignment=AlignmentConfig(**align),
        optim=OptimConfig(**d.get("optim", {})),
        **{k: d[k] for k in ("max_steps", "ema_decay") if k in d},
    )
