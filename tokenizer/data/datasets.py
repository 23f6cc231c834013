"""Datasets of medical images for the tokenizer: manifests, folders, volumes, phantoms.

Data formats
------------
Images: PNG (8- or 16-bit), JPEG, TIFF, DICOM (any transfer syntax with an installed decoder;
multi-frame files use the middle frame unless told) and NIfTI (.nii / .nii.gz, 3D or 4D).
The content decides the format; an extension that contradicts it is an error.

Manifests are JSONL (one object per line) or CSV (a header row) with these columns:

=========  ========  ==========================================================================
column     required  meaning
=========  ========  ==========================================================================
image      yes       path to the file, relative to the manifest's folder (or absolute inside it)
caption    no        free text ("" when absent)
modality   no        ct, mr, xray, us, fundus, histology, photo, other (or an alias: MRI, CXR,
                     x-ray, ultrasound, ...); overrides what a DICOM file says
split      no        any name; datasets select rows by it (e.g. train / val / test)
window     no        CT window: full, common, soft_tissue, lung, bone, or low,high in HU
                     (JSON: [low, high]); without it training draws a random window and
                     evaluation uses the preset's eval window
slice      no        slice of a volume along axis 2 (a frame of a multi-frame DICOM)
=========  ========  ==========================================================================

Other columns (e.g. ``attributes``, ``qa``) are kept in ``ManifestRow.extra``. A path that leaves
the manifest's folder is rejected unless ``allow_outside_root=True``. Bad lines (bad JSON, wrong
encoding, no image, wrong types) are reported as ``BadRow`` and skipped; a file that fails to load
becomes a ``BadSample`` that ``collate_samples`` drops; ``BadRowTracker`` fails the run when the
dropped fraction passes ``DataConfig.max_bad_fraction``.

CT intensities are clipped to the window (HU) and scaled; MR, ultrasound, X-ray and other scalar
images are scaled between the 0.5 and 99.5 percentiles; 8-bit images are divided by 255. The
network sees a (C, S, S) tensor in [-1, 1] (grayscale repeated to C channels).

3D volumes become 2D slices: NIfTI volumes are reoriented to RAS+ so ``axis`` 0 / 1 / 2 gives
sagittal / coronal / axial slices, shown with anterior / superior up; ``VolumeSliceDataset`` yields
every slice of every volume (multi-frame DICOM: every frame) and drops empty (constant) ones.
"""

from __future__ import annotations

import csv
import functools
import io as _stdio
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tokenizer.data.intensity import CT_WINDOWS, PreprocessConfig, prepare
from tokenizer.data.io import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    canonical_modality,
    num_slices,
    read_image,
    read_volume,
)
from tokenizer.data.io import volume_slice as _volume_slice
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

Sample = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Manifests.


@dataclass
class ManifestRow:
    """One good manifest row (see the module docstring for the columns)."""

    image: Path
    """Absolute, normalised path of the image file."""
    caption: str = ""
    modality: str | None = None
    """Canonical modality, or None when the row does not say."""
    split: str | None = None
    window: str | tuple[float, float] | None = None
    """CT window name or (low, high) in HU."""
    slice_index: int | None = None
    """The ``slice`` column."""
    line: int = 0
    """1-based line of the row in the manifest file."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Columns beyond the known ones, as read (CSV values are strings)."""


@dataclass
class BadRow:
    """A manifest line that was skipped."""

    line: int
    reason: str


_KNOWN_COLUMNS = ("image", "caption", "modality", "split", "window", "slice")


