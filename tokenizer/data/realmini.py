"""realmini: a small benchmark of real medical images assembled from files shipped inside PyPI packages.

Sources (found installed, or in unpacked wheels given as extra roots; nothing is downloaded):

- ``pydicom`` (``pydicom/data/test_files``) and ``pydicom-data`` (``data_store/data``, the optional
  ``data`` extra): every DICOM file whose Modality tag names an imaging modality (CT, MR, CR / DX, US;
  NM / PT become "other"); the catalogue (:mod:`tokenizer.data.realmini_catalogue`) adds licences
  and exclusions.
- ``nibabel`` (``tests/data``): the EPI MR volume; ``nilearn`` (``datasets/data``): the MNI ICBM152 T1
  template; ``scikit-image`` (``data``): retina fundus, microaneurysm fundus detail, immunohistochemistry.

Pipeline: :func:`find_packages` -> :func:`discover_sources` (read headers, group re-encodings and crops
of one image, decode one representative per group) -> :func:`assign_splits` (by source, never by
slice or tile: per modality, ~``test_fraction`` of the sources in SHA-256 order of their key, at
least one each way; a modality's only source goes to test) ->
:func:`tokenizer.data.realmini_render.render_source` (slices / frames -> intensity -> pyramid tiles) ->
8-bit PNGs plus ``manifest.jsonl`` rows in the DESIGN §4 format (written by ``tools/make_realmini.py``).
Images smaller than ``min_side`` are skipped, not upsampled.

Intensity mapping and tiling: :mod:`tokenizer.data.realmini_render`.

Captions are metadata captions: built from what the file or the catalogue says (modality, body part,
view / slice axis / frame, CT window, tile scale), not written by a reader of the image.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer.data.decoders import DICOM_MODALITIES
from tokenizer.data.intensity import CT_WINDOWS, PreprocessConfig, to_unit
from tokenizer.data.io import LoadedImage, read_image, read_volume
from tokenizer.data.realmini_catalogue import DICOM_NOTES, PACKAGES, FileSpec, dicom_caption, dicom_group
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

_NOT_DICOM_SUFFIXES = (".txt", ".json", ".dump", ".py", ".pyc", ".pyi", ".icc", ".gz", ".md", ".rst", ".csv")
_LOSSY_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 81, 91, 93, 203))
_UNCOMPRESSED_SYNTAXES = frozenset(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"])
_EXTRA_DICOM_MODALITIES = {"NM": "other", "PT": "other"}


@dataclass
class RealminiConfig:
    """How realmini is built; the defaults give a few thousand train and a few hundred test images."""

    size: int = 128
    """Side of every output PNG in pixels."""
    min_side: int | None = None
    """Images, slices and frames whose shorter side is below this are skipped (None: size / 1.5,
    so nothing is upsampled more than 1.5x: blurrier than real input, such images flatter scores)."""
    test_fraction: float = 0.15
    """Fraction of each modality's sources (files / volumes) put in the test split."""
    eval_ct_window: str = "common"
    """CT window of test images (a key of ``CT_WINDOWS``)."""
    train_ct_windows: tuple[str, ...] = tuple(CT_WINDOWS)
    """CT windows of train images: one PNG per window and tile."""
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    """Percentiles mapped to 0 / 255 for MR, X-ray, ultrasound and other scalar images."""
    max_per_source: int = 600
    """Most images one train source contributes (evenly spaced tiles / slices are kept)."""
    max_per_test_source: int = 120
    """Most images one test source contributes, so one large radiograph does not fill the test split."""
    max_slices_per_axis: int = 128
    """Most slices taken from one volume along one axis (the stride that stops one volume dominating)."""
    max_frames: int = 64
    """Most frames taken from one multi-frame DICOM."""
    native_ratio: float = 1.5
    """Add a native-resolution tile level when the shorter side is this many times the last level."""
    min_std: float = 0.03
    """Tiles whose intensity standard deviation (0..1 scale) is below this are dropped as empty."""
    max_flat: float = 0.75
    """Tiles with more than this fraction of pixels at their minimum or maximum are dropped."""

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if self.min_side is not None and self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        self.train_ct_windows = tuple(self.train_ct_windows)
        for name in (self.eval_ct_window, *self.train_ct_windows):
            if name not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {name!r}; expected one of {sorted(CT_WINDOWS)}")
        if not self.train_ct_windows:
            raise ValueError("train_ct_windows must name at least one window")
        caps = (self.max_per_source, self.max_per_test_source, self.max_slices_per_axis, self.max_frames)
        if min(caps) < 1:
            raise ValueError(f"the max_* limits must be >= 1, got {caps}")
        if self.native_ratio < 1.0 or not 0.0 <= self.min_std < 1.0 or not 0.0 < self.max_flat <= 1.0:
            raise ValueError("need native_ratio >= 1, 0 <= min_std < 1 and 0 < max_flat <= 1")

    @property
    def smallest_side(self) -> int:
        return self.min_side if self.min_side is not None else math.ceil(self.size / 1.5)

    def preprocess(self) -> PreprocessConfig:
        """The intensity settings handed to :func:`to_unit`."""
        windows = list(dict.fromkeys([self.eval_ct_window, *self.train_ct_windows]))
        return PreprocessConfig(
            image_size=self.size,
            eval_ct_window=self.eval_ct_window,
            train_ct_windows=windows,
            mr_percentiles=self.mr_percentiles,
        )


