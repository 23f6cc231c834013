"""Self-describing tokenizer checkpoints: a directory with ``model.safetensors`` + ``config.json``.

Loading never unpickles anything: weights come through safetensors, the config through JSON, and the
architecture is looked up in an explicit registry. A directory whose config and weights disagree is refused
with a message that names every differing tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenizer.atomic import atomic_write, atomic_write_bytes
from tokenizer.config import TokenizerConfig
from tokenizer.errors import InputError
from tokenizer.model import ImageTokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "medtok-image-tokenizer"
FORMAT_VERSION = 1


def save_tokenizer(model: ImageTokenizer, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); returns the directory.

    Frozen pretrained parts that are rebuilt from their own source (a hub text encoder) are saved too, so a
    checkpoint with a randomly initialised text encoder gives the same embeddings after loading.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model.config.to_dict(),
        "extra": extra or {},
    }
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2).encode())
    return directory


def read_config(directory: str | os.PathLike) -> TokenizerConfig:
    """The :class:`TokenizerConfig` stored in a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{directory}: not a tokenizer checkpoint (no {CONFIG_NAME})")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(
            f"{path}: 'format' must be {FORMAT!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}"
        )
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {raw['format_version']} is newer than this code ({FORMAT_VERSION})"
        )
    raw = {k: v for k, v in raw.items() if k not in ("format", "format_version", "extra")}
    try:
        return TokenizerConfig.from_dict(raw)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InputError` naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: config expects {tuple(expected[k].shape)}, file has {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if expected[k].shape != found[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:8]))
        raise InputError(f"{source}: weights do not match config.json ({'; '.join(parts)})")


def without_pretrained(config: TokenizerConfig) -> TokenizerConfig:
    """The same architecture with every pretrained source dropped: the checkpoint holds those weights."""
    if config.text_encoder is None or config.text_encoder.pretrained is None:
        return config
    return dataclasses.replace(config, text_encoder=dataclasses.replace(config.text_encoder, pretrained=None))


def load_tokenizer(
    name_or_dir: str | os.PathLike, device: str | torch.device | None = None
) -> ImageTokenizer:
    """Load a tokenizer from a local checkpoint directory or a Hugging Face Hub repo id (when online).

    Args:
        name_or_dir: directory written by :func:`save_tokenizer`, or ``"owner/repo"`` on the Hub.
        device: where to put the model; default CPU. The model is returned in eval mode.
    """
    directory = Path(name_or_dir)
    if not directory.is_dir():
        directory = _download(str(name_or_dir))
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    state = read_weights(weights)
    model = ImageTokenizer(without_pretrained(config))
    check_state(model.state_dict(), state, str(weights))
    model.load_state_dict(state, strict=True)
    model.config = config
    return model.to(device or "cpu").eval()


def _download(repo_id: str) -> Path:
    if "/" not in repo_id or repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        raise InputError(
            f"{repo_id}: no such checkpoint directory, and not a Hub repo id of the form 'owner/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:
        raise InputError(
            f"{repo_id}: not a local directory and could not be fetched from the Hub ({e})"
        ) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file raises InputError naming it."""
    if not path.is_file():
        raise InputError(f"{path.parent}: missing {path.name}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
