import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lm
from lm.api import (
    default_text_tokenizer,
    image_to_text_prompt_tokens,
    phantom_text_corpus,
    report_first_prompt_tokens,
    split_segments,
    text_to_image_prompt_tokens,
)
from lm.data import IMAGE_TO_TEXT_INSTRUCTIONS, REPORT_FIRST_INSTRUCTION, text_to_image_prompt
from lm.generate import SamplingConfig
from lm.text_tokenizer import TextTokenizer
from tokenizer.api import create_tokenizer, tokenize_image
from tokenizer.checkpoint import save_tokenizer
from tokenizer.data.phantoms import make_phantom
from tokenizer.errors import InputError


@pytest.fixture(scope="module")
def model():
    return lm.create_model("tiny", create_tokenizer("tiny").eval())


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("lm") / "model")


def test_public_api_and_default_text_tokenizer(model):
    assert set(lm.__all__) >= {"create_model", "load_model", "UnifiedModel", "generate_image", "describe_image",
                               "generate", "Vocab", "LMConfig", "SamplingConfig"}  # fmt: skip
    corpus = phantom_text_corpus()
    assert default_text_tokenizer() is default_text_tokenizer()  # trained once per process
    text = model.text_tokenizer
    assert model.vocab.num_text == text.vocab_size and text.vocab_size <= 1024
    for sentence in corpus[:50:7]:
        assert text.decode(text.encode(sentence)) == sentence
    caption = make_phantom(5, size=32).caption
    assert len(text.encode(caption)) < len(caption.encode()) / 2  # merges learnt on phantom captions
    with pytest.raises(InputError, match="tokenizer is required"):
        lm.create_model("tiny")
    with pytest.raises(InputError, match="max_seq_len"):
        lm.create_model("tiny", create_tokenizer("tiny"), max_seq_len=32)


def test_prompts_are_laid_out_like_training(model):
    vocab, encode = model.vocab, model.text_tokenizer.encode
    rows = text_to_image_prompt_tokens(model, " two small lesions ", "ct")[:, 0].tolist()
    assert rows == [vocab.bos, *encode(text_to_image_prompt("two small lesions", "ct"))]
    assert text_to_image_prompt_tokens(model, "")[:, 0].tolist() == [vocab.bos]  # unconditional
    codes = torch.randint(0, vocab.codebook_size, (vocab.num_codebooks, *vocab.grid))
    rows = image_to_text_prompt_tokens(model, codes)
    hw = vocab.image_length
    assert rows[:2, 0].tolist() == [vocab.bos, vocab.boi] and rows[hw + 2, 0] == vocab.eoi
    assert torch.equal(vocab.rows_to_image(rows[2 : hw + 2]), codes)
    assert rows[hw + 3 :, 0].tolist() == encode(f"{IMAGE_TO_TEXT_INSTRUCTIONS[0]}\n")
    question = image_to_text_prompt_tokens(model, codes, " How many findings? ")[hw + 3 :, 0].tolist()
    assert question == encode("How many findings?\n")


def test_generate_image_shapes_seed_and_guidance(model):
    images, codes = lm.generate_image(model, ["one small bright nodule", ""], seed=3)
    size = model.image_tokenizer.config.preprocess.image_size
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert codes.shape == (2, model.vocab.num_codebooks, *model.vocab.grid) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < model.vocab.codebook_size
    again, codes_again = lm.generate_image(model, ["one small bright nodule", ""], seed=3)
    assert torch.equal(codes, codes_again) and torch.equal(images, again)
    other = lm.generate_image(model, "one small bright nodule", seed=4)[1]
    assert other.shape[0] == 1 and not torch.equal(other[0], codes[0])
    unguided = lm.generate_image(model, "one small bright nodule", seed=3, cfg_scale=1.0)[1]
    assert not torch.equal(unguided[0], codes[0])
    with pytest.raises(InputError):
        lm.generate_image(model, [])


def test_describe_image_returns_text(model):
    phantom = make_phantom(7, size=32)
    report = lm.describe_image(model, phantom.image, max_new_tokens=12)
    assert isinstance(report, str) and report
    codes = tokenize_image(phantom.image, model.image_tokenizer)
    assert lm.describe_image(model, codes, max_new_tokens=12) == report  # codes are accepted as they are
    answers = lm.describe_image(
        model, [phantom.image, codes], ["How many findings?", None], max_new_tokens=12
    )
    assert isinstance(answers, list) and len(answers) == 2 and answers[1] == report
    sampled = lm.describe_image(model, codes, max_new_tokens=12, temperature=1.0, seed=1)
    assert isinstance(sampled, str)
    with pytest.raises(InputError, match="question: 2 for 1 images"):
        lm.describe_image(model, [codes], ["a?", "b?"])


