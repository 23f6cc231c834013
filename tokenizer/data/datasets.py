"""Datasets of medical images for the tokenizer: manifest rows, folders, volume slices.

Data formats
------------
Images: PNG (8- or 16-bit), JPEG, TIFF, DICOM (any transfer syntax with an installed decoder;
multi-frame files use the middle frame unless told) and NIfTI (.nii / .nii.gz, 3D or 4D).
The content decides the format; an extension that contradicts it is an error.

Manifests (JSONL or CSV, one row per image) are described in :mod:`tokenizer.data.manifest`. A file that
fails to load becomes a ``BadSample`` that ``collate_samples`` drops; ``BadRowTracker`` fails the run when
the dropped fraction passes ``DataConfig.max_bad_fraction``. :mod:`tokenizer.data.datamodule` picks the
dataset of a ``DataConfig`` (phantoms included) and batches it for Lightning.


CT intensities are clipped to the window (HU) and scaled; MR, ultrasound, X-ray and other scalar
images are scaled between the 0.5 and 99.5 percentiles; 8-bit images are divided by 255. The
network sees a (C, S, S) tensor in [-1, 1] (grayscale repeated to C channels).

3D volumes become 2D slices: NIfTI volumes are reoriented to RAS+ so ``axis`` 0 / 1 / 2 gives
sagittal / coronal / axial slices, shown with anterior / superior up; ``VolumeSliceDataset`` yields
every slice of every volume (multi-frame DICOM: every frame) and drops empty (constant) ones.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tokenizer.data.intensity import PreprocessConfig, prepare
from tokenizer.data.io import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    canonical_modality,
    num_slices,
    read_image,
    read_volume,
)
from tokenizer.data.io import volume_slice as _volume_slice
from tokenizer.data.manifest import BadRow, read_manifest
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

Sample = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Samples, bad samples, collation, bad-row accounting.


@dataclass
class BadSample:
    """Returned by a dataset instead of a sample when the file cannot be used."""

    index: int
    source: str
    reason: str


def collate_samples(samples: Sequence[Sample | BadSample], image_shape: Sequence[int] | None = None) -> dict:
    """Batch sample dicts, dropping ``BadSample`` entries.

    Returns:
        {"image": (B, C, S, S), "index": LongTensor (B,), every other key: list of B values,
        "bad": [(index, source, reason), ...]}. When every sample is bad the image tensor is
        (0, *image_shape) (or (0,) without ``image_shape``).
    """
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [(s.index, s.source, s.reason) for s in samples if isinstance(s, BadSample)]
    if not good:
        empty = torch.empty((0, *image_shape) if image_shape else (0,))
        return {
            "image": empty,
            "caption": [],
            "modality": [],
            "index": torch.empty(0, dtype=torch.long),
            "source": [],
            "bad": bad,
        }
    batch: dict[str, Any] = {key: [s[key] for s in good] for key in good[0]}
    batch["image"] = torch.stack(batch["image"])
    batch["index"] = torch.as_tensor(batch["index"], dtype=torch.long)
    batch["bad"] = bad
    return batch


class BadRowTracker:
    """Counts rows that were dropped and fails the run when there are too many.

    Args:
        max_fraction: largest tolerated fraction of bad rows (0.01 = 1 %).
        min_rows: rows to see before the fraction is judged (a bad first batch is not a trend).
    """

    def __init__(self, max_fraction: float, min_rows: int = 50) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.min_rows = min_rows
        self.num_rows = 0
        self.num_bad = 0
        self.examples: list[tuple[Any, str, str]] = []
        """The first 20 bad rows as (index, source, reason)."""

    @property
    def fraction(self) -> float:
        return self.num_bad / self.num_rows if self.num_rows else 0.0

    def update(self, num_ok: int, bad: Iterable[Any]) -> None:
        """Add ``num_ok`` good rows and the ``bad`` ones ((index, source, reason) tuples, BadSample
        or BadRow); logs each reason and raises InputError when the limit is passed."""
        bad = list(bad)
        for item in bad:
            if isinstance(item, BadSample):
                item = (item.index, item.source, item.reason)
            elif isinstance(item, BadRow):
                item = (item.line, "", item.reason)
            index, source, reason = item
            logger.warning("skipped row %s: %s", index, reason if source in reason else f"{source}: {reason}")
            if len(self.examples) < 20:
                self.examples.append((index, source, reason))
        self.num_bad += len(bad)
        self.num_rows += num_ok + len(bad)
        self._check()

    def _check(self) -> None:
        if self.num_rows >= self.min_rows and self.fraction > self.max_fraction:
            raise InputError(f"too many bad rows: {self.summary()}; the limit is {self.max_fraction:.2%}")

    def summary(self) -> str:
        """One line: counts, fraction and the first few reasons."""
        text = f"dropped {self.num_bad} of {self.num_rows} rows ({self.fraction:.2%})"
        if self.examples:
            text += "; e.g. " + "; ".join(f"{src or idx}: {why}" for idx, src, why in self.examples[:3])
        return text


# ----------------------------------------------------------------------------------------------
# Training augmentation (MedITok: light random resized crop, flips, 90-degree turns, grayscale).


@dataclass
class AugmentConfig:
    """Random changes applied to training images (after :func:`prepare`). Probability 0 switches
    a change off; switch flips and turns off when captions say left / right / upper / lower."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Area fraction of the random resized crop; (1.0, 1.0) switches cropping off."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range (width / height) of the crop."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    vflip: float = 0.5
    """Probability of a vertical flip."""
    rotate90: float = 0.5
    """Probability of a +90 or -90 degree turn (either with equal chance)."""
    grayscale: float = 0.1
    """Probability of replacing a 3-channel image by its luminance (no effect on 1 channel)."""

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        for name in ("hflip", "vflip", "rotate90", "grayscale"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")


class Augment:
    """Apply :class:`AugmentConfig` to one (C, S, S) image in [-1, 1]; output has the same shape."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def _crop_box(self, size: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop with the configured area and aspect ratio."""
        low, high = self.cfg.crop_scale
        log_ratio = (math.log(self.cfg.crop_ratio[0]), math.log(self.cfg.crop_ratio[1]))
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            area = size * size * (low + (high - low) * u[0])
            ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            width, height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < width <= size and 0 < height <= size:
                return int((size - height) * u[2]), int((size - width) * u[3]), height, width
        return 0, 0, size, size

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        channels, size, _ = image.shape
        if cfg.crop_scale[0] < 1.0:
            top, left, height, width = self._crop_box(size, generator)
            if (height, width) != (size, size):
                crop = image[None, :, top : top + height, left : left + width]
                image = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        u = torch.rand(5, generator=generator).tolist()
        if u[0] < cfg.hflip:
            image = image.flip(-1)
        if u[1] < cfg.vflip:
            image = image.flip(-2)
        if u[2] < cfg.rotate90:
            image = torch.rot90(image, 1 if u[3] < 0.5 else -1, dims=(-2, -1))
        if channels == 3 and u[4] < cfg.grayscale:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
            image = torch.einsum("chw,c->hw", image, luma).expand(3, -1, -1)
        return image.contiguous()


# ----------------------------------------------------------------------------------------------
# Datasets.


class _ImageDataset(Dataset):
    """Shared __getitem__: load, prepare, augment; a load failure becomes a BadSample."""

    seed: int = 0
    epoch: int | None = None
    """Set by :class:`~tokenizer.data.resumable.ResumableLoader`: items are then seeded by (seed, epoch, index)."""

    def __init__(self, cfg: PreprocessConfig, train: bool, augment: AugmentConfig | None) -> None:
        self.cfg = cfg
        self.train = train
        self.augment = Augment(augment or AugmentConfig()) if train else None

    def _random(self, index: int) -> tuple[np.random.Generator | None, torch.Generator | None]:
        """(CT-window rng, augmentation generator) of one training item; (None, None) for evaluation."""
        if not self.train:
            return None, None
        if self.epoch is None:  # a plain DataLoader: torch's RNG, which DataLoader seeds per worker
            return np.random.default_rng(int(torch.randint(2**31 - 1, ()).item())), None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))

    def _source(self, index: int) -> str:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[LoadedImage, str, str | None, Any]:
        """(image, caption, modality override, CT window) of one item."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample | BadSample:
        source = self._source(index)
        try:
            loaded, caption, modality, window = self._load(index)
            rng, generator = self._random(index)
            image = prepare(loaded, self.cfg, modality=modality, window=window, rng=rng)
        except InputError as err:
            return BadSample(index, source, str(err))
        if self.augment is not None:
            image = self.augment(image, generator)
        modality = modality or loaded.modality or ""
        return {"image": image, "caption": caption, "modality": modality, "index": index, "source": source}


class ManifestDataset(_ImageDataset):
    """Rows of a JSONL / CSV manifest (see :mod:`tokenizer.data.manifest`).

    Args:
        manifest: path of the manifest file.
        cfg: preprocessing settings.
        split: keep only rows whose ``split`` equals this (None: all rows).
        train: random CT windows and augmentation.
        allow_outside_root: accept image paths outside the manifest's folder.
        augment: augmentation settings when ``train`` (default: ``AugmentConfig()``).
        axis: slicing axis for volume rows.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        cfg: PreprocessConfig,
        *,
        split: str | None = None,
        train: bool = False,
        allow_outside_root: bool = False,
        augment: AugmentConfig | None = None,
        axis: int = 2,
    ) -> None:
        super().__init__(cfg, train, augment)
        self.manifest = Path(manifest)
        rows, self.bad_rows = read_manifest(self.manifest, allow_outside_root=allow_outside_root)
        for bad in self.bad_rows:
            logger.warning("%s: line %d skipped: %s", self.manifest, bad.line, bad.reason)
        self.num_rows_read = len(rows)
        if split is not None:
            present = sorted({row.split for row in rows if row.split})
            rows = [row for row in rows if row.split == split]
            if not rows:
                raise InputError(f"{self.manifest}: no rows with split {split!r}; splits present: {present}")
        if not rows:
            raise InputError(f"{self.manifest}: no usable rows ({len(self.bad_rows)} bad lines)")
        self.rows = rows
        self.axis = axis

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, index: int) -> str:
        return str(self.rows[index].image)

    def _load(self, index: int) -> tuple[LoadedImage, str, str | None, Any]:
        row = self.rows[index]
        return (
            read_image(row.image, slice_index=row.slice_index, axis=self.axis),
            row.caption,
            row.modality,
            row.window,
        )


