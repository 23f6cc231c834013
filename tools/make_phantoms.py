"""Write the procedural phantom benchmark to disk: 8-bit PNGs plus ``manifest.jsonl``.

    uv run python -m tools.make_phantoms --out DIR --num N --size 128 --seed 0 \\
        [--modalities ct mr] [--split-fraction 0.1]

Each manifest row: ``{"image": "images/000000.png", "caption", "modality", "split": "train" | "val",
"attributes": {"modality", "count", "findings": [...]}, "qa": [[question, answer], ...]}``.
Image i is ``PhantomDataset(N, seed=seed)`` item i, so the files match the in-memory dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tokenizer.data.phantom_vocab import MODALITIES
from tokenizer.data.phantoms import PhantomDataset
from tools.progress import progress_bar


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_phantoms", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--num", required=True, type=int, help="number of images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument(
        "--seed", type=int, default=0, help="dataset seed (default 0; use another for held-out)"
    )
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=None, help="looks to generate")
    parser.add_argument("--split-fraction", type=float, default=0.1, help="fraction of rows marked val")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    if args.size < 16:
        parser.error(f"--size must be >= 16, got {args.size}")
    if not 0 <= args.seed < 2**31:
        parser.error(f"--seed must be in [0, 2**31), got {args.seed}")
    if not 0.0 <= args.split_fraction < 1.0:
        parser.error(f"--split-fraction must be in [0, 1), got {args.split_fraction}")
    return args


def val_indices(num: int, fraction: float, seed: int) -> set[int]:
    """A seeded random subset of round(num * fraction) row indices."""
    rng = np.random.default_rng([seed, 0x5E1])
    return set(rng.choice(num, size=round(num * fraction), replace=False).tolist())


def to_png(image: np.ndarray) -> Image.Image:
    """float [0, 1] (H, W) or (H, W, 3) -> 8-bit grayscale or RGB PIL image."""
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def write_phantoms(args: argparse.Namespace) -> Path:
    """Write the images and the manifest; returns the manifest path."""
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dataset = PhantomDataset(args.num, seed=args.seed, size=args.size, modalities=args.modalities)
    val = val_indices(args.num, args.split_fraction, args.seed)
    digits = max(6, len(str(args.num - 1)))
    manifest = out / "manifest.jsonl"
    with manifest.open("w") as rows, progress_bar("phantoms", args.num) as advance:
        for i in range(args.num):
            phantom = dataset.phantom(i)
            name = f"images/{i:0{digits}d}.png"
            to_png(phantom.image).save(out / name)
            qa = dataset.questions(i)
            row = {
                "image": name,
                "caption": phantom.caption,
                "modality": phantom.modality,
                "split": "val" if i in val else "train",
                "attributes": phantom.attributes(),
                "qa": [list(pair) for pair in qa],
            }
            rows.write(json.dumps(row) + "\n")
            advance()
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    manifest = write_phantoms(args)
    num_val = round(args.num * args.split_fraction)
    print(f"wrote {args.num} phantoms ({args.num - num_val} train, {num_val} val) to {args.out}: {manifest}")


if __name__ == "__main__":
    main()
