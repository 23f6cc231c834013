import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.text_tokenizer import TextTokenizer
from tokenizer.errors import InputError

CAPTIONS = [
    "Axial CT of the chest showing a small nodule in the right upper lobe.",
    "T2-weighted MR image of the brain with a bright lesion on the left side.",
    "Chest X-ray with two large opacities in the left lower zone.",
    "Fundus photograph with three small dark spots near the optic disc.",
    "Histology slide showing many small round nuclei.",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.train_bpe(CAPTIONS, vocab_size=400)


def test_bpe_trains_merges_and_round_trips(bpe):
    assert 256 < bpe.vocab_size <= 400
    text = "Axial CT of the chest showing a small nodule."
    ids = bpe.encode(text)
    assert all(isinstance(i, int) and 0 <= i < bpe.vocab_size for i in ids)
    assert len(ids) < len(text.encode())  # merges learned from the captions
    assert bpe.decode(ids) == text
    assert bpe.encode("") == []
    assert bpe.encode_batch([text, "nodule"]) == [ids, bpe.encode("nodule")]


def test_line_break_ids(bpe):
    breaks = bpe.line_break_ids
    assert breaks and all("\n" in bpe.decode([i]) for i in breaks)
    assert set(bpe.encode("yes\nno")) & set(breaks) and not set(bpe.encode("yes no")) & set(breaks)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_bpe_round_trips_any_string(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_training_is_deterministic(bpe):
    again = TextTokenizer.train_bpe(CAPTIONS, vocab_size=400)
    assert again.vocab_size == bpe.vocab_size
    for caption in CAPTIONS[:5]:
        assert again.encode(caption) == bpe.encode(caption)


def test_save_load_and_from_pretrained_dir(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    for loaded in (TextTokenizer.load(tmp_path / "tok"), TextTokenizer.from_pretrained(tmp_path / "tok")):
        assert loaded.vocab_size == bpe.vocab_size
        for caption in CAPTIONS[:5]:
            assert loaded.encode(caption) == bpe.encode(caption)
            assert loaded.decode(loaded.encode(caption)) == caption


def test_any_hf_tokenizer_from_a_local_dir(tmp_path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "chest", "ct", "nodule", "small", "a", "##s", "."]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    tok = TextTokenizer.from_pretrained(tmp_path / "bert")
    assert tok.vocab_size == len(words)
    ids = tok.encode("A small chest CT nodules.")
    # no [CLS] / [SEP]: the LM vocabulary places its own specials
    assert ids == [words.index(w) for w in ["a", "small", "chest", "ct", "nodule", "##s", "."]]
    assert tok.decode(ids) == "a small chest ct nodules."


def test_errors(bpe, tmp_path):
    with pytest.raises(InputError, match="vocab_size must be >= 256"):
        TextTokenizer.train_bpe(CAPTIONS, vocab_size=100)
    with pytest.raises(InputError, match="decode: ids must lie"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(InputError, match="not a text tokenizer directory"):
        TextTokenizer.load(tmp_path / "missing")
    with pytest.raises(InputError, match="no-such-org/no-such-tokenizer"):
        TextTokenizer.from_pretrained("no-such-org/no-such-tokenizer")
