"""Image training data streamed from sharded storage through LitData.

A corpus of tens of millions of images never has to sit in one folder listing: the converter
(:func:`write_manifest_stream`, :func:`write_phantom_stream`; CLI ``tools/make_stream.py``) writes
LitData chunk files (``chunk-<writer>-<n>.bin``, ~64 MB each, plus ``index.json``) once, and
:class:`StreamingImageDataset` reads them back and returns the same sample dict as the other datasets:
``{"image": FloatTensor (C, S, S) in [-1, 1], "caption", "modality", "index", "source"}``.

Why LitData (rather than WebDataset); the claims, checked against the installed litdata 0.2.76:

- Deterministic shuffling: true. The chunk order is a permutation drawn from (seed, epoch) and the
  items of a chunk are permuted from (seed, epoch, chunk), so the same seed, world size, worker
  count and batch size give the same order; another seed or another epoch gives another order. On
  parallel file systems (NFS, Lustre, GPFS, VAST: read from ``/proc/mounts``) litdata switches to a
  "window" shuffle that keeps whole chunks per worker and mixes them within a window of 16 chunks:
  still deterministic, less random.
- Per-rank / per-worker splitting: true. Each (rank, worker) reads a disjoint part of every epoch.
  The rank comes from ``torch.distributed``, overridden by the ``WORLD_SIZE`` / ``GLOBAL_RANK`` /
  ``NNODES`` environment variables (how the tests simulate ranks), read when the dataset is built
  (the data module builds it in ``setup``, after the process group exists). There is no world-size
  argument. With more than one rank litdata forces ``drop_last``: every rank gets the same number
  of whole batches and the rest of the epoch (less than about ``(world_size + 1) * batch_size``
  samples) is skipped, a different rest each shuffled epoch.
- Resumable position: true, with one fix. ``StreamingDataLoader.state_dict()`` holds the epoch,
  the samples yielded (whole batches), the seed and the worker that yields next; ``load_state_dict``
  on a freshly built loader yields exactly the unseen rest of the epoch. Lightning saves it with no
  help: the fit loop stores ``state_dict()`` of every training loader that has one in each
  checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it back on
  ``fit(ckpt_path=...)``, so ``ImageDataModule`` needs no ``state_dict`` hooks of its own (they would
  store it twice). Lightning does not prefetch a training batch when the loader has a length, as
  this one does, so the saved position is the batches actually trained on. The fix: litdata keeps
  replaying the restored position until a pass ends in ``StopIteration``, which Lightning does not
  always reach, so the next epoch repeated the rest of the resumed one; :class:`StreamLoader`
  stops that. Known trap (Lightning issue #20550): calling ``trainer.estimated_stepping_batches``
  before the restore skips loading the state.
- Local and object-store shards read the same way: true by construction, untested here (no
  network). ``input_dir`` may be a path or an ``s3://``, ``gs://``, ``azure://`` or ``hf://`` URL;
  remote chunks are downloaded to a local cache (``cache_dir``; else ``LITDATA_CACHE_DIR`` or
  litdata's default), local ones are memory-mapped in place. The converter writes to a URL the same way.

What a stored sample holds (the deterministic part of :func:`~tokenizer.data.intensity.prepare`,
done once at conversion; the random part, CT window and augmentation, happens when read):

=========  =====================================================================================
pixels     (C, S, S) array, C = 1 (scalar) or 3 (colour), S = ``image_size`` at conversion
           (centre crop + antialiased resize already done); its dtype says how to read it:
           int16 = CT in Hounsfield units (window chosen when read: random during training),
           uint8 = 8-bit sources (PNG / JPEG exports), value / 255,
           uint16 = everything else (16-bit PNG / TIFF / DICOM, MR, phantoms), value / 65535
caption    str ("" when none); text fields are stored as UTF-8 bytes, because litdata would
           embed the file behind any ``str`` that names an existing file
modality   str, canonical ("" when unknown)
source     str: the file path (as ``ManifestDataset`` gives it) or ``phantom:seed:i``
window     str: "" (none), a ``CT_WINDOWS`` name, or "low,high" in HU
index      int: position of the row in the converter's input (manifest rows after the split
           filter, so it equals ``ManifestDataset(manifest, split=...)`` indices); failed rows
           leave gaps
=========  =====================================================================================

Why arrays rather than the original encoded files: a volume slice would drag its whole NIfTI or
DICOM file along; decoding a DICOM / JPEG and computing percentiles and a resize costs
milliseconds per image, while a stored array is a memory-mapped copy; and the size is known: a
256² grayscale sample is 64 KiB in uint8, 128 KiB in uint16 (2-4 TB for 30M images). Grayscale
stays one channel on disk and is repeated to ``cfg.channels`` when read. (litdata can zstd-compress
chunks, which needs the ``zstd`` package; it is not installed, so the converter does not offer it.)

Read output differs from :class:`~tokenizer.data.datasets.ManifestDataset` only by the storage
quantisation (1/255 or 1/65535 of the range) and, for CT, by the window being applied after the
resize instead of before (they differ only where the resize mixes values across a window edge).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize

from tokenizer.data.datasets import Augment, AugmentConfig, BadRowTracker, Sample, collate_samples
from tokenizer.data.intensity import PreprocessConfig, resize_square, to_unit
from tokenizer.data.io import LoadedImage, read_image
from tokenizer.data.manifest import BadRow, ManifestRow, read_manifest
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as in intensity.prepare
_UNIT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_HU = np.dtype(np.int16)


# ----------------------------------------------------------------------------------------------
# One image <-> its stored array.


def _is_eight_bit(dtype: Any) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "b" or (dtype.kind == "u" and dtype.itemsize == 1)


def _stored_dtype(loaded: LoadedImage) -> np.dtype:
    """The dtype the values had in the file (``meta["dtype"]``), else the pixels' own."""
    stored = loaded.meta.get("dtype")
    return np.dtype(stored if stored is not None else np.asarray(loaded.pixels).dtype)


