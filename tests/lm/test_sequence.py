import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.sequence import (
    IGNORE_INDEX,
    Batch,
    RecordRejected,
    Sequence,
    build_sequence,
    image_positions,
    left_pad,
    pack,
    prompt_tokens,
    unpack,
)
from lm.vocab import Vocab
from tokenizer.errors import InputError

VOCAB = Vocab(num_text=256, num_codebooks=2, codebook_size=16, grid=(2, 3))
HW = 6
CODES = {
    f"s:{i}": torch.randint(0, 16, (2, 2, 3), generator=torch.Generator().manual_seed(i)) for i in range(3)
}


def encode(text: str) -> list[int]:
    return list(text.encode())


def resolve(ref: str) -> torch.Tensor:
    return CODES[ref]


def build(record, **kw):
    return build_sequence(record, VOCAB, encode, resolve, **kw)


def ids(seq: Sequence) -> list[int]:
    return seq.tokens[:, 0].tolist()


def target_positions(seq: Sequence) -> list[int]:
    """Positions t + 1 that carry loss (the positions being predicted)."""
    return [t + 1 for t in range(len(seq)) if (seq.labels[t] != IGNORE_INDEX).any()]


def check_invariants(seq: Sequence) -> None:
    assert seq.tokens.dtype == seq.labels.dtype == seq.image_pos.dtype == torch.long
    T = len(seq)
    assert seq.tokens.shape == seq.labels.shape == (T, 2) and seq.image_pos.shape == (T,)
    assert ((seq.tokens >= 0) & (seq.tokens < VOCAB.size)).all()
    image = VOCAB.is_image(seq.tokens[:, 0])
    assert torch.equal(image, seq.image_pos >= 0)
    assert (seq.tokens[~image] == seq.tokens[~image, :1]).all()  # text / special ids repeated over K
    VOCAB.ids_to_codes(seq.tokens[image])  # column k holds a sub-code of codebook k
    has = (seq.labels != IGNORE_INDEX).all(1)
    assert torch.equal(seq.labels[:-1][has[:-1]], seq.tokens[1:][has[:-1]])
    assert (seq.labels[has.logical_not()] == IGNORE_INDEX).all() and not has[-1]
    assert torch.equal(image_positions(seq.tokens, VOCAB), seq.image_pos)


def test_segments_layout_and_default_loss():
    seq = build({"segments": [{"text": "ab"}, {"image": "s:0"}, {"text": "c"}]})
    check_invariants(seq)
    V = VOCAB
    assert ids(seq)[:4] == [V.bos, ord("a"), ord("b"), V.boi]
    assert ids(seq)[4 + HW :] == [V.eoi, ord("c"), V.eos]
    assert torch.equal(seq.tokens[4 : 4 + HW], V.image_rows(CODES["s:0"]))
    assert seq.image_pos.tolist() == [-1] * 4 + list(range(HW)) + [-1] * 3
    assert target_positions(seq) == list(range(1, len(seq)))


def test_image_to_text_loss_only_on_caption_and_eos():
    seq = build({"segments": [{"image": "s:1"}, {"text": "Describe.\n"}, {"text": "ok"}], "loss_on": [2]})
    check_invariants(seq)
    T = len(seq)
    assert ids(seq)[-3:] == [ord("o"), ord("k"), VOCAB.eos]
    assert target_positions(seq) == [T - 3, T - 2, T - 1]


def test_text_to_image_loss_only_on_image_span():
    seq = build({"segments": [{"text": "ct"}, {"image": "s:2"}], "loss_on": [1]})
    check_invariants(seq)
    assert target_positions(seq) == list(range(3, 3 + HW + 3))  # <boi>, h*w rows, <eoi>, <eos>
    assert torch.equal(seq.labels[3 : 3 + HW], VOCAB.image_rows(CODES["s:2"]))


def test_unconditional_record_is_bos_boi_image():
    seq = build({"segments": [{"text": ""}, {"image": "s:0"}], "loss_on": [1]})
    assert ids(seq)[:2] == [VOCAB.bos, VOCAB.boi] and len(seq) == 2 + HW + 2