# ----------------------------------------------------------------------------------------------
# Finding packages and sources.


@dataclass(frozen=True)
class FoundPackage:
    """A package found on disk."""

    name: str
    """Distribution name (a key of ``PACKAGES``)."""
    version: str
    root: Path
    """Folder that contains the import package (site-packages or an unpacked wheel)."""
    licence: str
    """The distribution's licence metadata."""

    @property
    def data_dir(self) -> Path:
        return self.root / PACKAGES[self.name].data_dir


def _describe(name: str, root: Path) -> FoundPackage:
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    for dist in importlib.metadata.distributions(path=[str(root)]):
        if re.sub(r"[-_.]+", "-", dist.metadata.get("Name", "")).lower() == wanted:
            meta = dist.metadata
            classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if "License ::" in c]
            text = meta.get("License") or ""
            licence = meta.get("License-Expression") or next(iter(classifiers), "")
            licence = licence or (text if len(text) <= 40 and "\n" not in text else "see package")
            return FoundPackage(name, dist.version, root, licence)
    return FoundPackage(name, "unknown", root, "see package")


def find_packages(source_roots: Sequence[str | Path] = (), *, installed: bool = True) -> list[FoundPackage]:
    """Packages of ``PACKAGES`` found in ``source_roots`` (folders holding unpacked wheels; first wins)
    and, when ``installed``, in the running environment (``importlib.util.find_spec``).

    Raises:
        InputError: a source root is not a directory.
    """
    found: dict[str, FoundPackage] = {}
    for root in map(Path, source_roots):
        if not root.is_dir():
            raise InputError(f"{root}: source root is not a directory")
        for name, spec in PACKAGES.items():
            if name not in found and (root / spec.data_dir).is_dir():
                found[name] = _describe(name, root.resolve())
    for name, spec in PACKAGES.items() if installed else ():
        module = None if name in found else importlib.util.find_spec(spec.import_name)
        if module is not None and module.submodule_search_locations:
            root = Path(next(iter(module.submodule_search_locations))).parent
            if (root / spec.data_dir).is_dir():
                found[name] = _describe(name, root)
    return [found[name] for name in PACKAGES if name in found]


