"""Intensity rules and the prepare() pipeline."""

from __future__ import annotations

import pathlib

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from tokenizer.data.intensity import (
    CT_WINDOWS,
    PreprocessConfig,
    prepare,
    resize_square,
    resolve_window,
    to_unit,
)
from tokenizer.data.io import LoadedImage, read_image
from tokenizer.errors import InputError

DICOM_DIR = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
CFG = PreprocessConfig(image_size=32, channels=3)


def test_ct_window_by_name_tuple_and_default():
    hu = np.array([[-2000.0, -1000.0, 0.0], [500.0, 1000.0, 3000.0]], dtype=np.float32)
    np.testing.assert_allclose(to_unit(hu, "ct", cfg=CFG), [[0, 0, 0.5], [0.75, 1, 1]])  # eval "common"
    np.testing.assert_allclose(to_unit(hu, "ct", window="soft_tissue", cfg=CFG)[0], [0, 0, 150 / 400])
    np.testing.assert_allclose(to_unit(hu, "ct", window=(0, 1000), cfg=CFG)[1], [0.5, 1, 1])
    with pytest.raises(InputError, match="unknown CT window 'brain'"):
        to_unit(hu, "ct", window="brain", cfg=CFG)
    with pytest.raises(InputError, match="low < high"):
        resolve_window((10, 10), CFG)


def test_random_training_windows_come_from_the_config():
    cfg = PreprocessConfig(image_size=32, train_ct_windows=["lung", "bone"])
    rng = np.random.default_rng(0)
    seen = {resolve_window(None, cfg, rng) for _ in range(50)}
    assert seen == {CT_WINDOWS["lung"], CT_WINDOWS["bone"]}
    assert resolve_window(None, cfg) == CT_WINDOWS[cfg.eval_ct_window]  # no rng: deterministic


def test_percentile_scaling_for_mr_and_unknown():
    values = np.arange(1000, dtype=np.float32).reshape(25, 40)
    unit = to_unit(values, "mr", cfg=CFG)
    low, high = np.percentile(values, CFG.mr_percentiles)
    np.testing.assert_allclose(unit, np.clip((values - low) / (high - low), 0, 1), atol=1e-6)
    assert unit.min() == 0.0 and unit.max() == 1.0
    np.testing.assert_allclose(to_unit(values.astype(np.int16), None, cfg=CFG), unit, atol=1e-6)
    shifted = to_unit(values * 3 + 100, "us", cfg=CFG)  # affine changes of scanner units do not matter
    np.testing.assert_allclose(shifted, unit, atol=1e-6)


def test_eight_bit_and_photo_rules():
    eight = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(to_unit(eight, "xray", cfg=CFG), [[0, 0.2, 1]])
    np.testing.assert_allclose(to_unit(eight, None, cfg=CFG), [[0, 0.2, 1]])
    np.testing.assert_allclose(to_unit(eight, "ct", cfg=CFG), [[0, 0.2, 1]])  # an 8-bit export is not HU
    as_float = eight.astype(np.float32)
    np.testing.assert_allclose(to_unit(as_float, "photo", cfg=CFG, stored_dtype="uint8"), [[0, 0.2, 1]])
    sixteen = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(to_unit(sixteen, "histology", cfg=CFG), [[0, 1]])
    ct_png = np.array([[0, 1000, 2000]], dtype=np.float32)  # 16-bit CT export, not HU: percentiles
    assert to_unit(ct_png, "ct", cfg=CFG, is_hu=False)[0, 1] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("modality", ["ct", "mr", "xray", None, "photo"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_constant_images_never_give_nan(modality, dtype):
    unit = to_unit(np.full((9, 7), 40, dtype=dtype), modality, cfg=CFG)
    assert np.isfinite(unit).all() and unit.min() >= 0 and unit.max() <= 1
    if modality in ("mr", "xray", None) and dtype != np.uint8:
        assert (unit == 0).all()


def test_non_finite_values_are_rejected():
    with pytest.raises(InputError, match="finite"):
        to_unit(np.array([[1.0, np.nan]]), "mr", cfg=CFG)


def test_prepare_shapes_channels_and_range():
    gray = np.random.default_rng(0).normal(size=(40, 60)).astype(np.float32)
    out = prepare(gray, CFG, modality="mr")
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and torch.equal(out[0], out[2])
    one = prepare(gray, PreprocessConfig(image_size=16, channels=1), modality="mr")
    assert one.shape == (1, 16, 16)
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    red = prepare(rgb, PreprocessConfig(image_size=20, channels=3))
    assert torch.allclose(red[0], torch.ones(20, 20)) and torch.allclose(red[1], -torch.ones(20, 20))
    luma = prepare(rgb, PreprocessConfig(image_size=20, channels=1))
    assert torch.allclose(luma, torch.full((1, 20, 20), 0.299 * 2 - 1), atol=1e-6)
    with pytest.raises(InputError, match="expected \\(H, W\\)"):
        prepare(np.zeros((2, 3, 4, 5)), CFG)


def test_resize_is_centre_crop_of_shorter_side():
    image = torch.zeros(1, 10, 30)
    image[:, :, 10:20] = 1.0  # the central 10x10 square
    out = resize_square(image, 10)
    assert torch.equal(out, torch.ones(1, 10, 10))
    big = resize_square(torch.rand(3, 8, 8), 64)  # upsampling stays in range
    assert big.shape == (3, 64, 64) and big.min() >= 0 and big.max() <= 1


def test_prepare_loaded_ct_dicom_windows_and_modality_override():
    loaded = read_image(DICOM_DIR / "CT_small.dcm")
    soft = prepare(loaded, CFG, window="soft_tissue")
    lung = prepare(loaded, CFG, window="lung")
    assert not torch.equal(soft, lung)
    manual = to_unit(loaded.pixels, "ct", window="soft_tissue", cfg=CFG)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(manual)[None, None], size=(32, 32), mode="bicubic", antialias=True
    )[0, 0].clamp(float(manual.min()), float(manual.max()))
    torch.testing.assert_close(soft[0], expected * 2 - 1)
    as_mr = prepare(loaded, CFG, modality="MRI")  # explicit modality beats the file's
    assert not torch.equal(as_mr, prepare(loaded, CFG))
    a = prepare(loaded, CFG, rng=np.random.default_rng(1))
    b = prepare(loaded, CFG, rng=np.random.default_rng(1))
    assert torch.equal(a, b)


def test_prepare_pil_and_sixteen_bit_loaded(tmp_path):
    pil = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)))
    out = prepare(pil, CFG)
    assert out[0, 0, 0] == -1 and out[0, 0, -1] == pytest.approx(248 / 255 * 2 - 1, abs=1e-5)
    wide = LoadedImage(
        np.linspace(0, 4000, 64 * 64, dtype=np.float32).reshape(64, 64), "xray", "x", {"dtype": "uint16"}
    )
    out = prepare(wide, PreprocessConfig(image_size=64))  # same size: no resampling
    assert out.min() == -1 and out.max() == 1 and (out > -1).float().mean() > 0.98  # percentiles, not /65535
    with pytest.raises(InputError, match="expected a LoadedImage, PIL image or numpy array"):
        prepare([1, 2, 3], CFG)
