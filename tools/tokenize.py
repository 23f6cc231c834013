"""Tokenize image files or a manifest into one ``.npy`` array of codes.

    uv run python -m tools.tokenize --tokenizer DIR --out codes.npy scan.dcm brain.nii.gz chest.png
    uv run python -m tools.tokenize --tokenizer DIR --out codes.npy --manifest data/test.jsonl

Writes ``codes.npy``: uint16 (N, K, h, w), one entry per image that could be read, in input order, and the
sidecar ``codes.json``: ``{"tokenizer", "shape", "K", "V", "grid", "sources", "skipped"}`` where ``sources[i]``
names the file of ``codes[i]`` (with ``lines[i]``, the manifest line, for a manifest) and ``skipped`` lists
every file that could not be used with the reason. Preprocessing (intensity windows, size, channels) comes
from the checkpoint; ``--modality`` / ``--window`` / ``--slice`` apply to every file, and to the manifest rows
that do not set their own. For datasets that do not fit in memory use ``tools/encode_dataset.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenizer.data.intensity import CT_WINDOWS


@dataclass
class Item:
    """One image to tokenize, with the per-image options."""

    path: Path
    modality: str | None = None
    window: str | tuple[float, float] | None = None
    slice_index: int | None = None
    line: int | None = None
    """Manifest line (1-based), None for files given on the command line."""


@dataclass
class Result:
    """Codes of the usable images and the reasons of the skipped ones."""

    codes: list[np.ndarray] = field(default_factory=list)
    """One uint16 (K, h, w) array per usable image."""
    used: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """{"source", "line"?, "reason"} per skipped file or manifest line."""


def parse_window(text: str) -> str | tuple[float, float]:
    """``lung`` (a CT window name) or ``-1400,200`` (low,high in HU)."""
    if text in CT_WINDOWS:
        return text
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(CT_WINDOWS)} or 'low,high' in HU, got {text!r}"
        ) from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"window needs low < high, got {text!r}")
    return low, high


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="image files (PNG, JPEG, TIFF, DICOM, NIfTI)")
    parser.add_argument("--manifest", type=Path, help="a JSONL / CSV manifest instead of files")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory (or Hub repo id)")
    parser.add_argument("--out", required=True, type=Path, help="output .npy file; the sidecar is .json")
    parser.add_argument("--modality", help="modality of images that do not say: ct, mr, xray, ...")
    parser.add_argument(
        "--window",
        type=parse_window,
        help="CT window: a name, or low,high in HU (negative: --window=-1400,200)",
    )
    parser.add_argument("--slice", type=int, help="slice of 3D volumes along the last axis (default middle)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.manifest):
        parser.error("give image files or --manifest, not both and not neither")
    if args.out.suffix != ".npy":
        parser.error(f"--out must end in .npy, got {args.out}")
    if args.slice is not None and args.slice < 0:
        parser.error(f"--slice must be >= 0, got {args.slice}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def collect_items(args: argparse.Namespace) -> tuple[list[Item], list[dict]]:
    """The images to tokenize and the manifest lines already known to be bad."""
    from tokenizer.data.manifest import read_manifest

    if not args.manifest:
        return [Item(Path(p), args.modality, args.window, args.slice) for p in args.files], []
    rows, bad = read_manifest(args.manifest)
    items = [
        Item(
            row.image,
            row.modality or args.modality,
            row.window or args.window,
            row.slice_index if row.slice_index is not None else args.slice,
            row.line,
        )
        for row in rows
    ]
    skipped = [{"source": str(args.manifest), "line": b.line, "reason": b.reason} for b in bad]
    return items, skipped


def tokenize_items(items: list[Item], tokenizer, batch_size: int) -> Result:
    """Read, prepare and encode ``items`` batch by batch; unreadable ones are skipped with their reason."""
    from tokenizer.api import tokenize_image
    from tokenizer.data.intensity import prepare
    from tokenizer.data.io import read_image
    from tokenizer.errors import InputError

    result = Result()
    for start in range(0, len(items), batch_size):
        images, used = [], []
        for item in items[start : start + batch_size]:
            try:
                loaded = read_image(item.path, slice_index=item.slice_index)
                images.append(
                    prepare(loaded, tokenizer.config.preprocess, modality=item.modality, window=item.window)
                )
                used.append(item)
            except InputError as err:
                reason = str(err)
                entry = {"source": str(item.path), "reason": reason}
                if item.line is not None:
                    entry["line"] = item.line
                result.skipped.append(entry)
                shown = reason if str(item.path) in reason else f"{item.path}: {reason}"
                print(f"skipped {shown}", file=sys.stderr)
        if images:
            codes = tokenize_image(torch.stack(images), tokenizer, batch_size=batch_size)
            result.codes.extend(codes.numpy().astype(np.uint16))
            result.used.extend(used)
    return result


def _atomic_save(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(args: argparse.Namespace, tokenizer, result: Result) -> Path:
    """Write ``args.out`` and its JSON sidecar; returns the sidecar path."""
    q = tokenizer.config.quantizer
    shape = (len(result.codes), q.num_codebooks, *tokenizer.grid)
    codes = np.stack(result.codes) if result.codes else np.zeros(shape, dtype=np.uint16)
    sidecar = {
        "tokenizer": str(args.tokenizer),
        "shape": list(shape),
        "dtype": "uint16",
        "K": q.num_codebooks,
        "V": q.codebook_size,
        "grid": list(tokenizer.grid),
        "sources": [str(item.path) for item in result.used],
        "skipped": result.skipped,
    }
    if args.manifest:
        sidecar["manifest"] = str(args.manifest)
        sidecar["lines"] = [item.line for item in result.used]
    _atomic_save(args.out, lambda f: np.save(f, codes, allow_pickle=False))
    json_path = args.out.with_suffix(".json")
    _atomic_save(json_path, lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    return json_path


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (1 when no image could be tokenized)."""
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.errors import InputError

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(args.tokenizer, device=device)
        items, skipped = collect_items(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for entry in skipped:
        print(f"skipped {entry['source']}:{entry['line']}: {entry['reason']}", file=sys.stderr)
    result = tokenize_items(items, tokenizer, args.batch_size)
    result.skipped = skipped + result.skipped
    sidecar = write_outputs(args, tokenizer, result)
    total = len(result.codes) + len(result.skipped)
    print(
        f"tokenized {len(result.codes)} of {total} images ({len(result.skipped)} skipped) -> {args.out}, {sidecar}"
    )
    if not result.codes:
        print("error: no image could be tokenized", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
