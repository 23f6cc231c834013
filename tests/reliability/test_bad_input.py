"""Bad input: every case either works correctly or raises InputError naming the file / row / field.

Property-based (hypothesis) over

- arrays handed to ``tokenize_image``: any dtype, 0-5 dimensions, empty / tiny / long / large shapes,
  NaN / Inf, constant images, extreme values; as numpy arrays and as torch tensors;
- image files derived from real ones that ship inside pydicom and nibabel, plus PNG / JPEG / TIFF files
  written here: truncated, zero-byte, bytes overwritten, garbage prepended, wrong extension;
- manifests (JSONL / CSV) mixing good rows with bad JSON, wrong types, missing columns, paths that leave
  the root, non-UTF-8 bytes and whole files in the wrong encoding;
- LM records: random JSON values, unknown image references, over-long and empty records.

"Works correctly" is checked, not assumed: accepted arrays reach the network finite and in [-1, 1] and give
codes of the right shape and range; accepted files give finite float32 (H, W) / (H, W, 3) pixels; every
manifest line is either a row or a BadRow with its line number (none lost); records become sequences no
longer than ``max_len``. Anything else that escapes (TypeError, struct.error, MemoryError, ...) fails.

The number of cases is each test's ``max_examples`` (hypothesis) or its parameter list; run with
``--hypothesis-show-statistics`` to see them. The skip-and-count / fail-past-``max_bad_fraction`` rule of
batch jobs is tested in tests/tokenizer/data/test_datasets.py::test_manifest_with_too_many_bad_lines_fails_early,
::test_datamodule_loaders_and_bad_fraction, tests/lm/test_data.py::test_val_split_and_bad_fraction_limit and
tests/tools/test_encode_dataset.py::test_manifest_with_a_bad_row.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lm.sequence import REASONS, RecordRejected, build_sequence
from lm.vocab import Vocab
from tokenizer.api import create_tokenizer, tokenize_image
from tokenizer.data.datasets import ManifestDataset
from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.io import read_image
from tokenizer.data.manifest import read_manifest
from tokenizer.errors import InputError

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"  # listed, never get_testdata_files
NIFTI_DIR = Path(nibabel.__file__).parent / "tests" / "data"
SCALE = int(os.environ.get("BAD_INPUT_SCALE", "1"))
"""Multiplies every case count below, for longer fuzzing runs (``BAD_INPUT_SCALE=20 pytest …``)."""
NUM_ARRAY_CASES = 400 * SCALE
NUM_TENSOR_CASES = 150 * SCALE
NUM_FILE_CASES = 600 * SCALE
NUM_MANIFEST_CASES = 100 * SCALE
NUM_RECORD_CASES = 400 * SCALE
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@functools.cache
def _tok():
    """The tiny tokenizer (not a fixture: hypothesis would print its whole repr with every failure)."""
    return create_tokenizer("tiny").eval()


def _checked(tok):
    """``tok`` whose ``encode_to_codes`` asserts that what reaches the network is finite and in [-1, 1]."""
    encode = type(tok).encode_to_codes

    def encode_to_codes(x):
        cfg = tok.config.preprocess
        assert x.dtype == torch.float32 and x.shape[1:] == (cfg.channels, cfg.image_size, cfg.image_size)
        assert torch.isfinite(x).all() and x.abs().max() <= 1.0, "network input outside [-1, 1] or not finite"
        return encode(tok, x)

    tok.encode_to_codes = encode_to_codes
    return tok


def _assert_codes(codes: torch.Tensor, tok, batch: int | None = None) -> None:
    q = tok.config.quantizer
    shape = (q.num_codebooks, *tok.grid)
    assert codes.dtype == torch.long and codes.shape == (shape if batch is None else (batch, *shape))
    assert codes.min() >= 0 and codes.max() < q.codebook_size


# ------------------------------------------------------------------------------------------- arrays
DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64", "complex64", "<U4", "object", "datetime64[s]"]  # fmt: skip


@st.composite
def shapes(draw) -> tuple[int, ...]:
    kind = draw(st.sampled_from(["2d", "rgb", "channel", "volume", "any"]))
    side = st.integers(0, 70)
    if kind == "2d":
        return draw(st.sampled_from([(1, 1), (1, 5000), (3000, 2), (1200, 1300)]) | st.tuples(side, side))
    if kind == "rgb":
        return (draw(side), draw(side), draw(st.sampled_from([1, 3, 4])))
    if kind == "channel":
        return (draw(st.sampled_from([1, 3])), draw(side), draw(side))
    if kind == "volume":
        return (draw(side), draw(side), draw(st.integers(2, 9)))
    return tuple(draw(st.lists(st.integers(0, 6), max_size=5)))


@st.composite
def arrays(draw) -> np.ndarray:
    dtype, shape = np.dtype(draw(st.sampled_from(DTYPES))), draw(shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(["random", "constant", "extreme", "nan", "inf", "tiny"]))
    if dtype.kind == "b":
        return rng.random(shape) < 0.5 if fill == "random" else np.ones(shape, bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if fill == "extreme":
            return rng.choice(np.array([info.min, info.max], dtype=dtype), size=shape)
        if fill == "constant":
            return np.full(shape, rng.integers(info.min, info.max, endpoint=True, dtype=dtype), dtype=dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.kind in "fc":
        info = np.finfo(dtype)
        values = {"random": rng.normal(0, 1000, shape), "constant": np.full(shape, rng.normal()),
                  "extreme": rng.choice([info.min, info.max, -1.0, 1.0], size=shape),
                  "tiny": rng.choice([info.tiny, -info.tiny, 0.0], size=shape),
                  "nan": rng.normal(size=shape), "inf": rng.normal(size=shape)}[fill]  # fmt: skip
        values = values.astype(dtype)
        if fill in ("nan", "inf") and values.size:
            values.flat[rng.integers(values.size)] = np.nan if fill == "nan" else -np.inf
        return values
    return np.zeros(shape, dtype=dtype)  # strings, objects, dates


def _tokenize_or_input_error(image, tok, **kwargs):
    try:
        codes = tokenize_image(image, tok, **kwargs)
    except InputError as err:
        message = str(err)
        assert re.match(r"(image|<array>|window|modality)[: ]", message), message  # names the field
        event("InputError")
        return None
    event("codes")
    return codes


@settings(max_examples=NUM_ARRAY_CASES, **SETTINGS)
@example(np.array([[3.4e38, -3.4e38, 1.0, -1.0]], np.float32), None, None, None)  # found: inf / inf -> NaN
@given(image=arrays(), modality=st.sampled_from([None, "ct", "mr", "xray", "fundus", "photo"]),
       window=st.sampled_from([None, "lung", (-1000.0, 1000.0)]), slice_index=st.sampled_from([None, 0, 1, 8]))  # fmt: skip
def test_any_array_gives_codes_or_input_error(image, modality, window, slice_index):
    tok = _tok()
    codes = _tokenize_or_input_error(
        image, _checked(tok), modality=modality, window=window, slice_index=slice_index
    )
    if codes is not None:
        _assert_codes(codes, tok)
        plane = image[..., slice_index] if image.ndim == 3 and image.shape[-1] not in (1, 3) else image
        assert plane.size and image.dtype.kind in "biuf"  # nothing empty or non-numeric was accepted
        if image.dtype.kind == "f":
            assert np.isfinite(plane).all()


TORCH_DTYPES = [torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64]  # fmt: skip


@settings(max_examples=NUM_TENSOR_CASES, **SETTINGS)
@example(torch.bfloat16, (3, 20, 20), 1, False, False)  # found: TypeError from .numpy()
@example(torch.complex64, (3, 32, 32), 1, True, False)  # found: imaginary part dropped silently
@example(torch.float32, (3, 32, 32), 3, True, False)  # found: raw values taken as network input
@given(dtype=st.sampled_from(TORCH_DTYPES), shape=shapes(), seed=st.integers(0, 2**31),
       batch=st.booleans(), constant=st.booleans())  # fmt: skip
def test_any_tensor_gives_codes_or_input_error(dtype, shape, seed, batch, constant):
    tok = _tok()
    size = tok.config.preprocess.image_size
    if batch:  # a (B, C, S, S) batch tensor is taken as network input already in [-1, 1]
        shape = (2, tok.config.preprocess.channels, size, size) if seed % 2 else (2, *shape[:3])
    gen = torch.Generator().manual_seed(seed)
    values = torch.zeros(shape) if constant else torch.rand(shape, generator=gen) * 2 - 1
    if seed % 3 == 0:
        values = values * 300  # raw intensities, not network input
    if dtype.is_floating_point and values.numel() and seed % 5 == 0:
        values.view(-1)[0] = float("nan")
    codes = _tokenize_or_input_error(values.to(dtype), _checked(tok))
    if codes is not None:
        _assert_codes(codes, tok, batch=2 if batch and len(shape) == 4 else None)


# ------------------------------------------------------------------------------------------- files
def _written_sources(folder: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for name, array in {"gray8.png": rng.integers(0, 255, (40, 30), dtype=np.uint8),
                        "gray16.png": rng.integers(0, 65535, (24, 24), dtype=np.uint16),
                        "rgb.jpg": rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)}.items():  # fmt: skip
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG" if name.endswith("png") else "JPEG")
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rng.normal(size=(2, 16, 16)).astype(np.float32))
    out["stack.tif"] = buffer.getvalue()
    return out


SOURCES = {
    **{name: (DICOM_DIR / name).read_bytes() for name in
       ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEGLSNearLossless_08.dcm", "rtplan.dcm"]},
    **{name: (NIFTI_DIR / name).read_bytes() for name in ["anatomical.nii", "example4d.nii.gz"]},
    **_written_sources(Path(".")),
}  # fmt: skip
EXTENSIONS = [".png", ".jpg", ".jpeg", ".tif", ".dcm", ".nii", ".nii.gz", "", ".txt"]


def _damage(data: bytes, damage: str, seed: int) -> bytes:
    """``data`` truncated, with bytes overwritten, with garbage in front, emptied or replaced."""
    rng = np.random.default_rng(seed)
    data = bytearray(data)
    if damage == "truncate":
        return bytes(data[: int(rng.integers(len(data)))])
    if damage == "overwrite":
        for _ in range(int(rng.integers(1, 17))):
            # headers are where parsers break: half of the hits land in the first kilobyte
            end = min(len(data), 1024) if rng.random() < 0.5 else len(data)
            data[int(rng.integers(end))] = int(rng.integers(256))
        return bytes(data)
    if damage == "prepend":
        return rng.bytes(int(rng.integers(1, 65))) + bytes(data)
    if damage == "zero":
        return b""
    if damage == "random":
        return rng.bytes(int(rng.integers(2049)))
    return bytes(data)


damaged_files = st.tuples(
    st.sampled_from(sorted(SOURCES)),
    st.sampled_from(["none", "truncate", "overwrite", "prepend", "zero", "random"]),
    st.integers(0, 2**32 - 1),
    st.none() | st.sampled_from(EXTENSIONS),  # None (half the cases) keeps the source's extension
)


@settings(max_examples=NUM_FILE_CASES, **SETTINGS)
@example(("example4d.nii.gz", "overwrite", 0, None))  # found: zlib.error escaped
@example(("anatomical.nii", "overwrite", 699, None))  # found: TypeError from a degenerate affine
@example(("stack.tif", "overwrite", 8, None))  # found: IndexError from a TIFF with no pages
@example(("stack.tif", "overwrite", 171972, None))  # found: ValueError from a zero-sized TIFF series
@given(case=damaged_files)
def test_damaged_files_read_correctly_or_raise_naming_the_file(tmp_path, case):
    source, damage, seed, extension = case
    stem = source.removesuffix(".gz").rsplit(".", 1)[0]
    tok, path = _tok(), tmp_path / f"{stem}_{damage}{source[len(stem) :] if extension is None else extension}"
    path.write_bytes(_damage(SOURCES[source], damage, seed))
    try:
        image = read_image(path)
    except InputError as err:
        assert str(err).startswith(str(path)), err  # the message starts with the file
        with pytest.raises(InputError, match=re.escape(str(path))):
            tokenize_image(path, tok)
        event(f"{damage}: InputError")
        return
    event(f"{damage}: read")
    pixels = image.pixels
    assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
    assert pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)
    assert image.source == str(path) and min(pixels.shape[:2]) >= 1
    try:
        _assert_codes(tokenize_image(path, _checked(tok)), tok)
    except InputError as err:  # readable, but e.g. a volume that needs a slice: still named
        assert str(err).startswith(str(path)), err


def test_dicom_with_a_corrupt_attribute_names_the_file(tmp_path):
    """pydicom converts values lazily: an unknown VR fails where the value is first read (found here)."""
    data = (DICOM_DIR / "CT_small.dcm").read_bytes()
    at = data.index(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR "CS"
    path = tmp_path / "bad_vr.dcm"
    path.write_bytes(data[: at + 4] + b"\x43\xb8" + data[at + 6 :])
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: corrupt DICOM attribute"):
        read_image(path)


def test_nifti_with_a_degenerate_affine_names_the_file(tmp_path):
    path = tmp_path / "flat.nii"
    nibabel.save(nibabel.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), path)
    data = bytearray(path.read_bytes())  # little-endian NIfTI-1 header: qform_code @252, srow_y @296
    data[252:254], data[296:312] = (0).to_bytes(2, "little"), bytes(16)  # sform row y = 0: degenerate
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: NIfTI affine .* has no orientation"):
        read_image(path)


def _without(dataset: pydicom.Dataset, *keywords: str) -> pydicom.Dataset:
    for keyword in keywords:
        if keyword in dataset:
            delattr(dataset, keyword)
    return dataset


def test_dicom_without_rescale_tags_reads_stored_values_as_the_standard_default(tmp_path):
    """Rescale slope / intercept absent: identity (DICOM's and pydicom's default), reported in the meta."""
    ds = _without(pydicom.dcmread(DICOM_DIR / "CT_small.dcm"), "RescaleSlope", "RescaleIntercept")
    ds.save_as(tmp_path / "no_rescale.dcm")
    image = read_image(tmp_path / "no_rescale.dcm")
    assert image.meta["rescale"] == (1.0, 0.0) and image.modality == "ct"
    np.testing.assert_array_equal(image.pixels, ds.pixel_array.astype(np.float32))
    only_slope = _without(pydicom.dcmread(DICOM_DIR / "CT_small.dcm"), "RescaleIntercept")
    only_slope.RescaleSlope = 2
    only_slope.save_as(tmp_path / "slope.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "slope.dcm").pixels, 2.0 * image.pixels)


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "SC_rgb_jpeg_gdcm.dcm"])  # fmt: skip
def test_compressed_dicom_without_a_decoder_names_file_and_transfer_syntax(tmp_path, name):
    path = tmp_path / name
    path.write_bytes((DICOM_DIR / name).read_bytes())
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and str(syntax) in message and "no decoder installed" in message


# ------------------------------------------------------------------------------------------- manifests
GOOD, BAD = "good", "bad"
BAD_ROWS = {  # line -> what its reason must name
    "{image: scan.png": "invalid JSON",
    "[1, 2]": "expected a JSON object",
    '{"caption": "x"}': "missing 'image'",
    '{"image": 7}': "'image' must be a string",
    '{"image": "  "}': "missing 'image'",
    '{"image": "../outside.png"}': "escapes the manifest folder",
    '{"image": "/etc/passwd"}': "escapes the manifest folder",
    '{"image": "a.png", "modality": "xylophone"}': "column 'modality'",
    '{"image": "a.png", "window": [5, 1]}': "column 'window'",
    '{"image": "a.png", "window": "brain"}': "column 'window'",
    '{"image": "a.png", "slice": -3}': "column 'slice'",
    '{"image": "a.png", "caption": ["x"]}': "column 'caption'",
    '{"image": "a.png", "caption": "\udce9t\udce9"}': "not valid UTF-8",  # é as a lone latin-1 byte
}


@st.composite
def manifest_lines(draw) -> list[tuple[str, str]]:
    """(expected, line) pairs: GOOD rows, bad rows (expected: what the reason names) and blank lines."""
    lines = []
    for _ in range(draw(st.integers(1, 25))):
        choice = draw(st.sampled_from(["good", "good", "bad", "blank", "unicode"]))
        if choice == "good":
            image = draw(st.sampled_from(["a.png", "sub/b.png", "./a.png", "sub/../a.png", "missing.png"]))
            row = {"image": image, "caption": draw(st.text(max_size=20)), "split": "train"}
            lines.append((GOOD, json.dumps(row, ensure_ascii=draw(st.booleans()))))
        elif choice == "bad":
            line = draw(st.sampled_from(sorted(BAD_ROWS)))
            lines.append((BAD_ROWS[line], line))
        elif choice == "blank":
            lines.append(("blank", draw(st.sampled_from(["", "   ", "\t"]))))
        else:
            lines.append((GOOD, json.dumps({"image": "a.png", "caption": "\u2028 \u00e9 \U0001f600"})))
    return lines


def _manifest_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / name)
    return root


@settings(max_examples=NUM_MANIFEST_CASES, **SETTINGS)
@given(lines=manifest_lines())
def test_every_jsonl_line_is_a_row_or_a_counted_bad_row(tmp_path, lines):
    root = _manifest_root(tmp_path)
    path = root / "manifest.jsonl"
    path.write_bytes("\n".join(line for _, line in lines).encode("utf-8", "surrogateescape"))
    expected = {n: kind for n, (kind, _) in enumerate(lines, start=1) if kind != "blank"}
    _check_manifest(path, root, expected)


CSV_GOOD = ["a.png", "sub/b.png", "sub/../a.png", "missing.png"]
CSV_BAD = {"": "missing 'image'", "  ": "missing 'image'", "../outside.png": "escapes the manifest folder",
           "/etc/hosts": "escapes the manifest folder"}  # fmt: skip


@st.composite
def csv_rows(draw) -> list[tuple[str, list[str] | str]]:
    """(kind, fields) rows: good ones, bad images, wrong field counts, non-UTF-8 and blank lines."""
    rows = []
    for _ in range(draw(st.integers(1, 25))):
        choice = draw(st.sampled_from(["good", "good", "bad", "fields", "latin1", "blank"]))
        caption = draw(st.text(max_size=20).map(lambda t: re.sub(r"[\r\n]", " ", t)))  # one line per row
        if choice == "good":
            rows.append((GOOD, [draw(st.sampled_from(CSV_GOOD)), caption, "train"]))
        elif choice == "bad":
            image = draw(st.sampled_from(sorted(CSV_BAD)))
            rows.append((CSV_BAD[image], [image, caption, "train"]))
        elif choice == "fields":
            rows.append(
                ("fields but the header has 3", draw(st.sampled_from([["a.png"], ["a.png", "x", "t", "4"]])))
            )
        elif choice == "latin1":
            rows.append(("not valid UTF-8", ["a.png", "caf\udce9", "train"]))  # é as a lone latin-1 byte
        else:
            rows.append(("blank", ""))
    return rows


@settings(max_examples=NUM_MANIFEST_CASES, **SETTINGS)
@given(rows=csv_rows(), delimiter=st.sampled_from([",", "\t"]))
def test_every_csv_row_is_a_row_or_a_counted_bad_row(tmp_path, rows, delimiter):
    root = _manifest_root(tmp_path)
    path = root / ("manifest.csv" if delimiter == "," else "manifest.tsv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["image", "caption", "split"])
    for _, fields in rows:
        writer.writerow(fields) if fields else buffer.write("\n")
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogateescape"))
    expected = {n: kind for n, (kind, _) in enumerate(rows, start=2) if kind != "blank"}
    _check_manifest(path, root, expected)


def _check_manifest(path: Path, root: Path, expected: dict[int, str]) -> None:
    """``expected``: line -> GOOD, or a phrase the reason of that bad line must contain."""
    rows, bad = read_manifest(path)
    found = {r.line: GOOD for r in rows} | {b.line: b.reason for b in bad}
    assert len(rows) + len(bad) == len(found)
    assert sorted(found) == sorted(expected)  # every non-blank line accounted for: none lost, none invented
    for line, want in expected.items():
        assert (found[line] == GOOD) == (want == GOOD) and want in found[line], (line, want, found[line])
    assert all(r.image.is_relative_to(root) for r in rows)
    if rows:
        dataset = ManifestDataset(path, PreprocessConfig(image_size=16))
        for i in range(len(dataset)):
            item = dataset[i]
            if isinstance(item, dict):
                assert item["image"].shape == (3, 16, 16)
            else:  # a file that is not there: named in the reason
                assert item.reason.startswith(str(root / "missing.png")), item.reason


def test_manifest_files_in_the_wrong_encoding_or_without_columns_are_named(tmp_path):
    root = _manifest_root(tmp_path)
    (root / "utf16.jsonl").write_text('{"image": "a.png"}\n{"image": "sub/b.png"}\n', encoding="utf-16")
    rows, bad = read_manifest(root / "utf16.jsonl")
    assert not rows and [b.line for b in bad] == [1, 2, 3]
    with pytest.raises(InputError, match=r"utf16.jsonl: no usable rows \(3 bad lines\)"):
        ManifestDataset(root / "utf16.jsonl", PreprocessConfig(image_size=16))
    (root / "nocol.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(
        InputError, match=r"nocol.csv: the CSV header \['path', 'caption'\] has no 'image' column"
    ):
        read_manifest(root / "nocol.csv")
    (root / "rows.txt").write_text('{"image": "a.png"}\n')
    with pytest.raises(InputError, match=r"rows.txt: manifest must be .jsonl, .ndjson, .csv or .tsv"):
        read_manifest(root / "rows.txt")
    (root / "latin1.csv").write_bytes("image,caption\na.png,caf\xe9\nsub/b.png,ok\n".encode("latin-1"))
    rows, bad = read_manifest(root / "latin1.csv")
    assert [r.line for r in rows] == [3] and [(b.line, b.reason) for b in bad] == [
        (2, "the row is not valid UTF-8")
    ]


# ------------------------------------------------------------------------------------------- LM records
VOCAB = Vocab(num_text=256, num_codebooks=2, codebook_size=16, grid=(2, 3))
CODES = {
    f"shard:{i}": torch.randint(0, 16, (2, 2, 3), generator=torch.Generator().manual_seed(i))
    for i in range(3)
}
MAX_LEN = 40


def _resolve(ref: str) -> torch.Tensor:
    name, _, row = ref.rpartition(":")
    if f"{name}:{row}" not in CODES:
        raise KeyError(f"no image {ref!r}")
    return CODES[ref]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
refs = st.sampled_from(["shard:0", "shard:2", "shard:9", "other:1", "shard:x", "", "shard:-1", "shard:1:2"])
good_segments = st.builds(lambda t: {"text": t}, st.text(max_size=60)) | st.builds(
    lambda r: {"image": r}, refs
)
segments = st.one_of(
    good_segments,
    good_segments,
    good_segments,
    st.dictionaries(st.sampled_from(["text", "image", "audio"]), json_values, max_size=2),
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.text(max_size=40) | st.lists(segments, max_size=3),
    }  # fmt: skip
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"segments": st.lists(good_segments, max_size=6)}),
    st.fixed_dictionaries(
        {"segments": st.lists(segments, max_size=6)},
        optional={"loss_on": st.lists(st.integers(-1, 7), max_size=4) | json_values},
    ),  # fmt: skip
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=4)}),
)


@settings(max_examples=NUM_RECORD_CASES, **SETTINGS)
@given(record=records, truncate=st.booleans())
def test_any_record_becomes_a_sequence_or_a_named_rejection(record, truncate):
    where = "docs.jsonl:7"
    try:
        seq = build_sequence(record, VOCAB, lambda t: list(t.encode()), _resolve,
                             max_len=MAX_LEN, truncate=truncate, where=where)  # fmt: skip
    except RecordRejected as err:
        assert err.reason in REASONS and str(err).startswith(where), err
        event(f"rejected: {err.reason}")
        if err.reason == "unknown_image":
            assert re.search(r"unknown image reference '.*'", str(err))
        return
    event("sequence")
    assert 2 <= len(seq) <= MAX_LEN and seq.tokens.shape == seq.labels.shape
    assert ((seq.tokens >= 0) & (seq.tokens < VOCAB.size)).all()
    assert (seq.labels != -100).any()  # a kept record always teaches something


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"segments": [{"text": "x" * 100}]}, "too_long"),
        ({"segments": [{"text": ""}]}, "empty"),
        ({"segments": []}, "empty"),
        ({"segments": [{"text": "a"}, {"image": "shard:7"}]}, "unknown_image"),
        ({"segments": [{"image": "nowhere:0"}]}, "unknown_image"),
        ({"segments": [{"text": "describe"}], "loss_on": []}, "no_loss"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_loss"),
    ],
)
def test_hand_made_bad_records_name_the_record_and_reason(record, reason):
    with pytest.raises(RecordRejected) as info:
        build_sequence(record, VOCAB, lambda t: list(t.encode()), _resolve,
                       max_len=MAX_LEN, truncate=False, where="r.jsonl:3")  # fmt: skip
    assert info.value.reason == reason and str(info.value).startswith("r.jsonl:3")
