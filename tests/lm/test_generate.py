from dataclasses import replace

import pytest
import torch

from lm.config import lm_config
from lm.generate import (
    DepthCache,
    KVCache,
    SamplingConfig,
    _backbone_step,
    _generate,
    _image_position,
    exponential_noise,
    generate_image_codes,
    generate_tokens,
    sample,
    unconditional_prompt,
)
from lm.model import DecoderLM
from lm.vocab import Vocab
from tokenizer.errors import InputError

VOCAB = Vocab(num_text=40, num_codebooks=2, codebook_size=16, grid=(2, 2))
HW = VOCAB.image_length
GREEDY = dict(text_temperature=0.0, image_temperature=0.0)


@pytest.fixture(scope="module")
def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(lm_config("tiny"), VOCAB).eval()


def prompts() -> list[torch.Tensor]:
    """Different lengths (left padding), one ending in text, one inside an image, one right after <boi>."""
    codes = VOCAB.codes_to_ids(torch.tensor([[3, 5]]))
    return [
        VOCAB.text_rows([VOCAB.bos, 3, 4, 5, 6, 7]),
        torch.cat([VOCAB.text_rows([VOCAB.bos, 9, VOCAB.boi]), codes]),
        VOCAB.text_rows([VOCAB.bos, VOCAB.boi]),
    ]


def check_structure(seq: torch.Tensor) -> int:
    """Assert every image span is <boi>, exactly h*w image rows, <eoi>; return the number of complete images."""
    first = seq[:, 0].tolist()
    images, t = 0, 0
    while t < len(first):
        if VOCAB.is_image(torch.tensor(first[t])):
            raise AssertionError(f"image row {t} outside a span")
        if first[t] == VOCAB.boi:
            span = seq[t + 1 : t + 1 + HW]
            if t + 1 + HW >= len(first):  # an unfinished image may only end the sequence
                assert bool(VOCAB.is_image(span[:, 0]).all())
                return images
            assert bool(VOCAB.is_image(span[:, 0]).all()), f"span at {t} has non-image rows"
            VOCAB.ids_to_codes(span)  # column k holds sub-code k
            assert first[t + 1 + HW] == VOCAB.eoi, f"no <eoi> after {HW} positions at {t}"
            images, t = images + 1, t + 2 + HW
        else:
            t += 1
    return images


def test_kv_cache_equals_full_recompute(model):
    sampling = SamplingConfig(**GREEDY, max_new_tokens=16)
    cached = generate_tokens(model, prompts(), sampling, seed=0)
    recomputed = generate_tokens(model, prompts(), sampling, seed=0, use_cache=False)
    alone = [generate_tokens(model, [p], sampling, seed=0, use_cache=False)[0] for p in prompts()]
    for c, r, a in zip(cached, recomputed, alone, strict=True):
        assert torch.equal(c, r) and torch.equal(c, a)
    seqs = [torch.cat([p, c]) for p, c in zip(prompts(), cached, strict=True)]
    assert all(check_structure(s) >= 1 for s in seqs[1:])  # image spans completed after the prompt
    for c in cached[1:]:  # and text follows the image in the same batch
        after = c[int((c[:, 0] == VOCAB.eoi).nonzero()[0]) :, 0]
        assert bool(VOCAB.is_text(after).any())


def test_narrow_depth_head_generates_and_trains():
    torch.manual_seed(0)
    narrow = DecoderLM(lm_config("tiny", depth_dim=16), VOCAB).eval()
    assert narrow.depth.head.shape == (2, 16, 16) and narrow.depth.proj.weight.shape == (16, 32)
    sampling = SamplingConfig(**GREEDY, max_new_tokens=16)
    cached = generate_tokens(narrow, prompts(), sampling, seed=0)
    recomputed = generate_tokens(narrow, prompts(), sampling, seed=0, use_cache=False)
    for p, c, r in zip(prompts(), cached, recomputed, strict=True):
        assert torch.equal(c, r)
        check_structure(torch.cat([p, c]))
    hidden, codes = torch.randn(5, 32), torch.randint(0, 16, (5, 2))
    teacher = narrow.depth_logits(hidden, codes)  # the training path agrees with step-by-step decoding
    cache = DepthCache(narrow, 5)
    step0 = narrow.depth_decode(hidden, 0, cache)
    step1 = narrow.depth_decode(narrow.subcode_embedding(codes[:, 0], 0), 1, cache)
    torch.testing.assert_close(torch.stack([step0, step1], 1), teacher, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="depth_dim"):
        lm_config("tiny", depth_dim=12)  # not a multiple of the head dim 8


