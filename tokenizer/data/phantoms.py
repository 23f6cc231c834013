"""Procedural medical phantoms: a seeded benchmark with exact ground truth (generation and dataset).

Five modality looks (``MODALITIES``): an axial chest "ct" slice, a brain "mr" slice (T1 or T2 look), a
chest "xray", an RGB retinal "fundus" photograph and an RGB H&E "histology" field. Each image carries
0-3 findings drawn on homogeneous tissue, one per region at most, with a fixed attribute vocabulary:

- region (``REGIONS``): the image quadrant as displayed, left/right from the viewer's side;
- size (``SIZES``): "small" = radius 7/128 of the side, "large" = radius 14/128 (2x), each +-4%;
- intensity (``INTENSITIES``): "bright" / "dark" against the tissue around the finding (luminance
  contrast about 0.2 to 0.5 in [0, 1] units, either sign);
- count: the number of findings (0-3).

Images are smooth (anatomy, low-frequency texture) plus Gaussian noise of std ``DEFAULT_NOISE`` = 0.01, so
noise alone caps a reconstruction at 40 dB PSNR. This module draws them (``make_phantom``) and serves them
as a dataset (``PhantomDataset``). The vocabulary and the ``Finding`` / ``Phantom`` records live in
:mod:`tokenizer.data.phantom_vocab`; captions, ``parse_caption`` and closed VQA in
:mod:`tokenizer.data.phantom_text`; ``read_phantom``, the analytic reader that recovers modality and
findings from pixels (tokenizer reconstructions, generated images), in :mod:`tokenizer.data.phantom_reader`.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from tokenizer.data.phantom_text import caption_for, phantom_questions
from tokenizer.data.phantom_vocab import (
    MAX_FINDINGS,
    MODALITIES,
    Finding,
    Phantom,
    modality_name,
    random_findings,
    zone_center,
)
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_NOISE = 0.01
"""Std of the additive Gaussian noise in [0, 1] units (kept <= 0.015 so a tokenizer can reach 28 dB)."""

PHANTOM_QA_STREAM = 0x0A
"""Seed stream of a phantom's QA pairs: ``default_rng([dataset seed, index, PHANTOM_QA_STREAM])``."""
_RADIUS = {"small": 7 / 64, "large": 14 / 64}  # normalised units: the image spans [-1, 1]
_JITTER = 1.5 / 64  # finding centre jitter, +-1.5 px at 128

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
"""Luminance weights (ITU-R BT.601) that turn an RGB phantom into grayscale."""


# ----------------------------------------------------------------------------- drawing primitives


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x (1, S) and y (S, 1), broadcast together to (S, S)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[None, :], c[:, None]


def _edge(signed_dist, size: int, width_px: float = 1.5) -> np.ndarray:
    """Soft inside-mask from a signed distance in normalised units (> 0 inside), ramp ~width_px."""
    return np.clip(0.5 + signed_dist * (size / (2.0 * width_px)), 0.0, 1.0)


