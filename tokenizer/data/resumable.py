"""A training DataLoader whose order and randomness come from (seed, epoch) and whose position survives a kill.

Lightning saves ``state_dict()`` of every training loader that has one inside each checkpoint and hands it
back to ``load_state_dict`` on ``fit(ckpt_path=...)``. With :class:`ResumableLoader` a run killed mid-epoch
continues with exactly the batches an uninterrupted run trains on next:

- an epoch's order is a permutation drawn from (seed, epoch), never from the global random generator;
- an item's random choices (CT window, augmentation) come from (seed, epoch, index): the loader sets the
  dataset's ``seed`` and ``epoch`` before its workers start, so they do not depend on which worker loads it;
- the state is (epoch, batches yielded); a restored loader skips those batches without loading them.

One process only: with several, Lightning shards the data through its ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices: a (seed, epoch) permutation cut into ``batch_size`` pieces.

    Args:
        num_items: dataset length.
        batch_size: items per batch.
        seed: seed of every epoch's permutation.
        drop_last: drop the last, smaller batch.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, drop_last: bool) -> None:
        if num_items < 0 or batch_size < 1:
            raise ValueError(f"need num_items >= 0 and batch_size >= 1, got {num_items}, {batch_size}")
        self.num_items, self.batch_size, self.seed, self.drop_last = num_items, batch_size, seed, drop_last
        self.epoch = 0
        self.start = 0
        """Batches of this epoch to skip (already trained on before a resume)."""

    def __len__(self) -> int:
        return (self.num_items // self.batch_size if self.drop_last else
                math.ceil(self.num_items / self.batch_size))  # fmt: skip

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        for b in range(self.start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class PassPosition:
    """The resumable position of a loader: the epoch of the current pass and the batches it has yielded.

    A loader mixes this in, calls :meth:`_next_epoch` and :meth:`_start_batch` at the start of ``__iter__``
    and :meth:`_advance` after each batch; Lightning saves ``state_dict()`` in checkpoints and hands it back on resume.
    """

    epoch_fn: Callable[[], int] | None = None
    _passes = _epoch = _done = 0
    _restored: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass and the batches it has yielded."""
        return {"epoch": self._epoch, "batches": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next pass, if it is of the same epoch, skips the batches already yielded."""
        self._restored = (int(state["epoch"]), int(state["batches"]))

    def _next_epoch(self) -> int:
        """The epoch of the pass that starts now."""
        self._passes += 1
        return self.epoch_fn() if self.epoch_fn is not None else self._passes - 1

    def _start_batch(self, epoch: int, num_batches: int) -> int:
        """The first batch of this pass: past the restored position when it is of the same epoch."""
        restored, self._restored = self._restored, None
        start = min(restored[1], num_batches) if restored is not None and restored[0] == epoch else 0
        self._epoch, self._done = epoch, start
        return start

    def _advance(self) -> None:
        self._done += 1


class ResumableLoader(PassPosition, DataLoader):
    """A shuffling training loader with a resumable position (see the module docstring).

    Args:
        dataset: a map-style dataset; its ``seed`` and ``epoch`` attributes, when it has them, are set
            before each pass so that it can seed every item from (seed, epoch, index).
        batch_size, drop_last: as for ``DataLoader``.
        seed: seed of the order and of the items' random choices.
        epoch_fn: the epoch of the next pass (e.g. the trainer's); without it passes are counted from 0.
        **kwargs: other ``DataLoader`` arguments (workers, collate_fn, pin_memory); workers are restarted
            every pass so that they see the new epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        epoch_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, drop_last=drop_last)
        # a private generator: starting a pass must not draw from the global one that the model uses
        generator = torch.Generator().manual_seed(seed)
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_sampler=sampler, generator=generator, **kwargs)
        self.seed, self.epoch_fn = seed, epoch_fn

    def __iter__(self) -> Iterator[Any]:
        epoch = self._next_epoch()
        start = self._start_batch(epoch, len(self.batch_sampler))
        self.batch_sampler.epoch, self.batch_sampler.start = epoch, start
        if hasattr(self.dataset, "epoch"):
            self.dataset.seed, self.dataset.epoch = self.seed, epoch
        for batch in super().__iter__():
            self._advance()
            yield batch