def test_cache_bookkeeping(model):
    cache = KVCache.for_model(model, batch_size=2, max_len=6)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    positions, attn = cache.begin(mask)
    assert positions.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert attn.shape == (2, 1, 3, 6)
    assert attn[0, 0].tolist()[2] == [False, True, True, False, False, False]
    assert attn[0, 0].tolist()[0] == [True, False, False, False, False, False]  # a pad query sees itself only
    positions, attn = cache.begin(torch.tensor([[True], [False]]))
    assert positions[0].tolist() == [2] and cache.length == 4
    assert cache.next_pos.tolist() == [3, 3]  # the padded step does not advance row 1
    with pytest.raises(InputError, match="overflows"):
        cache.begin(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="max_seq_len"):
        KVCache.for_model(model, 1, model.config.max_seq_len + 1)


def test_decode_step_functions_trace_without_graph_breaks(model):
    """What ``compile=True`` compiles: dynamo captures each function whole (fullgraph raises on a graph
    break) and the captured graph, run eagerly, gives the eager result and the same cache state."""
    guided = SamplingConfig(cfg_scale=3.0, image_top_k=4)
    rows = VOCAB.text_rows([VOCAB.bos, 3]).expand(4, 2, VOCAB.num_codebooks)
    results = []
    for trace in (False, True):
        torch._dynamo.reset()
        backbone_step, image_position = _backbone_step, _image_position
        if trace:
            backbone_step = torch.compile(_backbone_step, backend="eager", fullgraph=True, dynamic=False)
            image_position = torch.compile(_image_position, backend="eager", fullgraph=True, dynamic=False)
        cache = KVCache.for_model(model, batch_size=4, max_len=8)
        model(rows, torch.full((4, 2), -1), kv_cache=cache)
        for _ in range(2):  # the second step reuses the first step's graph (a recompile would raise)
            cache.advance()
            with torch._dynamo.config.patch(error_on_recompile=True):
                hidden = backbone_step(
                    model, rows[:, 0], torch.full((4,), -1), torch.tensor([1, 1, 0, 1]).bool(), cache
                )
        noise = exponential_noise((VOCAB.num_codebooks, 2, 4), torch.Generator().manual_seed(0), "cpu")
        codes = image_position(model, hidden, torch.tensor([0, 1]), noise, DepthCache(model, 4), guided, True)
        results.append((hidden, codes, cache.length, cache.key_valid.clone()))
    eager, traced = results
    torch.testing.assert_close(eager[0], traced[0])
    assert torch.equal(eager[1], traced[1]) and eager[2] == traced[2] == 4
    assert traced[3][:, :4].tolist() == [[True] * 4] * 2 + [[True, True, False, False]] + [[True] * 4]


@pytest.mark.slow
def test_compiled_generation_equals_eager(model):
    """Inductor-compiled decode steps: greedy tokens equal eager ones (batch with left padding, guidance)."""
    for sampling in (SamplingConfig(**GREEDY, max_new_tokens=16), SamplingConfig(**GREEDY, cfg_scale=3.0)):
        force = sampling.cfg_scale != 1.0
        eager = generate_tokens(model, prompts(), sampling, seed=0, force_image=force)
        compiled = generate_tokens(model, prompts(), sampling, seed=0, force_image=force, compile=True)
        assert all(torch.equal(e, c) for e, c in zip(eager, compiled, strict=True))


def test_images_have_exactly_hw_positions_and_boi_needs_room(model, monkeypatch):
    text_logits = model.text_logits

    def boi_loving(hidden):  # a model that always wants to start an image
        logits = text_logits(hidden).clone()
        logits[..., VOCAB.boi] += 100.0
        return logits

    monkeypatch.setattr(model, "text_logits", boi_loving)
    text_prompt = [VOCAB.text_rows([VOCAB.bos, 5])] * 3
    for budget, images in ((HW + 1, 0), (HW + 2, 1), (2 * (HW + 2) + 1, 2), (2 * (HW + 2) + HW + 1, 2)):
        outs = generate_tokens(
            model, text_prompt, SamplingConfig(max_new_tokens=budget), seed=1, stop_at_eos=False
        )
        for out in outs:
            assert out.shape[0] == budget
            assert check_structure(out) == images
            assert int((out[:, 0] == VOCAB.boi).sum()) == images  # never a <boi> without room


def test_a_stop_id_ends_a_sequence_where_it_is_sampled(model):
    text_prompt = [VOCAB.text_rows([VOCAB.bos, 5])]
    sampling = SamplingConfig(text_temperature=0.0, max_new_tokens=HW)
    free = generate_tokens(model, text_prompt, sampling, seed=0, stop_at_eos=False)[0][:, 0].tolist()
    at = next(i for i, t in enumerate(free) if t < VOCAB.num_text)  # the first text id sampled
    stopped = generate_tokens(model, text_prompt, sampling, seed=0, stop_at_eos=False, stop_ids=[free[at]])
    assert stopped[0][:, 0].tolist() == free[: at + 1] and at + 1 < len(free)  # the same run, cut after it


