"""What the notebooks in ``notebooks/`` share: finding (or training) the quickstart's models, sample files
that ship inside installed packages, and turning tensors into pictures.

    from tools import notebook_support as nbs
    models = nbs.quickstart_models()          # trains the fast quickstart (1-3 min on 2 CPU cores) if needed
    tok = tokenizer.load_tokenizer(models.tokenizer)

No model code lives here: everything the notebooks show comes from ``tokenizer`` and ``lm``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenizer.data.phantom_vocab import Phantom
from tokenizer.errors import InputError

PREFERRED_VARIANTS = ("full", "fast")
"""Quickstart variants the notebooks use, best first (``tools/quickstart.py`` defines them)."""
OUTPUTS_ENV = "MEDTOK_OUTPUTS"
"""Environment variable naming the folder that holds ``quickstart-<variant>/`` (default ``<repo>/outputs``)."""


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) with a ``pyproject.toml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise InputError(f"{here}: no pyproject.toml here or above; run the notebooks inside the repository")


@dataclass(frozen=True)
class QuickstartModels:
    """The trained models of one quickstart variant."""

    variant: str
    """"full" or "fast"."""
    stages: Path
    """``outputs/quickstart-<variant>``."""
    tokenizer: Path
    """Image tokenizer checkpoint after stage ``text`` (load with ``tokenizer.load_tokenizer``)."""
    lm: Path
    """Unified model directory (load with ``lm.load_model``)."""


def default_outputs() -> Path:
    """``$MEDTOK_OUTPUTS`` when set, else ``<repo>/outputs`` (where ``tools.quickstart`` writes by default)."""
    return Path(os.environ.get(OUTPUTS_ENV) or repo_root(Path(__file__).parent) / "outputs")


def find_quickstart_models(outputs: str | os.PathLike | None = None) -> QuickstartModels | None:
    """The first variant of :data:`PREFERRED_VARIANTS` whose tokenizer and LM are both saved, or None."""
    outputs = Path(outputs) if outputs is not None else default_outputs()
    for variant in PREFERRED_VARIANTS:
        stages = outputs / f"quickstart-{variant}"
        models = QuickstartModels(
            variant, stages, stages / "tokenizer_text" / "tokenizer", stages / "lm" / "model"
        )
        # config.json is written last by both savers: its presence means the save finished
        if (models.tokenizer / "config.json").is_file() and (models.lm / "config.json").is_file():
            return models
    return None


def quickstart_models(outputs: str | os.PathLike | None = None) -> QuickstartModels:
    """The quickstart's models; when no variant is finished, run ``python -m tools.quickstart --fast`` first.

    The fast run trains tiny models (32² images, 2 sub-codebooks of 16 codes) in one to three minutes on two
    CPU cores; its pictures are rough. ``uv run python -m tools.quickstart`` trains the full variant, which the
    notebooks then prefer.
    """
    outputs = Path(outputs) if outputs is not None else default_outputs()
    found = find_quickstart_models(outputs)
    if found is not None:
        print(f"Using the quickstart-{found.variant} models in {found.stages}")
        return found
    print(f"No quickstart models in {outputs}: running the fast quickstart (1-3 minutes on 2 CPU cores) …")
    start = time.perf_counter()
    command = [sys.executable, "-m", "tools.quickstart", "--fast", "--outputs", str(outputs)]
    done = subprocess.run(
        command, cwd=repo_root(Path(__file__).parent), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}"
        )
    found = find_quickstart_models(outputs)
    if found is None:
        raise RuntimeError(f"{' '.join(command)} finished but left no models in {outputs}")
    print(
        f"Trained the quickstart-{found.variant} models in {time.perf_counter() - start:.0f} s: {found.stages}"
    )
    return found


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, e.g. ``package_file("pydicom", "data", "test_files",
    "CT_small.dcm")``; raises :class:`InputError` naming the path when it is not there."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{package}: not an installed package")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise InputError(f"{path}: not shipped with the installed {package}")
    return path


def phantom_input(phantom: Phantom, channels: int = 3) -> torch.Tensor:
    """A phantom's [0, 1] image as network input (C, H, W) in [-1, 1], as ``PhantomDataset`` makes it."""
    image = torch.from_numpy(np.ascontiguousarray(phantom.image)) * 2 - 1
    if image.ndim == 3:  # colour (H, W, 3)
        image = image.permute(2, 0, 1)
        luma = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601, as the phantom dataset uses
        return torch.einsum("chw,c->hw", image, luma)[None] if channels == 1 else image
    return image[None].expand(channels, -1, -1).contiguous()


def to_display(images: torch.Tensor) -> np.ndarray:
    """Images (B, C, H, W) or (C, H, W) in [-1, 1] -> float numpy (B, H, W, 3) or (B, H, W) in [0, 1].

    Grayscale (C = 1, or three equal channels) comes back 2-D so ``imshow(..., cmap="gray")`` shows it.
    """
    images = images.detach().float().cpu()
    images = images[None] if images.ndim == 3 else images
    unit = ((images + 1) / 2).clamp(0, 1)
    if unit.shape[1] == 1 or bool((unit - unit[:, :1]).abs().max() < 1e-6):
        return unit[:, 0].numpy()
    return unit.permute(0, 2, 3, 1).numpy()


def show(ax, image: np.ndarray, title: str | None = None) -> None:
    """One picture from :func:`to_display` on a matplotlib axis, without ticks."""
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
