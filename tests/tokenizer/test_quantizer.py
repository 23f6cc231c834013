"""MultiCodebookQuantizer: shapes, the inference path against the library, the training step."""

import copy

import pytest
import torch

import tokenizer.quantizer as quantizer_module
from tokenizer.config import QuantizerConfig
from tokenizer.errors import InputError
from tokenizer.quantizer import MultiCodebookQuantizer, benchmark_lookup, codebook_stats

SMALL = {"num_codebooks": 4, "codebook_size": 64, "codebook_dim": 8}
KINDS = {
    "vq": QuantizerConfig(**SMALL),
    "vq_euclidean": QuantizerConfig(**SMALL, cosine=False),
    "fsq": QuantizerConfig(
        kind="fsq", num_codebooks=3, codebook_size=240, codebook_dim=3, fsq_levels=(8, 6, 5)
    ),
    "lfq": QuantizerConfig(kind="lfq", num_codebooks=2, codebook_size=64, codebook_dim=6),
}


def _latent(cfg: QuantizerConfig, batch: int = 3, height: int = 5, width: int = 6) -> torch.Tensor:
    return torch.randn(batch, cfg.latent_dim, height, width)


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes_and_ranges(name, training):
    cfg = KINDS[name]
    quantizer = MultiCodebookQuantizer(cfg).train(training)
    z = _latent(cfg).requires_grad_()
    out = quantizer(z)
    k = cfg.num_codebooks
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.codes.shape == (3, k, 5, 6) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < cfg.codebook_size
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.perplexity.shape == (k,) and out.usage.shape == (k,)
    assert torch.all(out.perplexity >= 1) and torch.all(out.perplexity <= 90 + 1e-3)
    assert torch.all(out.usage > 0) and torch.all(out.usage <= 1)
    if training:  # straight-through: the encoder gets a gradient
        (out.quantized.square().sum() + out.loss).backward()
        assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(KINDS))
def test_eval_forward_equals_embed_of_codes(name):
    cfg = KINDS[name]
    quantizer = MultiCodebookQuantizer(cfg).eval()
    z = _latent(cfg)
    out = quantizer(z)
    assert torch.equal(quantizer.codes(z), out.codes)
    assert torch.equal(quantizer.embed(out.codes), out.quantized)
    # the codebook table lists exactly what embed returns
    table = quantizer.codebook  # (K, V, d)
    assert table.shape == (cfg.num_codebooks, cfg.codebook_size, cfg.codebook_dim)
    first = out.codes[0, :, 0, 0]
    expected = table[torch.arange(cfg.num_codebooks), first].reshape(-1)
    torch.testing.assert_close(out.quantized[0, :, 0, 0], expected)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_fast_codes_equal_library_codes(name):
    """Our look-up gives the library's codes exactly (eval mode, same inputs)."""
    cfg = KINDS[name]
    quantizer = MultiCodebookQuantizer(cfg).eval()
    z = _latent(cfg, batch=4, height=7, width=7)
    _, library_codes, _ = quantizer._library_forward(z)
    assert torch.equal(quantizer.codes(z), library_codes)


@pytest.mark.parametrize("codebook_size", [1024, 4096])
def test_fast_codes_equal_library_at_preset_shapes(codebook_size, monkeypatch):
    cfg = QuantizerConfig(num_codebooks=8, codebook_size=codebook_size, codebook_dim=8)
    quantizer = MultiCodebookQuantizer(cfg).eval()
    z = _latent(cfg, batch=2, height=16, width=16)
    library_values, library_codes, _ = quantizer._library_forward(z)
    assert torch.equal(quantizer.codes(z), library_codes)
    assert torch.equal(quantizer.embed(library_codes), library_values)
    monkeypatch.setattr(quantizer_module, "_LOOKUP_BLOCK_ELEMENTS", 8 * codebook_size * 100)  # 100-row blocks
    assert torch.equal(quantizer.codes(z), library_codes)


TRAIN_VARIANTS = {
    "cosine": {},
    "euclidean": {"cosine": False},
    "rotation_trick": {"rotation_trick": True},
    "dead_code_restart": {"dead_code_threshold": 2.0},
    "kmeans_init": {"kmeans_init": True},
    "one_codebook": {"num_codebooks": 1},
}


