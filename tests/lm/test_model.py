import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lm.config import PRESETS, LMConfig, lm_config
from lm.generate import DepthCache
from lm.model import DecoderLM
from lm.vocab import Vocab
from tokenizer.errors import InputError

VOCAB = Vocab(num_text=200, num_codebooks=3, codebook_size=64, grid=(2, 3))


def random_batch(vocab: Vocab, b: int = 4, t: int = 24, seed: int = 0):
    """Sequences <bos> text <boi> [h*w image rows] <eoi> text, with next-position labels."""
    g = torch.Generator().manual_seed(seed)
    rows, positions = [], []
    for _ in range(b):
        n_text = t - vocab.image_length - 3
        text = torch.randint(0, vocab.num_text, (n_text,), generator=g)
        codes = torch.randint(0, vocab.codebook_size, (vocab.num_codebooks, *vocab.grid), generator=g)
        seq = torch.cat(
            [
                vocab.text_rows([vocab.bos]),
                vocab.text_rows(text[: n_text // 2]),
                vocab.text_rows([vocab.boi]),
                vocab.image_rows(codes),
                vocab.text_rows([vocab.eoi]),
                vocab.text_rows(text[n_text // 2 :]),
            ]
        )
        pos = torch.full((t,), -1)
        start = 2 + n_text // 2
        pos[start : start + vocab.image_length] = torch.arange(vocab.image_length)
        rows.append(seq)
        positions.append(pos)
    tokens, image_pos = torch.stack(rows), torch.stack(positions)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, image_pos, labels


@pytest.fixture
def model() -> DecoderLM:
    return DecoderLM(lm_config("tiny"), VOCAB)


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trip_and_validation():
    config = lm_config("small", depth_layers=2)
    assert LMConfig.from_dict(config.to_dict()) == config
    assert config.n_kv_heads == 4 and config.mlp_hidden % config.mlp_multiple_of == 0
    assert LMConfig(n_heads=8, n_kv_heads=None).n_kv_heads == 8
    with pytest.raises(InputError, match="unknown fields"):
        LMConfig.from_dict({**config.to_dict(), "dimm": 3})
    for bad in ({"dim": 30, "n_heads": 4}, {"n_heads": 8, "n_kv_heads": 3}, {"depth_layers": 4},
                {"attn_backend": "flash"}, {"dropout": 1.0}, {"z_loss_weight": -1.0}, {"dim": 0}):  # fmt: skip
        with pytest.raises(InputError):
            LMConfig(**bad)
    with pytest.raises(InputError, match="unknown"):
        lm_config("huge")
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    assert (PRESETS["tiny"]().n_layers, PRESETS["tiny"]().dim) == (2, 32)


# ------------------------------------------------------------------------------------------------ forward
def test_forward_shapes_and_loss_at_init(model):
    tokens, image_pos, labels = random_batch(VOCAB, b=16, t=24)
    out = model(tokens, image_pos, labels=labels)
    assert out.hidden.shape == (16, 24, 32)
    assert model.text_logits(out.hidden).dtype == torch.float32
    assert out.num_image_targets == 16 * VOCAB.image_length
    assert out.num_text_targets == 16 * (23 - VOCAB.image_length)
    # at init every head is near uniform: loss ~ ln(size of that head's vocabulary)
    assert out.text_loss.item() == pytest.approx(math.log(VOCAB.num_non_image), abs=0.1)
    assert out.image_loss.item() == pytest.approx(math.log(VOCAB.codebook_size), abs=0.1)
    assert 0 < out.z_loss.item() < 1e-5 * 2 * math.log(VOCAB.num_non_image) ** 2
    assert out.total_loss().item() == pytest.approx((out.text_loss + out.image_loss + out.z_loss).item())


def test_losses_match_manual_computation(model):
    tokens, image_pos, labels = random_batch(VOCAB, b=2, t=20)
    labels[0, :5] = -100
    out = model(tokens, image_pos, labels=labels)
    target = labels[..., 0]
    is_image = VOCAB.is_image(target)
    is_text = (target != -100) & ~is_image
    logits = model.text_logits(out.hidden)[is_text]
    assert out.text_loss.item() == pytest.approx(F.cross_entropy(logits, target[is_text]).item(), rel=1e-5)
    z = 1e-5 * torch.logsumexp(logits, -1).pow(2).mean()
    assert out.z_loss.item() == pytest.approx(z.item(), rel=1e-5)
    codes = VOCAB.ids_to_codes(labels[is_image])
    image_logits = model.depth_logits(out.hidden[is_image], codes)
    expected = F.cross_entropy(image_logits.reshape(-1, VOCAB.codebook_size), codes.reshape(-1))
    assert out.image_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.num_text_targets == int(is_text.sum())
    no_z = DecoderLM(lm_config("tiny", z_loss_weight=0.0), VOCAB)
    assert no_z(tokens, image_pos, labels=labels).z_loss.item() == 0.0


def test_image_embedding_is_sum_of_subcodes_plus_2d_position(model):
    tokens, image_pos, _ = random_batch(VOCAB, b=1, t=20)
    x = model.embed(tokens, image_pos)[0]
    t = int((image_pos[0] == 4).nonzero())  # image position 4 -> row 1, col 1 on a 2x3 grid
    sub = tokens[0, t] - VOCAB.image_offset
    expected = model.image_embed.weight[sub].sum(0) + model.row_embed.weight[1] + model.col_embed.weight[1]
    torch.testing.assert_close(x[t], expected)
    torch.testing.assert_close(x[0], model.text_embed.weight[VOCAB.bos])
    model.zero_grad()
    x[t].sum().backward()  # each of the position's K sub-code rows gets the whole gradient, no other row any
    grad = model.image_embed.weight.grad
    assert torch.equal(grad[sub], torch.ones_like(grad[sub])) and int((grad != 0).any(1).sum()) == len(sub)


def test_image_tables_start_from_the_tokenizer_codebook(model):
    g = torch.Generator().manual_seed(0)
    codebook = F.normalize(torch.randn(3, 64, 4, generator=g), dim=-1)
    model.init_image_tables(codebook)
    centred = codebook - codebook.mean(1, keepdim=True)
    embed = model.image_embed.weight.view(3, 64, -1)
    for table in (embed, model.depth.head):  # within a sub-codebook: the code vectors' geometry, one scale
        for k in range(3):
            gram, ref = table[k] @ table[k].T, centred[k] @ centred[k].T
            torch.testing.assert_close(gram / gram.diagonal().mean(), ref / ref.diagonal().mean())
    assert (embed[0] @ embed[2].T).abs().max() < 1e-6  # sub-codebooks in disjoint directions
    # a depth output along code 5's row scores code 5 first and the codes nearest to it next
    scores = model.depth.head[1] @ model.depth.head[1, 5]
    nearest = (centred[1] @ centred[1, 5]).argsort(descending=True)
    assert scores.argmax() == 5 and scores.argsort(descending=True)[:4].tolist() == nearest[:4].tolist()
    tokens, image_pos, labels = random_batch(VOCAB, b=16, t=24)
    image_loss = model(tokens, image_pos, labels=labels).image_loss.item()
    assert image_loss == pytest.approx(math.log(VOCAB.codebook_size), abs=0.1)  # starts where random does
    head = model.depth.head.clone()
    model.init_image_tables(codebook.flip(1), heads=False)
    torch.testing.assert_close(model.depth.head, head)
    with pytest.raises(InputError, match=r"expected \(K=3, V=64, d\)"):
        model.init_image_tables(codebook[:, :63])
    with pytest.raises(InputError, match=r"48 code dimensions \(K\*d, the inputs\) do not fit the width 32"):
        model.init_image_tables(torch.randn(3, 64, 16))
    with pytest.raises(InputError, match=r"40 code dimensions \(d, the depth head\) do not fit the width 32"):
        model.init_image_tables(torch.randn(3, 64, 40), inputs=False)


def test_causal_and_padding_invariance(model):
    tokens, image_pos, _ = random_batch(VOCAB, b=2, t=20)
    full = model(tokens, image_pos).hidden
    changed = tokens.clone()
    changed[:, -1] = VOCAB.text_rows([5])
    torch.testing.assert_close(model(changed, image_pos).hidden[:, :-1], full[:, :-1])
    # left padding: the valid positions see exactly what they see unpadded
    pad = 5
    padded = torch.cat([torch.full((2, pad, VOCAB.num_codebooks), VOCAB.pad), tokens], 1)
    padded_pos = torch.cat([torch.full((2, pad), -1), image_pos], 1)
    mask = torch.ones(2, 20 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    left = model(padded, padded_pos, mask).hidden[:, pad:]
    torch.testing.assert_close(left, full, atol=1e-5, rtol=1e-5)
    # right padding takes the plain causal path and agrees too
    right_mask = torch.ones(2, 20, dtype=torch.bool)
    right_mask[1, 15:] = False
    right = model(tokens, image_pos, right_mask).hidden
    torch.testing.assert_close(right[0], full[0])
    torch.testing.assert_close(right[1, :15], full[1, :15])


def test_depth_head_is_causal_over_subcodes(model):
    hidden = torch.randn(5, 32)
    codes = torch.randint(0, VOCAB.codebook_size, (5, VOCAB.num_codebooks))
    logits = model.depth_logits(hidden, codes)
    assert logits.shape == (5, VOCAB.num_codebooks, VOCAB.codebook_size) and logits.dtype == torch.float32
    changed = codes.clone()
    changed[:, 1] = (changed[:, 1] + 1) % VOCAB.codebook_size
    other = model.depth_logits(hidden, changed)
    torch.testing.assert_close(other[:, :2], logits[:, :2])  # step k sees sub-codes < k only
    assert not torch.allclose(other[:, 2], logits[:, 2])
    # the step-wise generation API (incremental, cached) gives the same logits as teacher forcing
    cache = DepthCache(model, 5)
    for _ in range(2):  # the same cache serves the next position
        inputs = hidden
        for k in range(VOCAB.num_codebooks):
            torch.testing.assert_close(
                model.depth_decode(inputs, k, cache), logits[:, k], atol=1e-5, rtol=1e-5
            )
            inputs = model.subcode_embedding(codes[:, k], k)


def test_bad_inputs_raise(model):
    tokens, image_pos, labels = random_batch(VOCAB, b=1, t=20)
    with pytest.raises(InputError, match="tokens"):
        model(tokens[..., :2], image_pos)
    with pytest.raises(InputError, match="image_pos"):
        model(tokens, image_pos[:, :-1])
    bad = labels.clone()
    bad[0, 0] = VOCAB.size
    with pytest.raises(InputError, match="labels"):
        model(tokens, image_pos, labels=bad)
    bad = labels.clone()
    t = int((VOCAB.is_image(labels[0, :, 0])).nonzero()[0])
    bad[0, t] = bad[0, t].flip(0)  # sub-codes in the wrong columns
    with pytest.raises(InputError, match="sub-codebook"):
        model(tokens, image_pos, labels=bad)
    with pytest.raises(InputError, match="max_seq_len"):
        DecoderLM(lm_config("tiny", max_seq_len=8), VOCAB)(tokens, image_pos)


def _train(model, batch, steps: int = 8, lr: float = 1e-2) -> list[float]:
    tokens, image_pos, labels = batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(tokens, image_pos, labels=labels).total_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_reduces_loss_and_checkpointing_matches(model):
    batch = random_batch(VOCAB, b=4, t=20)
    ckpt = DecoderLM(lm_config("tiny", grad_checkpointing=True), VOCAB)
    ckpt.load_state_dict(model.state_dict())
    model.train(), ckpt.train()
    for m in (model, ckpt):
        m(batch[0], batch[1], labels=batch[2]).total_loss().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    losses = _train(model, batch)
    assert losses[-1] < losses[0] - 0.5


def test_xformers_backend(monkeypatch):
    if "xformers" not in sys.modules:
        with pytest.raises(ImportError, match="xformers"):
            DecoderLM(lm_config("tiny", attn_backend="xformers"), VOCAB)

    # check our plumbing (layout, GQA expansion, masks) against a reference stand-in for xformers.ops
    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        causal = isinstance(attn_bias, LowerTriangularMask)
        bias = None if attn_bias is None or causal else attn_bias.contiguous()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal).transpose(1, 2)

    class LowerTriangularMask:
        pass

    ops = types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention, LowerTriangularMask=LowerTriangularMask
    )
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    sdpa = DecoderLM(lm_config("tiny"), VOCAB)
    xf = DecoderLM(lm_config("tiny", attn_backend="xformers"), VOCAB)
    xf.load_state_dict(sdpa.state_dict())
    tokens, image_pos, _ = random_batch(VOCAB, b=2, t=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :3] = False  # left padding -> explicit bias
    for m in (None, mask):
        torch.testing.assert_close(xf(tokens, image_pos, m).hidden, sdpa(tokens, image_pos, m).hidden)


def test_parameter_counts():
    model = DecoderLM(lm_config("tiny"), VOCAB)
    assert model.num_parameters() > model.num_parameters(exclude_embeddings=True) > 0
    assert model.num_parameters() == sum(p.numel() for p in model.state_dict().values())


# ------------------------------------------------------------------------------------------------ HF backbone
@pytest.fixture
def hf_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=210, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", hf


def test_hf_backbone_builds_and_trains(hf_dir):
    path, hf = hf_dir
    model = DecoderLM(lm_config("tiny", hf_backbone=str(path)), VOCAB)
    assert model.dim == 32
    # text rows come from the HF model; our specials start at the mean HF row
    torch.testing.assert_close(
        model.text_embed.weight[: VOCAB.num_text], hf.model.embed_tokens.weight[: VOCAB.num_text]
    )
    torch.testing.assert_close(model.text_head.weight[VOCAB.bos], hf.lm_head.weight.mean(0))
    # the backbone is the HF transformer: same hidden states for the same text embeddings
    ids = torch.randint(0, VOCAB.num_text, (2, 10))
    ours = model(VOCAB.text_rows(ids.flatten()).view(2, 10, -1), torch.full((2, 10), -1)).hidden
    torch.testing.assert_close(ours, hf.model(input_ids=ids).last_hidden_state)
    names = [n for n, _ in model.named_parameters()]
    assert not any("embed_tokens" in n for n in names)
    losses = _train(model, random_batch(VOCAB, b=4, t=20), steps=6)
    assert losses[-1] < losses[0] - 0.3
    with pytest.raises(InputError, match="hf_backbone"):
        DecoderLM(lm_config("tiny", hf_backbone=str(path / "missing")), VOCAB)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
def test_logits_stay_fp32_under_bf16_autocast(model):
    tokens, image_pos, labels = random_batch(VOCAB, b=2, t=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, image_pos, labels=labels)
        assert model.text_logits(out.hidden).dtype == torch.float32
        codes = torch.zeros(3, VOCAB.num_codebooks, dtype=torch.long)
        assert model.depth_logits(out.hidden[0, :3], codes).dtype == torch.float32
    assert torch.isfinite(out.total_loss())


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    from lm.model import _sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _sdpa(q, k, v, None, True, 0.0, True)
    # the bf16 inputs attended in fp32, then the output back in the inputs' dtype
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected.bfloat16())
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    # fp32 inputs without autocast take the plain call
    x = torch.randn(2, 4, 7, 16, generator=g)
    assert torch.equal(
        _sdpa(x, x, x, None, True, 0.0, False), F.scaled_dot_product_attention(x, x, x, is_causal=True)
    )
