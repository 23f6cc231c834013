import itertools
import json
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from tokenizer.data import phantom_text as pt
from tokenizer.data import phantoms as ph
from tokenizer.data.phantom_reader import read_phantom
from tokenizer.data.phantom_text import ANSWERS, answer_matches, caption_for, parse_caption, phantom_questions
from tokenizer.data.phantom_vocab import (
    COLOR_MODALITIES,
    INTENSITIES,
    MODALITIES,
    REGIONS,
    SIZES,
    Finding,
    canonical_findings,
)
from tokenizer.data.phantoms import DEFAULT_NOISE, PhantomDataset, make_phantom
from tokenizer.errors import InputError

ALL_FINDINGS = [Finding(r, s, i) for r, s, i in itertools.product(REGIONS, SIZES, INTENSITIES)]


def _blur_noise(image: np.ndarray, rng: np.random.Generator, sigma: float, std: float) -> np.ndarray:
    sigmas = (sigma, sigma, 0) if image.ndim == 3 else sigma
    return np.clip(ndimage.gaussian_filter(image, sigmas) + rng.normal(0, std, image.shape), 0, 1)


# ----------------------------------------------------------------------------- generation


def test_same_seed_same_phantom_and_drawn_modality_is_consistent():
    a, b = make_phantom(11), make_phantom(11)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.findings == b.findings
    c = make_phantom(11, modality=a.modality)
    assert np.array_equal(a.image, c.image) and c.caption == a.caption
    d = make_phantom(11, num_findings=len(a.findings))
    assert np.array_equal(a.image, d.image)
    assert not np.array_equal(make_phantom(12, modality=a.modality).image, a.image)


def test_dataset_item_phantom_and_questions_share_one_generation(monkeypatch):
    dataset = PhantomDataset(3, seed=5, size=32)
    calls = []
    monkeypatch.setattr(ph, "make_phantom", lambda *a, **k: calls.append(a) or make_phantom(*a, **k))
    item = dataset[1]
    phantom, qa = dataset.phantom(1), dataset.questions(-2)  # -2 is item 1
    assert len(calls) == 1 and item["caption"] == phantom.caption
    with pytest.raises(ValueError):  # shared with later callers, so nobody may write into it
        phantom.image[0, 0] = 0.0
    rng = np.random.default_rng([5, 1, ph.PHANTOM_QA_STREAM])
    assert qa == phantom_questions(make_phantom(*calls[0], size=32), rng)
    dataset[2]
    assert len(calls) == 2 and dataset.phantom(2) is dataset.phantom(2)


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [32, 96, 128])
def test_image_shape_dtype_and_range(modality, size):
    p = make_phantom(3, size=size, modality=modality)
    expected = (size, size, 3) if modality in COLOR_MODALITIES else (size, size)
    assert p.image.shape == expected and p.image.dtype == np.float32
    assert p.image.min() >= 0.0 and p.image.max() <= 1.0
    assert p.image.std() > 0.1  # anatomy, not a flat field
    if p.image.ndim == 3:  # colour modalities really are coloured
        assert np.abs(p.image[..., 0] - p.image[..., 2]).mean() > 0.1


def test_default_noise_is_mild_and_measurable():
    assert DEFAULT_NOISE <= 0.015
    clean = make_phantom(5, modality="mr", noise=0.0).image
    noisy = make_phantom(5, modality="mr").image
    inside = (clean > 0.05) & (clean < 0.95)  # away from clipping
    assert abs((noisy - clean)[inside].std() - DEFAULT_NOISE) < 0.002
    assert np.array_equal(clean, make_phantom(5, modality="mr", noise=0.0).image)


def test_every_modality_region_size_intensity_and_count_is_reachable():
    seen, counts, modalities = set(), set(), []
    for seed in range(500):
        p = make_phantom(seed, size=16)
        modalities.append(p.modality)
        counts.add((p.modality, len(p.findings)))
        seen.update((p.modality, f.region, f.size, f.intensity) for f in p.findings)
        assert len({f.region for f in p.findings}) == len(p.findings) <= 3
        assert p.findings == canonical_findings(p.findings)
    assert seen == set(itertools.product(MODALITIES, REGIONS, SIZES, INTENSITIES))
    assert counts == set(itertools.product(MODALITIES, range(4)))
    shares = np.array([modalities.count(m) for m in MODALITIES]) / len(modalities)
    assert shares.min() > 0.14 and shares.max() < 0.26  # uniform over the five looks


