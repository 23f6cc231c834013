"""Reading medical images: PNG / JPEG / TIFF / DICOM / NIfTI files -> float32 arrays plus metadata.

Every reader returns raw intensities (HU for CT DICOM, scanner units for MR, 0..255 or 0..65535 for
PNG / JPEG / TIFF); turning them into network input is :mod:`tokenizer.data.intensity`'s job.
Anything wrong with a file (missing, empty, truncated, corrupt, extension that contradicts the
content, no decoder for its compression, NaN values, unsupported layout) raises
:class:`tokenizer.errors.InputError` whose message starts with the file's path.

Orientation convention for volumes: NIfTI volumes are reoriented to the closest RAS+ axes, so
``axis`` 0 / 1 / 2 means sagittal / coronal / axial whatever the storage order, and a 2D slice is
``np.rot90`` of the volume section so that anterior / superior is up. Frame stacks (multi-frame
DICOM, multi-page TIFF) are stored so that slicing along axis 2 gives the frames exactly as stored.
pydicom and nibabel are imported lazily so reading a PNG stays fast.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("ct", "mr", "xray", "us", "fundus", "histology", "photo", "other")
"""Canonical modality names; "other" is for scalar images that fit no other name (PET, NM, ...)."""

_MODALITY_ALIASES: dict[str, str] = {
    **{name: name for name in MODALITIES},
    "mri": "mr",
    "x-ray": "xray",
    "cxr": "xray",
    "radiograph": "xray",
    "mammography": "xray",
    "ultrasound": "us",
    "retina": "fundus",
    "histopathology": "histology",
    "pathology": "histology",
    "wsi": "histology",
    "dermoscopy": "photo",
    "endoscopy": "photo",
}

# DICOM (0008,0060) Modality -> canonical name; unlisted codes (PT, NM, SEG, OT, ...) give None.
DICOM_MODALITIES: dict[str, str] = {
    "CT": "ct",
    "MR": "mr",
    "CR": "xray",
    "DX": "xray",
    "MG": "xray",
    "RF": "xray",
    "XA": "xray",
    "IO": "xray",
    "PX": "xray",
    "US": "us",
    "OP": "fundus",
    "SM": "histology",
    "XC": "photo",
}

_EXTENSION_FORMATS: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(_EXTENSION_FORMATS)
"""File name endings :func:`read_image` recognises (DICOM files without an extension are read too)."""

_MAX_VALUES = 2**28  # refuse to decode arrays above ~268M values (gigapixel slides): tile them first


@dataclass
class LoadedImage:
    """One 2D image as read from a file."""

    pixels: np.ndarray
    """Raw intensities, float32, (H, W) for scalar images or (H, W, 3) for colour."""
    modality: str | None
    """Canonical modality (see ``MODALITIES``) when the file says, else None."""
    source: str
    """Where the image came from (the file path)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Format details: format, dtype (as stored), is_hu (True / False / None = unknown),
    original_shape, frame / num_frames, slice_index / axis, photometric, transfer_syntax, ..."""


def canonical_modality(name: str | None, *, where: str = "modality") -> str | None:
    """Map a modality name or alias ("CT", "MRI", "x-ray", ...) to ``MODALITIES``; None / "" -> None.

    Raises:
        InputError: unknown name; the message says ``where`` it came from and lists the valid names.
    """
    if name is None or not str(name).strip():
        return None
    key = str(name).strip().lower()
    if key not in _MODALITY_ALIASES:
        raise InputError(
            f"{where}: unknown modality {name!r}; expected one of {list(MODALITIES)} "
            f"or an alias {sorted(set(_MODALITY_ALIASES) - set(MODALITIES))}"
        )
    return _MODALITY_ALIASES[key]


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    return len(head) >= 540 and head[4:8] == b"n+2\x00"


def _sniff(path: Path, head: bytes) -> str | None:
    """Format from the first bytes of the file, or None when they match nothing we read."""
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as stream:
                inner = stream.read(544)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error is not an OSError
            raise InputError(f"{path}: corrupt gzip data ({err})") from err
        return "nifti" if _is_nifti_header(inner) else "gzip"
    return None


def _looks_like_headerless_dicom(path: Path) -> bool:
    """DICOM written without the 128-byte preamble ("no meta"): parse it and look for Rows."""
    import pydicom

    try:
        with warnings.catch_warnings():  # pydicom warns while guessing the encoding of non-DICOM bytes
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return "Rows" in ds and "Columns" in ds
    except Exception:  # any parser failure just means "not DICOM"
        return False


def detect_format(path: str | os.PathLike) -> str:
    """Return "png", "jpeg", "tiff", "dicom" or "nifti" for a readable image file.

    The content decides; a known image extension that contradicts the content is an error (a JPEG
    named ``.png`` is usually a pipeline bug worth fixing at the source).

    Raises:
        InputError: missing, empty, unrecognised, or extension / content mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with path.open("rb") as stream:
            head = stream.read(1024)
    except OSError as err:
        raise InputError(f"{path}: cannot read the file ({err})") from err
    if not head:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    ext = _extension(path)
    claimed = _EXTENSION_FORMATS.get(ext)
    found = _sniff(path, head)
    if found is None and claimed in (None, "dicom") and _looks_like_headerless_dicom(path):
        found = "dicom"
    if found is None or found == "gzip":
        what = f"a {claimed.upper()} file" if claimed else "a PNG, JPEG, TIFF, DICOM or NIfTI file"
        raise InputError(f"{path}: not {what}: unrecognised content starting with {head[:8]!r} (corrupt?)")
    if claimed is not None and claimed != found:
        raise InputError(
            f"{path}: wrong extension {ext!r}: the content is {found.upper()}, not {claimed.upper()}; "
            "rename the file"
        )
    return found