def _is_hu(pixels: np.ndarray, modality: str | None, loaded: LoadedImage) -> bool:
    """Rule 1 of :func:`~tokenizer.data.intensity.to_unit`: scalar CT with values in HU."""
    is_hu = loaded.meta.get("is_hu")
    if is_hu is None:
        is_hu = not _is_eight_bit(_stored_dtype(loaded))
    return modality == "ct" and pixels.ndim == 2 and bool(is_hu)


def encode_image(loaded: LoadedImage, cfg: PreprocessConfig, *, modality: str | None = None) -> np.ndarray:
    """The stored form of one image (see the module docstring).

    Args:
        loaded: pixels (H, W) or (H, W, 3) as read, with their format details in ``meta``.
        cfg: ``image_size`` and ``mr_percentiles`` are used (channels and windows apply when read).
        modality: canonical modality; None keeps the file's.

    Returns:
        (C, S, S) int16 HU for CT in HU, uint8 for 8-bit sources, uint16 otherwise.
    """
    modality = modality or loaded.modality
    pixels = np.asarray(loaded.pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3) or min(pixels.shape[:2]) < 1:
        raise InputError(f"{loaded.source}: image of shape {pixels.shape}; expected (H, W) or (H, W, 3)")
    if _is_hu(pixels, modality, loaded):
        if not np.isfinite(pixels).all():
            raise InputError(f"{loaded.source}: CT values are not all finite")
        hu = resize_square(torch.from_numpy(pixels.astype(np.float32))[None], cfg.image_size).numpy()
        return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    try:
        unit = to_unit(
            pixels, modality, cfg=cfg, is_hu=loaded.meta.get("is_hu"), stored_dtype=loaded.meta.get("dtype")
        )
    except InputError as err:
        raise InputError(f"{loaded.source}: {err}") from err
    image = torch.from_numpy(np.ascontiguousarray(unit))
    image = image.permute(2, 0, 1) if image.ndim == 3 else image[None]
    image = resize_square(image, cfg.image_size).numpy()
    dtype = np.dtype(np.uint8 if _is_eight_bit(_stored_dtype(loaded)) else np.uint16)
    return np.rint(image * _UNIT_SCALE[dtype]).astype(dtype)


