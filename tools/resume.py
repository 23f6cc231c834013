"""What an exact resume needs beyond Lightning's own checkpoint contents.

- :class:`RandomState` stores the global random generators (torch CPU and CUDA, NumPy, Python) in every
  checkpoint and restores them on ``fit(ckpt_path=...)``, so the random choices made after a resume (dropout,
  dead-code restarts, loader seeds) are those an uninterrupted run makes. Lightning restores neither.
- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target, fsyncs it and renames
  it over the target. Lightning's writer stages the bytes in the system temp folder and *moves* the file,
  which is a plain copy (a kill mid-way leaves half a ``last.ckpt``) whenever that folder lies on another
  file system than the run directory, as it usually does on clusters (local ``/tmp``, shared run storage).

The data position is the loaders' part: ``tokenizer.data.resumable.ResumableLoader``,
``lm.data.EpochDataLoader`` and the stream loader each keep a ``state_dict`` that Lightning saves with the
checkpoint.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from tokenizer.atomic import atomic_write

log = logging.getLogger(__name__)


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # a tensor, not an ndarray: checkpoints are read with weights_only=True, which refuses NumPy objects
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))


class RandomState(Callback):
    """Saves and restores the global random generators with each checkpoint (one process only).

    With several processes the checkpoint holds rank 0's generators only; restoring them on every rank
    would give all ranks the same stream, so each rank keeps its freshly seeded one (a logged notice).
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                 "python": [version, list(internal), gauss]}  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world_size > 1:
            log.info("resume with %d processes: random generators are re-seeded, not restored", world_size)
            return
        torch.set_rng_state(state_dict["torch"])
        _set_numpy_state(state_dict["numpy"])
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the target's folder, fsync, then an atomic rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
