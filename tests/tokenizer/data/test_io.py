"""Reading real files shipped inside pydicom / nibabel, plus files written here with Pillow / tifffile."""

from __future__ import annotations

import gzip
import pathlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from tokenizer.data.io import (
    canonical_modality,
    detect_format,
    from_pil,
    num_slices,
    read_image,
    read_volume,
    volume_slice,
)
from tokenizer.errors import InputError

DICOM_DIR = (
    pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
)  # never get_testdata_file: it downloads
NIFTI_DIR = pathlib.Path(nib.__file__).parent / "tests" / "data"


def test_ct_dicom_is_in_hounsfield_units():
    path = DICOM_DIR / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_image(path)
    assert image.modality == "ct" and image.meta["is_hu"] is True
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))
    assert image.pixels.min() < -500  # air is negative in HU, raw values are not
    assert image.meta["rescale"] == (float(ds.RescaleSlope), float(ds.RescaleIntercept))


def test_mr_dicom_and_compressed_copy_agree():
    plain = read_image(DICOM_DIR / "MR_small.dcm")
    assert plain.modality == "mr" and plain.meta["is_hu"] is False and plain.meta["dtype"] == "int16"
    np.testing.assert_array_equal(plain.pixels, pydicom.dcmread(DICOM_DIR / "MR_small.dcm").pixel_array)
    big_endian = read_image(DICOM_DIR / "MR_small_bigendian.dcm")
    np.testing.assert_array_equal(big_endian.pixels, plain.pixels)
    try:  # JPEG 2000: Pillow's openjpeg decodes it where present
        j2k = read_image(DICOM_DIR / "MR_small_jp2klossless.dcm")
    except InputError as err:
        assert "JPEG 2000" in str(err) and "MR_small_jp2klossless.dcm" in str(err)
    else:
        np.testing.assert_array_equal(j2k.pixels, plain.pixels)


def test_dicom_without_decoder_names_file_and_transfer_syntax():
    path = DICOM_DIR / "MR_small_jpeg_ls_lossless.dcm"
    from pydicom.pixels import get_decoder

    tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(tsyntax).is_available:
        assert read_image(path).pixels.shape == (64, 64)
        return
    with pytest.raises(InputError, match="MR_small_jpeg_ls_lossless.dcm.*JPEG-LS"):
        read_image(path)


def test_multiframe_dicom_frames():
    path = DICOM_DIR / "SC_rgb_rle_2frame.dcm"
    frames = pydicom.dcmread(path).pixel_array  # (2, 100, 100, 3)
    middle = read_image(path)
    assert middle.meta["frame"] == 1 and middle.meta["num_frames"] == 2
    np.testing.assert_array_equal(middle.pixels, frames[1])
    np.testing.assert_array_equal(read_image(path, frame=0).pixels, frames[0])
    np.testing.assert_array_equal(read_image(path, slice_index=0).pixels, frames[0])
    with pytest.raises(InputError, match="SC_rgb_rle_2frame.dcm.*frame index 2 out of range"):
        read_image(path, frame=2)
    volume, _ = read_volume(path)
    assert volume.shape == (100, 100, 2, 3) and num_slices(path, 2) == 2
    np.testing.assert_array_equal(volume_slice(volume, 2, 0), frames[0])


def test_grayscale_multiframe_volume_matches_frames():
    path = DICOM_DIR / "rtdose.dcm"
    frames = pydicom.dcmread(path).pixel_array
    volume, meta = read_volume(path)
    assert volume.shape == (frames.shape[2], frames.shape[1], frames.shape[0])
    for k in (0, 7, 14):
        np.testing.assert_array_equal(volume_slice(volume, 2, k), frames[k])
    np.testing.assert_array_equal(read_image(path, slice_index=2, axis=0).pixels, volume_slice(volume, 0, 2))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("MR_truncated.dcm", "MR_truncated.dcm: cannot decode DICOM pixel data"),
        ("rtplan.dcm", "rtplan.dcm: DICOM without pixel data"),
    ],
)
def test_unusable_dicoms(name, match):
    with pytest.raises(InputError, match=match):
        read_image(DICOM_DIR / name)


def test_palette_and_ybr_dicoms_become_rgb():
    palette = read_image(DICOM_DIR / "examples_palette.dcm")
    assert palette.modality == "us" and palette.pixels.shape == (350, 800, 3)
    ybr = read_image(DICOM_DIR / "examples_ybr_color.dcm")
    assert ybr.pixels.shape == (240, 320, 3) and ybr.meta["frame"] == 15