@dataclass
class Source:
    """One split unit: a 2D image, a multi-frame DICOM or a volume (standing for its duplicates too)."""

    key: str
    """Group key ("dicom:<group>" or "<package>:<stem>"); the split is decided on it."""
    package: FoundPackage
    path: Path
    modality: str | None
    """Canonical modality; None until a DICOM file is decoded."""
    caption: str
    """Caption base (the catalogue's description or one built from the DICOM header)."""
    licence: str
    kind: str = "image"
    """"image", "frames" (multi-frame DICOM) or "volume" (NIfTI, sliced along three axes)."""
    num_frames: int = 1
    rank: tuple = ()
    """Sort key among files of one group: lossless, larger, uncompressed, shorter name first."""
    probe: LoadedImage | None = None
    """The decoded image (the middle frame for "frames"), kept so it is decoded once."""

    @property
    def source_file(self) -> str:
        return self.path.relative_to(self.package.root).as_posix()


@dataclass(frozen=True)
class Skip:
    """A file that gave no images, and why."""

    package: str
    file: str
    category: str
    """Short reason: unreadable, no image, not imaging, too small, duplicate, empty, missing."""
    reason: str


def _dicom_sources(package: FoundPackage, cfg: RealminiConfig, skips: list[Skip]) -> Iterator[Source]:
    """Undecoded sources for every DICOM file of ``package`` whose header looks usable."""
    import pydicom

    for path in sorted(p for p in package.data_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(package.root).as_posix()
        if path.name.startswith(".") or path.name.lower().endswith(_NOT_DICOM_SUFFIXES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception as err:  # not DICOM, or no image module: pydicom raises many types
            skips.append(Skip(package.name, rel, "no image", f"no DICOM image header ({type(err).__name__})"))
            continue
        key = dicom_group(path.name)
        note = DICOM_NOTES.get(key, FileSpec())
        code = str(ds.get("Modality", "")).upper()
        modality = note.modality or DICOM_MODALITIES.get(code) or _EXTRA_DICOM_MODALITIES.get(code)
        if modality is None or note.exclude:
            reason = note.exclude or f"DICOM modality {code or 'missing'!r}"
            skips.append(Skip(package.name, rel, "not imaging", reason))
        elif min(rows, cols) < cfg.smallest_side:
            skips.append(Skip(package.name, rel, "too small", f"{rows}x{cols} < {cfg.smallest_side} px"))
        else:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            rank = (syntax in _LOSSY_SYNTAXES, -rows * cols * frames, syntax not in _UNCOMPRESSED_SYNTAXES)
            caption = note.description or dicom_caption(ds, modality)
            licence = note.licence or PACKAGES[package.name].licence
            kind = "frames" if frames > 1 else "image"
            rank += (len(path.name), path.name)
            yield Source(f"dicom:{key}", package, path, modality, caption, licence, kind, frames, rank)


def _catalogue_sources(package: FoundPackage, skips: list[Skip]) -> Iterator[Source]:
    """Sources for the files the catalogue names in a non-DICOM package."""
    spec = PACKAGES[package.name]
    for name, note in spec.files.items():
        path = package.data_dir / name
        if not path.is_file():
            skips.append(Skip(package.name, name, "missing", "not shipped in this version"))
            continue
        key = f"{package.name}:{name.split('.')[0].lower()}"
        kind = "volume" if note.volume else "image"
        yield Source(key, package, path, note.modality, note.description, note.licence or spec.licence, kind)


def _probe(source: Source, cfg: RealminiConfig) -> None:
    """Decode a source once: checks it is readable and large enough and fills ``probe`` / ``modality``.

    Raises:
        InputError: unreadable, or too small in every plane.
    """
    if source.kind == "volume":
        shape = read_volume(source.path)[0].shape
        if sorted(shape[:3])[1] < cfg.smallest_side:
            raise InputError(
                f"{source.path}: volume {shape} has no plane with sides >= {cfg.smallest_side} px"
            )
        return
    source.probe = read_image(source.path)
    if min(source.probe.pixels.shape[:2]) < cfg.smallest_side:
        raise InputError(f"{source.path}: image {source.probe.pixels.shape[:2]} < {cfg.smallest_side} px")
    source.modality = source.modality or source.probe.modality


def _thumbnail(source: Source, pre: PreprocessConfig) -> np.ndarray:
    """(16, 16) luminance thumbnail in [0, 1] of a probed 2D source, to spot one image stored twice."""
    meta = source.probe.meta
    unit = to_unit(source.probe.pixels, source.modality, cfg=pre, is_hu=meta.get("is_hu"),
                   stored_dtype=meta.get("dtype"))  # fmt: skip
    gray = torch.from_numpy(np.ascontiguousarray(unit.mean(axis=-1) if unit.ndim == 3 else unit))
    return F.adaptive_avg_pool2d(gray[None], 16)[0].numpy()


def discover_sources(
    packages: Sequence[FoundPackage], cfg: RealminiConfig
) -> tuple[list[Source], list[Skip]]:
    """Every usable source of ``packages``, one per image, sorted by key; plus the skipped files.

    DICOM files of one image (re-encodings, crops, renames: :func:`dicom_group`; or equal thumbnails)
    form one source: the best-ranked member that decodes; the others are skipped as duplicates.
    """
    skips: list[Skip] = []
    groups: dict[str, list[Source]] = {}
    for package in packages:
        found = _dicom_sources(package, cfg, skips) if PACKAGES[package.name].scan_dicom else iter(())
        for source in [*found, *_catalogue_sources(package, skips)]:
            groups.setdefault(source.key, []).append(source)
    pre = cfg.preprocess()
    sources: list[Source] = []
    thumbs: list[tuple[np.ndarray, float, Source]] = []
    for key in sorted(groups):
        chosen = None
        for member in sorted(groups[key], key=lambda s: s.rank):
            if chosen is not None:
                reason = f"same image as {chosen.source_file}"
                skips.append(Skip(member.package.name, member.source_file, "duplicate", reason))
                continue
            try:
                _probe(member, cfg)
                chosen = member
            except InputError as err:
                reason = str(err).removeprefix(f"{member.path}: ")
                skips.append(Skip(member.package.name, member.source_file, "unreadable", reason))
        if chosen is None or chosen.probe is None:  # nothing decoded, or a volume (no thumbnail)
            sources += [chosen] if chosen else []
            continue
        thumb, aspect = _thumbnail(chosen, pre), chosen.probe.pixels.shape[1] / chosen.probe.pixels.shape[0]
        twin = next((s for t, a, s in thumbs if s.modality == chosen.modality and abs(a - aspect) < 0.02
                     and float(np.abs(t - thumb).mean()) < 0.02), None)  # fmt: skip
        if twin is None:
            thumbs.append((thumb, aspect, chosen))
            sources.append(chosen)
        else:
            reason = f"same image as {twin.source_file}"
            skips.append(Skip(chosen.package.name, chosen.source_file, "duplicate", reason))
    logger.info(
        "realmini: %d sources from %d packages; %d files skipped", len(sources), len(packages), len(skips)
    )
    return sources, skips


def split_value(key: str) -> float:
    """Deterministic position of a source key in [0, 1) (SHA-256)."""
    return int(hashlib.sha256(f"realmini/{key}".encode()).hexdigest()[:12], 16) / 16**12


def assign_splits(sources: Sequence[Source], test_fraction: float) -> dict[str, str]:
    """Source key -> "train" / "test", stratified by modality: a modality's sources are ordered by
    :func:`split_value` and the first ``max(1, round(test_fraction * n))`` go to test, keeping at least
    one in train when there are two or more (the only source of a modality goes to test, so that
    every modality is measured)."""
    splits: dict[str, str] = {}
    for modality in sorted({s.modality for s in sources}):
        keys = sorted((s.key for s in sources if s.modality == modality), key=split_value)
        num_test = 1 if len(keys) == 1 else min(max(1, round(test_fraction * len(keys))), len(keys) - 1)
        splits.update({key: "test" if rank < num_test else "train" for rank, key in enumerate(keys)})
    return splits
