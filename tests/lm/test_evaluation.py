"""lm/evaluation.py and lm/held_out.py: held-out items, a perfect "model" scores 100%, bad outputs count as wrong, determinism."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import lm
import lm.evaluation as ev
from lm.data import text_to_image_prompt
from lm.evaluation import evaluate_generation, evaluate_understanding
from lm.held_out import GenerationEvalConfig, PhantomItems, ShardItems, UnderstandingEvalConfig
from tokenizer.api import create_tokenizer
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.encode import row_metadata
from tokenizer.errors import InputError
from tokenizer.shards import ShardWriter
from tokenizer.text_encoder import TextEncoderConfig

N = 5


@pytest.fixture(scope="module")
def model():
    tokenizer = create_tokenizer("tiny", text_encoder=TextEncoderConfig(), embed_dim=64).eval()
    return lm.create_model("tiny", tokenizer)


@pytest.fixture(scope="module")
def items(model):
    return PhantomItems(N, 1, model)


def _codes_of(model, items) -> torch.Tensor:
    pixels = torch.stack([items[i].image for i in range(len(items))])
    return model.image_tokenizer.encode_to_codes(pixels)


def _nearest(table: torch.Tensor, codes: torch.Tensor) -> int:
    """Index of the table entry (N, K, h, w) closest to codes (K, h, w) in Hamming distance."""
    return int((table != codes.to(table.device)).flatten(1).sum(1).argmin())


def test_configs_validate():
    with pytest.raises(InputError, match="num_prompts"):
        GenerationEvalConfig(num_prompts=0)
    with pytest.raises(InputError, match="cfg_scales"):
        GenerationEvalConfig(cfg_scales=[])
    with pytest.raises(InputError, match="distinct"):
        GenerationEvalConfig(cfg_scales=[3, 3.0])
    with pytest.raises(InputError, match="top_p"):
        GenerationEvalConfig(top_p=0.0)
    for interval in ([0.5, 0.2], [0.0, 0.5, 1.0], [-0.1, 1.0]):
        with pytest.raises(InputError, match="cfg_interval"):
            GenerationEvalConfig(cfg_interval=interval)
    with pytest.raises(InputError, match="batch_size"):
        UnderstandingEvalConfig(batch_size=0)
    with pytest.raises(InputError, match="max_questions"):
        UnderstandingEvalConfig(max_questions=0)


def test_phantom_items_are_held_out_and_match_encoding(model, items):
    dataset = PhantomDataset(N, seed=1, size=32)
    train = PhantomDataset(N, seed=0, size=32)
    for i in range(N):
        item = items[i]
        assert item.caption == dataset.phantom(i).caption != train.phantom(i).caption
        assert torch.equal(item.image, dataset[i]["image"]) and item.source == f"phantom:1:{i}"
        # the QA pairs tools/encode_dataset.py writes for the same row
        assert [list(qa) for qa in item.qa] == [
            [q["question"], q["answer"]] for q in row_metadata(dataset, i)["qa"]
        ]


def test_perfect_understanding_scores_100_percent(model, items, monkeypatch):
    table = _codes_of(model, items)

    def describe(m, codes, question=None, **kwargs):
        questions = question if isinstance(question, list) else [question] * len(codes)
        answers = []
        for c, q in zip(codes, questions, strict=True):
            item = items[_nearest(table, c)]
            answers.append(item.caption if q is None else dict(item.qa)[q])
        return answers

    monkeypatch.setattr(ev, "describe_image", describe)
    results = evaluate_understanding(model, UnderstandingEvalConfig(num_images=N, batch_size=2, num_grid=3))
    cap = results.captioning
    assert cap["bleu4"] == pytest.approx(1.0) and cap["rouge_l"] == pytest.approx(1.0)
    a = cap["attributes"]
    assert (a["n"], a["modality"], a["count"], a["findings"], a["exact"], a["unreadable"]) == (
        N,
        1,
        1,
        1,
        1,
        0,
    )
    assert results.vqa["accuracy"] == 1.0 and results.vqa["n"] == sum(len(items[i].qa) for i in range(N))
    assert sum(c["n"] for c in cap["per_modality"].values()) == N
    zs = results.zero_shot  # random text encoder: only the bookkeeping is checked
    assert zs["modality"]["n"] == N and 0 <= zs["modality"]["accuracy"] <= 1
    assert results.grid["images"].shape == (3, 3, 32, 32) and len(results.grid["reports"]) == 3
    json.dumps(results.to_dict(), allow_nan=False)


def test_bad_reports_count_as_wrong(model, monkeypatch):
    monkeypatch.setattr(
        ev,
        "describe_image",
        lambda m, codes, question=None, **kw: ["", "��"] * (len(codes) // 2) + [""] * (len(codes) % 2),
    )
    results = evaluate_understanding(model, UnderstandingEvalConfig(num_images=3, zero_shot=False))
    a = results.captioning["attributes"]
    assert a["exact"] == 0 and a["unreadable"] == 3 and results.captioning["bleu4"] == 0.0
    assert results.vqa["accuracy"] == 0.0 and results.zero_shot is None
    assert results.captioning["empty_reports"] == 2


def test_perfect_generation_matches_real_images(model, items, monkeypatch):
    """A "model" that returns the real image of each prompt: reader = its ceiling, FID ~ 0, P = R = 1."""
    seen_prompts, seen_negatives = [], []
    real = torch.stack([items[i].image for i in range(N)])
    detokenize = ev.detokenize

    def generate(lm_, rows, sampling, seed, negative_prompts=None):
        if negative_prompts is not None:
            assert len(negative_prompts) == len(rows)
            seen_negatives.extend(model.text_tokenizer.decode(n[1:, 0].tolist()) for n in negative_prompts)
        picks = []
        for row in rows:
            text = model.text_tokenizer.decode(row[1:, 0].tolist())
            seen_prompts.append(text)
            picks.append(next(i for i in range(N) if text.endswith(items[i].caption)))
        v = model.vocab
        return torch.tensor(picks)[:, None, None, None].expand(-1, v.num_codebooks, *v.grid).clone()

    def fake_detokenize(codes, tokenizer):
        flat = codes.flatten(1)
        if bool((flat == flat[:, :1]).all()):  # the fake's codes: one index everywhere
            return real[flat[:, 0]].clone()
        return detokenize(codes, tokenizer)

    monkeypatch.setattr(ev, "generate_image_codes", generate)
    monkeypatch.setattr(ev, "detokenize", fake_detokenize)
    cfg = GenerationEvalConfig(num_prompts=N, cfg_scales=[1.0, 2.0], batch_size=3, kid_subsets=4, num_grid=2)
    results = evaluate_generation(model, cfg)
    expected = {text_to_image_prompt(items[i].caption, items[i].modality) for i in range(N)}
    assert set(seen_prompts) == expected and len(seen_prompts) == 2 * N  # training layout, item modality
    ceiling = results.reference["reader_real"]
    assert ceiling["n"] == N and ceiling["exact"] >= 0.8
    for scale in ("1", "2"):
        m = results.scales[scale]
        assert m["attributes"] == ceiling
        assert m["fid"] == pytest.approx(0.0, abs=1e-5) and m["precision"] == 1.0 and m["recall"] == 1.0
        assert m["alignment"] == pytest.approx(results.reference["alignment_real"], abs=1e-5)
        assert math.isfinite(m["kid"]) and sum(a["n"] for a in m["per_modality"].values()) == N
    assert torch.equal(results.grid["1"], real[:2]) and results.grid["captions"] == [
        items[i].caption for i in range(2)
    ]
    assert results.samples[0]["cfg_1"]["exact"] == (
        results.samples[0]["cfg_1"]["read"] == results.samples[0]["truth"]
    )
    assert not seen_negatives and results.settings["sampling"]["negative_prompt"] is None
    # a negative prompt is laid out like each prompt, with its modality (the engine ignores it at scale 1)
    negative = dataclasses.replace(cfg, negative_prompt="No abnormality is seen.")
    results = evaluate_generation(model, negative)
    laid_out = [text_to_image_prompt("No abnormality is seen.", items[i].modality) for i in range(N)]
    assert sorted(seen_negatives) == sorted(laid_out * 2)  # once per scale
    assert results.settings["sampling"]["negative_prompt"] == "No abnormality is seen."
    with pytest.raises(InputError, match="negative_prompt"):
        GenerationEvalConfig(negative_prompt=" ")


def test_non_finite_images_do_not_crash(model, monkeypatch):
    detokenize = ev.detokenize
    calls = []

    def nan_detokenize(codes, tokenizer):
        calls.append(1)
        images = detokenize(codes, tokenizer)
        return images if len(calls) % 2 else torch.full_like(images, float("nan"))  # every generated batch

    monkeypatch.setattr(ev, "detokenize", nan_detokenize)
    results = evaluate_generation(model, GenerationEvalConfig(num_prompts=2, cfg_scales=[1.0], kid_subsets=2))
    m = results.scales["1"]
    assert m["attributes"]["unreadable"] == 2 and m["attributes"]["exact"] == 0.0
    data = results.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["scales"]["1"]["alignment"] is None


def test_generation_is_deterministic(model):
    cfg = GenerationEvalConfig(num_prompts=2, cfg_scales=[3.0], kid_subsets=2, seed=7)
    first, second = evaluate_generation(model, cfg), evaluate_generation(model, cfg)
    assert torch.equal(first.grid["3"], second.grid["3"])
    assert first.samples == second.samples


def test_guidance_interval_reaches_sampling(model):
    """Guidance on no position (interval [1, 1]) draws what no guidance draws; on every position, not."""
    base = {"num_prompts": 2, "kid_subsets": 2, "seed": 7}
    plain = evaluate_generation(model, GenerationEvalConfig(cfg_scales=[1.0], **base)).grid["1"]
    nowhere = GenerationEvalConfig(cfg_scales=[8.0], cfg_interval=[1.0, 1.0], **base)
    assert torch.allclose(evaluate_generation(model, nowhere).grid["8"], plain, atol=1e-5)
    everywhere = evaluate_generation(model, GenerationEvalConfig(cfg_scales=[8.0], **base)).grid["8"]
    assert not torch.allclose(everywhere, plain, atol=1e-3)


def test_shard_items(model, items, tmp_path, monkeypatch):
    dataset = PhantomDataset(N, seed=1, size=32)
    codes = _codes_of(model, items).cpu()
    v = model.vocab
    writer = ShardWriter(tmp_path / "held", num_rows=N, K=v.num_codebooks, V=v.codebook_size, grid=v.grid,
                         tokenizer_config={})  # fmt: skip
    records = [row_metadata(dataset, i, split="val" if i < 3 else "train") for i in range(N)]
    writer.write(list(range(N)), codes.numpy().astype(np.uint16), records)
    writer.close()
    writer.finalize()
    shard = ShardItems(str(tmp_path / "held"), 10, model, split="val")
    assert len(shard) == 3
    item = shard[1]
    assert item.caption == items[1].caption and item.truth == items[1].truth and item.qa == items[1].qa
    assert torch.equal(item.codes, codes[1]) and item.image is None and item.source == "held:1"

    def describe(m, c, question=None, **kwargs):
        questions = question if isinstance(question, list) else [question] * len(c)
        return [items[_nearest(codes, x)].caption if q is None else dict(items[_nearest(codes, x)].qa)[q]
                for x, q in zip(c, questions, strict=True)]  # fmt: skip

    monkeypatch.setattr(ev, "describe_image", describe)
    cfg = UnderstandingEvalConfig(num_images=10, shard=str(tmp_path / "held"), shard_split="val", num_grid=2)
    results = evaluate_understanding(model, cfg)
    assert results.settings["items"] == "shard" and len(results.samples) == 3
    assert results.captioning["attributes"]["exact"] == 1.0 and results.vqa["accuracy"] == 1.0
    with pytest.raises(InputError, match="no captioned rows"):
        ShardItems(str(tmp_path / "held"), 10, model, split="test")
    other = lm.create_model("tiny", create_tokenizer("tiny", quantizer={"codebook_size": 32}))
    with pytest.raises(InputError, match="V=16"):
        ShardItems(str(tmp_path / "held"), 10, other)