def read_image(
    path: str | os.PathLike,
    *,
    slice_index: int | None = None,
    axis: int = 2,
    frame: int | None = None,
) -> LoadedImage:
    """Read one 2D image from any supported file.

    Args:
        path: PNG (8/16-bit), JPEG, TIFF, DICOM (any transfer syntax with an installed decoder) or
            NIfTI (.nii / .nii.gz, 2D / 3D / 4D).
        slice_index: for volumes, the slice along ``axis`` (default: the middle one). For frame
            stacks (multi-frame DICOM, multi-page TIFF) a slice along axis 2 is the frame.
        axis: 0, 1 or 2 (NIfTI: sagittal / coronal / axial after RAS+ reorientation).
        frame: multi-frame DICOM / multi-page TIFF: the frame (default: the middle one);
            4D NIfTI: the volume (default 0).

    Returns:
        LoadedImage with float32 pixels (H, W) or (H, W, 3).

    Raises:
        InputError: the file cannot be read as an image; the message names the file and the problem.
    """
    path = Path(path)
    if axis not in (0, 1, 2):
        raise InputError(f"{path}: axis must be 0, 1 or 2, got {axis}")
    fmt = detect_format(path)
    if fmt == "nifti":
        return _read_nifti_slice(path, slice_index=slice_index, axis=axis, volume=frame or 0)
    if slice_index is not None and axis != 2:
        volume, meta = read_volume(path)
        pixels = volume_slice(volume, axis, _check_index(path, slice_index, volume.shape[axis], "slice"))
        meta.update(axis=axis, slice_index=slice_index)
        return LoadedImage(_finish(path, pixels), meta.pop("modality", None), str(path), meta)
    if slice_index is not None:
        if frame is not None and frame != slice_index:
            raise InputError(f"{path}: slice_index {slice_index} and frame {frame} disagree; give one")
        frame = slice_index
    if fmt == "dicom":
        pixels, meta = _read_dicom(path, frame=frame)
    elif fmt == "tiff":
        pixels, meta = _read_tiff(path, frame=frame)
    else:
        pixels, meta = _read_pil(path, frame=frame)
    pixels = _finish(path, pixels)
    return LoadedImage(pixels, meta.pop("modality", None), str(path), meta)