def _ell_dist(size, cx, cy, ax, ay, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (1 on the boundary) of an ellipse rotated by ``angle``."""
    x, y = _grid(size)
    if angle == 0.0:
        return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s
    return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _ell(size, cx, cy, ax, ay, angle: float = 0.0, width_px: float = 1.5) -> np.ndarray:
    """Soft mask (S, S) of a filled ellipse."""
    return _edge((1.0 - _ell_dist(size, cx, cy, ax, ay, angle)) * min(ax, ay), size, width_px)


def _blend(img: np.ndarray, mask: np.ndarray, value) -> None:
    """In place: ``img = img * (1 - mask) + value * mask`` for (S, S) or (S, S, 3) images."""
    if img.ndim == 3:
        img += mask[..., None] * (np.asarray(value, np.float32) - img)
    else:
        img += mask * (value - img)


@functools.lru_cache(maxsize=32)
def _interp(size: int, cells: int) -> np.ndarray:
    """(S, cells) Gaussian interpolation rows of unit norm, so ``W G W^T`` has unit variance."""
    x = _grid(size)[0][0]
    c = np.linspace(-1.2, 1.2, cells, dtype=np.float32)
    w = np.exp(-0.5 * ((x[:, None] - c[None, :]) / (c[1] - c[0])) ** 2)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean unit-variance random field (S, S) with about ``cells`` blobs per side."""
    w = _interp(size, cells)
    return w @ rng.standard_normal((cells, cells), dtype=np.float32) @ w.T


def _u(rng: np.random.Generator, half: float) -> float:
    return float(rng.uniform(-half, half))


# ----------------------------------------------------------------------------- anatomy per modality
# Each renderer returns the finding-free image and the finding colours {"bright": v, "dark": v}
# (a grey level or an RGB triple) chosen against the tissue under that modality's finding zones.


def _render_ct(rng: np.random.Generator, size: int):
    """Axial chest CT, lung-window-like look: air, fat, muscle, lungs, heart, aorta, ribs, spine."""
    x, y = _grid(size)
    img = np.zeros((size, size), np.float32)
    _blend(img, _edge(0.012 - np.abs(y - 0.92 - 0.06 * x * x), size), 0.3)  # scanner table
    sx, sy = 1 + _u(rng, 0.03), 1 + _u(rng, 0.03)
    _blend(img, _ell(size, 0, 0.03, 0.96 * sx, 0.81 * sy), 0.40 + _u(rng, 0.03))  # subcutaneous fat
    _blend(img, _ell(size, 0, 0.04, 0.89 * sx, 0.74 * sy), 0.56 + _u(rng, 0.03))  # chest wall muscle
    theta = np.arctan2((y - 0.04) / 0.74, x / 0.89)
    ring = _ell(size, 0, 0.04, 0.87 * sx, 0.72 * sy) - _ell(size, 0, 0.04, 0.81 * sx, 0.66 * sy)
    _blend(
        img, np.clip(ring, 0, 1) * np.clip((np.cos(13 * theta + _u(rng, 3)) - 0.45) * 4, 0, 1), 0.86
    )  # ribs
    tissue = 0.22 + _u(rng, 0.02)
    lungs = np.maximum(
        _ell(size, -0.46, 0.0, 0.36, 0.7, _u(rng, 0.06)), _ell(size, 0.46, 0.0, 0.36, 0.7, _u(rng, 0.06))
    )
    _blend(img, lungs, tissue)
    sigma = 1.6 * size / 128  # vessel markings: smoothed white noise, rescaled to unit std
    marks = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma) * (
        2 * np.pi**0.5 * sigma
    )
    img += lungs * (0.05 * np.clip(marks - 1.3, 0, None) + 0.015 * _lowfreq(rng, size, 8))
    _blend(img, _ell(size, 0.05 + _u(rng, 0.03), 0.16, 0.2, 0.23, 0.3), 0.63)  # heart
    _blend(img, _ell(size, -0.03, -0.14, 0.075, 0.075), 0.68)  # ascending aorta
    _blend(img, _ell(size, 0.1, 0.4, 0.065, 0.065), 0.68)  # descending aorta
    _blend(img, _ell(size, 0, -0.7 * sy, 0.07, 0.035), 0.88)  # sternum
    _blend(img, _ell(size, 0, 0.53, 0.12, 0.11), 0.95)  # vertebral cortex
    _blend(img, _ell(size, 0, 0.53, 0.09, 0.08), 0.76 + _u(rng, 0.03))  # cancellous bone
    _blend(img, _ell(size, 0, 0.77, 0.12, 0.035), 0.9)  # laminae
    _blend(img, _ell(size, 0, 0.68, 0.045, 0.04), 0.5)  # spinal canal
    img += 0.012 * _lowfreq(rng, size, 6) * (img > 0.05)
    return img, {"bright": tissue + 0.4 + _u(rng, 0.03), "dark": tissue - 0.2}