def test_chat_loss_only_on_assistant():
    record = {
        "messages": [
            {"role": "user", "content": [{"image": "s:0"}, {"text": "q?"}]},
            {"role": "assistant", "content": "ab"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": [{"text": "c"}, {"image": "s:1"}]},
        ]
    }
    seq = build(record)
    check_invariants(seq)
    V, tok = VOCAB, ids(seq)
    user, assistant = V.special("<user>"), V.special("<assistant>")
    first = 1 + 1 + (HW + 2) + 2 + 1  # <bos> <user> image "q?" <eot>
    assert tok[:2] == [V.bos, user] and tok[first - 1] == V.eot
    assert tok[first : first + 4] == [assistant, ord("a"), ord("b"), V.eot]
    second = first + 4 + 1 + 4 + 1  # <user> "more" <eot>
    assert tok[second] == assistant and tok[-2:] == [V.eot, V.eos]
    expected = [first + 1, first + 2, first + 3] + list(range(second + 1, len(seq)))
    assert target_positions(seq) == expected


def test_unknown_image_names_record_and_ref():
    with pytest.raises(RecordRejected, match=r"docs.jsonl:7.*'s:9'") as e:
        build({"segments": [{"text": "a"}, {"image": "s:9"}]}, where="docs.jsonl:7")
    assert e.value.reason == "unknown_image" and isinstance(e.value, InputError)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"segments": []}, "empty"),
        ({"segments": [{"text": ""}]}, "empty"),
        ({"messages": [{"role": "user", "content": ""}]}, "empty"),
        ({"text": "a"}, "bad_record"),
        ({"segments": [{"text": "a"}], "messages": []}, "bad_record"),
        ({"segments": [{"text": "a"}], "loss_on": [1]}, "bad_record"),
        ({"segments": [{"text": "a", "image": "s:0"}]}, "bad_record"),
        ({"segments": [{"text": 3}]}, "bad_record"),
        ({"messages": [{"role": "system", "content": "a"}]}, "bad_record"),
        ({"segments": [{"text": "a"}], "loss_on": []}, "no_loss"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no_loss"),
    ],
)
def test_rejections(record, reason):
    with pytest.raises(RecordRejected) as e:
        build(record)
    assert e.value.reason == reason


def test_bad_image_shape():
    with pytest.raises(RecordRejected) as e:
        build_sequence(
            {"segments": [{"image": "x"}]}, VOCAB, encode, lambda ref: torch.zeros(2, 3, 3, dtype=torch.long)
        )
    assert e.value.reason == "bad_image"


def test_truncation_only_at_segment_boundaries():
    record = {"segments": [{"text": "abc"}, {"image": "s:0"}, {"text": "defgh"}]}
    full = build(record)
    assert len(full) == 1 + 3 + 8 + 5 + 1
    assert torch.equal(build(record, max_len=len(full) - 1).tokens, full.tokens[:-1])  # only <eos> dropped
    cut = build(record, max_len=len(full) - 2)  # drops the last text, keeps the whole image, no <eos>
    check_invariants(cut)
    assert torch.equal(cut.tokens, full.tokens[: 1 + 3 + 8])
    cut = build(record, max_len=1 + 3 + 7)  # the image does not fit: never cut inside it
    assert ids(cut) == [VOCAB.bos, *b"abc"]
    with pytest.raises(RecordRejected, match="first block") as e:
        build(record, max_len=3)
    assert e.value.reason == "too_long"
    with pytest.raises(RecordRejected) as e:
        build(record, max_len=len(full) - 1, truncate=False)
    assert e.value.reason == "too_long"
    with pytest.raises(RecordRejected, match="after truncation") as e:
        build({**record, "loss_on": [2]}, max_len=len(full) - 2)
    assert e.value.reason == "no_loss"
    assert torch.equal(build(record, max_len=len(full)).tokens, full.tokens)


def test_chat_truncates_at_message_boundaries():
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 2}
    full = build(record)
    cut = build(record, max_len=len(full) - 2)
    assert ids(cut) == ids(full)[: 1 + 3 * 4] and ids(cut)[-1] == VOCAB.eot


def test_prompt_tokens_matches_training_layout():
    segments = [{"image": "s:0"}, {"text": "Describe.\n"}]
    prompt = prompt_tokens(segments, VOCAB, encode, resolve)
    seq = build({"segments": [*segments, {"text": "ok"}], "loss_on": [2]})
    assert torch.equal(prompt, seq.tokens[: len(prompt)])
    t2i = prompt_tokens([{"text": "ct"}], VOCAB, encode, resolve, open_image=True)
    assert t2i[:, 0].tolist() == [VOCAB.bos, ord("c"), ord("t"), VOCAB.boi]
    assert prompt_tokens([{"text": ""}], VOCAB, encode, resolve, open_image=True)[:, 0].tolist() == [
        VOCAB.bos,
        VOCAB.boi,
    ]


