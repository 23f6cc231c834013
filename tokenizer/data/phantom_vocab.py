"""The phantom benchmark's shared vocabulary: modalities, finding attributes, ground-truth records, zones.

Every finding takes one value per attribute: region (``REGIONS``, the image quadrant as displayed, left/right
from the viewer's side), size (``SIZES``) and intensity (``INTENSITIES``). ``Finding`` and ``Phantom`` are the
ground-truth records; ``zone_center`` gives the nominal centre of each region's finding per modality. Used by
generation (:mod:`tokenizer.data.phantoms`), captions and closed VQA (:mod:`tokenizer.data.phantom_text`) and
the analytic reader (:mod:`tokenizer.data.phantom_reader`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenizer.errors import InputError

MODALITIES = ("ct", "mr", "xray", "fundus", "histology")
COLOR_MODALITIES = ("fundus", "histology")
REGIONS = ("left upper", "right upper", "left lower", "right lower")
SIZES = ("small", "large")
INTENSITIES = ("bright", "dark")
MAX_FINDINGS = 3
"""A phantom has 0..MAX_FINDINGS findings, each in its own region."""

_ZONES = {  # modality -> (|x| of the zone centres, y of upper zones, y of lower zones), normalised
    "ct": (0.46, -0.30, 0.24),
    "mr": (0.32, -0.35, 0.35),
    "xray": (0.45, -0.30, 0.20),
    "fundus": (0.40, -0.40, 0.40),
    "histology": (0.45, -0.45, 0.45),
}


@dataclass(frozen=True)
class Finding:
    """One finding; every field takes a value of the fixed vocabulary."""

    region: str
    """One of ``REGIONS``."""
    size: str
    """One of ``SIZES``."""
    intensity: str
    """One of ``INTENSITIES``."""

    def __post_init__(self) -> None:
        for name, allowed in (("region", REGIONS), ("size", SIZES), ("intensity", INTENSITIES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"Finding.{name}={getattr(self, name)!r}; expected one of {allowed}")

    def as_dict(self) -> dict[str, str]:
        return {"region": self.region, "size": self.size, "intensity": self.intensity}


def canonical_findings(findings) -> tuple[Finding, ...]:
    """Findings sorted by region order (the canonical order of captions and records)."""
    return tuple(sorted(findings, key=lambda f: REGIONS.index(f.region)))


def random_findings(rng: np.random.Generator, count: int) -> tuple[Finding, ...]:
    """``count`` (0-4) findings in distinct random regions, each of random size and intensity.

    Draws, in this order: a permutation of the regions, four sizes, four intensities (the same draws
    whatever ``count``).
    """
    order, sizes, levels = rng.permutation(len(REGIONS)), rng.integers(2, size=4), rng.integers(2, size=4)
    return canonical_findings(
        Finding(REGIONS[r], SIZES[sizes[r]], INTENSITIES[levels[r]]) for r in order[:count]
    )


@dataclass
class Phantom:
    """One generated image with its ground truth."""

    image: np.ndarray
    """float32 (H, W) grayscale or (H, W, 3) RGB for colour modalities, values in [0, 1]."""
    modality: str
    """One of ``MODALITIES``."""
    findings: tuple[Finding, ...]
    """Findings in canonical (region) order."""
    caption: str
    """English description stating modality, count and every finding's attributes."""
    seed: int
    """The seed the phantom was generated from."""

    def attributes(self) -> dict:
        """JSON-able record: ``{"modality", "count", "findings": [{"region", "size", "intensity"}]}``."""
        return {
            "modality": self.modality,
            "count": len(self.findings),
            "findings": [f.as_dict() for f in self.findings],
        }


_MODALITY_ALIASES = {"mri": "mr", "x-ray": "xray", "x ray": "xray", "cxr": "xray", "h&e": "histology"}


def modality_name(name, where: str) -> str:
    """Canonical modality for a name or alias ("CT", "MRI", "x-ray", ...); raises InputError otherwise."""
    key = str(name).strip().lower()
    key = _MODALITY_ALIASES.get(key, key)
    if key not in MODALITIES:
        raise InputError(f"{where}: modality {name!r}; expected one of {MODALITIES}")
    return key


def zone_center(modality: str, region: str) -> tuple[float, float]:
    """Nominal (x, y) centre of a region's finding, normalised to [-1, 1] (y grows downwards)."""
    ax, y_upper, y_lower = _ZONES[modality]
    side, level = region.split()
    return (-ax if side == "left" else ax), (y_upper if level == "upper" else y_lower)
