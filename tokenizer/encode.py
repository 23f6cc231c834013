"""Encode a dataset into a code shard (DESIGN §6) with Lightning ``predict``: the library behind
``tools/encode_dataset.py``.

The same code runs on one CPU, several GPUs or several nodes:

* :class:`ShardPredictionWriter` (a ``BasePredictionWriter`` callback) opens a
  :class:`~tokenizer.shards.ShardWriter` on every rank in ``setup``. Opening reads every rank's index log, so
  each rank learns which rows earlier (interrupted) runs finished; Lightning's ``post_setup`` barrier follows,
  so every rank computes the same pending list before anyone writes.
* :class:`EncodeDataModule` loads only this rank's share of the pending rows: a :class:`PendingRowSampler`
  (a ``DistributedSampler``, which Lightning keeps as it is) yields a contiguous, deterministic slice of the
  pending row ids, so finished rows are skipped before their images are read.
* :class:`EncodeSystem` turns a batch into codes with ``ImageTokenizer.encode_to_codes``; the writer stores
  them (``write_on_batch_end``) together with one index record per row.
* In ``teardown`` (after a normal end only) every rank closes its log and meets a barrier; rank 0 then checks
  the shard's bad-row fraction and finalizes ``index.jsonl``.

Index records: ``{"row", "source", "modality", "caption", "split", ...}`` plus the manifest's extra columns
(``attributes``, ``qa`` and so on), ``slice`` / ``window`` when a manifest row sets them, and for phantoms the
ground truth ``attributes`` and closed ``qa`` pairs (the same ones ``tools/make_phantoms.py`` writes). ``qa``
entries are stored as ``{"question", "answer"}`` objects, the form ``lm.data`` reads; ``[question, answer]``
pairs from a manifest are converted.

Bad rows: a row whose image cannot be used (missing, unreadable, wrong shape) is recorded in the index with
``"bad": "<reason>"``, an empty caption, no extra fields and all-zero codes, so it trains nothing. It is *not*
retried on resume (a file that failed once fails again; retrying would re-read it on every resume); encode
into a new directory after fixing the files. Every rank fails as soon as its own bad fraction passes
``DataConfig.max_bad_fraction`` (after ``min_rows_before_failing`` rows), and rank 0 refuses to finalize a
shard whose overall bad fraction passes it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from tokenizer.checkpoint import CONFIG_NAME, FORMAT, FORMAT_VERSION
from tokenizer.data.datasets import BadRowTracker, BadSample, ManifestDataset, collate_samples
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError
from tokenizer.model import ImageTokenizer
from tokenizer.shards import INDEX_NAME, PART_PATTERN, ShardWriter

log = logging.getLogger(__name__)


@dataclass
class TokenizerRef:
    """A trained image tokenizer, referenced by checkpoint; its architecture comes from the checkpoint only."""

    checkpoint: str | None = None
    """Checkpoint directory written by ``save_tokenizer`` (``<run_dir>/tokenizer``), or a Hub repo id."""

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            raise ValueError("tokenizer.checkpoint must be a checkpoint directory or Hub repo id, got ''")


def checkpoint_config(name_or_dir: str | os.PathLike, model: ImageTokenizer) -> dict:
    """The checkpoint's ``config.json`` as stored (local directory), or rebuilt from ``model`` (Hub id)."""
    path = Path(name_or_dir) / CONFIG_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **model.config.to_dict()}


# ----------------------------------------------------------------------------------------------
# Index records.


def normalise_qa(qa: Any, where: str) -> list[dict[str, str]]:
    """``[[question, answer], ...]`` or ``[{"question", "answer"}, ...]`` -> list of dicts."""
    if not isinstance(qa, list):
        raise InputError(f"{where}: 'qa' must be a list of [question, answer] pairs, got {type(qa).__name__}")
    pairs = []
    for entry in qa:
        if isinstance(entry, dict):
            question, answer = entry.get("question"), entry.get("answer")
        elif isinstance(entry, list | tuple) and len(entry) == 2:
            question, answer = entry
        else:
            raise InputError(f"{where}: a 'qa' entry must be [question, answer], got {entry!r:.80}")
        if not (isinstance(question, str) and isinstance(answer, str)):
            raise InputError(f"{where}: 'qa' questions and answers must be strings, got {entry!r:.80}")
        pairs.append({"question": question, "answer": answer})
    return pairs


def _row_source(dataset: Dataset, index: int) -> str:
    """Where row ``index`` comes from, as the dataset names it (file path, volume slice, ...)."""
    name = getattr(dataset, "_source", None)
    return name(index) if callable(name) else f"{type(dataset).__name__}:{index}"


