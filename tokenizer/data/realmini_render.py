"""Rendering one realmini source: 2D views -> intensity -> pyramid tiles (see :mod:`tokenizer.data.realmini`).

Intensity: :func:`tokenizer.data.intensity.to_unit` per 2D image (CT: the eval window for test
sources, ``train_ct_windows`` for train sources, one PNG per window; MR / X-ray / US scalar images:
percentiles; 8-bit photos: / 255). The PNGs are 8-bit and already intensity-mapped, so a
``ManifestDataset`` reading them applies only ``/ 255``.

Tiling: each 2D image is resized so its shorter side is ``size * 2**l`` for every level that does not
upsample past the native resolution (level 0 always exists), plus the native resolution when it is at
least 1.5x the last level; each level is cut into a centred grid of ``size``-square tiles. Tiles that
are near-constant or mostly background are dropped; ``max_per_source`` keeps evenly spaced ones.
Train sources are tiled with half-tile overlap above level 0 (more crops, never shared with test).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer.data.intensity import PreprocessConfig, to_unit
from tokenizer.data.io import LoadedImage, read_image, read_volume, volume_slice
from tokenizer.data.realmini import RealminiConfig, Source

_AXIS_NAMES = ("sagittal", "coronal", "axial")


@dataclass
class Tile:
    """One output image before it is written."""

    pixels: np.ndarray
    """float32 (size, size) or (size, size, 3) in [0, 1]."""
    fields: dict[str, Any]
    """Manifest fields beyond image / split (caption, modality, source_*, scale, tile, ...)."""


def _resize(unit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of (H, W[, 3]) values in [0, 1], clamped to [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(unit))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    y = y.clamp(0.0, 1.0)
    return (y[0] if unit.ndim == 2 else y.permute(1, 2, 0)).numpy()


def pyramid(
    unit: np.ndarray, size: int, native_ratio: float = 1.5, *, overlap: bool = False
) -> Iterator[tuple[float, int, int, tuple[int, int], np.ndarray]]:
    """Tiles of an image (H, W[, 3]) in [0, 1] (levels as in the module docstring): yields
    (scale, row, col, (rows, cols) of the level, tile (size, size[, 3])); ``scale`` is output pixels
    per input pixel. With ``overlap`` the levels above 0 use a stride of size / 2."""
    height, width = unit.shape[:2]
    short = min(height, width)
    sides = [size]
    while sides[-1] * 2 <= short:
        sides.append(sides[-1] * 2)
    if short >= native_ratio * sides[-1]:
        sides.append(short)
    for level, side in enumerate(sides):
        scale = side / short
        h, w = max(size, round(height * scale)), max(size, round(width * scale))
        image = unit if (h, w) == (height, width) else _resize(unit, h, w)
        stride = size // 2 if overlap and level > 0 else size
        rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
        top, left = (h - (rows - 1) * stride - size) // 2, (w - (cols - 1) * stride - size) // 2
        for r in range(rows):
            for c in range(cols):
                y, x = top + r * stride, left + c * stride
                yield scale, r, c, (rows, cols), image[y : y + size, x : x + size]


def informative(tile: np.ndarray, min_std: float, max_flat: float) -> bool:
    """False for near-constant tiles and tiles mostly at their darkest / brightest value."""
    gray = tile.mean(axis=-1) if tile.ndim == 3 else tile
    low, high = float(gray.min()), float(gray.max())
    flat = max(float((gray <= low + 0.02).mean()), float((gray >= high - 0.02).mean()))
    return float(gray.std()) >= min_std and flat <= max_flat


def _views(
    source: Source, cfg: RealminiConfig, pre: PreprocessConfig
) -> Iterator[tuple[LoadedImage, dict, str]]:
    """2D images of a source: (image, manifest fields, caption part)."""
    if source.kind == "image":
        yield source.probe, {}, ""
    elif source.kind == "frames":
        n = source.num_frames
        previous = None
        for k in np.unique(np.linspace(0, n - 1, min(n, cfg.max_frames)).round().astype(int)).tolist():
            loaded = source.probe if k == source.probe.meta.get("frame") else read_image(source.path, frame=k)
            if previous is None or not np.array_equal(previous, loaded.pixels):  # stored twice: keep once
                yield loaded, {"source_frame": k}, f"frame {k + 1} of {n}"
            previous = loaded.pixels
    else:
        volume, meta = read_volume(source.path)
        info = {"dtype": meta.get("dtype"), "is_hu": meta.get("is_hu")}
        for axis in range(3):
            shape = [volume.shape[i] for i in range(3) if i != axis]
            if min(shape) < cfg.smallest_side:
                continue
            keep = []
            for k in range(volume.shape[axis]):
                unit = to_unit(
                    volume_slice(volume, axis, k), source.modality, cfg=pre, stored_dtype=info["dtype"]
                )
                if informative(unit, cfg.min_std, cfg.max_flat):
                    keep.append(k)
            picks = np.linspace(0, len(keep) - 1, min(len(keep), cfg.max_slices_per_axis)).round().astype(int)
            for k in (keep[i] for i in np.unique(picks)):
                loaded = LoadedImage(volume_slice(volume, axis, k), source.modality, str(source.path), info)
                yield loaded, {"source_axis": axis, "source_slice": k}, f"{_AXIS_NAMES[axis]} slice"


def render_source(source: Source, split: str, cfg: RealminiConfig) -> list[Tile]:
    """The output images of one source for ``split``: CT in the eval window for test, else in each
    train window; train tiles overlap by half; at most ``max_per_source`` (test:
    ``max_per_test_source``) evenly spaced ones."""
    pre = cfg.preprocess()
    windows = [None]
    if source.modality == "ct":
        windows = [cfg.eval_ct_window] if split == "test" else list(cfg.train_ct_windows)
    tiles: list[Tile] = []
    for loaded, view, view_phrase in _views(source, cfg, pre):
        level_zero = cfg.size / min(loaded.pixels.shape[:2])
        for window in windows:
            meta = loaded.meta
            unit = to_unit(loaded.pixels, source.modality, window=window, cfg=pre,
                           is_hu=meta.get("is_hu"), stored_dtype=meta.get("dtype"))  # fmt: skip
            for scale, r, c, (rows, cols), tile in pyramid(
                unit, cfg.size, cfg.native_ratio, overlap=split != "test"
            ):
                if not informative(tile, cfg.min_std, cfg.max_flat):
                    continue
                if scale <= level_zero + 1e-9:
                    where = f"part {r * cols + c + 1} of {rows * cols}" if rows * cols > 1 else ""
                elif scale >= 0.999:
                    where = "detail at full resolution"
                else:
                    where = f"detail at 1:{round(1 / scale)} scale"
                window_phrase = f"{window.replace('_', ' ')} window" if window else ""
                caption = ", ".join(p for p in (source.caption, view_phrase, window_phrase, where) if p)
                fields = {"caption": caption, "modality": source.modality, **view}
                fields.update(scale=round(scale, 4), tile=[r, c], **({"ct_window": window} if window else {}))
                tiles.append(Tile(tile, fields))
    limit = cfg.max_per_test_source if split == "test" else cfg.max_per_source
    if len(tiles) > limit:
        tiles = [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, limit).round().astype(int))]
    return tiles
