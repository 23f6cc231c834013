"""Training-step guard shared by both trainers: skip a step whose loss is NaN/Inf or a spike."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from tokenizer.distributed import world_size


class LossGuard(nn.Module):
    """Judges each step's loss against the running mean of the losses it accepted before.

    A step is bad when its loss is NaN/Inf, or, once ``warmup`` steps were accepted, when it exceeds
    ``spike_factor`` times that running mean (an exponential average with ``decay``; 0 disables spike
    detection). The running mean lives in buffers, so it is checkpointed and an interrupted run resumes
    with the same judgement.
    """

    def __init__(self, spike_factor: float, warmup: int = 100, decay: float = 0.99) -> None:
        super().__init__()
        if spike_factor < 0 or (0 < spike_factor <= 1):
            raise ValueError(f"spike_factor: expected 0 (off) or a factor > 1, got {spike_factor}")
        self.spike_factor, self.warmup, self.decay = spike_factor, warmup, decay
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("accepted", torch.zeros((), dtype=torch.long))

    def judge(self, loss: torch.Tensor) -> str | None:
        """One training step: None (and the loss joins the running mean) when it may be applied, else why not.

        The loss is averaged over ranks first (NaN anywhere is NaN everywhere), so every rank decides alike.
        """
        loss = loss.detach()
        if world_size() > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= world_size()
        why = self.verdict(loss)
        if why is None:
            self.accept(loss)
        return why

    def verdict(self, loss: torch.Tensor) -> str | None:
        """None when the step may be applied, else why not (``"non-finite"`` or ``"spike"``)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            return "non-finite"
        if (
            self.spike_factor
            and int(self.accepted) >= self.warmup
            and value > self.spike_factor * float(self.mean)
        ):
            return f"spike ({value:.4g} > {self.spike_factor:g} x running mean {float(self.mean):.4g})"
        return None

    def accept(self, loss: torch.Tensor) -> None:
        """Fold an applied step's loss into the running mean."""
        value = float(loss.detach())
        first = int(self.accepted) == 0
        self.mean.fill_(value if first else self.decay * float(self.mean) + (1 - self.decay) * value)
        self.accepted += 1
