"""Code shards: a dataset encoded once by the image tokenizer, read many times by the LM (DESIGN §6).

A shard is a directory::

    codes.npy            uint16 array (N, K, h, w), a NumPy ``.npy`` file opened as a memmap
    index.jsonl          one JSON object per row, in row order: {"row", "source", "modality", "caption",
                         "split", ...extra manifest fields such as "attributes" and "qa"}
    config.json          the image tokenizer checkpoint's config, copied in
    shard.json           {"format", "format_version", "num_rows", "K", "V", "grid", "dtype"}

Writing protocol (any number of processes, rows in any order, safe against SIGKILL at any moment)
------------------------------------------------------------------------------------------------
* Every rank opens a :class:`ShardWriter` with the same arguments and its own ``rank``. ``shard.json`` and
  ``config.json`` are written through a temporary file + ``os.replace`` (identical content from every rank);
  a rank that finds different content refuses to write. ``codes.npy`` is created full-size (sparse) under a
  temporary name and published with ``os.link``, which fails if another rank published first, so exactly one
  file ever exists and nobody truncates another rank's rows.
* Rank ``r`` owns the append-only log ``index.rank{r}.jsonl``. A line in a log is the *completion record* of
  its row. :meth:`ShardWriter.write` first stores the codes in the shared memmap and flushes them (msync),
  then appends the rows' lines in one write and fsyncs the log. Hence a complete line (ending in a newline
  and parsing as JSON) implies its codes are on disk; a kill before the append loses only rows that were
  never recorded as finished, and they are written again on resume.
* A kill during the append can leave a partial last line. Readers ignore a trailing partial line; the owner
  rank truncates it away when it reopens its log, before appending.
* On open, a writer reads ``index.jsonl`` (if an earlier finalize ran) and every ``index.rank*.jsonl``
  (whatever world size wrote them) and marks those rows finished; :meth:`ShardWriter.write` skips finished
  rows, so a resumed run never writes a row twice. If two ranks race on one row anyway, finalize keeps the
  first line and logs the duplicate; the codes are the same because encoding is deterministic.
* :meth:`ShardWriter.finalize` (one rank, after all have finished) merges all logs into ``index.jsonl``
  ordered by row, via a temporary file + ``os.replace``, then deletes the logs. It refuses while rows are
  missing. Finalizing again is harmless.

:class:`CodeShard` reads a finalized shard and checks every shape against ``shard.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from tokenizer.atomic import atomic_write_text, temp_path
from tokenizer.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "medtok-code-shard"
FORMAT_VERSION = 1
CODES_NAME = "codes.npy"
INDEX_NAME = "index.jsonl"
CONFIG_NAME = "config.json"
META_NAME = "shard.json"
PART_PATTERN = re.compile(r"^index\.rank(\d+)\.jsonl$")
MAX_CODEBOOK_SIZE = 65536  # uint16 storage


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _make_meta(num_rows: int, K: int, V: int, grid: Sequence[int]) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "num_rows": int(num_rows),
        "K": int(K),
        "V": int(V),
        "grid": [int(g) for g in grid],
        "dtype": "uint16",
    }


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: format_version {meta['format_version']} is newer than this code")
    for key in ("num_rows", "K", "V", "grid"):
        if key not in meta:
            raise InputError(f"{path}: missing field {key!r}")
    grid = meta["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
        raise InputError(f"{path}: 'grid' must be [h, w] with h, w >= 1, got {grid!r}")
    if not 2 <= meta["V"] < MAX_CODEBOOK_SIZE:
        raise InputError(
            f"{path}: V must lie in [2, {MAX_CODEBOOK_SIZE}) to fit uint16 codes, got {meta['V']}"
        )
    if meta["K"] < 1 or meta["num_rows"] < 0:
        raise InputError(
            f"{path}: need K >= 1 and num_rows >= 0, got K={meta['K']}, num_rows={meta['num_rows']}"
        )


def _parse_log(path: Path) -> tuple[dict[int, str], int]:
    """Complete lines of an index log as {row: line}; also the byte length of the complete part."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a trailing partial line (killed mid-append) is not a completion record
    rows: dict[int, str] = {}
    for line_no, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode()
            row = json.loads(line)["row"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{line_no}: not a JSON object with a 'row' field ({e})") from None
        if not isinstance(row, int):
            raise InputError(f"{path}:{line_no}: 'row' must be an integer, got {row!r}")
        if row in rows:
            log.warning("%s:%d: row %d recorded twice; keeping the first record", path, line_no, row)
            continue
        rows[row] = line
    return rows, end


def _part_paths(directory: Path) -> list[Path]:
    parts = [p for p in directory.iterdir() if PART_PATTERN.match(p.name)]
    return sorted(parts, key=lambda p: int(PART_PATTERN.match(p.name).group(1)))


class ShardWriter:
    """Write rows of a code shard, from one of several processes, resumably (protocol in the module doc).

    Args:
        directory: the shard directory (created if needed).
        num_rows: N, total rows of the shard.
        K: sub-codebooks per position.
        V: codes per sub-codebook (< 65536).
        grid: (h, w) positions per image.
        tokenizer_config: the image tokenizer checkpoint's config dict, stored as ``config.json``.
        rank: this process's index; it owns ``index.rank{rank}.jsonl``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        num_rows: int,
        K: int,
        V: int,
        grid: Sequence[int],
        tokenizer_config: dict,
        rank: int = 0,
    ) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.meta = _make_meta(num_rows, K, V, grid)
        _check_meta(self.meta, self.directory / META_NAME)
        self.num_rows, self.K, self.V = int(num_rows), int(K), int(V)
        self.grid = tuple(self.meta["grid"])
        self._publish_json(META_NAME, self.meta)
        self._publish_json(CONFIG_NAME, tokenizer_config)
        self._codes = self._open_codes()
        self._done = np.zeros(self.num_rows, dtype=bool)
        self._load_done()
        self._log_path = self.directory / f"index.rank{rank}.jsonl"
        self._log = self._open_log()
        log.info("%s rank %d: %d of %d rows already finished", self.directory, rank, self.num_done, num_rows)

    # ----------------------------------------------------------------------------- opening
    def _publish_json(self, name: str, content: dict) -> None:
        path = self.directory / name
        content = json.loads(json.dumps(content))  # tuples -> lists, as they read back
        if path.exists():
            found = _read_json(path)
            if found != content:
                differing = sorted(k for k in set(found) | set(content) if found.get(k) != content.get(k))
                raise InputError(
                    f"{path}: holds a different shard (fields differ: {differing}); use a new directory"
                )
            return
        atomic_write_text(path, json.dumps(content, indent=2))

    def _open_codes(self) -> np.memmap:
        path = self.directory / CODES_NAME
        shape = (self.num_rows, self.K, *self.grid)
        if not path.exists():
            tmp = temp_path(path)
            try:
                created = open_memmap(tmp, mode="w+", dtype=np.uint16, shape=shape)
                created.flush()
                del created
                os.link(tmp, path)  # atomic publish; fails if another rank published first
            except FileExistsError:
                pass
            finally:
                Path(tmp).unlink(missing_ok=True)
        try:
            codes = open_memmap(path, mode="r+")
        except ValueError as e:
            raise InputError(f"{path}: not a readable .npy file ({e})") from None
        if codes.dtype != np.uint16 or codes.shape != shape:
            raise InputError(f"{path}: expected uint16 {shape}, found {codes.dtype} {codes.shape}")
        return codes

    def _load_done(self) -> None:
        index = self.directory / INDEX_NAME
        sources = ([index] if index.exists() else []) + _part_paths(self.directory)
        for path in sources:
            rows, _ = _parse_log(path)
            for row in rows:
                if not 0 <= row < self.num_rows:
                    raise InputError(f"{path}: row {row} outside [0, {self.num_rows})")
                self._done[row] = True

    def _open_log(self):
        if self._log_path.exists():
            _, end = _parse_log(self._log_path)
            if end != self._log_path.stat().st_size:
                log.warning("%s: dropping a partial last line left by an interrupted write", self._log_path)
                os.truncate(self._log_path, end)
        return open(self._log_path, "ab")  # noqa: SIM115 — held open for the writer's lifetime

    # ----------------------------------------------------------------------------- writing
    @property
    def num_done(self) -> int:
        """Rows known to be finished (on disk at open time, or written by this writer)."""
        return int(self._done.sum())

    def is_done(self, row: int) -> bool:
        return bool(self._done[row])

    def pending(self, rows: Iterable[int] | None = None) -> list[int]:
        """The rows among ``rows`` (default: all) that are not finished yet, in the given order."""
        rows = range(self.num_rows) if rows is None else rows
        return [int(r) for r in rows if not self._done[int(r)]]

    def write(self, rows: Sequence[int], codes: np.ndarray | torch.Tensor, records: Sequence[dict]) -> int:
        """Store codes and index records of ``rows``; finished rows are skipped. Returns rows written.

        Args:
            rows: row indices in [0, N), any order, no repeats.
            codes: (len(rows), K, h, w) integer codes in [0, V).
            records: one JSON-serialisable dict per row (source, modality, caption, split, ...); a "row"
                field is added.
        """
        rows = [int(r) for r in rows]
        if isinstance(codes, torch.Tensor):
            codes = codes.detach().cpu().numpy()
        codes = np.asarray(codes)
        expected = (len(rows), self.K, *self.grid)
        if codes.shape != expected:
            raise InputError(f"{self.directory}: codes must have shape {expected}, got {codes.shape}")
        if len(records) != len(rows) or len(set(rows)) != len(rows):
            raise InputError(
                f"{self.directory}: need one record per row and distinct rows, got {len(records)} records for {len(rows)} rows"
            )
        for row in rows:
            if not 0 <= row < self.num_rows:
                raise InputError(f"{self.directory}: row {row} outside [0, {self.num_rows})")
        if codes.size and (codes.min() < 0 or codes.max() >= self.V):
            raise InputError(
                f"{self.directory}: codes must lie in [0, {self.V}), got [{codes.min()}, {codes.max()}]"
            )
        keep = [i for i, r in enumerate(rows) if not self._done[r]]
        if not keep:
            return 0
        new_rows = [rows[i] for i in keep]
        lines = []
        for i in keep:
            if not isinstance(records[i], dict):
                raise InputError(f"{self.directory}: record of row {rows[i]} must be a dict")
            lines.append(json.dumps({**records[i], "row": rows[i]}) + "\n")
        self._codes[new_rows] = codes[keep].astype(np.uint16)
        self._codes.flush()  # codes reach the file before their completion records
        self._log.write("".join(lines).encode())
        self._log.flush()
        os.fsync(self._log.fileno())
        self._done[new_rows] = True
        return len(new_rows)

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()
        self._codes.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------- finalizing
    def finalize(self) -> Path:
        """Merge every rank's log into ``index.jsonl`` ordered by row; returns the index path.

        Call once, from one process, after every rank has finished writing.
        """
        if not self._log.closed:
            self._log.flush()
        index = self.directory / INDEX_NAME
        parts = _part_paths(self.directory)
        merged: dict[int, str] = {}
        for path in ([index] if index.exists() else []) + parts:
            rows, _ = _parse_log(path)
            for row, line in rows.items():
                if row in merged:
                    log.warning("%s: row %d already recorded by another log; keeping the first", path, row)
                    continue
                merged[row] = line
        missing = [r for r in range(self.num_rows) if r not in merged]
        if missing:
            raise InputError(
                f"{self.directory}: cannot finalize, {len(missing)} of {self.num_rows} rows not written "
                f"(first missing: {missing[:5]})"
            )
        extra = sorted(set(merged) - set(range(self.num_rows)))
        if extra:
            raise InputError(f"{self.directory}: logs hold rows outside [0, {self.num_rows}): {extra[:5]}")
        atomic_write_text(index, "".join(merged[r].rstrip("\n") + "\n" for r in range(self.num_rows)))
        self.close()
        for path in parts:
            path.unlink(missing_ok=True)
        log.info("%s: finalized %d rows from %d logs", self.directory, self.num_rows, len(parts))
        return index


class CodeShard:
    """Read a finalized code shard.

    ``len(shard)`` rows; ``shard.codes(i)`` -> LongTensor (K, h, w); ``shard.row(i)`` -> index dict;
    ``shard.config`` the tokenizer config; ``K``, ``V``, ``grid``; ``name`` the directory name (used in
    image references ``"<name>:<row>"``). The memmap opens lazily, so a shard pickles cheaply into
    DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"{self.directory}: not a code shard directory")
        meta_path = self.directory / META_NAME
        self.meta = _read_json(meta_path)
        _check_meta(self.meta, meta_path)
        self.K, self.V = int(self.meta["K"]), int(self.meta["V"])
        self.grid: tuple[int, int] = tuple(self.meta["grid"])
        self.config = _read_json(self.directory / CONFIG_NAME)
        self._rows = self._read_index()
        self._codes: np.ndarray | None = None
        codes = self._memmap()
        expected = (len(self._rows), self.K, *self.grid)
        if codes.dtype != np.uint16 or codes.shape != expected:
            raise InputError(
                f"{self.directory / CODES_NAME}: expected uint16 {expected} (from {META_NAME} and {INDEX_NAME}), "
                f"found {codes.dtype} {codes.shape}"
            )

    def _read_index(self) -> list[dict]:
        path = self.directory / INDEX_NAME
        if not path.is_file():
            parts = _part_paths(self.directory)
            hint = f"; found {len(parts)} unmerged index logs, run ShardWriter.finalize()" if parts else ""
            raise InputError(f"{path}: missing{hint}")
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or record.get("row") != line_no - 1:
                    raise InputError(f"{path}:{line_no}: expected an object with 'row': {line_no - 1}")
                rows.append(record)
        if len(rows) != self.meta["num_rows"]:
            raise InputError(f"{path}: {len(rows)} rows, {META_NAME} says {self.meta['num_rows']}")
        return rows

    def _memmap(self) -> np.ndarray:
        if self._codes is None:
            path = self.directory / CODES_NAME
            try:
                self._codes = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not a readable .npy file ({e})") from None
        return self._codes

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_codes"] = None
        return state

    @property
    def name(self) -> str:
        return self.directory.name

    def __len__(self) -> int:
        return len(self._rows)

    def _check_row(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self._rows):
            raise InputError(f"{self.directory}: row {i!r} outside [0, {len(self._rows)})")
        return int(i)

    def codes(self, i: int) -> torch.Tensor:
        """Codes of row ``i``: LongTensor (K, h, w) in [0, V)."""
        i = self._check_row(i)
        codes = torch.from_numpy(np.asarray(self._memmap()[i], dtype=np.int64))
        if codes.max() >= self.V:
            raise InputError(
                f"{self.directory / CODES_NAME}: row {i} holds code {int(codes.max())} >= V={self.V}"
            )
        return codes

    def row(self, i: int) -> dict:
        """Index record of row ``i`` (a copy): row, source, modality, caption, split and extra fields."""
        return dict(self._rows[self._check_row(i)])

    def rows(self) -> list[dict]:
        """All index records, in row order (copies)."""
        return [dict(r) for r in self._rows]