def read_volume(path: str | os.PathLike, *, volume: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a whole volume as float32 (X, Y, Z) (or (X, Y, Z, 3) for colour frame stacks).

    NIfTI volumes come back in RAS+ order (4D files: ``volume`` picks one); frame stacks and 2D
    images come back such that ``volume_slice(v, 2, k)`` is frame ``k`` as stored.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "nifti":
        return _read_nifti_volume(path, volume=volume)
    if fmt == "dicom":
        frames, meta = _read_dicom(path, frame=None, all_frames=True)
    elif fmt == "tiff":
        frames, meta = _read_tiff(path, frame=None, all_frames=True)
    else:
        frames, meta = _read_pil(path, frame=None, all_frames=True)
    frames = np.stack([_finish(path, f, collapse_gray=False) for f in frames])
    vol = np.moveaxis(np.rot90(frames, k=-1, axes=(1, 2)), 0, 2)  # (F, H, W) -> (W, H, F)
    return np.ascontiguousarray(vol), meta


def num_slices(path: str | os.PathLike, axis: int = 2) -> int:
    """Number of 2D slices along ``axis`` (same convention as :func:`read_volume`).

    NIfTI: from the header alone; other formats decode one frame.
    """
    path = Path(path)
    if detect_format(path) == "nifti":
        img, shape3 = _nifti_header(path)
        ornt, _ = _orientation(path, img)
        return int(shape3[int(np.flatnonzero(ornt[:, 0] == axis)[0])])
    image = read_image(path, frame=0)
    height, width = image.pixels.shape[:2]
    return (width, height, int(image.meta.get("num_frames", 1)))[axis]


def volume_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The display-oriented 2D slice ``index`` of a (X, Y, Z[, 3]) volume along ``axis``."""
    return np.ascontiguousarray(np.rot90(np.take(volume, index, axis=axis)))


def from_pil(image: Image.Image, source: str = "<PIL image>") -> LoadedImage:
    """Convert an in-memory PIL image with the same rules as PNG / JPEG files."""
    pixels, meta = _pil_array(image, Path(source))
    return LoadedImage(_finish(Path(source), pixels), None, source, meta)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the readers.


def _check_index(path: Path, index: int | None, size: int, what: str) -> int:
    if size < 1:  # e.g. a damaged TIFF whose series lists no pages
        raise InputError(f"{path}: the file holds no {what} (expected at least one)")
    if index is None:
        return size // 2
    if not 0 <= index < size:
        raise InputError(f"{path}: {what} index {index} out of range; the file has {size} (0..{size - 1})")
    return int(index)


def _finish(path: Path, pixels: np.ndarray, *, collapse_gray: bool = True) -> np.ndarray:
    """Validate layout and values, return float32 (H, W) or (H, W, 3)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]  # drop alpha
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)) or min(pixels.shape[:2]) < 1:
        raise InputError(f"{path}: unsupported image shape {pixels.shape}; expected (H, W) or (H, W, 3)")
    if pixels.dtype.kind not in "buif":
        raise InputError(f"{path}: unsupported pixel type {pixels.dtype}; expected integers or floats")
    pixels = pixels.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        bad = int((~np.isfinite(pixels)).sum())
        raise InputError(f"{path}: {bad} of {pixels.size} pixel values are NaN or infinite")
    if (
        collapse_gray
        and pixels.ndim == 3
        and np.array_equal(pixels[..., 0], pixels[..., 1])
        and np.array_equal(pixels[..., 0], pixels[..., 2])
    ):
        pixels = pixels[..., 0]  # grayscale saved as RGB
    return np.ascontiguousarray(pixels)


def _pick_frames(path: Path, frames: np.ndarray, frame: int | None, all_frames: bool) -> np.ndarray:
    """frames: (F, H, W[, C]) -> one frame, or all of them when ``all_frames``."""
    if all_frames:
        return frames
    return frames[_check_index(path, frame, frames.shape[0], "frame")]


# ----------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow).