def test_attributes_are_json_and_match_findings():
    p = make_phantom(21, num_findings=2)
    record = json.loads(json.dumps(p.attributes()))
    assert record["modality"] == p.modality and record["count"] == 2
    assert [Finding(**f) for f in record["findings"]] == list(p.findings)


def test_large_findings_are_twice_the_small_ones():
    # 14 vs 7 px radius at 128: the area ratio of the finding masks is about 4
    areas = {}
    for size_name in SIZES:
        img = np.zeros((128, 128), np.float32)
        ph._draw_finding(
            img, Finding("left upper", size_name, "bright"), "mr", 1.0, np.random.default_rng(0), 128
        )
        areas[size_name] = (img > 0.5).sum()
    assert 3.2 < areas["large"] / areas["small"] < 4.8
    assert 120 < areas["small"] < 190  # pi * 7^2 = 154


def test_bad_arguments_raise_input_error():
    for kwargs in ({"modality": "pet"}, {"num_findings": 4}, {"size": 8}, {"noise": -0.1}):
        with pytest.raises(InputError):
            make_phantom(0, **kwargs)
    with pytest.raises(InputError):
        make_phantom(-1)
    with pytest.raises(InputError, match="region"):
        Finding("middle", "small", "bright")
    assert make_phantom(4, modality="MRI").modality == "mr"


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_template_parses_back(modality):
    rng = np.random.default_rng(0)
    for template in range(len(pt._CAPTION_TEMPLATES)):
        for _ in range(25):  # random finding sets and synonym draws
            count = int(rng.integers(1, 4))
            regions = rng.choice(len(REGIONS), size=count, replace=False)
            findings = [
                Finding(REGIONS[r], SIZES[rng.integers(2)], INTENSITIES[rng.integers(2)]) for r in regions
            ]
            text = caption_for(modality, findings, rng, template=template)
            assert parse_caption(text) == (modality, canonical_findings(findings)), text
            assert pt._COUNT_WORDS[count] in text
    for template in range(len(pt._NORMAL_TEMPLATES)):
        text = caption_for(modality, (), rng, template=template)
        assert parse_caption(text) == (modality, ()), text
        assert "no " in text.lower() or "zero" in text.lower()


def test_captions_use_several_phrasings():
    texts = {make_phantom(s, modality="ct", num_findings=1).caption.split()[0] for s in range(40)}
    assert len(texts) >= 4


def test_parse_near_misses():
    assert parse_caption(
        "ct shows small bright nodule upper-left and a LARGE hypodense cyst in right lower"
    ) == (
        "ct",
        (Finding("left upper", "small", "bright"), Finding("right lower", "large", "dark")),
    )
    # no separators between two findings: each attribute goes to the nearest region
    got = parse_caption("mri big dark lesion left lower small bright focus right upper")
    assert got == ("mr", (Finding("right upper", "small", "bright"), Finding("left lower", "large", "dark")))
    # a finding without a size is dropped, a repeated region keeps its first mention
    text = "X-ray: a bright opacity in the left upper; a small dark lucency in the right lower; large bright right lower"
    assert parse_caption(text) == ("xray", (Finding("right lower", "small", "dark"),))
    assert parse_caption("the weather is nice") == (None, ())
    assert parse_caption("H&E slide, no abnormality") == ("histology", ())
    assert parse_caption("retinal photograph")[0] == "fundus"


# ----------------------------------------------------------------------------- reader


def test_reader_is_exact_on_1000_clean_images():
    t0 = time.perf_counter()
    wrong = [s for s in range(1000) if read_phantom((p := make_phantom(s)).image) != (p.modality, p.findings)]
    assert len(wrong) <= 10, f"reader missed seeds {wrong[:20]}"
    assert time.perf_counter() - t0 < 60


def test_reader_survives_blur_and_noise():
    # measured on seeds 0-999: 100% after blur sigma=1 px + noise 0.02, 100% at sigma 2 + 0.05, 99.8% at sigma 3
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(5000, 5300):
        p = make_phantom(seed)
        hits += read_phantom(_blur_noise(p.image, rng, 1.0, 0.02)) == (p.modality, p.findings)
    assert hits / 300 >= 0.99


def test_reader_accepts_layouts_sizes_and_tensors():
    for modality in MODALITIES:
        p = make_phantom(77, modality=modality, num_findings=2)
        truth = (modality, p.findings)
        rgb = p.image if p.image.ndim == 3 else np.repeat(p.image[..., None], 3, -1)
        assert read_phantom(rgb) == truth
        assert read_phantom(np.moveaxis(rgb, -1, 0)) == truth
        assert read_phantom(torch.from_numpy(np.moveaxis(rgb, -1, 0).copy())) == truth
        assert read_phantom(p.image, modality=modality) == truth
        for size in (64, 256):
            q = make_phantom(77, modality=modality, num_findings=2, size=size)
            assert read_phantom(q.image) == truth
    gray = make_phantom(78, modality="fundus", num_findings=1)
    assert read_phantom(gray.image @ ph.LUMA) == ("fundus", gray.findings)  # luminance-only input