def _optional_str(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"column {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value.strip() or None


def _parse_window(value: Any) -> str | tuple[float, float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip() in CT_WINDOWS:
        return value.strip()
    parts = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(v) for v in parts)
        if isinstance(value, list) and any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in value
        ):
            raise TypeError
    except (TypeError, ValueError):
        raise InputError(
            f"column 'window' must be one of {sorted(CT_WINDOWS)} or 'low,high', got {value!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"column 'window' needs finite low < high, got {value!r}")
    return low, high


def _parse_slice(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InputError(f"column 'slice' must be a non-negative integer, got {value!r}")


def _is_within(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:  # different drives
        return False


def _parse_row(record: Any, line: int, root: Path, allow_outside_root: bool) -> ManifestRow:
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InputError(
            "missing 'image' (a non-empty path string)"
            if image is None or isinstance(image, str)
            else f"'image' must be a string, got {image!r}"
        )
    path = Path(os.path.normpath(root / image.strip()))
    if not allow_outside_root and not _is_within(path, root):
        raise InputError(
            f"image path {image!r} escapes the manifest folder {root} (allow_outside_root=False)"
        )
    return ManifestRow(
        image=path,
        caption=_optional_str(record, "caption") or "",
        modality=canonical_modality(_optional_str(record, "modality"), where="column 'modality'"),
        split=_optional_str(record, "split"),
        window=_parse_window(record.get("window")),
        slice_index=_parse_slice(record.get("slice")),
        line=line,
        extra={k: v for k, v in record.items() if k not in _KNOWN_COLUMNS},
    )


def _has_bad_bytes(text: str) -> bool:
    """Bytes that were not UTF-8 were decoded to lone surrogates (errors="surrogateescape")."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _jsonl_records(text: str) -> Iterable[tuple[int, Any]]:
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid JSON
        if _has_bad_bytes(raw):
            yield number, InputError("the line is not valid UTF-8")
        elif raw.strip():
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as err:
                yield number, InputError(f"invalid JSON ({err.msg} at column {err.colno})")


def _csv_records(text: str, path: Path, delimiter: str) -> Iterable[tuple[int, Any]]:
    reader = csv.reader(_stdio.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]
    if "image" not in header:
        raise InputError(f"{path}: the CSV header {header} has no 'image' column")
    start = reader.line_num + 1
    for fields in reader:
        if any(f.strip() for f in fields):
            if len(fields) != len(header):
                yield start, InputError(f"has {len(fields)} fields but the header has {len(header)}")
            elif any(_has_bad_bytes(f) for f in fields):
                yield start, InputError("the row is not valid UTF-8")
            else:
                yield start, dict(zip(header, fields, strict=True))
        start = reader.line_num + 1


def read_manifest(
    path: str | os.PathLike, *, allow_outside_root: bool = False
) -> tuple[list[ManifestRow], list[BadRow]]:
    """Read a JSONL (.jsonl / .ndjson) or CSV (.csv / .tsv) manifest.

    Returns:
        (good rows in file order, skipped lines with reasons).

    Raises:
        InputError: the manifest itself is missing, of an unknown kind, or a CSV without 'image'.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise InputError(f"{path}: manifest must be .jsonl, .ndjson, .csv or .tsv, got {suffix!r}")
    # Undecodable bytes become lone surrogates, so one bad line is reported instead of the file failing.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    root = Path(os.path.normpath(path.absolute().parent))
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(text)
    else:
        records = _csv_records(text, path, "\t" if suffix == ".tsv" else ",")
    rows: list[ManifestRow] = []
    bad: list[BadRow] = []
    for line, record in records:
        try:
            if isinstance(record, InputError):
                raise record
            rows.append(_parse_row(record, line, root, allow_outside_root))
        except InputError as err:
            bad.append(BadRow(line, str(err)))
    return rows, bad


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
    """Rows of a JSONL / CSV manifest (see the module docstring).

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


# ----------------------------------------------------------------------------------------------
# Configuration and the Lightning data module.

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
    ImageDataModule.__qualname__ = "ImageDataModule"  # picklable as tokenizer.data.datasets.ImageDataModule
    return ImageDataModule


def __getattr__(name: str) -> Any:
    """``ImageDataModule`` is defined on first access so that importing this module skips Lightning."""
    if name == "ImageDataModule":
        globals()[name] = _define_datamodule()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