def _pil_array(image: Image.Image, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        pixels = np.asarray(image).astype(np.uint16)
    elif mode == "I":
        pixels = np.asarray(image)
        if image.format == "PNG" and pixels.min() >= 0 and pixels.max() <= 65535:
            pixels = pixels.astype(np.uint16)  # PNG holds at most 16 bits
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
    elif mode in ("L", "RGB"):
        pixels = np.asarray(image)
    elif mode in ("1", "LA", "La"):
        pixels = np.asarray(image.convert("L"))
    else:  # P, PA, RGBA, CMYK, YCbCr, LAB, HSV, ...
        pixels = np.asarray(image.convert("RGB"))
    meta = {"format": (image.format or "pil").lower(), "dtype": str(pixels.dtype), "mode": mode}
    meta.update(is_hu=False, original_shape=tuple(pixels.shape))
    return pixels, meta


def _read_pil(path: Path, *, frame: int | None, all_frames: bool = False) -> tuple[Any, dict[str, Any]]:
    try:
        with Image.open(path) as image:
            image.load()
            if image.format == "JPEG":
                image = ImageOps.exif_transpose(image)
            pixels, meta = _pil_array(image, path)
    except InputError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise InputError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") from err
    if frame not in (None, 0):
        raise InputError(f"{path}: frame index {frame} out of range; the file has 1 (0..0)")
    meta["num_frames"] = 1
    return (pixels[None] if all_frames else pixels), meta


# ----------------------------------------------------------------------------------------------
# TIFF (tifffile, falling back to Pillow for compressions tifffile cannot decode here).


def _read_tiff(
    path: Path, *, frame: int | None, all_frames: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if int(np.prod(series.shape)) > _MAX_VALUES:
                raise InputError(f"{path}: TIFF of shape {series.shape} is too large to read whole; tile it")
            axes, data = series.axes, series.asarray()
    except InputError:
        raise
    except Exception as err:
        try:
            pixels, meta = _read_pil(path, frame=frame, all_frames=all_frames)
        except InputError:
            raise InputError(f"{path}: cannot decode the TIFF ({type(err).__name__}: {err})") from err
        return pixels, meta
    if "S" in axes:  # colour samples last
        data = np.moveaxis(data, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    if not axes.removesuffix("S").endswith("YX"):
        raise InputError(f"{path}: TIFF axes {series.axes!r} do not end in Y, X; expected an image")
    if data.size == 0:  # a damaged header can declare a zero-sized series
        raise InputError(f"{path}: TIFF series of shape {series.shape} holds no pixels")
    spatial = 3 if axes.endswith("S") else 2
    frames = data.reshape((-1, *data.shape[data.ndim - spatial :]))  # every other axis -> frames
    meta = {"format": "tiff", "dtype": str(data.dtype), "axes": series.axes, "num_frames": frames.shape[0]}
    meta.update(is_hu=None if data.dtype.kind in "if" else False, original_shape=tuple(series.shape))
    return _pick_frames(path, frames, frame, all_frames), meta


# ----------------------------------------------------------------------------------------------
# DICOM (pydicom).


def _transfer_syntax(ds: Any) -> Any:
    """The dataset's transfer syntax; files without file meta get one from their encoding."""
    from pydicom import uid

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return tsyntax
    implicit, little = ds.original_encoding
    tsyntax = (
        uid.ImplicitVRLittleEndian
        if implicit
        else (uid.ExplicitVRLittleEndian if little in (True, None) else uid.ExplicitVRBigEndian)
    )
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _rescale(ds: Any, frame: int) -> tuple[float, float]:
    """(slope, intercept) for ``frame``: top-level tags or the enhanced multi-frame functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    for groups, item in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and item < len(seq) and seq[item].get("PixelValueTransformationSequence"):
            pvt = seq[item].PixelValueTransformationSequence[0]
            return float(pvt.get("RescaleSlope", 1.0) or 1.0), float(pvt.get("RescaleIntercept", 0.0) or 0.0)
    return 1.0, 0.0


def _dicom_values(ds: Any, raw: np.ndarray, frame: int) -> np.ndarray:
    """Raw stored values of one frame -> modality values (HU for CT), MONOCHROME1 inverted.

    Values keep the stored integer dtype when no rescale applies, so 8-bit files stay recognisable.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        return apply_color_lut(raw, ds)
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(raw, ds)
        low, high = float(values.min()), float(values.max())
    else:
        slope, intercept = _rescale(ds, frame)
        values = raw if (slope, intercept) == (1.0, 0.0) else raw.astype(np.float64) * slope + intercept
        if raw.dtype.kind in "iu":
            bits = min(int(ds.get("BitsStored", 8 * raw.itemsize)), 8 * raw.itemsize)
            signed = raw.dtype.kind == "i"
            low_raw, high_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            low, high = sorted((low_raw * slope + intercept, high_raw * slope + intercept))
        else:
            low, high = float(raw.min()), float(raw.max())
    if photometric == "MONOCHROME1":  # 0 means white: flip within the representable range
        flipped = (low + high) - values.astype(np.float64)
        values = flipped.astype(values.dtype) if values.dtype.kind in "iu" and low >= 0 else flipped
    return values


def _read_dicom(path: Path, *, frame: int | None, all_frames: bool = False) -> tuple[Any, dict[str, Any]]:
    try:
        return _read_dicom_dataset(path, frame=frame, all_frames=all_frames)
    except InputError:
        raise
    except Exception as err:  # pydicom converts values lazily: a corrupt one fails wherever it is first read
        raise InputError(f"{path}: corrupt DICOM attribute ({type(err).__name__}: {err})") from err


def _read_dicom_dataset(path: Path, *, frame: int | None, all_frames: bool) -> tuple[Any, dict[str, Any]]:
    import pydicom
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.pixels.utils import get_nr_frames

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise InputError(f"{path}: cannot parse DICOM ({type(err).__name__}: {err})") from err
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("SOPClassUID")
        raise InputError(
            f"{path}: DICOM without pixel data ({getattr(kind, 'name', kind) or 'unknown SOP class'})"
        )
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as err:
        raise InputError(
            f"{path}: DICOM transfer syntax {tsyntax.name} ({tsyntax}) is not supported"
        ) from err
    if not decoder.is_available:
        raise InputError(
            f"{path}: no decoder installed for DICOM transfer syntax {tsyntax.name} ({tsyntax}); "
            f"install one of: {'; '.join(decoder.missing_dependencies)}"
        )
    try:
        num_frames = int(get_nr_frames(ds, warn=False))
        indices = list(range(num_frames)) if all_frames else [_check_index(path, frame, num_frames, "frame")]
        frames = [_dicom_values(ds, pixel_array(ds, index=i if num_frames > 1 else None), i) for i in indices]
    except InputError:
        raise
    except Exception as err:  # truncated data, bad group 0028 values, decoder failures
        raise InputError(f"{path}: cannot decode DICOM pixel data ({type(err).__name__}: {err})") from err
    code = str(ds.get("Modality", "")).upper()
    modality = DICOM_MODALITIES.get(code)
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "dicom_modality": code,
        "dtype": str(frames[0].dtype),
        "is_hu": modality == "ct" and str(ds.get("RescaleType", "HU")).upper() in ("HU", "US"),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax": tsyntax.name,
        "num_frames": num_frames,
        "rescale": _rescale(ds, indices[0]),
        "original_shape": (num_frames, int(ds.Rows), int(ds.Columns)),
    }
    if not all_frames:
        meta["frame"] = indices[0]
    if "PixelSpacing" in ds:
        meta["pixel_spacing"] = tuple(float(v) for v in ds.PixelSpacing)
    return (np.stack(frames) if all_frames else frames[0]), meta


# ----------------------------------------------------------------------------------------------
# NIfTI (nibabel).


def _nifti_header(path: Path) -> tuple[Any, tuple[int, int, int, int]]:
    """The nibabel image and its shape as (X, Y, Z, T) (2D files get Z = 1, 3D files T = 1)."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as err:
        raise InputError(f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})") from err
    shape = list(img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4 or len(shape) < 2:
        raise InputError(f"{path}: NIfTI of shape {img.shape} not supported; expected 2D, 3D or 4D")
    shape += [1] * (4 - len(shape))
    return img, (shape[0], shape[1], shape[2], shape[3])


def _orientation(path: Path, img: Any) -> tuple[np.ndarray, str]:
    """(nibabel io_orientation rows, axis codes such as "RAS"); a degenerate affine is an InputError."""
    import nibabel as nib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ornt = nib.orientations.io_orientation(img.affine)
            codes = nib.orientations.ornt2axcodes(ornt)
    except Exception as err:  # non-finite or singular affines fail inside nibabel
        raise InputError(f"{path}: NIfTI affine has no orientation ({type(err).__name__}: {err})") from err
    if np.isnan(ornt).any() or None in codes:
        raise InputError(
            f"{path}: NIfTI affine {np.round(img.affine, 3).tolist()} has no orientation for every axis "
            "(zero or non-finite voxel sizes?); expected a valid qform / sform"
        )
    return ornt, "".join(codes)


def _nifti_data(path: Path, img: Any, index: tuple) -> np.ndarray:
    """Read ``index`` (into the (X, Y, Z, T) view) from the file's proxy without loading the rest."""
    try:
        proxy = img.dataobj
        data = np.asanyarray(proxy[index[: len(img.shape)]] if len(img.shape) >= 3 else proxy[index[:2]])
    except Exception as err:  # truncated / corrupt data block
        raise InputError(f"{path}: cannot read NIfTI data ({type(err).__name__}: {err})") from err
    if data.dtype.kind not in "buif":
        raise InputError(f"{path}: NIfTI data type {data.dtype} not supported; expected scalar voxels")
    return data


def _nifti_volume_raw(path: Path, volume: int) -> tuple[Any, np.ndarray, tuple[int, int, int, int]]:
    img, shape = _nifti_header(path)
    volume = _check_index(path, volume, shape[3], "4D volume")
    data = _nifti_data(path, img, (slice(None), slice(None), slice(None), volume))
    return img, data.reshape(shape[:3]), shape


def _read_nifti_volume(path: Path, *, volume: int) -> tuple[np.ndarray, dict[str, Any]]:
    import nibabel as nib

    img, data, shape = _nifti_volume_raw(path, volume)
    ornt, codes = _orientation(path, img)
    data = nib.orientations.apply_orientation(data, ornt)
    meta = {
        "format": "nifti",
        "dtype": str(data.dtype),
        "is_hu": None,
        "original_shape": tuple(img.shape),
        "orientation": codes,
        "volume": volume,
        "num_volumes": shape[3],
    }
    return _finish_volume(path, data), meta


def _finish_volume(path: Path, data: np.ndarray) -> np.ndarray:
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {bad} of {data.size} voxel values are NaN or infinite")
    return np.ascontiguousarray(data)


def _read_nifti_slice(path: Path, *, slice_index: int | None, axis: int, volume: int) -> LoadedImage:
    """One RAS+ slice, read through the proxy (only that slice is decoded from .nii files)."""
    img, shape = _nifti_header(path)
    volume = _check_index(path, volume, shape[3], "4D volume")
    ornt, codes = _orientation(path, img)  # row i: (RAS axis of voxel axis i, flip)
    raw_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    size = shape[raw_axis]
    index = _check_index(path, slice_index, size, f"slice (axis {axis})")
    raw_index = index if ornt[raw_axis, 1] > 0 else size - 1 - index
    selector: list[Any] = [slice(None)] * 3 + [volume]
    selector[raw_axis] = raw_index
    data = _nifti_data(path, img, tuple(selector)).reshape([shape[i] for i in range(3) if i != raw_axis])
    rest = [i for i in range(3) if i != raw_axis]
    order = sorted(rest, key=lambda i: ornt[i, 0])  # remaining voxel axes in RAS order
    data = data.transpose([rest.index(i) for i in order])
    for position, i in enumerate(order):
        if ornt[i, 1] < 0:
            data = np.flip(data, position)
    pixels = _finish(path, np.rot90(_finish_volume(path, data)))
    meta = {
        "format": "nifti",
        "dtype": str(data.dtype),
        "is_hu": None,
        "original_shape": tuple(img.shape),
        "orientation": codes,
        "axis": axis,
        "slice_index": index,
        "num_slices": size,
        "volume": volume,
        "num_volumes": shape[3],
    }
    return LoadedImage(pixels, None, str(path), meta)