def test_sampled_generation_structure_and_determinism(model):
    runs = (
        (SamplingConfig(text_top_k=20, image_top_p=0.9, max_new_tokens=3 * (HW + 2)), False),
        (SamplingConfig(text_top_p=0.8, image_top_k=5, cfg_scale=2.0, max_new_tokens=2 * (HW + 2)), True),
    )
    for sampling, force_image in runs:
        a = generate_tokens(model, prompts(), sampling, seed=7, force_image=force_image)
        b = generate_tokens(model, prompts(), sampling, seed=7, force_image=force_image)
        c = generate_tokens(model, prompts(), sampling, seed=8, force_image=force_image)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
        for i, (p, out) in enumerate(zip(prompts(), a, strict=True)):
            assert check_structure(torch.cat([p, out])) >= int(force_image or i > 0)


def test_guidance_uses_the_unconditional_prompt(model, monkeypatch):
    assert torch.equal(unconditional_prompt(VOCAB, prompts()[2]), VOCAB.text_rows([VOCAB.bos, VOCAB.boi]))
    started = prompts()[1]
    assert torch.equal(
        unconditional_prompt(VOCAB, started),
        torch.cat([VOCAB.text_rows([VOCAB.bos, VOCAB.boi]), started[-1:]]),
    )
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: seen.append(a) or forward(*a, **kw))
    generate_tokens(
        model, prompts(), SamplingConfig(cfg_scale=3.0, max_new_tokens=HW + 1), seed=0, force_image=True
    )
    tokens, image_pos, mask = seen[0]  # the prefill batch: 3 conditional rows, then their 3 partners
    assert tokens.shape[0] == 6
    bos_boi = VOCAB.text_rows([VOCAB.bos, VOCAB.boi])
    partners = [bos_boi, torch.cat([bos_boi, prompts()[1][-1:]]), bos_boi]  # prompt 0 got a forced <boi>
    for row, partner in enumerate(partners):
        n = partner.shape[0]
        assert torch.equal(tokens[3 + row, -n:], partner)
        assert not bool(mask[3 + row, :-n].any()) and bool(mask[3 + row, -n:].all())
        assert image_pos[3 + row, -n:].tolist() == [-1, -1] + list(range(n - 2))
    assert all(step[0].shape[:2] == (6, 1) for step in seen[1:])  # every decode step runs the doubled batch


def test_guidance_against_negative_prompts(model, monkeypatch):
    negative = VOCAB.text_rows([VOCAB.bos, 11, 12])
    started = prompts()[1]
    partner = unconditional_prompt(VOCAB, started, negative)
    assert torch.equal(partner, torch.cat([negative, VOCAB.text_rows([VOCAB.boi]), started[-1:]]))
    with pytest.raises(InputError, match="negative prompt"):
        unconditional_prompt(VOCAB, started, VOCAB.text_rows([VOCAB.bos, VOCAB.boi]))
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: seen.append(a) or forward(*a, **kw))
    sampling = SamplingConfig(**GREEDY, cfg_scale=8.0)
    guided = generate_image_codes(model, prompts(), sampling, seed=0, negative_prompts=[negative] * 3)
    tokens, image_pos, _ = seen[0]
    n = partner.shape[0]
    assert torch.equal(tokens[4, -n:], partner) and image_pos[4, -n:].tolist() == [-1, -1, -1, -1, 0]
    assert not torch.equal(guided, generate_image_codes(model, prompts(), sampling, seed=0))
    plain = replace(sampling, cfg_scale=1.0)  # no guidance: the negative prompts have nothing to do
    unguided = generate_image_codes(model, prompts(), plain, seed=0, negative_prompts=[negative] * 3)
    assert torch.equal(unguided, generate_image_codes(model, prompts(), plain, seed=0))
    with pytest.raises(InputError, match="negative_prompts: 1 for 3"):
        generate_image_codes(model, prompts(), sampling, seed=0, negative_prompts=[negative])


def test_guidance_scale_one_equals_no_guidance_and_scale_matters(model):
    for kwargs in (GREEDY, {}):
        sampling = SamplingConfig(**kwargs, max_new_tokens=2 * HW + 3)
        plain = generate_tokens(model, prompts(), sampling, seed=3, force_image=True)
        doubled = _generate(model, prompts(), sampling, 3, [VOCAB.eos], True, True, True, False)
        assert all(torch.equal(x, y) for x, y in zip(plain, doubled, strict=True))
    strong = SamplingConfig(**GREEDY, cfg_scale=8.0, max_new_tokens=HW + 1)
    plain = generate_image_codes(model, prompts(), SamplingConfig(**GREEDY), seed=0)
    guided = generate_image_codes(model, prompts(), strong, seed=0)
    assert not torch.equal(plain, guided)
    interval = SamplingConfig(
        **GREEDY, cfg_scale=8.0, cfg_interval=(1.0, 1.0)
    )  # empty interval -> no guidance
    assert torch.equal(generate_image_codes(model, prompts(), interval, seed=0), plain)