def _render_mr(rng: np.random.Generator, size: int):
    """Axial brain MR, T1 or T2 look: scalp, skull, CSF, folded cortex, white matter, ventricles."""
    x, y = _grid(size)
    t2 = rng.random() < 0.5
    csf, gm, wm, fat = (0.9, 0.55, 0.38, 0.6) if t2 else (0.1, 0.45, 0.66, 0.86)
    s = 1 + _u(rng, 0.03)
    img = np.zeros((size, size), np.float32)
    _blend(img, _ell(size, 0, 0, 0.86 * s, 0.96 * s, 0, 2), fat)  # scalp
    _blend(img, _ell(size, 0, 0, 0.815 * s, 0.915 * s, 0, 2), 0.12)  # skull
    _blend(img, _ell(size, 0, 0, 0.775 * s, 0.875 * s, 0, 2), (csf + gm) / 2)  # CSF over the convexity
    theta = np.arctan2(y, x)
    d = _ell_dist(size, 0, 0, 0.755 * s, 0.86 * s) * (1 + 0.012 * np.sin(23 * theta + _u(rng, 3)))
    cortex = _edge((1 - d) * 0.7, size)
    _blend(img, cortex, gm)
    folds = 20 * theta + 2.0 * np.sin(3 * theta + _u(rng, 3)) + 1.2 * np.sin(7 * theta + _u(rng, 3))
    sulci = np.clip((np.cos(folds) - 0.88) * 8, 0, 1) * _edge(d - 0.87, size, 1.5)
    _blend(img, cortex * sulci, csf)
    wiggle = 1 + 0.03 * np.cos(folds + np.pi) + 0.02 * np.sin(9 * theta + _u(rng, 3))
    d = _ell_dist(size, 0, 0, 0.695 * s, 0.8 * s) * wiggle
    white = _edge((1 - d) * 0.65, size, 1.5)
    _blend(img, white, wm)
    img += white * (0.015 * _lowfreq(rng, size, 10))
    fissure = _edge(0.012 - np.abs(x - _u(rng, 0.02)), size) * (np.abs(y) > 0.5) * cortex
    _blend(img, fissure, csf)
    _blend(img, _ell(size, 0, -0.22, 0.09, 0.03), (gm + wm) / 2)  # corpus callosum genu
    for side in (-1, 1):
        _blend(img, _ell(size, side * 0.17, 0.05, 0.05, 0.11, side * 0.25), (gm + wm) / 2)  # deep grey nuclei
        _blend(img, _ell(size, side * 0.075, -0.06, 0.045, 0.22, side * 0.2), csf)  # lateral ventricle
    img = ndimage.gaussian_filter(img, 0.7 * size / 128)  # partial-volume softness of thin rims and sulci
    return img, {"bright": wm + 0.32 + _u(rng, 0.02), "dark": wm - 0.27 + _u(rng, 0.02)}