def decode_image(
    pixels: np.ndarray,
    cfg: PreprocessConfig,
    *,
    window: str | tuple[float, float] | None = None,
    rng: np.random.Generator | None = None,
    source: str = "<stream>",
) -> torch.Tensor:
    """Network input from a stored array (the inverse of :func:`encode_image` plus the CT window).

    Args:
        pixels: (C, S, S) int16 / uint8 / uint16 as written by :func:`encode_image`.
        window: CT window for int16 data; None: random ``cfg.train_ct_windows`` entry when ``rng``
            is given, else ``cfg.eval_ct_window``.
        rng: makes the random training window possible.

    Returns:
        float32 (cfg.channels, cfg.image_size, cfg.image_size) in [-1, 1]; resized when the stream
        was written at another size.
    """
    if (
        pixels.ndim != 3
        or pixels.dtype not in (_HU, *_UNIT_SCALE)
        or pixels.shape[0] not in ((1,) if pixels.dtype == _HU else (1, 3))
    ):
        raise InputError(
            f"{source}: stored pixels {pixels.dtype} {pixels.shape}; expected (1|3, S, S) uint8 / uint16 "
            "or (1, S, S) int16 (HU); write streams with tools/make_stream.py"
        )
    x = pixels.astype(np.float32)
    if x.shape[1:] != (cfg.image_size, cfg.image_size):
        x = resize_square(torch.from_numpy(x), cfg.image_size).numpy()
    if pixels.dtype == _HU:
        x = to_unit(x[0], "ct", window=window, cfg=cfg, rng=rng, is_hu=True)[None]
    else:
        x *= 1.0 / _UNIT_SCALE[pixels.dtype]
    if cfg.channels == 1 and x.shape[0] == 3:
        x = np.tensordot(_LUMA, x, axes=1)[None]
    elif cfg.channels == 3 and x.shape[0] == 1:
        x = np.broadcast_to(x, (3, *x.shape[1:]))
    return torch.from_numpy(np.ascontiguousarray(x * 2.0 - 1.0, dtype=np.float32))


def _window_text(window: str | tuple[float, float] | None) -> str:
    if window is None:
        return ""
    return window if isinstance(window, str) else f"{float(window[0])!r},{float(window[1])!r}"


def _parse_window_text(text: str) -> str | tuple[float, float] | None:
    if not text:
        return None
    if "," not in text:
        return text
    low, high = text.split(",")
    return float(low), float(high)


_TEXT_FIELDS = ("caption", "modality", "source", "window")


def _record(
    pixels: np.ndarray, *, caption: str, modality: str | None, source: str, window, index: int
) -> dict:
    # Text as UTF-8 bytes: litdata would embed the file behind any str that names an existing file.
    text = {"caption": caption, "modality": modality or "", "source": source, "window": _window_text(window)}
    return {
        "pixels": pixels,
        **{key: value.encode("utf-8") for key, value in text.items()},
        "index": int(index),
    }


# ----------------------------------------------------------------------------------------------
# The converter.


@dataclass
class ShardOptions:
    """How the converter writes LitData chunks."""

    num_workers: int = 1
    """Writer processes; each writes its own chunk files (the same count gives the same files)."""
    chunk_bytes: str | int = "64MB"
    """Target size of one chunk file (tens of MB suit object stores)."""
    overwrite: bool = False
    """Replace a stream already at the output."""
    start_method: str | None = None
    """Start method of the writer processes ("fork", "spawn"; None: litdata's choice, spawn)."""
    verbose: bool = False
    """Let litdata print its progress."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


@dataclass
class StreamReport:
    """What a conversion did."""

    output_dir: str
    num_inputs: int
    """Rows (or phantoms) handed to the writers."""
    num_written: int
    """Samples in the stream."""
    bad_rows: list[BadRow] = field(default_factory=list)
    """Manifest lines skipped before conversion (bad JSON, missing columns, ...)."""
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    """(index, source, reason) of inputs that could not be read or preprocessed."""
    seconds: float = 0.0

    @property
    def num_dropped(self) -> int:
        return len(self.bad_rows) + len(self.failures)

    def summary(self) -> str:
        """One line: counts, time and the first reasons."""
        text = (
            f"wrote {self.num_written} samples to {self.output_dir} in {self.seconds:.1f} s; dropped "
            f"{self.num_dropped} ({len(self.bad_rows)} bad manifest lines, {len(self.failures)} unreadable)"
        )
        reasons = [f"line {b.line}: {b.reason}" for b in self.bad_rows[:2]]
        reasons += [f"{source}: {why}" for _, source, why in self.failures[:2]]
        return text + ("; e.g. " + "; ".join(reasons) if reasons else "")


def _note_failure(failures_dir: str, index: int, source: str, reason: str) -> None:
    """Runs in a writer process: keep the reason for the report (which logs it)."""
    with open(os.path.join(failures_dir, f"{os.getpid()}.jsonl"), "a") as out:
        out.write(json.dumps([index, source, reason]) + "\n")


def _manifest_sample(item: tuple[int, ManifestRow], *, cfg: PreprocessConfig, axis: int, failures_dir: str):
    """Writer function: one manifest row -> zero or one stored sample."""
    index, row = item
    source = str(row.image)  # as ManifestDataset; a volume's rows differ by index
    try:
        loaded = read_image(row.image, slice_index=row.slice_index, axis=axis)
        modality = row.modality or loaded.modality
        pixels = encode_image(loaded, cfg, modality=modality)
    except Exception as err:  # one unreadable file must not stop (or, in litdata, hang) the conversion
        reason = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
        _note_failure(failures_dir, index, source, reason)
        return
    yield _record(
        pixels, caption=row.caption, modality=modality, source=source, window=row.window, index=index
    )


@functools.lru_cache(maxsize=4)
def _phantoms(num_images: int, seed: int, size: int, modalities: tuple[str, ...] | None):
    from tokenizer.data.phantoms import PhantomDataset

    return PhantomDataset(num_images, seed=seed, size=size, modalities=modalities)


def _phantom_sample(index: int, *, num_images: int, seed: int, size: int, modalities, failures_dir: str):
    """Writer function: phantom ``index`` -> one stored sample (uint16, as generated)."""
    phantom = _phantoms(num_images, seed, size, modalities).phantom(index)
    image = phantom.image.transpose(2, 0, 1) if phantom.image.ndim == 3 else phantom.image[None]
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    source = f"phantom:{seed}:{index}"
    yield _record(
        pixels, caption=phantom.caption, modality=phantom.modality, source=source, window=None, index=index
    )


def _write(fn: Callable, inputs: Sequence[Any], output_dir: str, options: ShardOptions) -> StreamReport:
    """Run litdata's ``optimize`` over ``inputs``; collect the per-row failures the writers noted."""
    if "://" not in output_dir and (Path(output_dir) / "index.json").exists() and not options.overwrite:
        raise InputError(f"{output_dir}: a stream is already there; choose another folder or overwrite it")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="make_stream-") as failures_dir:
        optimize(
            fn=functools.partial(fn, failures_dir=failures_dir),
            inputs=list(inputs),
            output_dir=output_dir,
            chunk_bytes=options.chunk_bytes,
            num_workers=options.num_workers,
            keep_data_ordered=True,  # static slices per writer: the same input gives the same chunks
            reorder_files=False,
            mode="overwrite" if options.overwrite else None,
            start_method=options.start_method,
            verbose=options.verbose,
        )
        failures = [
            tuple(json.loads(line))
            for path in sorted(Path(failures_dir).glob("*.jsonl"))
            for line in path.read_text().splitlines()
        ]
    failures.sort()
    return StreamReport(
        output_dir=output_dir,
        num_inputs=len(inputs),
        num_written=len(inputs) - len(failures),
        failures=failures,
        seconds=time.perf_counter() - start,
    )


