"""The one question every cross-rank reduction asks: how many ranks are running now."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """Ranks of the running process group; 1 when none is running (or torch has no distributed support)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