def test_generate_image_codes(model):
    codes = generate_image_codes(model, prompts(), SamplingConfig(cfg_scale=2.0), seed=0)
    assert codes.shape == (3, VOCAB.num_codebooks, *VOCAB.grid)
    assert codes.min() >= 0 and codes.max() < VOCAB.codebook_size
    # the second prompt already holds the first image position; it is kept
    assert codes[1, :, 0, 0].tolist() == [3, 5]


def test_sample_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, 1.0, float("-inf")]]).repeat(2000, 1)
    assert sample(logits, 0.0, 0, 1.0, g).unique().tolist() == [1]
    assert sample(logits, 1.0, 1, 1.0, g).unique().tolist() == [1]
    assert sample(logits, 1.0, 0, 0.5, g).unique().tolist() == [1]  # p(1) = 0.67 covers the nucleus
    draws = sample(logits, 1.0, 0, 1.0, g)
    freq = torch.bincount(draws, minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.04, rtol=0)
    assert set(sample(logits, 1.0, 2, 1.0, g).unique().tolist()) == {1, 2}


def test_bad_prompts_and_settings_raise(model):
    greedy = SamplingConfig(**GREEDY, max_new_tokens=8)
    codes = VOCAB.codes_to_ids(torch.tensor([[1, 2]]))
    with pytest.raises(InputError, match=r"prompts\[0\].*outside"):
        generate_tokens(model, [torch.cat([VOCAB.text_rows([VOCAB.bos]), codes])], greedy, seed=0)
    with pytest.raises(InputError, match=r"prompts\[1\].*shape"):
        generate_tokens(model, [VOCAB.text_rows([1]), torch.zeros(3, dtype=torch.long)], greedy, seed=0)
    with pytest.raises(InputError, match="needs 5 positions"):
        generate_tokens(model, [VOCAB.text_rows([1, VOCAB.boi])], SamplingConfig(max_new_tokens=4), seed=0)
    with pytest.raises(InputError, match="guidance"):
        generate_tokens(model, [VOCAB.text_rows([1])], SamplingConfig(cfg_scale=2.0), seed=0)
    with pytest.raises(InputError, match="max_seq_len"):
        generate_tokens(model, [VOCAB.text_rows([1])], SamplingConfig(max_new_tokens=10_000), seed=0)
    for bad in (
        {"text_temperature": -1},
        {"image_top_p": 0.0},
        {"cfg_interval": (0.5, 0.2)},
        {"max_new_tokens": 0},
    ):
        with pytest.raises(InputError):
            SamplingConfig(**bad)


def test_hf_backbone_generates(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = DecoderLM(lm_config("tiny", hf_backbone=str(tmp_path)), VOCAB).eval()
    sampling = SamplingConfig(**GREEDY, max_new_tokens=12)
    cached = generate_tokens(model, prompts(), sampling, seed=0)
    recomputed = generate_tokens(model, prompts(), sampling, seed=0, use_cache=False)
    for p, c, r in zip(prompts(), cached, recomputed, strict=True):
        assert torch.equal(c, r)
        check_structure(torch.cat([p, c]))
    assert generate_image_codes(model, prompts(), SamplingConfig(cfg_scale=2.0), seed=0).shape == (3, 2, 2, 2)


@pytest.mark.slow
def test_decode_speed_against_hf_llama():
    """Run: HF_HUB_OFFLINE=1 uv run pytest tests/lm/test_generate.py -m slow -s -k speed

    The reference is HF ``LlamaForCausalLM.generate`` of the same size producing the image as h*w*K flat
    sub-code tokens for the doubled (cond + uncond) batch; ``tools/benchmark.py`` also reports the h*w-token one.
    """
    from tools.bench_lm import decode_ms_per_position

    torch.set_num_threads(1)  # the CPU is shared; one thread keeps both sides comparable
    vocab = Vocab(num_text=256, num_codebooks=2, codebook_size=16, grid=(8, 8))
    model = DecoderLM(lm_config("tiny"), vocab).eval()
    for batch in (1, 8):
        ours, theirs = decode_ms_per_position(model, batch, reps=7)
        print(
            f"\ntiny batch {batch} + guidance: ours {ours:.2f} ms/position, HF generate {theirs:.2f} ms/position"
        )
    assert theirs / ours >= 1.5  # the bar is set at batch 8 with guidance