def write_manifest_stream(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: PreprocessConfig,
    *,
    split: str | None = None,
    axis: int = 2,
    allow_outside_root: bool = False,
    max_bad_fraction: float = 0.01,
    min_rows_before_failing: int = 50,
    options: ShardOptions | None = None,
) -> StreamReport:
    """Convert the rows of a JSONL / CSV manifest into a LitData stream.

    Args:
        manifest: manifest file (see :mod:`tokenizer.data.manifest`).
        output_dir: local folder (created) or object-store URL.
        cfg: ``image_size`` and ``mr_percentiles`` are fixed into the stream.
        split: keep only rows of this split (None: all rows).
        axis: slicing axis for volume rows.
        max_bad_fraction, min_rows_before_failing: as in ``DataConfig``; judged after writing.

    Raises:
        InputError: no usable rows, nothing could be converted, or too many rows dropped (the stream
            is written first, so the report of what failed is complete).
    """
    options = options or ShardOptions()
    rows, bad_rows = read_manifest(manifest, allow_outside_root=allow_outside_root)
    if split is not None:
        rows = [row for row in rows if row.split == split]
    if not rows:
        raise InputError(f"{manifest}: no usable rows (split={split!r}, {len(bad_rows)} bad lines)")
    fn = functools.partial(_manifest_sample, cfg=cfg, axis=axis)
    report = _write(fn, list(enumerate(rows)), str(output_dir), options)
    report.bad_rows = bad_rows
    if report.num_written == 0:
        raise InputError(f"{manifest}: no row could be converted; {report.summary()}")
    tracker = BadRowTracker(max_bad_fraction, min_rows_before_failing)
    tracker.update(len(rows) - len(report.failures), [*bad_rows, *report.failures])
    return report