def test_reader_rejects_bad_images():
    for bad in (
        np.zeros((16, 16)),
        np.zeros((2, 64, 64, 3)),
        np.zeros((64, 64, 4)),
        np.full((64, 64), np.nan),
    ):
        with pytest.raises(InputError, match="read_phantom"):
            read_phantom(bad)


def test_reader_sees_nothing_on_flat_images():
    modality, findings = read_phantom(np.full((128, 128), 0.5, np.float32), modality="ct")
    assert modality == "ct" and findings == ()


# ----------------------------------------------------------------------------- VQA


def test_questions_have_closed_answers_that_match():
    rng = np.random.default_rng(0)
    for seed in range(60):
        p = make_phantom(seed, size=16)
        qa = phantom_questions(p, rng)
        assert all(a in ANSWERS for _, a in qa)
        answers = dict(qa)
        assert pt._COUNT_WORDS[len(p.findings)] in answers.values()
        for region in REGIONS:
            asked = [a for q, a in qa if q.startswith("Is there") and region in q]
            assert asked == ["yes" if region in {f.region for f in p.findings} else "no"]
        for _, a in qa:
            assert answer_matches(a, a) and answer_matches(a.upper() + ".", a)


def test_answer_matching_synonyms():
    assert answer_matches("Yes, there is.", "yes") and not answer_matches("No.", "yes")
    assert answer_matches("There is no lesion there", "no")
    assert answer_matches("No findings", "zero") and answer_matches("2", "two")
    assert answer_matches("This is an MRI.", "MR") and answer_matches("a chest radiograph", "X-ray")
    assert answer_matches("upper-left", "left upper") and not answer_matches("upper right", "left upper")
    assert answer_matches("It is hyperdense", "bright") and not answer_matches("small", "large")
    assert not answer_matches("I don't know", "yes") and not answer_matches("yes", "maybe")


# ----------------------------------------------------------------------------- dataset


def test_dataset_items():
    ds = PhantomDataset(6, seed=0, size=64)
    item = ds[2]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert item["source"] == "phantom:0:2" and item["index"] == 2
    assert item["caption"] == ds.phantom(2).caption and item["modality"] == ds.phantom(2).modality
    assert torch.equal(ds[-4]["image"], item["image"]) and len(ds) == 6
    image = torch.from_numpy(ds.phantom(2).image)
    expected = image.permute(2, 0, 1) if image.ndim == 3 else image.expand(3, -1, -1)
    assert torch.allclose(item["image"], expected * 2 - 1)
    with pytest.raises(IndexError):
        ds[6]


def test_dataset_grayscale_repeat_and_luminance():
    gray = PhantomDataset(8, size=32, channels=3, modalities=["ct"])[0]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    one = PhantomDataset(8, size=32, channels=1, modalities=["fundus"])
    p, item = one.phantom(0), one[0]
    assert item["image"].shape == (1, 32, 32)
    assert torch.allclose(item["image"][0], torch.from_numpy(p.image @ ph.LUMA) * 2 - 1, atol=1e-5)


def test_train_and_held_out_never_overlap():
    train, held = PhantomDataset(200, seed=0, size=16), PhantomDataset(200, seed=1, size=16)
    seeds = {ph.dataset_seed(0, i) for i in range(200)}
    assert seeds.isdisjoint(ph.dataset_seed(1, i) for i in range(200))
    assert not torch.equal(train[0]["image"], held[0]["image"])
    assert {train[i]["source"] for i in range(3)}.isdisjoint(held[i]["source"] for i in range(3))


def test_dataset_modalities_and_validation():
    ds = PhantomDataset(30, size=16, modalities=("mr", "X-ray"))
    assert {ds[i]["modality"] for i in range(30)} == {"mr", "xray"}
    for kwargs in ({"channels": 2}, {"modalities": ["pet"]}, {"modalities": []}, {"size": 8}, {"seed": -1}):
        with pytest.raises(InputError):
            PhantomDataset(4, **kwargs)


@pytest.mark.slow
def test_generation_speed_one_core():
    for s in range(20):
        make_phantom(s)
    t0 = time.process_time()
    for s in range(500):
        make_phantom(s)
    assert 500 / (time.process_time() - t0) >= 200
