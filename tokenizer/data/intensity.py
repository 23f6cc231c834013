"""Intensity handling: raw scanner values -> [-1, 1] network input.

Rules (which applies to which input) are in :func:`to_unit`; channels and size in :func:`prepare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer.data.io import LoadedImage, canonical_modality, from_pil
from tokenizer.errors import InputError

# CT windows in Hounsfield units, (low, high); MedITok presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "full": (-1000.0, 2000.0),
    "common": (-1000.0, 1000.0),
    "soft_tissue": (-150.0, 250.0),
    "lung": (-1400.0, 200.0),
    "bone": (-500.0, 1300.0),
}


@dataclass
class PreprocessConfig:
    """How an image becomes a network input; stored inside every tokenizer checkpoint."""

    image_size: int = 256
    """Side of the square network input in pixels."""
    channels: int = 3
    """Channels of the network input; grayscale is repeated to fill them."""
    eval_ct_window: str = "common"
    """CT window used at inference and evaluation (a key of ``CT_WINDOWS``)."""
    train_ct_windows: list[str] = field(default_factory=lambda: list(CT_WINDOWS))
    """CT windows drawn at random during training."""
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    """Percentiles mapped to [-1, 1] for MR and other non-CT scalar images."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in [self.eval_ct_window, *self.train_ct_windows]:
            if name not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {name!r}; expected one of {sorted(CT_WINDOWS)}")
        low, high = self.mr_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}")


# ----------------------------------------------------------------------------------------------
# Raw intensities -> [0, 1] -> network input.

_PHOTO_LIKE = ("photo", "fundus", "histology")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights Pillow's convert("L") uses


def resolve_window(
    window: str | Sequence[float] | None, cfg: PreprocessConfig, rng: np.random.Generator | None = None
) -> tuple[float, float]:
    """CT window (low, high) in HU: a name from ``CT_WINDOWS``, a (low, high) pair, or None for
    a random ``cfg.train_ct_windows`` entry when ``rng`` is given, else ``cfg.eval_ct_window``."""
    if window is None:
        names = cfg.train_ct_windows if rng is not None else [cfg.eval_ct_window]
        window = names[int(rng.integers(len(names)))] if rng is not None else names[0]
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise InputError(f"window: unknown CT window {window!r}; expected one of {sorted(CT_WINDOWS)}")
        return CT_WINDOWS[window]
    values = tuple(float(v) for v in window)
    if len(values) != 2 or not values[0] < values[1]:
        raise InputError(f"window: expected a name or (low, high) with low < high, got {window!r}")
    return values[0], values[1]


def _percentile_scale(x: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    low, high = (float(v) for v in np.percentile(x, percentiles))
    if high <= low:  # percentiles collapse (mostly-constant image): fall back to the full range
        low, high = float(x.min()), float(x.max())
    if high <= low:
        return np.zeros_like(x, dtype=np.float32)
    if not np.isfinite(np.float32(high - low)):  # a range wider than float32 holds would give inf / inf = NaN
        x = x.astype(np.float64)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_unit(
    pixels: np.ndarray,
    modality: str | None,
    *,
    window: str | Sequence[float] | None = None,
    cfg: PreprocessConfig,
    rng: np.random.Generator | None = None,
    is_hu: bool | None = None,
    stored_dtype: np.dtype | str | None = None,
) -> np.ndarray:
    """Map raw intensities to [0, 1]; the first rule that matches applies.

    1. ``modality == "ct"``, scalar, values in HU (``is_hu`` True, or None and not 8-bit):
       clip to the CT window (see :func:`resolve_window`): a random training window when ``rng``
       is given and ``window`` is None, else ``cfg.eval_ct_window``.
    2. 8-bit data (``stored_dtype`` uint8 / bool, e.g. PNG / JPEG exports of any modality): / 255.
    3. photo / fundus / histology stored as unsigned integers (16-bit TIFF): / dtype max.
    4. Everything else (MR, US, X-ray, CT not in HU, "other", unknown modality, floats): map the
       ``cfg.mr_percentiles`` percentiles to 0 and 1 and clip; colour uses one range for all
       channels. If the percentiles coincide the min / max are used.

    Constant images give zeros under rule 4 (never NaN); rules 1-3 keep their fixed mapping.

    Args:
        pixels: (H, W) or (H, W, C) raw values, any real dtype.
        modality: canonical modality or None.
        stored_dtype: dtype the values had in the file (``LoadedImage.meta["dtype"]``) when
            ``pixels`` were converted to float; defaults to ``pixels.dtype``.

    Returns:
        float32 array of the same shape in [0, 1].
    """
    x = np.asarray(pixels)
    if x.dtype.kind not in "buif":
        raise InputError(f"pixels: expected real numbers, got dtype {x.dtype}")
    dtype = np.dtype(stored_dtype) if stored_dtype is not None else x.dtype
    x = x.astype(np.float32, copy=False)
    if x.size == 0 or not np.isfinite(x).all():
        raise InputError(f"pixels: expected a non-empty array of finite values, got shape {x.shape}")
    eight_bit = dtype.kind == "b" or (dtype.kind == "u" and dtype.itemsize == 1)
    if modality == "ct" and x.ndim == 2 and (is_hu if is_hu is not None else not eight_bit):
        low, high = resolve_window(window, cfg, rng)
        return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if eight_bit:
        return np.clip(x / 255.0, 0.0, 1.0).astype(np.float32)
    if modality in _PHOTO_LIKE and dtype.kind == "u":
        return np.clip(x / float(np.iinfo(dtype).max), 0.0, 1.0).astype(np.float32)
    return _percentile_scale(x, cfg.mr_percentiles)


def _as_loaded(image: Any) -> LoadedImage:
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, Image.Image):
        return from_pil(image)
    if isinstance(image, np.ndarray):
        return LoadedImage(image, None, "<array>", {})
    raise InputError(f"image: expected a LoadedImage, PIL image or numpy array, got {type(image).__name__}")