def _render_xray(rng: np.random.Generator, size: int):
    """PA chest radiograph: torso, lungs with rib shadows, mediastinum, heart, domes, clavicles."""
    x, y = _grid(size)
    ax = np.abs(x)
    img = np.full((size, size), 0.05, np.float32)
    torso = (ax / 0.97) ** 4 + (np.abs(y - 0.25) / 1.25) ** 4
    _blend(img, _edge((1 - torso) * 0.25, size, 2), 0.55 + _u(rng, 0.03))
    tissue = 0.25 + _u(rng, 0.02)
    dome = 0.56 + _u(rng, 0.04) + 0.5 * (ax - 0.45) ** 2
    lungs = np.maximum(
        _ell(size, -0.45, -0.05, 0.35, 0.75, 0.05, 2), _ell(size, 0.45, -0.05, 0.34, 0.75, -0.05, 2)
    )
    lungs = lungs * _edge(dome - y, size, 2)
    _blend(img, lungs, tissue)
    phase = (y + 0.35 * ax - 0.45 * ax * ax + _u(rng, 0.1)) / 0.21
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.1) * 1.5, 0, 1)
    img += lungs * (0.07 * ribs + 0.02 * _lowfreq(rng, size, 12))
    spine = _edge(0.11 - ax, size, 2.5) * _edge(y + 0.85, size, 2)
    _blend(img, spine, 0.72)
    _blend(img, _ell(size, 0.07 + _u(rng, 0.03), 0.34, 0.22, 0.18, -0.25, 2), 0.68)  # heart
    _blend(img, _edge(y - dome, size, 2.5) * _edge(1 - torso, size), 0.7)  # below the domes
    _blend(img, _ell(size, 0.42, 0.74, 0.08, 0.05, 0, 2), 0.4)  # gastric air bubble
    clavicles = _edge(0.035 - np.abs(y + 0.66 + 0.12 * (ax - 0.1)), size, 1.5) * _edge(0.68 - ax, size, 2)
    img += 0.14 * clavicles * _edge(ax - 0.06, size)
    img += 0.01 * _lowfreq(rng, size, 5)
    img = ndimage.gaussian_filter(img, 0.8 * size / 128)  # projection radiographs are soft
    return img, {"bright": tissue + 0.36 + _u(rng, 0.03), "dark": tissue - 0.2}


# Vessels as curves y = disc_y + sign * (rise * (1 - exp(-t / bend)) + slope * t) over the horizontal
# distance t from the disc (towards the macula when temporal): (temporal, sign, rise, bend, slope,
# half-width, length). The two big temporal arcades arch above and below the macula.
_FUNDUS_VESSELS = (
    (True, 1, 0.36, 0.1, 0.12, 0.024, 1.5),
    (True, -1, 0.36, 0.1, 0.12, 0.024, 1.5),
    (True, 1, 0.12, 0.08, 0.32, 0.014, 1.0),
    (True, -1, 0.12, 0.08, 0.32, 0.014, 1.0),
    (True, 1, 0.05, 0.3, 0.0, 0.009, 0.35),
    (False, 1, 0.3, 0.12, 0.25, 0.018, 0.45),
    (False, -1, 0.3, 0.12, 0.25, 0.018, 0.45),
)


def _render_fundus(rng: np.random.Generator, size: int):
    """Retinal photograph: orange fundus, vignetting, optic disc with cup, macula, vessel arcades."""
    x, y = _grid(size)
    side = 1.0 if rng.random() < 0.5 else -1.0  # which side the optic disc is on (eye laterality)
    r2 = x * x + y * y
    base = np.array([0.8, 0.37, 0.15]) * (1 + np.array([_u(rng, 0.04), _u(rng, 0.05), _u(rng, 0.08)]))
    shade = (1 - 0.3 * r2) * (1 + 0.03 * _lowfreq(rng, size, 7)) * (1 - 0.3 * np.exp(-r2 / 0.03))
    img = shade[..., None] * base.astype(np.float32)
    disc_x, disc_y = side * 0.6, _u(rng, 0.04)
    towards_macula = -side * (x - disc_x)  # (1, S) horizontal distance from the disc towards the macula
    vessels = np.zeros((size, size), np.float32)
    for temporal, sign, rise, bend, slope, width, length in _FUNDUS_VESSELS:
        t = np.maximum(towards_macula if temporal else -towards_macula, 0)
        rise, slope = rise * (1 + _u(rng, 0.15)), slope * (1 + _u(rng, 0.3))
        decay = np.exp(-t / bend)
        curve = disc_y + sign * (rise * (1 - decay) + slope * t)
        grad = rise / bend * decay + slope
        dist = np.abs(y - curve) / np.sqrt(1 + grad * grad)  # distance normal to the curve
        vessels = np.maximum(
            vessels, _edge(width * (1.1 - 0.6 * t / length) - dist, size) * ((t > 0) & (t < length))
        )
    img *= 1 - vessels[..., None] * np.array([0.35, 0.6, 0.5], np.float32)
    _blend(img, _ell(size, disc_x, disc_y, 0.12, 0.13, 0, 1.5), (0.97, 0.78, 0.5))
    _blend(img, _ell(size, disc_x - side * 0.02, disc_y, 0.05, 0.06, 0, 1.5), (1.0, 0.93, 0.78))  # cup
    _blend(img, 1 - _edge(0.94 - np.sqrt(r2), size, 1.5), (0.0, 0.0, 0.0))  # field of view
    return img, {"bright": (0.98, 0.87, 0.42), "dark": (0.38, 0.06, 0.04)}


