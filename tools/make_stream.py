"""Write LitData image shards for ``data=stream`` training, or measure how fast they read.

    uv run python -m tools.make_stream manifest MANIFEST OUT --size 256 [--split train] [--num-workers 8]
    uv run python -m tools.make_stream phantoms OUT --num 4096 --size 128 [--seed 0] [--modalities ct mr]
    uv run python -m tools.make_stream measure DIR --size 128 [--workers 1 2] [--batch-size 32] [--eval]

OUT may be a local folder or an object-store URL (s3://...). The stored layout (preprocessed, not
augmented arrays at the given size, plus caption, modality, source, CT window and row index) is
described in ``tokenizer/data/streaming.py``. Train with
``python -m tools.train_tokenizer data=stream data.path=OUT [data.val_path=VAL_OUT]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.phantom_vocab import MODALITIES
from tokenizer.errors import InputError


def _add_shard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int, default=1, help="writer processes (default 1)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target chunk file size (default 64MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a stream already at OUT")
    parser.add_argument("--verbose", action="store_true", help="show litdata's progress output")
    parser.add_argument(
        "--start-method", choices=("fork", "spawn", "forkserver"), default=None, help="writer process start"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.make_stream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    manifest = commands.add_parser("manifest", help="convert the rows of a JSONL / CSV manifest")
    manifest.add_argument("manifest", help="manifest file (.jsonl / .csv)")
    manifest.add_argument("out", help="output folder or URL")
    manifest.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    manifest.add_argument("--split", default=None, help="only rows of this split (default: all)")
    manifest.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="volume slicing axis")
    manifest.add_argument(
        "--mr-percentiles", type=float, nargs=2, default=(0.5, 99.5), help="MR / scalar scaling percentiles"
    )
    manifest.add_argument("--allow-outside-root", action="store_true", help="accept paths outside the folder")
    manifest.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail above this drop rate")
    _add_shard_options(manifest)

    phantoms = commands.add_parser("phantoms", help="write the procedural phantom benchmark")
    phantoms.add_argument("out", help="output folder or URL")
    phantoms.add_argument("--num", type=int, required=True, help="number of images")
    phantoms.add_argument("--size", type=int, default=128, help="image side (default 128)")
    phantoms.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    phantoms.add_argument("--modalities", nargs="+", choices=MODALITIES, default=None, help="looks")
    _add_shard_options(phantoms)

    measure = commands.add_parser("measure", help="read a stream and print images/s as JSON lines")
    measure.add_argument("dir", help="stream folder or URL")
    measure.add_argument("--size", type=int, default=128, help="network input side (default 128)")
    measure.add_argument("--channels", type=int, default=3, choices=(1, 3), help="network input channels")
    measure.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    measure.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    measure.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    measure.add_argument("--eval", action="store_true", help="no random windows / augmentation")
    args = parser.parse_args(argv)
    if getattr(args, "num_workers", 1) < 1:
        parser.error(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.command == "phantoms" and args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    if args.command == "measure" and (min(args.workers) < 0 or args.batch_size < 1):
        parser.error("--workers must be >= 0 and --batch-size >= 1")
    return args


def _shard_options(args: argparse.Namespace):
    from tokenizer.data.streaming import ShardOptions

    return ShardOptions(
        num_workers=args.num_workers,
        chunk_bytes=args.chunk_bytes,
        overwrite=args.overwrite,
        verbose=args.verbose,
        start_method=args.start_method,
    )


def measure_read_throughput(
    input_dir: str | os.PathLike,
    cfg: PreprocessConfig,
    *,
    num_workers: int,
    batch_size: int = 32,
    train: bool = True,
    max_images: int | None = None,
) -> dict[str, float]:
    """Read one shuffled epoch (or ``max_images``) and time it.

    Returns:
        {"num_workers", "images", "startup_s" (until the first batch), "seconds" (after it),
        "images_per_s" (steady state: images after the first batch / seconds)}.
    """
    from tokenizer.data import streaming

    dataset = streaming.StreamingImageDataset(input_dir, cfg, shuffle=True, seed=0, train=train)
    loader = streaming.stream_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    start = time.perf_counter()
    first = None
    num_images = num_after_first = 0
    for batch in loader:
        count = len(batch["index"])
        num_images += count
        if first is None:
            first = time.perf_counter()
        else:
            num_after_first += count
        if max_images is not None and num_images >= max_images:
            break
    end = time.perf_counter()
    first = first if first is not None else end
    seconds = end - first
    return {
        "num_workers": num_workers,
        "images": num_images,
        "startup_s": first - start,
        "seconds": seconds,
        "images_per_s": num_after_first / seconds if seconds > 0 else 0.0,
    }


def run(args: argparse.Namespace) -> None:
    """Carry out one parsed command."""
    from tokenizer.data import streaming

    if args.command == "manifest":
        cfg = PreprocessConfig(image_size=args.size, mr_percentiles=tuple(args.mr_percentiles))
        report = streaming.write_manifest_stream(
            args.manifest,
            args.out,
            cfg,
            split=args.split,
            axis=args.axis,
            allow_outside_root=args.allow_outside_root,
            max_bad_fraction=args.max_bad_fraction,
            options=_shard_options(args),
        )
        print(report.summary())
    elif args.command == "phantoms":
        report = streaming.write_phantom_stream(
            args.out,
            args.num,
            seed=args.seed,
            size=args.size,
            modalities=args.modalities,
            options=_shard_options(args),
        )
        print(report.summary())
    else:
        cfg = PreprocessConfig(image_size=args.size, channels=args.channels)
        for workers in args.workers:
            result = measure_read_throughput(
                args.dir,
                cfg,
                num_workers=workers,
                batch_size=args.batch_size,
                train=not args.eval,
                max_images=args.max_images,
            )
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