def test_an_answer_ends_at_its_line_and_a_report_does_not(model, monkeypatch):
    vocab = model.vocab
    said = vocab.text_rows([*model.text_tokenizer.encode("yes\nIs it large?\nno"), vocab.eos])
    monkeypatch.setattr(lm.api, "generate_tokens", lambda lm_, prompts, *a, **k: [said] * len(prompts))
    codes = tokenize_image(make_phantom(7, size=32).image, model.image_tokenizer)
    answer, report = lm.describe_image(model, [codes, codes], ["Is there a lesion?", None])
    assert answer == "yes" and report == "yes\nIs it large?\nno"


def test_describe_then_answer_writes_each_report_once(model, monkeypatch):
    vocab, encode = model.vocab, model.text_tokenizer.encode
    hw, seen = vocab.image_length, []

    def fake(lm_, prompts, *a, **k):  # a report for the report prompt, "yes" after a question
        seen.append(prompts)
        asked = [p[hw + 3 :, 0].tolist() != encode(f"{REPORT_FIRST_INSTRUCTION}\n") for p in prompts]
        said = ["yes\nmore" if a else "Two small lesions.\nIs it?" for a in asked]
        return [vocab.text_rows(encode(t)) for t in said]

    monkeypatch.setattr(lm.api, "generate_tokens", fake)
    one, two = (tokenize_image(make_phantom(s, size=32).image, model.image_tokenizer) for s in (1, 2))
    answers = lm.describe_image(model, [one, two, one], ["Large?", "Bright?", None], report_first=True)
    assert answers == ["yes", "yes", "Two small lesions."]
    assert [len(p) for p in seen] == [2, 2]  # two distinct images: two reports, then two questions
    expected = report_first_prompt_tokens(model, two, "Two small lesions.", "Bright?")
    assert torch.equal(seen[1][1], expected)
    tail = expected[hw + 3 :, 0].tolist()
    assert tail == encode(f"{REPORT_FIRST_INSTRUCTION}\n") + encode("Two small lesions.\n") + encode(
        "Bright?\n"
    )
    given = lm.describe_image(model, one, "Large?", report="One lesion.")
    assert given == "yes" and len(seen) == 3  # a given report is not written again
    with pytest.raises(InputError, match="report: 1 for 2 images"):
        lm.describe_image(model, [one, two], ["a?", "b?"], report=["only one"])
    with pytest.raises(InputError, match="one str per image"):
        lm.describe_image(model, [one, two], ["a?", "b?"], report=["one", 2])
    with pytest.raises(InputError, match="needs the report"):
        report_first_prompt_tokens(model, one, question="Large?")


def test_guidance_against_a_negative_prompt(model, monkeypatch):
    captured = []
    real = lm.api.generate_image_codes

    def spy(lm_, rows, sampling, seed, **kwargs):
        captured.append(kwargs["negative_prompts"])
        return real(lm_, rows, sampling, seed, **kwargs)

    monkeypatch.setattr(lm.api, "generate_image_codes", spy)
    prompts = ["one small bright nodule", "two lesions"]
    codes = lm.generate_image(model, prompts, seed=3, modality="ct", negative_prompt="a large dark cyst")[1]
    assert codes.shape == (2, model.vocab.num_codebooks, *model.vocab.grid)
    expected = text_to_image_prompt_tokens(model, "a large dark cyst", "ct")
    assert len(captured[0]) == 2 and all(torch.equal(n, expected) for n in captured[0])
    lm.generate_image(model, prompts[0], seed=3)
    assert captured[1] is None  # <bos><boi> by default
    same = lm.generate_image(model, prompts[0], seed=3, negative_prompt="")[1]  # "" is <bos><boi>
    assert torch.equal(same, lm.generate_image(model, prompts[0], seed=3)[1])
    with pytest.raises(InputError, match="negative_prompt: 1 for 2"):
        lm.generate_image(model, prompts, negative_prompt=["x"])


