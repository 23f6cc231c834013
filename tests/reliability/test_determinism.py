"""Determinism: same image + same checkpoint -> same codes; same seed -> same generations.

Codes are compared across batch sizes (1, 3, 8), repeated runs, a save / load round trip, the two entry
points (``tokenize_image`` and ``ImageTokenizer.encode_to_codes``), thread counts, and, where CUDA is
present (``gpu`` marker), CPU against GPU. Generations are compared across repeated calls with one seed;
another seed must give another result, so the comparison cannot pass by the seed being ignored.
A saved and reloaded LM generates the same: tests/lm/test_api.py::test_save_load_gives_identical_generations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lm
from lm.generate import SamplingConfig
from tokenizer.api import create_tokenizer, tokenize_image
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.data.phantoms import PhantomDataset

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = create_tokenizer("tiny").eval()
    with torch.no_grad():  # a few random steps of the codebook EMA: codes spread over many entries
        tok.train()
        for seed in range(3):
            tok(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
        tok.eval()
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Raw phantom intensities (five modality looks) and a few random-noise images."""
    data = PhantomDataset(NUM_IMAGES - 4, seed=5, size=48)
    raw = [data.phantom(i).image for i in range(len(data))]
    rng = np.random.default_rng(0)
    return raw + [rng.normal(100, 30, (40 + i, 50)).astype(np.float32) for i in range(4)]


def test_codes_do_not_depend_on_batch_size_runs_or_entry_point(checkpoint, images):
    tok = load_tokenizer(checkpoint)
    reference = tokenize_image(images, tok, batch_size=1)
    assert reference.shape[0] == NUM_IMAGES and reference.unique().numel() > 4  # not a degenerate code
    for batch_size in (3, 8, NUM_IMAGES):
        assert torch.equal(tokenize_image(images, tok, batch_size=batch_size), reference), batch_size
    for i in (0, 7, NUM_IMAGES - 1):  # one image alone
        assert torch.equal(tokenize_image(images[i], tok), reference[i])
    batch = torch.stack([_prepared(tok, image) for image in images])
    with torch.no_grad():
        for size in (1, 3, 8):
            chunks = [tok.encode_to_codes(chunk) for chunk in batch.split(size)]
            assert torch.equal(torch.cat(chunks), reference), size
    assert torch.equal(tokenize_image(images, load_tokenizer(checkpoint), batch_size=8), reference)


def _prepared(tok, image) -> torch.Tensor:
    """The network input tokenize_image builds for one raw image."""
    from tokenizer.data.intensity import prepare

    return prepare(image, tok.config.preprocess)


def test_codes_do_not_depend_on_the_thread_count(checkpoint, images):
    tok = load_tokenizer(checkpoint)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tokenize_image(images, tok, batch_size=8)
        torch.set_num_threads(2)
        two = tokenize_image(images, tok, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.gpu
def test_codes_on_gpu_equal_codes_on_cpu(checkpoint, images):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = tokenize_image(images, load_tokenizer(checkpoint), batch_size=8)
    gpu_tok = load_tokenizer(checkpoint, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gpu = tokenize_image(images, gpu_tok, batch_size=8)
    assert gpu.device.type == "cpu" and torch.equal(gpu, cpu)
    assert torch.equal(tokenize_image(images, gpu_tok, batch_size=3), gpu)


# ------------------------------------------------------------------------------------------- LM generations
@pytest.fixture(scope="module")
def model():
    return lm.create_model("tiny", create_tokenizer("tiny").eval())


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9}])
def test_same_seed_same_images(model, sampling):
    prompts = ["one small lesion in the left lung", "normal brain MRI"]
    images, codes = lm.generate_image(model, prompts, seed=11, cfg_scale=2.0, **sampling)
    again_images, again = lm.generate_image(model, prompts, seed=11, cfg_scale=2.0, **sampling)
    assert torch.equal(codes, again) and torch.equal(images, again_images)
    assert not torch.equal(lm.generate_image(model, prompts, seed=12, cfg_scale=2.0, **sampling)[1], codes)


def test_same_seed_same_text_and_interleaved_output(model):
    image = torch.randint(0, model.vocab.codebook_size, (model.vocab.num_codebooks, *model.vocab.grid))
    kwargs = {"max_new_tokens": 12, "temperature": 1.0}
    texts = {lm.describe_image(model, image, seed=s, **kwargs) for s in (4, 4, 4)}
    assert len(texts) == 1
    others = {lm.describe_image(model, image, seed=s, **kwargs) for s in range(5, 10)}
    assert others - texts  # the seed is used
    sampling = SamplingConfig(max_new_tokens=80, text_temperature=1.0, image_temperature=1.0)
    first = lm.generate(model, ["Describe:", image], sampling=sampling, seed=2)
    second = lm.generate(model, ["Describe:", image], sampling=sampling, seed=2)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (a, b)