def _random_sequence(draw_len: int, seed: int) -> Sequence:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB.size, (draw_len, 2), generator=g)
    labels = torch.where(torch.rand(draw_len, 2, generator=g) < 0.5, tokens, IGNORE_INDEX)
    image_pos = torch.randint(-1, HW, (draw_len,), generator=g)
    grounding = torch.randint(-1, 5, (draw_len, 3), generator=g)
    grounding[grounding < 0] = IGNORE_INDEX
    return Sequence(tokens=tokens, labels=labels, image_pos=image_pos, grounding=grounding)


def _same(a: Sequence, b: Sequence) -> bool:
    ground = (a.grounding is None and b.grounding is None) or torch.equal(a.grounding, b.grounding)
    return (
        torch.equal(a.tokens, b.tokens)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.image_pos, b.image_pos)
        and ground
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(0, 10_000), st.booleans())
def test_pack_unpack_inverse(lengths, seed, pad_to_max):
    seqs = [_random_sequence(n, seed + i) for i, n in enumerate(lengths)]
    batch = pack(seqs, 20, VOCAB.pad, pad_to_max=pad_to_max)
    T = 20 if pad_to_max else max(lengths)
    assert batch.tokens.shape == (len(seqs), T, 2) and batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.sum(1).tolist() == lengths
    pad = ~batch.attention_mask
    assert (batch.tokens[pad] == VOCAB.pad).all() and (batch.labels[pad] == IGNORE_INDEX).all()
    assert (batch.image_pos[pad] == -1).all() and (batch.grounding[pad] == IGNORE_INDEX).all()
    back = unpack(batch)
    assert len(back) == len(seqs) and all(_same(a, b) for a, b in zip(seqs, back, strict=True))


def test_pack_real_sequences_and_errors():
    seqs = [
        build({"segments": [{"text": "a"}, {"image": "s:0"}]}),
        build({"messages": [{"role": "assistant", "content": "xyz"}]}),
    ]
    batch = pack(seqs, 64, VOCAB.pad)
    assert isinstance(batch, Batch) and len(batch) == 2 and batch.grounding is None
    assert all(_same(a, b) for a, b in zip(seqs, unpack(batch), strict=True))
    with pytest.raises(InputError, match="exceeds max_len"):
        pack(seqs, 5, VOCAB.pad)
    with pytest.raises(InputError, match="no sequences"):
        pack([], 5, VOCAB.pad)
    batch.attention_mask[0, 0] = False
    with pytest.raises(InputError, match="right padding"):
        unpack(batch)


def test_left_pad_for_generation():
    a = prompt_tokens([{"image": "s:0"}, {"text": "Describe.\n"}], VOCAB, encode, resolve)
    b = prompt_tokens([{"text": "ct"}], VOCAB, encode, resolve, open_image=True)
    c = torch.cat([b, VOCAB.image_rows(CODES["s:1"])[:4]])  # a prompt that ends inside an image
    batch = left_pad([a, b, c], VOCAB)
    T = len(a)
    assert batch.tokens.shape == (3, T, 2)
    assert batch.attention_mask.sum(1).tolist() == [len(a), len(b), len(c)]
    assert (
        torch.equal(batch.tokens[1, T - len(b) :], b) and (batch.tokens[1, : T - len(b)] == VOCAB.pad).all()
    )
    assert batch.attention_mask[:, -1].all()  # every prompt ends at the last column
    assert batch.image_pos[2, -4:].tolist() == [0, 1, 2, 3]
    assert batch.image_pos[0].tolist() == [-1, -1] + list(range(HW)) + [-1] * (T - 2 - HW)
    assert (batch.labels == IGNORE_INDEX).all()
    with pytest.raises(InputError, match="K=2"):
        left_pad([torch.zeros(3, 1, dtype=torch.long)], VOCAB)


def test_batch_to_keeps_fields():
    batch = pack([_random_sequence(4, 0)], 8, VOCAB.pad)
    batch.skipped["too_long"] = 2
    moved = batch.to("cpu")
    assert moved.skipped == {"too_long": 2} and torch.equal(moved.tokens, batch.tokens)
