"""Manifest files: the JSONL / CSV index of a dataset's images, read into ``ManifestRow`` records.

Manifests are JSONL (one object per line) or CSV (a header row) with these columns:

=========  ========  ==========================================================================
column     required  meaning
=========  ========  ==========================================================================
image      yes       path to the file, relative to the manifest's folder (or absolute inside it)
caption    no        free text ("" when absent)
modality   no        ct, mr, xray, us, fundus, histology, photo, other (or an alias: MRI, CXR,
                     x-ray, ultrasound, ...); overrides what a DICOM file says
split      no        any name; datasets select rows by it (e.g. train / val / test)
window     no        CT window: full, common, soft_tissue, lung, bone, or low,high in HU
                     (JSON: [low, high]); without it training draws a random window and
                     evaluation uses the preset's eval window
slice      no        slice of a volume along axis 2 (a frame of a multi-frame DICOM)
=========  ========  ==========================================================================

Other columns (e.g. ``attributes``, ``qa``) are kept in ``ManifestRow.extra``. A path that leaves
the manifest's folder is rejected unless ``allow_outside_root=True``. Bad lines (bad JSON, wrong
encoding, no image, wrong types) are reported as ``BadRow`` and skipped.
:class:`~tokenizer.data.datasets.ManifestDataset` serves the rows as images.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizer.data.intensity import CT_WINDOWS
from tokenizer.data.io import canonical_modality
from tokenizer.errors import InputError


@dataclass
class ManifestRow:
    """One good manifest row (see the module docstring for the columns)."""

    image: Path
    """Absolute, normalised path of the image file."""
    caption: str = ""
    modality: str | None = None
    """Canonical modality, or None when the row does not say."""
    split: str | None = None
    window: str | tuple[float, float] | None = None
    """CT window name or (low, high) in HU."""
    slice_index: int | None = None
    """The ``slice`` column."""
    line: int = 0
    """1-based line of the row in the manifest file."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Columns beyond the known ones, as read (CSV values are strings)."""


@dataclass
class BadRow:
    """A manifest line that was skipped."""

    line: int
    reason: str


_KNOWN_COLUMNS = ("image", "caption", "modality", "split", "window", "slice")


def _optional_str(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"column {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value.strip() or None


def _parse_window(value: Any) -> str | tuple[float, float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip() in CT_WINDOWS:
        return value.strip()
    parts = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(v) for v in parts)
        if isinstance(value, list) and any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in value
        ):
            raise TypeError
    except (TypeError, ValueError):
        raise InputError(
            f"column 'window' must be one of {sorted(CT_WINDOWS)} or 'low,high', got {value!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"column 'window' needs finite low < high, got {value!r}")
    return low, high


def _parse_slice(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InputError(f"column 'slice' must be a non-negative integer, got {value!r}")


def _is_within(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:  # different drives
        return False


def _parse_row(record: Any, line: int, root: Path, allow_outside_root: bool) -> ManifestRow:
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InputError(
            "missing 'image' (a non-empty path string)"
            if image is None or isinstance(image, str)
            else f"'image' must be a string, got {image!r}"
        )
    path = Path(os.path.normpath(root / image.strip()))
    if not allow_outside_root and not _is_within(path, root):
        raise InputError(
            f"image path {image!r} escapes the manifest folder {root} (allow_outside_root=False)"
        )
    return ManifestRow(
        image=path,
        caption=_optional_str(record, "caption") or "",
        modality=canonical_modality(_optional_str(record, "modality"), where="column 'modality'"),
        split=_optional_str(record, "split"),
        window=_parse_window(record.get("window")),
        slice_index=_parse_slice(record.get("slice")),
        line=line,
        extra={k: v for k, v in record.items() if k not in _KNOWN_COLUMNS},
    )


def _has_bad_bytes(text: str) -> bool:
    """Bytes that were not UTF-8 were decoded to lone surrogates (errors="surrogateescape")."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _jsonl_records(text: str) -> Iterable[tuple[int, Any]]:
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid JSON
        if _has_bad_bytes(raw):
            yield number, InputError("the line is not valid UTF-8")
        elif raw.strip():
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as err:
                yield number, InputError(f"invalid JSON ({err.msg} at column {err.colno})")


def _csv_records(text: str, path: Path, delimiter: str) -> Iterable[tuple[int, Any]]:
    reader = csv.reader(_stdio.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]
    if "image" not in header:
        raise InputError(f"{path}: the CSV header {header} has no 'image' column")
    start = reader.line_num + 1
    for fields in reader:
        if any(f.strip() for f in fields):
            if len(fields) != len(header):
                yield start, InputError(f"has {len(fields)} fields but the header has {len(header)}")
            elif any(_has_bad_bytes(f) for f in fields):
                yield start, InputError("the row is not valid UTF-8")
            else:
                yield start, dict(zip(header, fields, strict=True))
        start = reader.line_num + 1


def read_manifest(
    path: str | os.PathLike, *, allow_outside_root: bool = False
) -> tuple[list[ManifestRow], list[BadRow]]:
    """Read a JSONL (.jsonl / .ndjson) or CSV (.csv / .tsv) manifest.

    Returns:
        (good rows in file order, skipped lines with reasons).

    Raises:
        InputError: the manifest itself is missing, of an unknown kind, or a CSV without 'image'.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise InputError(f"{path}: manifest must be .jsonl, .ndjson, .csv or .tsv, got {suffix!r}")
    # Undecodable bytes become lone surrogates, so one bad line is reported instead of the file failing.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    root = Path(os.path.normpath(path.absolute().parent))
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(text)
    else:
        records = _csv_records(text, path, "\t" if suffix == ".tsv" else ",")
    rows: list[ManifestRow] = []
    bad: list[BadRow] = []
    for line, record in records:
        try:
            if isinstance(record, InputError):
                raise record
            rows.append(_parse_row(record, line, root, allow_outside_root))
        except InputError as err:
            bad.append(BadRow(line, str(err)))
    return rows, bad
