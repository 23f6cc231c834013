"""Shared by the frozen vision teacher (tokenizer.alignment) and the text encoders (tokenizer.text_encoder).

The BiomedCLIP hub id, the open_clip loader (random, hub, local directory or weights file), seeded
random initialisation, modules that stay in eval mode, and the check of a config's choice fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tokenizer.errors import InputError

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
"""MedITok's teacher (image and text towers), loaded through open_clip."""


def check_choice(owner: str, name: str, value: str, choices) -> None:
    if value not in choices:
        raise InputError(f"{owner}.{name}: expected one of {tuple(choices)}, got {value!r}")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a random initialisation from ``seed`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class FrozenModule(nn.Module):
    """A module that stays in eval mode whatever ``.train()`` its parent calls."""

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


def open_clip_model(name: str, pretrained: str | None, seed: int, **force):
    """An open_clip model (random when ``pretrained`` is None) and a description of its weights."""
    import open_clip

    common = dict(pretrained_image=False, pretrained_text=False, **force)
    path = Path(pretrained) if pretrained not in (None, "hub") else None
    with seeded(seed):
        if pretrained is None:
            return open_clip.create_model(
                name, load_weights=False, **common
            ), f"open_clip {name}, RANDOM weights"
        if pretrained == "hub":
            model = open_clip.create_model(name, require_pretrained=True, **common)
        elif path.is_dir():
            model = open_clip.create_model(f"local-dir:{path}", require_pretrained=True, **common)
        elif path.is_file():
            model = open_clip.create_model(name, load_weights=False, **common)
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        elif pretrained in open_clip.list_pretrained_tags_by_model(name):
            model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, **common)
        else:
            raise InputError(
                f"pretrained={pretrained!r} for open_clip {name!r}: no such file, directory or tag"
            )
    return model, f"open_clip {name}, weights {pretrained}"
