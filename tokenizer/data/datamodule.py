"""The tokenizer's data configuration and Lightning data module.

``DataConfig`` says where training / validation / prediction images come from (phantoms, a folder, a
manifest, volumes or a LitData stream); ``build_dataset`` builds the dataset of one role and
``ImageDataModule`` batches it with :func:`~tokenizer.data.datasets.collate_samples`, tracking dropped rows
with a :class:`~tokenizer.data.datasets.BadRowTracker`. ``ImageDataModule`` is defined on first access, so
importing this module skips Lightning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from tokenizer.data.datasets import (
    AugmentConfig,
    BadRowTracker,
    FolderDataset,
    ManifestDataset,
    VolumeSliceDataset,
    collate_samples,
)
from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.io import canonical_modality

DATA_KINDS = ("phantoms", "folder", "manifest", "volume", "stream")


@dataclass
class DataConfig:
    """Where training / validation / prediction images come from and how they are batched."""

    kind: str = "phantoms"
    """"phantoms" (generated, no files), "folder", "manifest", "volume" or "stream" (LitData shards
    written by ``tools/make_stream.py``, see :mod:`tokenizer.data.streaming`)."""
    path: str | None = None
    """Manifest file (manifest), image folder (folder), volume folder / file (volume), or stream
    folder / object-store URL (stream)."""
    val_path: str | None = None
    """folder / volume / stream kinds: a separate validation source (None: no validation)."""
    train_split: str = "train"
    """manifest: the split used for training."""
    val_split: str | None = "val"
    """manifest: the split used for validation (None: no validation)."""
    predict_split: str | None = None
    """manifest: the split encoded by predict (None: every row)."""
    batch_size: int = 32
    """Images per batch and device."""
    num_workers: int = 4
    """DataLoader worker processes (0: load in the main process)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (files only; phantoms are used as generated, their captions are exact)."""
    max_bad_fraction: float = 0.01
    """Fail the run when more than this fraction of rows / files could not be used."""
    min_rows_before_failing: int = 50
    """Rows seen before ``max_bad_fraction`` is judged."""
    allow_outside_root: bool = False
    """manifest: accept image paths outside the manifest's folder."""
    modality: str | None = None
    """folder / volume: modality of files that do not say (e.g. "ct" for NIfTI in HU)."""
    axis: int = 2
    """Slicing axis for volumes (RAS+: 0 sagittal, 1 coronal, 2 axial)."""
    drop_empty: bool = True
    """volume: drop constant slices."""
    num_train: int = 512
    """phantoms: training images."""
    num_val: int = 64
    """phantoms: validation images."""
    seed: int = 0
    """phantoms: seed of the training set (validation uses seed + 1); stream: shuffle and augmentation seed."""
    modalities: list[str] | None = None
    """phantoms: looks to generate (None: all)."""

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind != "phantoms" and not self.path:
            raise ValueError(f"data kind {self.kind!r} needs a path")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if self.num_train < 1 or self.num_val < 0:
            raise ValueError(f"need num_train >= 1 and num_val >= 0, got {self.num_train}, {self.num_val}")
        canonical_modality(self.modality, where="data.modality")
        for name in self.modalities or []:
            canonical_modality(name, where="data.modalities")


def build_dataset(data: DataConfig, preprocess: PreprocessConfig, role: str) -> Dataset | None:
    """The dataset for ``role`` ("train", "val" or "predict"); None when that role has no data."""
    train = role == "train"
    if data.kind == "phantoms":
        from tokenizer.data.phantoms import PhantomDataset

        num, seed = (data.num_val, data.seed + 1) if role == "val" else (data.num_train, data.seed)
        if num == 0:
            return None
        size, channels = preprocess.image_size, preprocess.channels
        return PhantomDataset(num, seed=seed, size=size, channels=channels, modalities=data.modalities)
    if data.kind == "manifest":
        split = {"train": data.train_split, "val": data.val_split, "predict": data.predict_split}[role]
        if role == "val" and split is None:
            return None
        dataset = ManifestDataset(
            data.path,
            preprocess,
            split=split,
            train=train,
            allow_outside_root=data.allow_outside_root,
            augment=data.augment,
            axis=data.axis,
        )
        BadRowTracker(data.max_bad_fraction, data.min_rows_before_failing).update(
            dataset.num_rows_read, dataset.bad_rows
        )
        return dataset
    path = data.val_path if role == "val" else data.path
    if path is None:
        return None
    if data.kind == "stream":
        from tokenizer.data.streaming import StreamingImageDataset

        return StreamingImageDataset(
            path, preprocess, shuffle=train, seed=data.seed, train=train, augment=data.augment
        )
    if data.kind == "folder":
        return FolderDataset(path, preprocess, train=train, modality=data.modality, augment=data.augment)
    return VolumeSliceDataset(
        path,
        preprocess,
        axis=data.axis,
        drop_empty=data.drop_empty,
        modality=data.modality,
        train=train,
        augment=data.augment,
    )


