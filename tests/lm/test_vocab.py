import pytest
import torch

from lm.vocab import SPECIALS, Vocab
from tokenizer.errors import InputError


@pytest.fixture
def vocab():
    return Vocab(num_text=100, num_codebooks=3, codebook_size=16, grid=(2, 4))


def test_ranges_disjoint_and_cover(vocab):
    ranges = vocab.ranges()
    seen = set()
    for r in ranges.values():
        assert not seen & set(r)
        seen |= set(r)
    assert seen == set(range(vocab.size))
    assert vocab.size == 100 + len(SPECIALS) + 3 * 16


def test_special_ids(vocab):
    ids = [vocab.special(s) for s in SPECIALS]
    assert ids == list(range(100, 100 + len(SPECIALS)))
    assert vocab.boi == vocab.special("<boi>")
    with pytest.raises(KeyError, match="<nope>"):
        vocab.special("<nope>")


def test_codes_ids_round_trip(vocab):
    codes = torch.randint(0, 16, (5, 3))
    ids = vocab.codes_to_ids(codes)
    assert vocab.is_image(ids).all()
    assert (ids[:, 1] >= vocab.image_offset + 16).all() and (ids[:, 1] < vocab.image_offset + 32).all()
    assert torch.equal(vocab.ids_to_codes(ids), codes)


def test_image_rows_round_trip(vocab):
    codes = torch.randint(0, 16, (3, 2, 4))
    rows = vocab.image_rows(codes)
    assert rows.shape == (8, 3)
    assert torch.equal(vocab.rows_to_image(rows), codes)
    # Row-major: position 1 is (row 0, col 1).
    assert torch.equal(vocab.ids_to_codes(rows[1]), codes[:, 0, 1])


def test_bad_codes_rejected(vocab):
    with pytest.raises(InputError, match="values must lie in"):
        vocab.codes_to_ids(torch.tensor([[0, 16, 0]]))
    with pytest.raises(InputError, match="last dimension"):
        vocab.codes_to_ids(torch.zeros(2, 2, dtype=torch.long))
    swapped = vocab.codes_to_ids(torch.tensor([[1, 2, 3]]))[:, [1, 0, 2]]
    with pytest.raises(InputError, match="sub-codebook"):
        vocab.ids_to_codes(swapped)


def test_text_rows(vocab):
    rows = vocab.text_rows([1, 2, vocab.eos])
    assert rows.shape == (3, 3) and (rows == rows[:, :1]).all()
    with pytest.raises(InputError):
        vocab.text_rows([vocab.image_offset])


def test_check_tokenizer_names_mismatch(vocab):
    vocab.check_tokenizer(3, 16, (2, 4))
    with pytest.raises(InputError, match="V: vocab 16 vs tokenizer 32"):
        vocab.check_tokenizer(3, 32, (2, 4))
    with pytest.raises(InputError, match="text tokenizer has 7"):
        vocab.check_text(7)


def test_dict_round_trip(vocab):
    assert Vocab.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(InputError, match="unknown fields"):
        Vocab.from_dict({**vocab.to_dict(), "extra": 1})
