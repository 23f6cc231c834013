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
The PNG / JPEG / TIFF / DICOM decoders live in :mod:`tokenizer.data.decoders`; NIfTI volumes are read
here. pydicom and nibabel are imported lazily so reading a PNG stays fast.
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
from PIL import Image

from tokenizer.data.decoders import check_index, pil_array, read_dicom, read_pil, read_tiff
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
        pixels = volume_slice(volume, axis, check_index(path, slice_index, volume.shape[axis], "slice"))
        meta.update(axis=axis, slice_index=slice_index)
        return LoadedImage(_finish(path, pixels), meta.pop("modality", None), str(path), meta)
    if slice_index is not None:
        if frame is not None and frame != slice_index:
            raise InputError(f"{path}: slice_index {slice_index} and frame {frame} disagree; give one")
        frame = slice_index
    if fmt == "dicom":
        pixels, meta = read_dicom(path, frame=frame)
    elif fmt == "tiff":
        pixels, meta = read_tiff(path, frame=frame)
    else:
        pixels, meta = read_pil(path, frame=frame)
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
        frames, meta = read_dicom(path, frame=None, all_frames=True)
    elif fmt == "tiff":
        frames, meta = read_tiff(path, frame=None, all_frames=True)
    else:
        frames, meta = read_pil(path, frame=None, all_frames=True)
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
    pixels, meta = pil_array(image, Path(source))
    return LoadedImage(_finish(Path(source), pixels), None, source, meta)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the readers.


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
    volume = check_index(path, volume, shape[3], "4D volume")
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
    volume = check_index(path, volume, shape[3], "4D volume")
    ornt, codes = _orientation(path, img)  # row i: (RAS axis of voxel axis i, flip)
    raw_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    size = shape[raw_axis]
    index = check_index(path, slice_index, size, f"slice (axis {axis})")
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
