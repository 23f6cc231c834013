from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from tokenizer import create_tokenizer, detokenize, tokenize_image
from tokenizer.errors import InputError

DICOM = Path(pydicom.__file__).parent / "data" / "test_files"
NIFTI = Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture(scope="module")
def tok():
    return create_tokenizer("tiny").eval()


def _shape(tok):
    return (tok.config.quantizer.num_codebooks, *tok.grid)


def test_files_of_every_kind(tok, tmp_path):
    png16 = tmp_path / "x16.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(png16)
    jpg = tmp_path / "rgb.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(jpg)
    for path in [DICOM / "CT_small.dcm", DICOM / "MR_small.dcm", NIFTI / "anatomical.nii", png16, jpg]:
        codes = tokenize_image(path, tok)
        assert codes.shape == _shape(tok) and codes.dtype == torch.long, path
    nifti_slice = tokenize_image(NIFTI / "anatomical.nii", tok, slice_index=3)
    assert nifti_slice.shape == _shape(tok)


def test_arrays_pil_and_lists(tok):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (70, 60)).astype(np.int16)
    one = tokenize_image(ct, tok, modality="ct", window="lung")
    many = tokenize_image([ct, ct], tok, modality="ct", window="lung")
    assert many.shape == (2, *_shape(tok)) and torch.equal(many[0], one) and torch.equal(many[1], one)
    pil = Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    assert tokenize_image(pil, tok).shape == _shape(tok)
    batch = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(tokenize_image(batch, tok), tok.encode_to_codes(batch))
    assert torch.equal(tokenize_image(batch, tok, batch_size=3), tok.encode_to_codes(batch))


def test_detokenize_round_trip(tok):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tokenize_image(x, tok)
    images = detokenize(codes, tok)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(
        detokenize(codes[0], tok), images[:1], atol=1e-5
    )  # conv kernels differ by batch size
    expected = tok.decode(tok.quantize(tok.encode(x)).quantized).float().clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-6)


def test_errors_are_clear(tok):
    with pytest.raises(InputError, match="volume; pass slice_index"):
        tokenize_image(np.zeros((10, 10, 7)), tok)
    with pytest.raises(InputError, match="NaN"):
        tokenize_image(np.full((10, 10), np.nan, dtype=np.float32), tok)
    with pytest.raises(InputError, match=r"expected \(B, 3, 32, 32\)"):
        tokenize_image(torch.zeros(2, 1, 32, 32), tok)
    with pytest.raises(InputError, match="out of range"):
        tokenize_image(np.zeros((10, 10, 4)), tok, slice_index=9)
    with pytest.raises(InputError, match="ids must lie in"):
        detokenize(torch.full(_shape(tok), tok.config.quantizer.codebook_size), tok)
    with pytest.raises(InputError, match="codes: expected"):
        detokenize(torch.zeros(5, 2, 2, dtype=torch.long), tok)
    with pytest.raises(InputError, match="empty list"):
        tokenize_image([], tok)