class FolderDataset(_ImageDataset):
    """Every image file under ``root`` (recursive, hidden files skipped), sorted by relative path.

    ``modality`` names the modality of files that do not say (DICOM files say); volumes give their
    middle slice along axis 2 (use :class:`VolumeSliceDataset` for all slices).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cfg: PreprocessConfig,
        *,
        train: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        modality: str | None = None,
        augment: AugmentConfig | None = None,
    ) -> None:
        super().__init__(cfg, train, augment)
        self.root = Path(root)
        self.files = _find_files(self.root, extensions)
        self.modality = canonical_modality(modality)

    def __len__(self) -> int:
        return len(self.files)

    def _source(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int) -> tuple[LoadedImage, str, str | None, Any]:
        loaded = read_image(self.files[index])
        return loaded, "", loaded.modality or self.modality, None


def _find_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    endings = tuple(e.lower() for e in extensions)
    files = [
        p
        for p in root.rglob("*")
        if p.name.lower().endswith(endings)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    ]
    if not files:
        raise InputError(f"{root}: no files ending in {list(endings)}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


VOLUME_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".dcm", ".dicom", ".tif", ".tiff")


class VolumeSliceDataset(_ImageDataset):
    """Every 2D slice along ``axis`` of every volume (NIfTI, multi-frame DICOM, multi-page TIFF).

    Args:
        paths: volume files, or one directory searched recursively for ``VOLUME_EXTENSIONS``.
        drop_empty: drop constant slices (reads every volume once at construction; otherwise
            slice counts come from the headers).
        modality: modality of volumes that do not say (NIfTI never does), e.g. "ct".

    Volumes that cannot be read are skipped and listed in ``skipped`` (BadRow, line = path index).
    The last two volumes read stay cached, so iterate in order where you can.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        cfg: PreprocessConfig,
        *,
        axis: int = 2,
        drop_empty: bool = True,
        modality: str | None = None,
        train: bool = False,
        augment: AugmentConfig | None = None,
    ) -> None:
        super().__init__(cfg, train, augment)
        if isinstance(paths, str | os.PathLike) and Path(paths).is_dir():
            paths = _find_files(Path(paths), VOLUME_EXTENSIONS)
        elif isinstance(paths, str | os.PathLike):
            paths = [paths]
        if axis not in (0, 1, 2):
            raise InputError(f"axis must be 0, 1 or 2, got {axis}")
        self.paths = [Path(p) for p in paths]
        self.axis = axis
        self.modality = canonical_modality(modality)
        self._cache: OrderedDict[int, tuple[np.ndarray, dict]] = OrderedDict()
        self.skipped: list[BadRow] = []
        self.slices: list[tuple[int, int]] = []
        for number, path in enumerate(self.paths):
            try:
                if drop_empty:
                    keep = _nonconstant(self._volume(number)[0], axis)
                else:
                    keep = range(num_slices(path, axis))
            except InputError as err:
                logger.warning("volume skipped: %s", err)
                self.skipped.append(BadRow(number, str(err)))
                continue
            self.slices.extend((number, int(k)) for k in keep)
        self._cache.clear()  # keep worker copies small
        if not self.slices:
            raise InputError(f"no usable slices in {len(self.paths)} volume(s); skipped: {self.skipped[:3]}")

    def _volume(self, number: int) -> tuple[np.ndarray, dict]:
        if number not in self._cache:
            self._cache[number] = read_volume(self.paths[number])
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        self._cache.move_to_end(number)
        return self._cache[number]

    def __len__(self) -> int:
        return len(self.slices)

    def _source(self, index: int) -> str:
        number, k = self.slices[index]
        return f"{self.paths[number]}[axis={self.axis},slice={k}]"

    def _load(self, index: int) -> tuple[LoadedImage, str, str | None, Any]:
        number, k = self.slices[index]
        volume, meta = self._volume(number)
        info = {key: meta.get(key) for key in ("format", "dtype", "is_hu")}
        loaded = LoadedImage(
            _volume_slice(volume, self.axis, k), meta.get("modality"), self._source(index), info
        )
        return loaded, "", loaded.modality or self.modality, None


def _nonconstant(volume: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` of slices that are not constant."""
    flat = np.moveaxis(volume, axis, 0).reshape(volume.shape[axis], -1)
    return np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
