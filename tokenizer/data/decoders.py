"""Decoders of 2D images and frame stacks: PNG / JPEG (Pillow), TIFF (tifffile), DICOM (pydicom).

Each returns one frame (H, W[, C]), or with ``all_frames`` every frame (F, H, W[, C]), in the file's own
units (DICOM: after rescale / modality LUT, MONOCHROME1 inverted), and a meta dict; :mod:`tokenizer.data.io`
picks the decoder from the file's content and validates what it returns. tifffile and pydicom are
imported lazily so reading a PNG stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from tokenizer.errors import InputError

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

_MAX_VALUES = 2**28  # refuse to decode arrays above ~268M values (gigapixel slides): tile them first


# ----------------------------------------------------------------------------------------------
# Helpers shared by the readers.


def check_index(path: Path, index: int | None, size: int, what: str) -> int:
    if size < 1:  # e.g. a damaged TIFF whose series lists no pages
        raise InputError(f"{path}: the file holds no {what} (expected at least one)")
    if index is None:
        return size // 2
    if not 0 <= index < size:
        raise InputError(f"{path}: {what} index {index} out of range; the file has {size} (0..{size - 1})")
    return int(index)


def _pick_frames(path: Path, frames: np.ndarray, frame: int | None, all_frames: bool) -> np.ndarray:
    """frames: (F, H, W[, C]) -> one frame, or all of them when ``all_frames``."""
    if all_frames:
        return frames
    return frames[check_index(path, frame, frames.shape[0], "frame")]


# ----------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow).


def pil_array(image: Image.Image, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
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


def read_pil(path: Path, *, frame: int | None, all_frames: bool = False) -> tuple[Any, dict[str, Any]]:
    try:
        with Image.open(path) as image:
            image.load()
            if image.format == "JPEG":
                image = ImageOps.exif_transpose(image)
            pixels, meta = pil_array(image, path)
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


def read_tiff(
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
            pixels, meta = read_pil(path, frame=frame, all_frames=all_frames)
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


def read_dicom(path: Path, *, frame: int | None, all_frames: bool = False) -> tuple[Any, dict[str, Any]]:
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
        indices = list(range(num_frames)) if all_frames else [check_index(path, frame, num_frames, "frame")]
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