def _layout(pixels: np.ndarray, source: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W) or (H, W, 3)."""
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 1:
        raise InputError(
            f"{source}: image of shape {pixels.shape}; expected (H, W) or (H, W, 1|3|4) channels-last"
        )
    return pixels


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop (C, H, W) to its shorter side, then antialiased bicubic resize to (C, size, size).

    Equivalent to "resize the shorter side to ``size``, then centre-crop", without resizing pixels
    the crop throws away. Values are clamped to the input range (bicubic overshoots).
    """
    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[:, top : top + side, left : left + side]
    if side == size:
        return image
    low, high = image.min(), image.max()
    resized = F.interpolate(
        image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].clamp(low, high)


def prepare(
    pixels_or_loaded: LoadedImage | np.ndarray | Image.Image,
    cfg: PreprocessConfig,
    *,
    modality: str | None = None,
    window: str | Sequence[float] | None = None,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Turn one image into network input.

    Steps: intensities -> [0, 1] with :func:`to_unit` (a LoadedImage supplies its modality, HU flag
    and stored dtype; ``modality`` overrides the file's); channels: grayscale is repeated to
    ``cfg.channels``, RGB becomes luminance when ``cfg.channels == 1`` and stays RGB when it is 3;
    size: :func:`resize_square` to ``cfg.image_size``; finally [0, 1] -> [-1, 1].

    Args:
        pixels_or_loaded: LoadedImage, PIL image, or numpy array (H, W) / (H, W, 1|3|4) of raw values.
        cfg: preprocessing settings (size, channels, windows, percentiles).
        modality: canonical name or alias; None keeps the file's (arrays: unknown).
        window: CT window name or (low, high); None: see :func:`resolve_window`.
        rng: makes a random training CT window possible; None gives deterministic output.

    Returns:
        float32 tensor (cfg.channels, cfg.image_size, cfg.image_size) in [-1, 1].
    """
    loaded = _as_loaded(pixels_or_loaded)
    name = canonical_modality(modality, where=f"{loaded.source}: modality") if modality else loaded.modality
    pixels = _layout(np.asarray(loaded.pixels), loaded.source)
    try:
        unit = to_unit(
            pixels,
            name,
            window=window,
            cfg=cfg,
            rng=rng,
            is_hu=loaded.meta.get("is_hu"),
            stored_dtype=loaded.meta.get("dtype"),
        )
    except InputError as err:
        raise InputError(f"{loaded.source}: {err}") from err
    image = torch.from_numpy(np.ascontiguousarray(unit))
    image = image.permute(2, 0, 1) if image.ndim == 3 else image[None]  # (C, H, W)
    if cfg.channels == 1 and image.shape[0] == 3:
        image = torch.einsum("chw,c->hw", image, torch.tensor(_LUMA))[None]
    image = resize_square(image, cfg.image_size)
    if image.shape[0] != cfg.channels:
        image = image.expand(cfg.channels, -1, -1)
    return (image * 2.0 - 1.0).contiguous().float()
