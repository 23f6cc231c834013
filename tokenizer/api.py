"""The public functions: create, tokenize and detokenize images.

Kept light on imports (no Lightning, no Hydra) so that ``from tokenizer import tokenize_image`` is fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tokenizer.config import create_config
from tokenizer.data.intensity import prepare
from tokenizer.data.io import LoadedImage, read_image
from tokenizer.errors import InputError
from tokenizer.model import ImageTokenizer

ImageLike = str | os.PathLike | np.ndarray | torch.Tensor | LoadedImage


def create_tokenizer(preset: str = "tiny", **overrides) -> ImageTokenizer:
    """A randomly initialised tokenizer from a named preset ("tiny", "small", "base", "large").

    Overrides are config fields, e.g. ``create_tokenizer("small", quantizer={"codebook_size": 4096})``.
    """
    return ImageTokenizer(create_config(preset, **overrides))


def _to_input(
    image: ImageLike,
    tokenizer: ImageTokenizer,
    modality: str | None,
    window: str | tuple[float, float] | None,
    slice_index: int | None,
) -> torch.Tensor:
    """One image of any accepted kind -> (C, S, S) float in [-1, 1] using the checkpoint's preprocessing."""
    cfg = tokenizer.config.preprocess
    if isinstance(image, str | os.PathLike):
        image = read_image(Path(image), slice_index=slice_index)
    elif _is_pil(image):
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_complex():
            raise InputError(f"image: expected a real-valued tensor, got {image.dtype}")
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.float()  # bfloat16 / float8: numpy has no such type
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        image = _check_array(image, slice_index)
    return prepare(image, cfg, modality=modality, window=window)


def _is_pil(obj) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _check_array(array: np.ndarray, slice_index: int | None) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] not in (1, 3):
        if slice_index is None:
            raise InputError(
                f"image: a 3D array of shape {array.shape} is a volume; pass slice_index= to choose a slice along the last axis"
            )
        if not 0 <= slice_index < array.shape[-1]:
            raise InputError(f"image: slice_index {slice_index} is out of range for {array.shape[-1]} slices")
        array = array[..., slice_index]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise InputError(f"image: expected (H, W), (H, W, 1|3) or (C, H, W), got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise InputError(f"image: expected a numeric array, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("image: array contains NaN or Inf values")
    return array


@torch.no_grad()
def tokenize_image(
    image: ImageLike | Sequence[ImageLike],
    tokenizer: ImageTokenizer,
    *,
    modality: str | None = None,
    window: str | tuple[float, float] | None = None,
    slice_index: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Image(s) -> codes.

    Args:
        image: a path (PNG/JPEG/TIFF/DICOM/NIfTI), PIL image, numpy array of raw intensities (H, W) or
            (H, W, 3), a tensor (C, H, W) of raw intensities, a list of those, or a batch tensor (B, C, H, W)
            already in [-1, 1] at the tokenizer's size.
        tokenizer: the :class:`ImageTokenizer`; its checkpoint fixes the preprocessing.
        modality: "ct", "mr", "xray", … — chooses the intensity rule when the file does not say.
        window: CT window name (e.g. "lung") or (low, high) in HU; default the checkpoint's evaluation window.
        slice_index: slice of a 3D volume (NIfTI or a 3D array); default the middle slice for files.
        batch_size: images per forward pass.

    Returns:
        LongTensor (K, h, w) for one image, (B, K, h, w) for a list or batch.
    """
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        batch, single = _check_batch(image, tokenizer), False
    else:
        single = not isinstance(image, list | tuple)
        items = [image] if single else list(image)
        if not items:
            raise InputError("image: empty list")
        batch = torch.stack([_to_input(i, tokenizer, modality, window, slice_index) for i in items])
    device = next(tokenizer.parameters()).device
    codes = torch.cat(
        [tokenizer.encode_to_codes(chunk.to(device)).cpu() for chunk in batch.split(batch_size)]
    )
    return codes[0] if single else codes


def _check_batch(batch: torch.Tensor, tokenizer: ImageTokenizer) -> torch.Tensor:
    cfg = tokenizer.config.preprocess
    expected = (cfg.channels, cfg.image_size, cfg.image_size)
    if tuple(batch.shape[1:]) != expected:
        raise InputError(
            f"image batch: expected (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(batch.shape)}"
        )
    if batch.is_complex():
        raise InputError(f"image batch: expected a real-valued tensor, got {batch.dtype}")
    batch = batch.float()
    if not torch.isfinite(batch).all():
        raise InputError("image batch: contains NaN or Inf values")
    if batch.numel() and batch.abs().max() > 1.0 + 1e-3:
        raise InputError(
            f"image batch: a (B, C, H, W) tensor is network input and must lie in [-1, 1], got "
            f"[{batch.min():.4g}, {batch.max():.4g}]; pass raw images as a list to preprocess them"
        )
    return batch


@torch.no_grad()
def detokenize(codes: torch.Tensor, tokenizer: ImageTokenizer) -> torch.Tensor:
    """Codes (K, h, w) or (B, K, h, w) -> images (B, C, H, W) in [-1, 1]."""
    codes = torch.as_tensor(codes)
    if codes.ndim == 3:
        codes = codes[None]
    q = tokenizer.config.quantizer
    expected = (q.num_codebooks, *tokenizer.grid)
    if codes.ndim != 4 or tuple(codes.shape[1:]) != expected:
        raise InputError(f"codes: expected (B, {', '.join(map(str, expected))}), got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point:
        raise InputError(f"codes: expected an integer tensor, got {codes.dtype}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= q.codebook_size):
        raise InputError(
            f"codes: ids must lie in [0, {q.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
        )
    device = next(tokenizer.parameters()).device
    return tokenizer.decode_codes(codes.long().to(device)).float().clamp(-1, 1)