def _define_datamodule() -> type:
    import lightning as L  # deferred: importing Lightning costs seconds

    class ImageDataModule(L.LightningDataModule):
        """Train / val / predict loaders for :class:`DataConfig`, batched by :func:`collate_samples`.

        Every batch passes through ``tracker`` (a :class:`BadRowTracker`), which logs dropped rows and
        stops the run when their fraction passes ``DataConfig.max_bad_fraction``.
        """

        def __init__(self, data: DataConfig, preprocess: PreprocessConfig) -> None:
            super().__init__()
            self.data = data
            self.preprocess = preprocess
            self.tracker = BadRowTracker(data.max_bad_fraction, data.min_rows_before_failing)
            self.datasets: dict[str, Dataset | None] = {}

        def setup(self, stage: str | None = None) -> None:
            roles = {"fit": ("train", "val"), "validate": ("val",), "predict": ("predict",)}
            for role in roles.get(stage or "fit", ("train", "val")):
                if role not in self.datasets:
                    self.datasets[role] = build_dataset(self.data, self.preprocess, role)

        def _loader(self, role: str) -> Any:
            self.setup({"train": "fit", "val": "validate", "predict": "predict"}[role])
            dataset = self.datasets[role]
            if dataset is None:
                return []
            if self.data.kind == "stream":  # Lightning saves this loader's position in checkpoints
                from tokenizer.data.streaming import stream_loader

                return stream_loader(
                    dataset,
                    batch_size=self.data.batch_size,
                    num_workers=self.data.num_workers,
                    pin_memory=torch.cuda.is_available(),
                )
            shape = (self.preprocess.channels, self.preprocess.image_size, self.preprocess.image_size)
            train = role == "train"
            if train and (self.trainer is None or self.trainer.world_size == 1):
                from tokenizer.data.resumable import ResumableLoader  # Lightning saves its position

                return ResumableLoader(
                    dataset,
                    batch_size=self.data.batch_size,
                    seed=self.data.seed,
                    drop_last=len(dataset) > self.data.batch_size,
                    epoch_fn=(lambda: self.trainer.current_epoch) if self.trainer is not None else None,
                    num_workers=self.data.num_workers,
                    pin_memory=torch.cuda.is_available(),
                    collate_fn=functools.partial(collate_samples, image_shape=shape),
                )
            return torch.utils.data.DataLoader(
                dataset,
                batch_size=self.data.batch_size,
                shuffle=train,
                drop_last=train and len(dataset) > self.data.batch_size,
                num_workers=self.data.num_workers,
                persistent_workers=self.data.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                collate_fn=functools.partial(collate_samples, image_shape=shape),
            )

        def train_dataloader(self) -> Any:
            return self._loader("train")

        def val_dataloader(self) -> Any:
            return self._loader("val")

        def predict_dataloader(self) -> Any:
            return self._loader("predict")

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            if isinstance(batch, dict) and "bad" in batch:
                self.tracker.update(len(batch["index"]), batch["bad"])
            return batch

    ImageDataModule.__module__ = __name__
    ImageDataModule.__qualname__ = "ImageDataModule"  # picklable as tokenizer.data.datamodule.ImageDataModule
    return ImageDataModule


def __getattr__(name: str) -> Any:
    """``ImageDataModule`` is defined on first access so that importing this module skips Lightning."""
    if name == "ImageDataModule":
        globals()[name] = _define_datamodule()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
