"""The LM training system: weighted text / image losses, z-loss, AdamW with warm-up + cosine.

Mixed precision (bf16 autocast) comes from the Lightning ``precision`` setting; the model computes its
logits and losses in fp32 either way. Activation checkpointing is ``LMConfig.grad_checkpointing``. A step
whose loss is NaN/Inf on any rank is skipped on every rank (no backward, no optimizer step) and logged.
The hyperparameters stored in a checkpoint are plain dicts, so ``LMSystem.load_from_checkpoint(path,
weights_only=True)`` needs neither Hydra nor pickled classes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field

import lightning as L
import torch

from lm import grounding
from lm.config import LMConfig
from lm.model import DecoderLM, LMOutput
from lm.sequence import Batch
from lm.vocab import Vocab
from tokenizer.guard import LossGuard
from tokenizer.system import adamw, clip_grad_norm, cosine_schedule, param_groups

log = logging.getLogger(__name__)


DEFAULT_KIND_WEIGHTS = {"place": 1.0, "summary": 0.025, "answer": 0.0, "modality": 0.0}
"""Near the balance of the best run so far (lm37 in docs/BENCHMARKS.md, whose loss was the mean over all its
targets, ~4 % of them summaries, no answers); the answer and modality targets are opt-in (lm40-lm42, lm47,
lm50 there: ``modality: 0.5`` from the first step keeps the drawn images in the prompted modality)."""


@dataclass
class LMOptimConfig:
    """AdamW (β 0.9, 0.95) with linear warm-up then cosine decay to ``min_lr_ratio``; loss weights."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.1
    """Weight decay on matrices (never on norms, embeddings or the depth head's step embeddings)."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """The cosine ends at this fraction of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    text_weight: float = 1.0
    """Weight of the text cross-entropy."""
    image_weight: float = 1.0
    """Weight of the image (depth head) cross-entropy."""
    grounding_weight: float = 0.0
    """Weight of each kind of grounding target's mean cross-entropy (:mod:`lm.grounding`; targets from
    ``data.grounding``): a linear head kept in the training system, not in the saved model. 0 = no head."""
    grounding_kind_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS)
    )
    """Factor on ``grounding_weight`` per kind of target (``place``, ``summary``, ``answer``, ``modality``; a
    kind left out keeps its default, :data:`DEFAULT_KIND_WEIGHTS`)."""
    grounding_layer: int = 0
    """Backbone block (1-based, native backbone) whose output, RMS-normalised, feeds the grounding head's
    place, summary and modality targets; 0 = the final hidden states."""
    grounding_answer_layer: int | None = None
    """The same for the answer targets; None = ``grounding_layer``. A block after ``grounding_layer`` lets
    the answer read the summary that block left at ``<eoi>``."""
    skip_nonfinite: bool = True
    """Skip (and log) a step whose loss is NaN/Inf, or a spike (see ``spike_factor``), instead of applying it."""
    spike_factor: float = 10.0
    """With ``skip_nonfinite``: also skip a step whose loss exceeds this many times the running mean of
    accepted losses (after 100 accepted steps); 0 disables spike detection."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup_steps < 0:
            raise ValueError(f"optim: need lr > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio: expected [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip", "text_weight", "image_weight", "grounding_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optim.{name}: expected a finite value >= 0, got {value}")
        unknown = set(self.grounding_kind_weights) - set(grounding.KINDS)
        values = self.grounding_kind_weights.values()
        if unknown or not all(math.isfinite(w) and w >= 0 for w in values):
            raise ValueError(
                f"optim.grounding_kind_weights: expected {grounding.KINDS} mapped to finite values >= 0, "
                f"got {dict(self.grounding_kind_weights)}"
            )
        self.grounding_kind_weights = {**DEFAULT_KIND_WEIGHTS, **self.grounding_kind_weights}
        for name in ("grounding_layer", "grounding_answer_layer"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"optim.{name}: expected 0 (final) or a block number >= 1, got {value}")
        if self.text_weight == 0 and self.image_weight == 0:
            raise ValueError("optim: text_weight and image_weight are both 0; nothing to train")


@dataclass
class LMTrainConfig:
    """Model + vocabulary + optimisation; saved inside every Lightning checkpoint as plain data."""

    model: LMConfig = field(default_factory=LMConfig)
    """The DecoderLM architecture."""
    vocab: dict = field(default_factory=dict)
    """The :class:`Vocab` layout as a dict (``Vocab.to_dict``)."""
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    """Optimizer, schedule and loss weights."""
    max_steps: int = 1000
    """Length of the schedule in optimizer steps."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.vocab:
            raise ValueError("LMTrainConfig.vocab is empty; pass Vocab.to_dict() of the LM's vocabulary")

    def to_dict(self) -> dict:
        """Plain, JSON-able data (what checkpoints store)."""
        return {
            "model": self.model.to_dict(),
            "vocab": Vocab.from_dict(self.vocab).to_dict(),
            "optim": {**dataclasses.asdict(self.optim), "betas": list(self.optim.betas)},
            "max_steps": self.max_steps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LMTrainConfig:
        """Inverse of :meth:`to_dict`."""
        unknown = set(d) - {"model", "vocab", "optim", "max_steps"}
        if unknown:
            raise ValueError(f"LM train config: unknown fields {sorted(unknown)}")
        return cls(
            model=LMConfig.from_dict(dict(d["model"])),
            vocab=dict(d["vocab"]),
            optim=LMOptimConfig(**d.get("optim", {})),
            max_steps=int(d.get("max_steps", 1000)),
        )


class LMSystem(L.LightningModule):
    """Trains a :class:`DecoderLM` on :class:`~lm.sequence.Batch` es.

    Args:
        config: an :class:`LMTrainConfig`, or its ``to_dict()`` form (as stored in checkpoints).
    """

    def __init__(self, config: LMTrainConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = LMTrainConfig.from_dict(config)
        self.config = config
        self.vocab = Vocab.from_dict(config.vocab)
        self.save_hyperparameters({"config": config.to_dict()})
        self.model = DecoderLM(config.model, self.vocab)
        self.grounding_head = None
        self._grounding_inputs: dict[int, torch.Tensor] = {}
        if config.optim.grounding_weight > 0:
            width = grounding.NUM_TARGETS * grounding.NUM_CLASSES
            self.grounding_head = torch.nn.Linear(self.model.config.dim, width, bias=False)
            torch.nn.init.normal_(self.grounding_head.weight, std=0.02)
            blocks = getattr(self.model.backbone, "blocks", [])
            for name in ("grounding_layer", "grounding_answer_layer"):
                layer = getattr(config.optim, name)
                if layer is not None and layer > len(blocks):
                    raise ValueError(
                        f"optim.{name}={layer}: the native backbone has {len(blocks)} blocks (a Hugging Face "
                        "backbone takes 0, the final states)"
                    )
            weights = config.optim.grounding_kind_weights
            used = {
                layer
                for kind, layer in zip(grounding.KINDS, self.grounding_layers(), strict=True)
                if weights[kind] > 0
            }
            for layer in used - {0}:  # a kind of weight 0 costs nothing: no hook, no loss
                blocks[layer - 1].register_forward_hook(functools.partial(self._keep_grounding_input, layer))
        self.skipped_steps = 0
        self.loss_guard = LossGuard(config.optim.spike_factor)

    def configure_optimizers(self):
        o = self.config.optim
        groups = param_groups(self, o.weight_decay)  # the model and the grounding head
        opt = adamw(self, groups, lr=o.lr, betas=o.betas)
        total = self.config.max_steps

        def lam(step: int) -> float:
            return cosine_schedule(step, o.warmup_steps, total, o.min_lr_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def forward(self, batch: Batch) -> LMOutput:
        return self.model(batch.tokens, batch.image_pos, batch.attention_mask, labels=batch.labels)

    def losses(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``loss`` (weighted total, with grad) and the detached parts ``text_loss``, ``image_loss``, ``z_loss``;
        and the number of targets behind each part (a batch of VQA records has no image target)."""
        out = self(batch)
        o = self.config.optim
        losses = {
            "loss": out.total_loss(o.text_weight, o.image_weight),
            "text_loss": out.text_loss.detach(),
            "image_loss": out.image_loss.detach(),
            "z_loss": out.z_loss.detach(),
        }
        n_text, n_image = out.num_text_targets, out.num_image_targets
        targets = {"text_loss": n_text, "image_loss": n_image, "z_loss": n_text}
        if self.grounding_head is not None:
            states = [self._grounding_inputs.get(layer, out.hidden) for layer in self.grounding_layers()]
            self._grounding_inputs.clear()
            g_loss, targets["grounding_loss"] = self.grounding_loss(states, batch.grounding)
            losses["loss"] = losses["loss"] + o.grounding_weight * g_loss
            losses["grounding_loss"] = g_loss.detach()
        return losses, targets

    def grounding_layers(self) -> tuple[int, ...]:
        """The block (0 = final states) whose output feeds each kind of grounding target (``grounding.KINDS``)."""
        o = self.config.optim
        answer = o.grounding_layer if o.grounding_answer_layer is None else o.grounding_answer_layer
        return tuple(answer if kind == "answer" else o.grounding_layer for kind in grounding.KINDS)

    def _keep_grounding_input(self, layer: int, module, args, output) -> None:
        self._grounding_inputs[layer] = torch.nn.functional.rms_norm(output, output.shape[-1:])

    def grounding_loss(
        self, states: list[torch.Tensor], target: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Cross-entropy of the grounding head over the targets (B, T, G): the sum over the kinds of target
        (``grounding.KINDS``) present of the kind's mean times its ``grounding_kind_weights``, the kind's head
        rows applied to its states (``states``: one (B, T, D) per kind); and the number of targets of the kinds
        weighted above 0 (a batch without any gives a zero that still touches the head, so DDP sees it used)."""
        weight = self.grounding_head.weight.view(grounding.NUM_TARGETS, grounding.NUM_CLASSES, -1)
        total, count = weight.sum() * 0.0, 0
        for kind, hidden in enumerate(states if target is not None else []):
            factor = self.config.optim.grounding_kind_weights[grounding.KINDS[kind]]
            columns = [c for c, k in enumerate(grounding.COLUMN_KIND) if k == kind]
            t = target[..., columns]
            has = t != -100
            if factor == 0 or not bool(has.any()):
                continue
            rows = has.any(-1)
            with torch.autocast(hidden.device.type, enabled=False):
                logits = torch.einsum("nd,ckd->nck", hidden[rows].float(), weight[columns].float())
            total = total + factor * torch.nn.functional.cross_entropy(logits[has[rows]], t[rows][has[rows]])
            count += int(has.sum())
        return total, count

    def training_step(self, batch: Batch, batch_idx: int):
        losses, targets = self.losses(batch)
        n = batch.tokens.shape[0]
        if self.config.optim.skip_nonfinite:
            why = self.loss_guard.judge(losses["loss"])
            if why is not None:
                self.skipped_steps += 1
                log.warning(
                    "step %d: %s, losses %s; step skipped (%d so far)",
                    self.global_step,
                    why,
                    {k: float(v.detach()) for k, v in losses.items()},
                    self.skipped_steps,
                )
                self.log("train/skipped_steps", float(self.skipped_steps), batch_size=n)
                return None  # Lightning runs no backward and no optimizer step for a None loss
        # a part without targets in this batch is not logged (its 0 is no measurement)
        parts = {f"train/{k}": v for k, v in losses.items() if k != "loss" and targets[k]}
        self.log_dict(parts, batch_size=n)
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses, targets = self.losses(batch)
        for k, v in losses.items():
            # the epoch value is the mean over targets: a batch without image targets adds nothing to
            # val/image_loss (every rank logs every key, as sync_dist needs)
            self.log(f"val/{k}", v.detach(), batch_size=targets.get(k, batch.tokens.shape[0]), sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.config.optim.grad_clip:
            clip_grad_norm(self, self.parameters(), self.config.optim.grad_clip)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lm_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("lm_skipped_steps", 0))
