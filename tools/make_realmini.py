"""Build ``realmini``: real medical images from files shipped in PyPI packages -> PNGs + manifest.jsonl.

    uv run python -m tools.make_realmini --out data/realmini [--source-root DIR ...] [--size 128]

Sources are the installed packages (pydicom, nibabel, scikit-image; pydicom-data and nilearn when
installed through the ``data`` extra) plus any ``--source-root`` folder holding unpacked wheels
(``python -m zipfile -e pydicom_data-*.whl DIR``). See :mod:`tokenizer.data.realmini` for the
rules. Writes ``DIR/images/<modality>/<source>/NNNN.png`` (8-bit, grayscale or RGB, already
intensity-mapped), ``DIR/manifest.jsonl`` (DESIGN §4 rows plus source_package, source_version,
source_file, licence, source_id, scale, tile and, where they apply, source_axis / source_slice /
source_frame / ct_window) and ``DIR/summary.md`` (counts per modality x split, skipped files).
Use it with ``data=realmini`` (``conf/data/realmini.yaml``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from tokenizer.data.intensity import CT_WINDOWS
from tokenizer.data.realmini import (
    FoundPackage,
    RealminiConfig,
    Skip,
    Source,
    assign_splits,
    discover_sources,
    find_packages,
)
from tokenizer.data.realmini_catalogue import PACKAGES
from tokenizer.data.realmini_render import render_source
from tokenizer.errors import InputError

SPLITS = ("train", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = RealminiConfig()  # defaults live in one place
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_realmini", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--out", required=True, type=Path, help="output directory (created)")
    add(
        "--source-root", action="append", default=[], type=Path, help="folder of unpacked wheels (repeatable)"
    )
    add("--no-installed", action="store_true", help="use only --source-root folders")
    add("--overwrite", action="store_true", help="replace an existing realmini build in --out")
    add("--size", type=int, default=d.size, help=f"PNG side in pixels (default {d.size})")
    add("--min-side", type=int, default=None, help="skip smaller images (default size / 1.5)")
    add("--test-fraction", type=float, default=d.test_fraction, help="fraction of each modality's sources")
    add(
        "--eval-window", default=d.eval_ct_window, choices=sorted(CT_WINDOWS), help="CT window of test images"
    )
    add("--train-windows", nargs="+", default=list(d.train_ct_windows), choices=sorted(CT_WINDOWS))
    add("--max-per-source", type=int, default=d.max_per_source, help="most images of one train source")
    add("--max-per-test-source", type=int, default=d.max_per_test_source, help="most of one test source")
    add("--max-slices-per-axis", type=int, default=d.max_slices_per_axis, help="most slices per volume axis")
    add("--max-frames", type=int, default=d.max_frames, help="most frames of one multi-frame file")
    add("--contact-sheet", type=Path, default=None, help="also write a PNG grid of sample images")
    args = parser.parse_args(argv)
    try:
        args.config = RealminiConfig(
            size=args.size,
            min_side=args.min_side,
            test_fraction=args.test_fraction,
            eval_ct_window=args.eval_window,
            train_ct_windows=tuple(args.train_windows),
            max_per_source=args.max_per_source,
            max_per_test_source=args.max_per_test_source,
            max_slices_per_axis=args.max_slices_per_axis,
            max_frames=args.max_frames,
        )
    except ValueError as err:
        parser.error(str(err))
    return args


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with an earlier build unless ``overwrite`` (which removes it)."""
    ours = [out / "images", out / "manifest.jsonl", out / "summary.md"]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise InputError(f"{out}: already holds a realmini build; pass --overwrite to replace it")
        shutil.rmtree(out / "images", ignore_errors=True)
        for path in ours[1:]:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _to_png(pixels: np.ndarray) -> Image.Image:
    """float [0, 1] (H, W) or (H, W, 3) -> 8-bit grayscale or RGB image."""
    return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))