def row_metadata(dataset: Dataset, index: int, split: str | None = None) -> dict[str, Any]:
    """Index record of dataset row ``index`` without reading its image (phantoms are regenerated).

    Args:
        dataset: a ManifestDataset, PhantomDataset, FolderDataset or VolumeSliceDataset.
        index: row of the dataset.
        split: split recorded for rows whose data names none (phantoms, folders, volumes, manifest rows
            without a ``split``).

    Returns:
        ``{"source", "modality", "caption", "split", ...extra fields}``.
    """
    if isinstance(dataset, ManifestDataset):
        row = dataset.rows[index]
        where = f"{dataset.manifest}:{row.line}"
        record = {
            "source": str(row.image),
            "modality": row.modality,
            "caption": row.caption,
            "split": row.split or split,
        }
        if row.slice_index is not None:
            record["slice"] = row.slice_index
        if row.window is not None:
            record["window"] = list(row.window) if isinstance(row.window, tuple) else row.window
        extra = dict(row.extra)
        if "qa" in extra:
            extra["qa"] = normalise_qa(extra["qa"], where)
        clash = sorted(set(extra) & {"row", "bad", *record})
        if clash:
            raise InputError(f"{where}: columns {clash} are reserved by the code shard index")
        return {**record, **extra}
    if isinstance(dataset, PhantomDataset):
        phantom = dataset.phantom(index)
        return {
            "source": f"phantom:{dataset.seed}:{index}",
            "modality": phantom.modality,
            "caption": phantom.caption,
            "split": split,
            "attributes": phantom.attributes(),
            "qa": normalise_qa([list(pair) for pair in dataset.questions(index)], "phantom"),
        }
    source = _row_source(dataset, index)
    return {"source": source, "modality": getattr(dataset, "modality", None), "caption": "", "split": split}


def bad_record(dataset: Dataset, index: int, reason: str, split: str | None = None) -> dict[str, Any]:
    """Index record of a row that could not be encoded: no caption, no extra fields, ``"bad": reason``."""
    source = _row_source(dataset, index)
    modality = getattr(dataset, "modality", None)
    if isinstance(dataset, ManifestDataset):
        modality, split = dataset.rows[index].modality, dataset.rows[index].split or split
    return {"source": source, "modality": modality, "caption": "", "split": split, "bad": reason}


class RecordedDataset(Dataset):
    """A dataset whose samples also carry their index record (built in the loader workers).

    Item ``i``: the base sample plus ``"record"``; a ``BadSample`` passes through unchanged.
    """

    def __init__(self, base: Dataset, split: str | None = None) -> None:
        self.base = base
        self.split = split

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict | BadSample:
        sample = self.base[index]
        if isinstance(sample, BadSample):
            return sample
        try:
            record = row_metadata(self.base, index, self.split)
        except InputError as err:  # e.g. a malformed 'qa' column: the row is bad, the run goes on
            return BadSample(index, sample["source"], str(err))
        record["modality"] = sample.get("modality") or record["modality"]  # a DICOM file may say
        return {**sample, "record": record}


# ----------------------------------------------------------------------------------------------
# Which rows each rank encodes.


