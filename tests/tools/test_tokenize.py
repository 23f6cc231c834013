import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image

from tokenizer.api import create_tokenizer, tokenize_image
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tools.tokenize import main

DICOM = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
NIFTI = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tokenizer(create_tokenizer("tiny").eval(), tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    gray = root / "gray16.png"
    Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)).save(gray)
    rgb = root / "photo.png"
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(rgb)
    bad = root / "broken.png"
    bad.write_bytes(b"this is not an image")
    return {"png": gray, "rgb": rgb, "bad": bad}


def _read(out: Path) -> tuple[np.ndarray, dict]:
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def test_files_dicom_nifti_png_and_a_bad_file(checkpoint, files, tmp_path, capsys):
    out = tmp_path / "codes.npy"
    inputs = [DICOM, NIFTI, files["png"], files["bad"], files["rgb"]]
    assert main(["--tokenizer", str(checkpoint), "--out", str(out), *map(str, inputs)]) == 0
    captured = capsys.readouterr()
    assert "tokenized 4 of 5 images (1 skipped)" in captured.out
    assert f"skipped {files['bad']}" in captured.err and "not a PNG" in captured.err

    codes, sidecar = _read(out)
    tok = load_tokenizer(checkpoint)
    assert codes.dtype == np.uint16 and codes.shape == (4, 2, *tok.grid)
    good = [DICOM, NIFTI, files["png"], files["rgb"]]
    assert sidecar["sources"] == [str(p) for p in good]
    assert sidecar["shape"] == list(codes.shape) and (sidecar["K"], sidecar["V"]) == (2, 16)
    assert [s["source"] for s in sidecar["skipped"]] == [str(files["bad"])]
    for row, path in zip(codes, good, strict=True):
        np.testing.assert_array_equal(row, tokenize_image(path, tok).numpy())


def test_modality_window_and_slice_options(checkpoint, tmp_path):
    out = tmp_path / "nifti.npy"
    argv = ["--tokenizer", str(checkpoint), "--out", str(out), str(NIFTI)]
    assert main([*argv, "--modality", "ct", "--window=-1400,200", "--slice", "3"]) == 0
    codes, _ = _read(out)
    tok = load_tokenizer(checkpoint)
    expected = tokenize_image(NIFTI, tok, modality="ct", window=(-1400.0, 200.0), slice_index=3)
    np.testing.assert_array_equal(codes[0], expected.numpy())
    assert not np.array_equal(codes[0], tokenize_image(NIFTI, tok).numpy())  # the options took effect


def test_manifest_rows_override_command_line_defaults(checkpoint, files, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("png", "rgb"):
        (root / files[name].name).write_bytes(files[name].read_bytes())
    (root / "scan.nii").write_bytes(NIFTI.read_bytes())
    rows = [
        {"image": "gray16.png", "modality": "xray", "caption": "a chest film"},
        '{"image": ',  # bad JSON line
        {"image": "missing.png"},
        {"image": "scan.nii", "slice": 2},
        {"image": "photo.png"},
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "m.npy"
    argv = [
        "--tokenizer",
        str(checkpoint),
        "--out",
        str(out),
        "--manifest",
        str(manifest),
        "--modality",
        "mr",
    ]
    assert main(argv) == 0
    codes, sidecar = _read(out)
    assert codes.shape[0] == 3 and sidecar["lines"] == [1, 4, 5]
    assert sorted(s["line"] for s in sidecar["skipped"]) == [2, 3]
    tok = load_tokenizer(checkpoint)
    expected = [
        tokenize_image(root / "gray16.png", tok, modality="xray"),
        tokenize_image(root / "scan.nii", tok, modality="mr", slice_index=2),
        tokenize_image(root / "photo.png", tok, modality="mr"),
    ]
    for row, exp in zip(codes, expected, strict=True):
        np.testing.assert_array_equal(row, exp.numpy())


def test_nothing_usable_fails_and_bad_arguments_exit(checkpoint, files, tmp_path, capsys):
    out = tmp_path / "none.npy"
    assert main(["--tokenizer", str(checkpoint), "--out", str(out), str(files["bad"])]) == 1
    assert "no image could be tokenized" in capsys.readouterr().err
    assert np.load(out).shape == (0, 2, 8, 8)
    assert main(["--tokenizer", str(tmp_path / "nowhere"), "--out", str(out), str(files["png"])]) == 1
    for argv in (
        [str(files["png"]), "--manifest", "m.jsonl"],  # both inputs
        [],  # no input
        [str(files["png"]), "--window", "wide"],
        [str(files["png"]), "--window", "200,-100"],
        [str(files["png"]), "--slice", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--tokenizer", str(checkpoint), "--out", str(out), *argv])
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--tokenizer", str(checkpoint), "--out", str(tmp_path / "codes.bin"), str(files["png"])])