def _render_histology(rng: np.random.Generator, size: int):
    """H&E field: pink fibrous stroma, clear spaces, purple nuclei scattered on a rotated jittered lattice."""
    x, y = _grid(size)
    angle = _u(rng, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    fibres = np.sin(2 * np.pi * 4 * (x * c + y * s) + 3 * _lowfreq(rng, size, 5))
    stroma = np.array([0.92, 0.6, 0.78]) + np.array([_u(rng, 0.03), _u(rng, 0.05), _u(rng, 0.04)])
    img = (1 + 0.035 * fibres + 0.03 * _lowfreq(rng, size, 8))[..., None] * stroma.astype(np.float32)
    spots = ((0.0, 0.0), (0.0, -0.9), (0.0, 0.9), (-0.9, 0.0), (0.9, 0.0))  # clear spaces, off the zones
    clear = np.zeros((size, size), np.float32)
    for i in rng.choice(len(spots), size=2, replace=False):
        sx, sy = spots[i]
        blob = _ell(size, sx, sy, 0.12 + _u(rng, 0.04), 0.16 + _u(rng, 0.04), _u(rng, 1.5), 1.5)
        _blend(img, blob, (0.96, 0.93, 0.96))
        clear = np.maximum(clear, blob)
    cell = 0.15
    u, v = x * c + y * s + 1.5, y * c - x * s + 1.5  # lattice coordinates, rotated with the fibres
    n = int(np.ceil(3 / cell)) + 1
    cell_index = ((v / cell).astype(np.intp) * n + (u / cell).astype(np.intp)).ravel()
    tilt = rng.uniform(0, np.pi, (n, n))
    density = 0.45 + 0.3 * np.clip(_lowfreq(rng, n, 4), -1, 1)
    per_cell = np.stack(  # one row per lattice cell, gathered once for every pixel
        [
            (np.arange(n)[None, :] + rng.uniform(0.38, 0.62, (n, n))) * cell,  # nucleus centre u
            (np.arange(n)[:, None] + rng.uniform(0.38, 0.62, (n, n))) * cell,  # nucleus centre v
            np.cos(tilt),
            np.sin(tilt),
            1 / rng.uniform(0.034, 0.046, (n, n)),  # inverse semi-axes
            1 / rng.uniform(0.027, 0.035, (n, n)),
            (rng.random((n, n)) < density) * rng.uniform(0.85, 1.1, (n, n)),  # presence x stain
        ],
        axis=-1,
    ).astype(np.float32)
    cu, cv, tc, ts, inv_a, inv_b, stain = per_cell.reshape(n * n, -1)[cell_index].T.reshape(-1, size, size)
    du, dv = u - cu, v - cv
    d = np.sqrt(((du * tc + dv * ts) * inv_a) ** 2 + ((dv * tc - du * ts) * inv_b) ** 2)
    nuclei = _edge((1 - d) * 0.028, size, 1.8) * (stain > 0) * (1 - clear)
    _blend(img, nuclei, 0)
    img += (nuclei * stain)[..., None] * np.array([0.42, 0.26, 0.58], np.float32)
    return img, {"bright": (0.97, 0.94, 0.97), "dark": (0.36, 0.2, 0.52)}


_RENDERERS = {
    "ct": _render_ct,
    "mr": _render_mr,
    "xray": _render_xray,
    "fundus": _render_fundus,
    "histology": _render_histology,
}


def _draw_finding(img: np.ndarray, finding: Finding, modality: str, color, rng, size: int) -> None:
    """Overwrite a soft, slightly irregular disc at the finding's zone (in place, cropped for speed)."""
    cx, cy = zone_center(modality, finding.region)
    cx, cy = cx + _u(rng, _JITTER), cy + _u(rng, _JITTER)
    radius = _RADIUS[finding.size] * (1 + _u(rng, 0.04))
    half = radius * 1.1 + 8.0 / size
    j0, j1 = (max(0, int((c + 1) / 2 * size)) for c in (cx - half, cx + half))
    i0, i1 = (max(0, int((c + 1) / 2 * size)) for c in (cy - half, cy + half))
    x, y = _grid(size)
    dx, dy = x[:, j0 : j1 + 1] - cx, y[i0 : i1 + 1] - cy
    dist, theta = np.sqrt(dx * dx + dy * dy), np.arctan2(dy, dx)
    outline = radius * (1 + 0.03 * np.sin(3 * theta + _u(rng, 3)) + 0.02 * np.sin(5 * theta + _u(rng, 3)))
    mask = _edge(outline - dist, size)
    crop = img[i0 : i1 + 1, j0 : j1 + 1]
    _blend(crop, mask, color)
    shading = 1 + 0.04 * np.clip(1 - (dist / radius) ** 2, 0, 1) * mask  # a rounded, not flat, look
    crop *= shading[..., None] if crop.ndim == 3 else shading


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generator per aspect (modality, findings, anatomy, noise, caption) of one seed."""
    return np.random.default_rng([stream, seed])


def make_phantom(
    seed: int,
    *,
    size: int = 128,
    modality: str | None = None,
    num_findings: int | None = None,
    noise: float | None = None,
) -> Phantom:
    """Generate one phantom, deterministic in (seed, size, modality, num_findings, noise).

    Args:
        seed: non-negative integer; draws the modality (when None), the findings, the anatomy and the caption.
        size: side of the square image in pixels (>= 16); anatomy is defined in normalised units.
        modality: one of ``MODALITIES``; None draws it uniformly from the seed. Passing the drawn value
            gives the same image as None.
        num_findings: 0-3; None draws it uniformly from the seed.
        noise: std of the additive Gaussian noise in [0, 1] units; None means ``DEFAULT_NOISE``.

    Returns:
        A :class:`Phantom` with a float32 (size, size) or (size, size, 3) image in [0, 1].
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"make_phantom: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise InputError(f"make_phantom: size must be an integer >= 16, got {size!r}")
    if modality is not None:
        modality = modality_name(modality, "make_phantom")
    if num_findings is not None and num_findings not in range(MAX_FINDINGS + 1):
        raise InputError(f"make_phantom: num_findings must be in 0..{MAX_FINDINGS}, got {num_findings!r}")
    noise = DEFAULT_NOISE if noise is None else float(noise)
    if not 0.0 <= noise <= 0.5:
        raise InputError(f"make_phantom: noise std must be in [0, 0.5], got {noise}")
    seed, size = int(seed), int(size)
    drawn = MODALITIES[int(_rng(seed, 0).integers(len(MODALITIES)))]
    modality = modality or drawn
    frng = _rng(seed, 1)
    count = int(frng.integers(MAX_FINDINGS + 1))  # always drawn, so num_findings=drawn changes nothing
    count = count if num_findings is None else int(num_findings)
    findings = random_findings(frng, count)
    arng = _rng(seed, 2)
    image, colors = _RENDERERS[modality](arng, size)
    for finding in findings:
        _draw_finding(image, finding, modality, colors[finding.intensity], arng, size)
    if noise > 0:
        image += _rng(seed, 3).standard_normal(image.shape, dtype=np.float32) * noise
    np.clip(image, 0.0, 1.0, out=image)
    caption = caption_for(modality, findings, _rng(seed, 4))
    return Phantom(
        image=image.astype(np.float32, copy=False),
        modality=modality,
        findings=findings,
        caption=caption,
        seed=seed,
    )


# ----------------------------------------------------------------------------- dataset


def dataset_seed(seed: int, index: int) -> int:
    """Phantom seed of image ``index`` of the dataset with ``seed``; injective, so datasets never overlap."""
    return int(seed) * 2**32 + int(index)


class PhantomDataset(Dataset):
    """A fixed, seeded set of phantoms as tokenizer inputs.

    Item ``i``: ``{"image": FloatTensor (C, size, size) in [-1, 1], "caption": str, "modality": str,
    "index": i, "source": "phantom:{seed}:{i}"}``. Grayscale is repeated to C channels; colour
    modalities become luminance when C = 1.
    """

    def __init__(
        self, num_images: int, *, seed: int = 0, size: int = 128, channels: int = 3, modalities=None
    ) -> None:
        if num_images < 0 or not 0 <= seed < 2**31:
            raise InputError(
                f"PhantomDataset: need num_images >= 0 and 0 <= seed < 2**31, got {num_images}, {seed}"
            )
        if size < 16:
            raise InputError(f"PhantomDataset: size must be >= 16, got {size}")
        if channels not in (1, 3):
            raise InputError(f"PhantomDataset: channels must be 1 or 3, got {channels}")
        if modalities is not None:
            modalities = tuple(modality_name(m, "PhantomDataset.modalities") for m in modalities)
            if not modalities:
                raise InputError(f"PhantomDataset: modalities is empty; expected a subset of {MODALITIES}")
        self.num_images, self.seed, self.size, self.channels = int(num_images), int(seed), int(size), channels
        self.modalities = modalities
        self._last: tuple[int, Phantom] | None = None  # callers wanting item and phantom generate it once

    def __len__(self) -> int:
        return self.num_images

    def phantom(self, index: int) -> Phantom:
        """The :class:`Phantom` behind item ``index``.

        The last one is kept, so ``dataset[i]`` and ``dataset.phantom(i)`` in a row generate it once; its
        image is read-only because the next caller shares it.
        """
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"PhantomDataset index {index} out of range for {self.num_images} images")
        index %= self.num_images
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        seed = dataset_seed(self.seed, index)
        modality = None
        if self.modalities is not None:
            modality = self.modalities[int(_rng(seed, 5).integers(len(self.modalities)))]
        phantom = make_phantom(seed, size=self.size, modality=modality)
        phantom.image.setflags(write=False)
        self._last = (index, phantom)
        return phantom

    def questions(self, index: int) -> list[tuple[str, str]]:
        """Closed QA pairs of item ``index`` (:func:`phantom_questions`, drawn from the item's own QA stream:
        the same pairs wherever the item is encoded, written or evaluated)."""
        rng = np.random.default_rng([self.seed, index % self.num_images, PHANTOM_QA_STREAM])
        return phantom_questions(self.phantom(index), rng)

    def __getitem__(self, index: int) -> dict:
        p = self.phantom(index)
        index %= self.num_images
        if p.image.ndim == 3:  # numpy, not torch: tiny torch ops cost more in thread start-up than work
            chw = (p.image @ LUMA)[None] if self.channels == 1 else p.image.transpose(2, 0, 1)
        else:
            chw = np.broadcast_to(p.image, (self.channels, *p.image.shape))
        image = torch.from_numpy(np.ascontiguousarray(chw * 2 - 1, dtype=np.float32))
        return {
            "image": image,
            "caption": p.caption,
            "modality": p.modality,
            "index": index,
            "source": f"phantom:{self.seed}:{index}",
        }