def _canonical_slice(path: pathlib.Path, axis: int, index: int) -> np.ndarray:
    data = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    return np.rot90(np.take(data, index, axis=axis)).astype(np.float32)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slices_along_each_axis(name, axis):
    path = NIFTI_DIR / name
    volume, meta = read_volume(path)
    assert meta["orientation"] == "LAS" and volume.ndim == 3  # stored LAS, returned RAS
    size = volume.shape[axis]
    assert num_slices(path, axis) == size
    middle = read_image(path, axis=axis)
    assert middle.meta["slice_index"] == size // 2 and middle.modality is None
    np.testing.assert_array_equal(middle.pixels, _canonical_slice(path, axis, size // 2))
    for index in (0, size - 1):
        pixels = read_image(path, axis=axis, slice_index=index).pixels
        np.testing.assert_array_equal(pixels, volume_slice(volume, axis, index))
    with pytest.raises(InputError, match=f"{name}: slice \\(axis {axis}\\) index {size} out of range"):
        read_image(path, axis=axis, slice_index=size)


def test_nifti_4d_volume_choice():
    path = NIFTI_DIR / "example4d.nii.gz"
    raw = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    second = read_image(path, frame=1, slice_index=3)
    np.testing.assert_array_equal(second.pixels, np.rot90(raw[:, :, 3, 1]).astype(np.float32))
    assert not np.array_equal(second.pixels, read_image(path, slice_index=3).pixels)
    with pytest.raises(InputError, match="4D volume index 2 out of range"):
        read_image(path, frame=2)


def test_png_8_and_16_bit_jpeg_tiff(tmp_path):
    wide = (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)  # up to 61420 > 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png")
    assert image.meta["dtype"] == "uint16" and image.pixels.max() > 255
    np.testing.assert_array_equal(image.pixels, wide)

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png").pixels, rgb)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").pixels.shape == (20, 30, 3)

    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (32, 1))
    Image.fromarray(gray).convert("RGB").save(tmp_path / "gray.jpg", quality=95)
    jpeg = read_image(tmp_path / "gray.jpg")
    assert detect_format(tmp_path / "gray.jpg") == "jpeg" and jpeg.pixels.shape == (32, 40)
    assert np.abs(jpeg.pixels - gray).max() <= 8

    stack = np.arange(3 * 16 * 24, dtype=np.int16).reshape(3, 16, 24) - 500
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tif = read_image(tmp_path / "stack.tif")
    assert tif.meta["num_frames"] == 3 and tif.meta["is_hu"] is None
    np.testing.assert_array_equal(tif.pixels, stack[1])
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif", frame=2).pixels, stack[2])
    tifffile.imwrite(tmp_path / "planar.tiff", np.stack([rgb[..., c] for c in range(3)]), photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tiff").pixels, rgb)


def test_from_pil_and_modality_names():
    image = from_pil(Image.fromarray(np.full((4, 5), 7, dtype=np.uint8)))
    assert image.pixels.shape == (4, 5) and image.meta["dtype"] == "uint8"
    assert canonical_modality("MRI") == "mr" and canonical_modality(" X-Ray ") == "xray"
    assert canonical_modality("") is None
    with pytest.raises(InputError, match="row 3: unknown modality 'ctt'"):
        canonical_modality("ctt", where="row 3")


def _broken_files(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    png = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    data = png.read_bytes()
    files = {
        "zero": ("empty.png", b"", "is empty"),
        "truncated": ("cut.png", data[: len(data) // 2], "cannot decode"),
        "corrupt": ("noise.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode"),
        "text": ("notes.txt", b"hello, not an image\n", "unrecognised content"),
        "wrong_extension": ("scan.dcm", data, "wrong extension '.dcm': the content is PNG"),
        "not_png": ("fake.png", b"GIF89a" + bytes(100), "not a PNG file"),
        "bad_gzip": ("vol.nii.gz", gzip.compress(b"not nifti" * 100), "not a NIFTI file"),
        "cut_gzip": ("cut.nii.gz", (NIFTI_DIR / "example4d.nii.gz").read_bytes()[:3000], "NIfTI"),
    }
    out = {}
    for key, (name, content, match) in files.items():
        (tmp_path / name).write_bytes(content)
        out[key] = (tmp_path / name, match)
    return out


@pytest.mark.parametrize(
    "key", ["zero", "truncated", "corrupt", "text", "wrong_extension", "not_png", "bad_gzip", "cut_gzip"]
)
def test_bad_files_raise_input_error_naming_the_file(tmp_path, key):
    path, match = _broken_files(tmp_path)[key]
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and match in message


def test_missing_file_and_nan_values(tmp_path):
    with pytest.raises(InputError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    values = np.ones((8, 8), np.float32)
    values[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", values)
    with pytest.raises(InputError, match="nan.tif: 1 of 64 pixel values are NaN"):
        read_image(tmp_path / "nan.tif")
    volume = np.ones((4, 4, 3), np.float32)
    volume[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "inf.nii")
    with pytest.raises(InputError, match="inf.nii: 1 of 48 voxel values are NaN or infinite"):
        read_volume(tmp_path / "inf.nii")


def test_truncated_nifti_data(tmp_path):
    data = (NIFTI_DIR / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nii: cannot read NIfTI data"):
        read_image(tmp_path / "cut.nii")


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "MR_small.dcm")
    raw = ds.pixel_array.astype(np.float32)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    bits = int(ds.BitsStored)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # signed range of the stored values
    np.testing.assert_array_equal(read_image(tmp_path / "mono1.dcm").pixels, (low + high) - raw)