def rank_share(rows: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of ``rows`` (sizes differ by at most one; the order is kept)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    start, stop = (len(rows) * r // world_size for r in (rank, rank + 1))
    return [int(r) for r in rows[start:stop]]


class PendingRowSampler(DistributedSampler):
    """Yields one rank's share of the pending row ids, in order, each exactly once (no padding).

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of injecting its own.
    """

    def __init__(self, pending: Sequence[int], rank: int, world_size: int) -> None:
        super().__init__(list(pending), num_replicas=world_size, rank=rank, shuffle=False)
        self.rows = rank_share(list(pending), rank, world_size)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


# ----------------------------------------------------------------------------------------------
# Bad-row accounting over the whole shard (every run, every rank).


def shard_bad_rows(directory: str | os.PathLike) -> tuple[int, int, list[tuple[int, str, str]]]:
    """(rows recorded, bad rows recorded, first bad rows as (row, source, reason)) over the index and logs."""
    directory = Path(directory)
    paths = [directory / INDEX_NAME] if (directory / INDEX_NAME).is_file() else []
    paths += sorted(p for p in directory.iterdir() if PART_PATTERN.match(p.name))
    seen: set[int] = set()
    bad: list[tuple[int, str, str]] = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line left by a kill: not a completion record
            if record["row"] in seen:
                continue
            seen.add(record["row"])
            if record.get("bad"):
                bad.append((record["row"], record.get("source", ""), record["bad"]))
    return len(seen), len(bad), sorted(bad)[:20]


# ----------------------------------------------------------------------------------------------
# Lightning pieces.


class EncodeSystem(L.LightningModule):
    """Images -> codes for ``trainer.predict``.

    Args:
        tokenizer: the trained image tokenizer (eval mode; its weights are not changed).
    """

    def __init__(self, tokenizer: ImageTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer.eval()

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns {"index": LongTensor (B,), "codes": LongTensor (B, K, h, w)} for the good rows."""
        if len(batch["index"]) == 0:  # every row of the batch was bad
            q = self.tokenizer.config.quantizer
            codes = torch.zeros((0, q.num_codebooks, *self.tokenizer.grid), dtype=torch.long)
        else:
            codes = self.tokenizer.encode_to_codes(batch["image"])
        return {"index": batch["index"], "codes": codes}


class ShardPredictionWriter(BasePredictionWriter):
    """Writes every predicted batch into the code shard at ``directory`` (protocol in the module doc).

    Args:
        directory: the shard directory.
        dataset: the dataset being encoded (row ``i`` of the shard is its item ``i``).
        tokenizer_config: the checkpoint's ``config.json`` content, copied into the shard.
        num_codebooks: K.
        codebook_size: V.
        grid: (h, w).
        max_bad_fraction: fail past this fraction of bad rows.
        min_rows_before_failing: rows a rank sees before its own fraction is judged.
        split: split recorded for rows whose data names none.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dataset: Dataset,
        *,
        tokenizer_config: dict,
        num_codebooks: int,
        codebook_size: int,
        grid: Sequence[int],
        max_bad_fraction: float,
        min_rows_before_failing: int = 50,
        split: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if isinstance(dataset, IterableDataset):
            raise InputError(
                f"{directory}: a code shard needs a dataset with fixed row numbers (data.kind phantoms, manifest, "
                f"folder or volume), got the iterable {type(dataset).__name__}; encode the manifest it was made from"
            )
        self.directory = Path(directory)
        self.dataset = dataset
        self.tokenizer_config = tokenizer_config
        self.shape = (int(num_codebooks), *(int(g) for g in grid))
        self.codebook_size = int(codebook_size)
        self.max_bad_fraction = max_bad_fraction
        self.split = split
        self.tracker = BadRowTracker(max_bad_fraction, min_rows_before_failing)
        self.writer: ShardWriter | None = None
        self.pending: list[int] = []
        self.num_written = 0
        """Rows this rank wrote in this run."""
        self.finalized = False
        """True on the rank that finalized the shard (rank 0) once it did."""
        self.num_bad = 0
        """Bad rows of the finalized shard (set with ``finalized``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.writer = ShardWriter(
            self.directory,
            num_rows=len(self.dataset),
            K=self.shape[0],
            V=self.codebook_size,
            grid=self.shape[1:],
            tokenizer_config=self.tokenizer_config,
            rank=trainer.global_rank,
        )
        self.pending = self.writer.pending()
        if trainer.is_global_zero:
            log.info(
                "%s: %d of %d rows finished earlier, %d to encode on %d rank(s)",
                self.directory,
                self.writer.num_done,
                len(self.dataset),
                len(self.pending),
                trainer.world_size,
            )

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rows = prediction["index"].tolist()
        codes = prediction["codes"].cpu().numpy()
        records = list(batch["record"]) if rows else []
        bad = batch["bad"]
        if bad:
            rows += [int(index) for index, _, _ in bad]
            records += [bad_record(self.dataset, int(i), reason, self.split) for i, _, reason in bad]
            codes = np.concatenate([codes, np.zeros((len(bad), *self.shape), dtype=codes.dtype)])
        assert self.writer is not None
        self.num_written += self.writer.write(rows, codes, records)
        self.tracker.update(len(rows) - len(bad), bad)  # after writing: a bad row is never retried

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.writer is not None:
            self.writer.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After every rank finished writing, rank 0 finalizes (Lightning skips this hook after an error)."""
        if self.writer is None:
            return
        self.writer.close()
        trainer.strategy.barrier("encode_dataset_written")
        if trainer.is_global_zero:
            self.finalize()

    def finalize(self) -> None:
        """Check the overall bad fraction, then merge the logs into ``index.jsonl``."""
        assert self.writer is not None
        num_rows, num_bad, examples = shard_bad_rows(self.directory)
        if num_rows and num_bad / num_rows > self.max_bad_fraction:
            shown = "; ".join(f"row {row} {source}: {reason}" for row, source, reason in examples[:3])
            raise InputError(
                f"{self.directory}: {num_bad} of {num_rows} rows are bad ({num_bad / num_rows:.2%}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction:.2%}; not finalized. E.g. {shown}"
            )
        self.writer.finalize()
        self.finalized = True
        self.num_bad = num_bad
        if num_bad:
            log.warning(
                "%s: %d of %d rows are bad and marked in the index", self.directory, num_bad, num_rows
            )


class EncodeDataModule(L.LightningDataModule):
    """Predict loader over this rank's share of the rows that ``writer`` still needs.

    Args:
        dataset: the dataset being encoded.
        writer: the :class:`ShardPredictionWriter` of this run (its ``setup`` found the pending rows).
        image_shape: (C, S, S) of a network input, for batches where every row is bad.
        batch_size: images per batch and device.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        writer: ShardPredictionWriter,
        image_shape: Sequence[int],
        *,
        batch_size: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = RecordedDataset(dataset, writer.split)
        self.writer = writer
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        sampler = PendingRowSampler(self.writer.pending, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers if len(sampler) else 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=functools.partial(collate_samples, image_shape=self.image_shape),
        )
