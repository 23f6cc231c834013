"""Intensity handling: raw scanner values -> [-1, 1] network input."""

from __future__ import annotations

from dataclasses import dataclass, field

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