def write_source(source: Source, split: str, cfg: RealminiConfig, out: Path) -> tuple[list[dict], list[Skip]]:
    """Render one source into ``out/images`` and return its manifest rows (or why it gave none)."""
    try:
        tiles = render_source(source, split, cfg)
    except InputError as err:
        return [], [Skip(source.package.name, source.source_file, "unreadable", str(err))]
    if not tiles:
        return [], [Skip(source.package.name, source.source_file, "empty", "no informative slice or tile")]
    folder = Path("images") / source.modality / source.key.replace(":", "-").replace("/", "-")
    (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for number, tile in enumerate(tiles):
        name = (folder / f"{number:04d}.png").as_posix()
        _to_png(tile.pixels).save(out / name)
        rows.append(
            {
                "image": name,
                "caption": tile.fields.pop("caption"),
                "modality": tile.fields.pop("modality"),
                "split": split,
                "source_package": source.package.name,
                "source_version": source.package.version,
                "source_file": source.source_file,
                "licence": source.licence,
                "source_id": source.key,
                **tile.fields,
            }
        )
    return rows, []


def build(args: argparse.Namespace, console: Console) -> tuple[list[dict], list[Skip], list[FoundPackage]]:
    """Find, split, render and write everything; returns (manifest rows, skipped files, packages)."""
    cfg: RealminiConfig = args.config
    packages = find_packages(args.source_root, installed=not args.no_installed)
    if not packages:
        raise InputError(
            "no source package found: install pydicom / nibabel / scikit-image or pass --source-root"
        )
    _prepare_out(args.out, args.overwrite)
    sources, skips = discover_sources(packages, cfg)
    splits = assign_splits(sources, cfg.test_fraction)
    rows: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("realmini", total=len(sources))
        for source in sources:
            progress.update(task, description=f"realmini {source.key}")
            new_rows, new_skips = write_source(source, splits[source.key], cfg, args.out)
            rows += new_rows
            skips += new_skips
            progress.advance(task)
    with (args.out / "manifest.jsonl").open("w") as manifest:
        manifest.writelines(json.dumps(row) + "\n" for row in rows)
    return rows, skips, packages


def summary_tables(rows: list[dict], skips: list[Skip], packages: list[FoundPackage]) -> list[Table]:
    """Images and sources per modality x split; skipped files per package and reason; packages used."""
    counts = Counter((r["modality"], r["split"]) for r in rows)
    sources = Counter((m, s) for m, s, _ in {(r["modality"], r["split"], r["source_id"]) for r in rows})
    table = Table(title="realmini: images (sources) per modality and split")
    for name in ("modality", *SPLITS, "total"):
        table.add_column(name, justify="left" if name == "modality" else "right")
    for modality in [*sorted({r["modality"] for r in rows}), "total"]:
        cells = []
        for split in (*SPLITS, None):
            keys = [(m, s) for m, s in counts if modality in ("total", m) and split in (None, s)]
            cells.append(f"{sum(counts[k] for k in keys)} ({sum(sources[k] for k in keys)})")
        table.add_row(modality, *cells)
    skipped = Table(title="skipped files")
    for name in ("package", "reason", "files", "example"):
        skipped.add_column(name)
    by_reason = Counter((s.package, s.category) for s in skips)
    for (package, category), n in sorted(by_reason.items()):
        example = next(s for s in skips if (s.package, s.category) == (package, category))
        skipped.add_row(package, category, str(n), f"{Path(example.file).name}: {example.reason}"[:90])
    used = Table(title="source packages")
    for name in ("package", "version", "licence"):
        used.add_column(name)
    found = {p.name: p for p in packages}
    for name in PACKAGES:
        package = found.get(name)
        used.add_row(name, package.version if package else "not found", package.licence if package else "")
    return [table, skipped, used]


def to_markdown(table: Table) -> str:
    """A rich table as a Markdown table."""
    headers = [str(c.header) for c in table.columns]
    cells = [[str(v) for v in c.cells] for c in table.columns]
    lines = [f"### {table.title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(col[i] for col in cells) + " |" for i in range(table.row_count)]
    return "\n".join(lines) + "\n"


def contact_sheet(rows: list[dict], out: Path, path: Path, per_modality: int = 4) -> None:
    """A grid of ``per_modality`` evenly spaced images per modality and split (RGB PNG)."""
    picks = []
    for key in sorted({(r["modality"], r["split"]) for r in rows}):
        group = [r for r in rows if (r["modality"], r["split"]) == key]
        picks += [
            group[i] for i in np.unique(np.linspace(0, len(group) - 1, per_modality).round().astype(int))
        ]
    size = Image.open(out / picks[0]["image"]).size[0]
    cols = 8
    sheet = Image.new("RGB", (cols * size, -(-len(picks) // cols) * size))
    for i, row in enumerate(picks):
        sheet.paste(Image.open(out / row["image"]).convert("RGB"), ((i % cols) * size, (i // cols) * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    start = time.perf_counter()
    try:
        rows, skips, packages = build(args, console)
    except InputError as err:
        raise SystemExit(f"make_realmini: {err}") from None
    tables = summary_tables(rows, skips, packages)
    for table in tables:
        console.print(table)
    header = (
        "# realmini\n\nBuilt by `python -m tools.make_realmini` "
        f"(size {args.config.size}, test fraction {args.config.test_fraction}). "
        "Captions are metadata captions (modality, body part, view / axis, CT window, tile scale).\n\n"
    )
    listing = [f"- `{s.package}` {s.file}: {s.category}: {s.reason}" for s in skips]
    body = "\n".join(to_markdown(t) for t in tables) + "\n### every skipped file\n\n" + "\n".join(listing)
    (args.out / "summary.md").write_text(header + body + "\n")
    if args.contact_sheet:
        contact_sheet(rows, args.out, args.contact_sheet)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(rows)} images from {len({r['source_id'] for r in rows})} sources to {args.out} in {elapsed:.1f}s"
    )


if __name__ == "__main__":
    main()