def write_phantom_stream(
    output_dir: str | os.PathLike,
    num_images: int,
    *,
    seed: int = 0,
    size: int = 128,
    modalities: Sequence[str] | None = None,
    options: ShardOptions | None = None,
) -> StreamReport:
    """Write ``PhantomDataset(num_images, seed=seed, size=size, modalities=modalities)`` as a stream.

    Sample ``i`` read back (``train=False``, same size) equals the dataset's item ``i`` up to the
    16-bit storage (|difference| <= 1/65535 in [-1, 1] units).
    """
    modalities = tuple(modalities) if modalities is not None else None
    _phantoms(num_images, seed, size, modalities)  # validates the arguments before any process starts
    fn = functools.partial(
        _phantom_sample, num_images=num_images, seed=seed, size=size, modalities=modalities
    )
    return _write(fn, range(num_images), str(output_dir), options or ShardOptions())


# ----------------------------------------------------------------------------------------------
# Reading.


class StreamingImageDataset(StreamingDataset):
    """Samples of a stream written by the converter, as network inputs.

    Args:
        input_dir: stream folder or object-store URL.
        cfg: preprocessing (size, channels, CT windows) of the network input.
        shuffle: shuffle chunks and the items inside them (deterministic in seed and epoch).
        seed: shuffle seed; also seeds training windows and augmentation per (seed, epoch, index),
            so a resumed run draws the same augmentations as an uninterrupted one.
        train: random CT windows (rows without a window) and ``augment``.
        augment: augmentation when ``train`` (default ``AugmentConfig()``); switch flips and turns
            off for captions that say left / right (phantoms).
        cache_dir: local cache for remote chunks (None: litdata's default).

    Items: ``{"image": (C, S, S) float32 in [-1, 1], "caption", "modality", "index", "source"}``.
    Use :func:`stream_loader` to batch them (a ``StreamingDataLoader``, whose position can be saved).
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        cfg: PreprocessConfig,
        *,
        shuffle: bool = False,
        seed: int = 0,
        train: bool = False,
        augment: AugmentConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        input_dir = str(input_dir)
        if "://" not in input_dir and not (Path(input_dir) / "index.json").is_file():
            raise InputError(
                f"{input_dir}: not a stream (no index.json); write one with tools/make_stream.py"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # Items are decoded one at a time (no decode window), so a full in-chunk permutation is cheap.
        super().__init__(
            input_dir, cache_dir=cache_dir, shuffle=shuffle, seed=seed, batch_decode=0, item_shuffle_window=0
        )
        self.cfg = cfg
        self.train = train
        self.augment = Augment(augment or AugmentConfig()) if train else None

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if isinstance(index, str):  # key look-ups re-enter __getitem__ with a chunk index
            return item
        if isinstance(index, slice):
            return [self._sample(record) for record in item]
        return self._sample(item)

    def _sample(self, record: dict[str, Any]) -> Sample:
        try:
            pixels, index = record["pixels"], int(record["index"])
            caption, modality, source, window = (bytes(record[key]).decode("utf-8") for key in _TEXT_FIELDS)
        except (KeyError, TypeError) as err:
            where = self.input_dir.url or self.input_dir.path
            raise InputError(
                f"{where}: item is not an image-stream record ({type(err).__name__}: {err}); "
                "write streams with tools/make_stream.py"
            ) from None
        rng = generator = None
        if self.train:
            rng = np.random.default_rng([self.seed, self.current_epoch, index])
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        image = decode_image(pixels, self.cfg, window=_parse_window_text(window), rng=rng, source=source)
        if self.augment is not None:
            image = self.augment(image, generator)
        return {"image": image, "caption": caption, "modality": modality, "index": index, "source": source}


class StreamLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose restored position serves one pass only.

    litdata keeps a loaded position (``restore``) until a pass runs into ``StopIteration``. After a
    mid-epoch resume Lightning may end the epoch by counting batches instead (it adds the batches
    done before the checkpoint to its fetch count; seen with validation inside the epoch), and the
    next epoch then replayed the restored rest of the old one. Here the pass that follows a resumed
    pass always starts a new epoch.
    """

    _resumed_pass_started = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resumed_pass_started = False

    def __iter__(self) -> Any:
        if self.restore and self._resumed_pass_started:
            self.restore = False  # litdata then resets its counters and moves to the next epoch
        self._resumed_pass_started = self.restore
        yield from super().__iter__()


def stream_loader(
    dataset: StreamingImageDataset, *, batch_size: int, num_workers: int, pin_memory: bool = False
) -> StreamLoader:
    """A :class:`StreamLoader` batching with :func:`~tokenizer.data.datasets.collate_samples`.

    Workers are not persistent: each epoch (and each resume) starts them from the loader's state.
    """
    shape = (dataset.cfg.channels, dataset.cfg.image_size, dataset.cfg.image_size)
    return StreamLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_samples, image_shape=shape),
        pin_memory=pin_memory,
    )