def test_generate_interleaved_and_split_segments(model):
    vocab = model.vocab
    codes = torch.randint(0, vocab.codebook_size, (vocab.num_codebooks, *vocab.grid))
    out = lm.generate(model, ["Two scans:", codes, " and"], sampling=SamplingConfig(max_new_tokens=8))
    assert out and all(isinstance(s, str | torch.Tensor) for s in out)
    text = model.text_tokenizer.encode("left lesion")
    rows = torch.cat([
        vocab.text_rows(text), vocab.text_rows([vocab.boi]), vocab.image_rows(codes), vocab.text_rows([vocab.eoi]),
        vocab.text_rows([vocab.eot, *text, vocab.eos, *text]),
    ])  # fmt: skip
    parts = split_segments(model, rows)
    assert parts[0] == "left lesion" and torch.equal(parts[1], codes) and parts[2] == "left lesion"
    assert len(parts) == 3  # specials dropped, nothing after <eos>
    assert split_segments(model, rows[: len(text) + 5]) == ["left lesion"]  # an unfinished image is dropped
    with pytest.raises(InputError, match="guidance"):
        lm.generate(model, ["x"], sampling=SamplingConfig(cfg_scale=2.0))


def test_save_load_gives_identical_generations(model, saved):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "lm.safetensors", "text_tokenizer", "image_tokenizer"} <= names
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "medtok-lm" and config["vocab"] == model.vocab.to_dict()
    loaded = lm.load_model(saved)
    assert not loaded.training and loaded.vocab == model.vocab
    for (name, a), b in zip(model.lm.state_dict().items(), loaded.lm.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    prompt = ["two large dark lesions", "normal chest CT"]
    assert torch.equal(
        lm.generate_image(model, prompt, seed=1)[1], lm.generate_image(loaded, prompt, seed=1)[1]
    )
    codes = torch.randint(0, model.vocab.codebook_size, (model.vocab.num_codebooks, *model.vocab.grid))
    assert lm.describe_image(model, codes, max_new_tokens=10) == lm.describe_image(
        loaded, codes, max_new_tokens=10
    )


def copy_of(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


@pytest.mark.parametrize(
    "change", [{"quantizer": {"codebook_size": 32}}, {"quantizer": {"num_codebooks": 1}}]
)
def test_load_refuses_a_mismatched_image_tokenizer(saved, tmp_path, change):
    directory = copy_of(saved, tmp_path)
    shutil.rmtree(directory / "image_tokenizer")
    save_tokenizer(create_tokenizer("tiny", **change), directory / "image_tokenizer")
    detail = (
        "V: vocab 16 vs tokenizer 32"
        if "codebook_size" in change["quantizer"]
        else "K: vocab 2 vs tokenizer 1"
    )
    with pytest.raises(InputError, match=f"image tokenizer: .*{detail}"):
        lm.load_model(directory)


def test_load_refuses_bad_text_tokenizer_weights_and_config(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    TextTokenizer.train_bpe(["a b c"], vocab_size=256).save(directory / "text_tokenizer")
    with pytest.raises(InputError, match="text tokenizer: vocabulary expects"):
        lm.load_model(directory)
    shutil.rmtree(directory)

    directory = copy_of(saved, tmp_path)
    state = load_file(directory / "lm.safetensors")
    state["text_head.weight"] = state["text_head.weight"][:-1]
    del state["row_embed.weight"]
    save_file(state, directory / "lm.safetensors")
    with pytest.raises(
        InputError, match=r"missing tensors \['row_embed.weight'\].*text_head.weight: config expects"
    ):
        lm.load_model(directory)

    config = json.loads((directory / "config.json").read_text())
    for key, value, message in (("architecture", "mamba", "unknown architecture 'mamba'"),
                                ("format", "other", "'format' must be"), ("format_version", 99, "format_version")):  # fmt: skip
        (directory / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(InputError, match=message):
            lm.load_model(directory)
    with pytest.raises(InputError, match="not a model directory"):
        lm.load_model(tmp_path / "nowhere")


def test_hf_backbone_through_create_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = tmp_path / "llama"
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    own = TextTokenizer.train_bpe(phantom_text_corpus(50), vocab_size=300)
    own.save(hf_dir)  # the backbone's directory has a tokenizer: create_model uses it
    model = lm.create_model("tiny", create_tokenizer("tiny").eval(), hf_backbone=str(hf_dir))
    assert model.text_tokenizer.vocab_size == own.vocab_size and model.lm.dim == 32
    images, codes = lm.generate_image(model, "one small lesion", seed=0)
    assert codes.shape == (1, 2, 8, 8) and images.shape == (1, 3, 32, 32)
    saved = model.save_pretrained(tmp_path / "model")
    shutil.rmtree(hf_dir)  # the saved model does not depend on the original backbone directory
    loaded = lm.load_model(saved)
    assert loaded.lm.config.hf_backbone == str(saved / "hf_backbone")
    assert torch.equal(lm.generate_image(loaded, "one small lesion", seed=0)[1], codes)