@pytest.mark.parametrize("variant", sorted(TRAIN_VARIANTS))
def test_training_step_equals_library(variant):
    """Our EMA step = VectorQuantize's: codes, values, loss, input gradient and codebook state."""
    cfg = QuantizerConfig(**{**SMALL, **TRAIN_VARIANTS[variant]})
    ours = MultiCodebookQuantizer(cfg).train()
    library = copy.deepcopy(ours)
    z = _latent(cfg)
    z_ours, z_library = z.clone().requires_grad_(), z.clone().requires_grad_()
    for step in range(3):  # later steps see the updated codebooks (and restarted codes)
        torch.manual_seed(step)
        a = ours._vq_train_forward(z_ours)
        torch.manual_seed(step)
        b = library._library_forward(z_library)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-7)
    weights = torch.randn_like(a[0])
    ((a[0] * weights).sum() + a[2]).backward()
    ((b[0] * weights).sum() + b[2]).backward()
    torch.testing.assert_close(z_ours.grad, z_library.grad, rtol=1e-5, atol=1e-6)
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(
            getattr(ours.impl._codebook, name), getattr(library.impl._codebook, name), rtol=1e-5, atol=1e-6
        )


def test_training_updates_codebook_only_in_training_mode():
    cfg = KINDS["vq"]
    quantizer = MultiCodebookQuantizer(cfg)
    before = quantizer.codebook.clone()
    quantizer.eval()(_latent(cfg))
    assert torch.equal(quantizer.codebook, before)
    quantizer.train()(_latent(cfg))
    assert not torch.equal(quantizer.codebook, before)
    # cosine codebooks stay unit length after the EMA update
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(4, 64), rtol=0, atol=1e-5)


def test_lookup_runs_in_fp32_under_bf16_autocast():
    cfg = KINDS["vq"]
    quantizer = MultiCodebookQuantizer(cfg).eval()
    z = _latent(cfg)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
        codes = quantizer.codes(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.codes, reference.codes) and torch.equal(codes, reference.codes)
    train_out = quantizer.train()(z.bfloat16())
    assert train_out.quantized.dtype == torch.float32


def test_codebook_stats_extremes():
    same = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    perplexity, usage = codebook_stats(same, 16)
    torch.testing.assert_close(perplexity, torch.ones(3))
    torch.testing.assert_close(usage, torch.full((3,), 1 / 16))
    uniform = torch.arange(16).view(1, 1, 4, 4).expand(2, 3, 4, 4)
    perplexity, usage = codebook_stats(uniform, 16)
    torch.testing.assert_close(perplexity, torch.full((3,), 16.0))
    torch.testing.assert_close(usage, torch.ones(3))


def test_bad_inputs_raise_input_error():
    cfg = KINDS["vq"]
    quantizer = MultiCodebookQuantizer(cfg)
    with pytest.raises(InputError, match="dim must equal"):
        MultiCodebookQuantizer(cfg, dim=cfg.latent_dim + 1)
    with pytest.raises(InputError, match=r"\(B, 32, h, w\)"):
        quantizer(torch.randn(2, 31, 4, 4))
    with pytest.raises(InputError, match="integer tensor"):
        quantizer.embed(torch.zeros(2, 4, 3, 3))
    with pytest.raises(InputError, match="integer tensor"):
        quantizer.embed(torch.zeros(2, 3, 3, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "rvq"}, "kind"),
        ({"kind": "fsq", "codebook_dim": 4, "codebook_size": 999}, "codebook_size"),
        ({"kind": "fsq", "codebook_dim": 3, "fsq_levels": (8, 5, 5, 5)}, "fsq_levels"),
        ({"kind": "lfq", "codebook_size": 100}, "codebook_size"),
        ({"cosine": True, "learnable_codebook": True}, "learnable_codebook"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"codebook_size": 0}, "codebook_size"),
    ],
)
def test_quantizer_config_validation(overrides, message):
    with pytest.raises(InputError, match=message):
        QuantizerConfig(**overrides)


def test_library_train_step_switch_gives_the_same_forward(monkeypatch):
    """``library_train_step`` routes training through VectorQuantize.forward; results equal the fast step."""
    fast = MultiCodebookQuantizer(QuantizerConfig(**SMALL)).train()
    library = MultiCodebookQuantizer(QuantizerConfig(**SMALL, library_train_step=True)).train()
    library.load_state_dict(fast.state_dict())
    calls = []
    monkeypatch.setattr(library, "_vq_train_forward", lambda z: calls.append(z))
    z = _latent(fast.config)
    a, b = fast(z), library(z)
    assert not calls and torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.quantized, b.quantized, rtol=0, atol=1e-6)


def test_learnable_codebook_trains_through_library():
    cfg = QuantizerConfig(**SMALL, cosine=False, learnable_codebook=True)
    quantizer = MultiCodebookQuantizer(cfg).train()
    out = quantizer(_latent(cfg))
    out.loss.backward()
    assert quantizer.impl._codebook.embed.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("codebook_size", [1024, 4096])
def test_lookup_speed_against_bare_matmul(codebook_size):
    """Our look-up costs at most 1.5x a bare normalise + matmul + argmax (small and large shapes)."""
    result = benchmark_lookup(batch=8, grid=16, codebook_size=codebook_size, repeats=20)
    assert result["fast_over_baseline"] <= 1.5, result
