"""TokenizerConfig (presets, JSON round trip, overrides) and ImageTokenizer (shapes, contract, heads)."""

import dataclasses
import json
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

import tokenizer.text_encoder
from tokenizer.config import ARCHITECTURES as ARCHITECTURE_NAMES
from tokenizer.config import PRESETS, TokenizerConfig, create_config
from tokenizer.errors import InputError
from tokenizer.model import (
    ARCHITECTURES,
    ImageTokenizer,
    count_parameters,
    create_timm_model,
    load_encoder_weights,
)

# a ViT tokenizer small enough for CPU tests: timm vit_tiny at 64 px, 16 px patches -> 4x4 grid
VIT_TINY = {
    "architecture": "vit",
    "encoder_name": "vit_tiny_patch16_224",
    "downsample": 16,
    "preprocess": {"image_size": 64},
    "decoder_width": 32,
    "decoder_depth": 2,
    "decoder_heads": 2,
}


@pytest.fixture(scope="module")
def tiny() -> ImageTokenizer:
    return ImageTokenizer(create_config("tiny")).eval()


def _images(cfg: TokenizerConfig, batch: int = 2) -> torch.Tensor:
    size = cfg.preprocess.image_size
    return torch.rand(batch, cfg.preprocess.channels, size, size) * 2 - 1


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_round_trip_through_json(preset):
    cfg = PRESETS[preset]()
    restored = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert isinstance(restored.channels, tuple) and isinstance(restored.quantizer.fsq_levels, tuple)


def test_preset_values():
    tiny, small, base, large = (PRESETS[name]() for name in ("tiny", "small", "base", "large"))
    assert tiny.preprocess.image_size == 32 and tiny.channels == (8, 16)
    assert (tiny.quantizer.num_codebooks, tiny.quantizer.codebook_size, tiny.quantizer.codebook_dim) == (
        2,
        16,
        4,
    )
    assert small.preprocess.image_size == 128 and small.grid == (16, 16) and small.architecture == "cnn"
    assert (small.quantizer.num_codebooks, small.quantizer.codebook_size, small.quantizer.codebook_dim) == (
        8,
        1024,
        8,
    )
    for cfg in (base, large):
        assert cfg.grid == (16, 16) and cfg.architecture == "vit"
        assert (cfg.quantizer.num_codebooks, cfg.quantizer.codebook_size, cfg.quantizer.codebook_dim) == (
            8,
            4096,
            8,
        )
    assert large.encoder_name == "vitamin_large_256"


def test_architecture_registry_matches_config_names():
    assert set(ARCHITECTURES) == set(ARCHITECTURE_NAMES)


def test_from_dict_names_unknown_and_mistyped_keys():
    data = PRESETS["tiny"]().to_dict()
    with pytest.raises(InputError, match=r"unknown key\(s\) \['colour'\]"):
        TokenizerConfig.from_dict({**data, "colour": 1})
    bad = json.loads(json.dumps(data))
    bad["quantizer"]["codebook_size"] = "big"
    with pytest.raises(InputError, match=r"TokenizerConfig\.quantizer\.codebook_size: expected int"):
        TokenizerConfig.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["channels"] = [8, 16.5]
    with pytest.raises(InputError, match=r"TokenizerConfig\.channels\[1\]"):
        TokenizerConfig.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["preprocess"]["channels"] = 2  # rejected by PreprocessConfig itself
    with pytest.raises(InputError, match="TokenizerConfig.preprocess"):
        TokenizerConfig.from_dict(bad)


def test_text_encoder_config_round_trips():
    cfg = create_config("tiny", text_encoder=tokenizer.text_encoder.TextEncoderConfig(), embed_dim=64)
    restored = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg and isinstance(restored.text_encoder, tokenizer.text_encoder.TextEncoderConfig)


def test_create_config_overrides():
    cfg = create_config("tiny", **{"quantizer.codebook_size": 32}, embed_dim=24)
    assert cfg.quantizer.codebook_size == 32 and cfg.embed_dim == 24
    cfg = create_config("tiny", quantizer={"num_codebooks": 3}, preprocess={"image_size": 64})
    assert cfg.quantizer.num_codebooks == 3 and cfg.quantizer.codebook_size == 16
    assert cfg.preprocess.image_size == 64 and cfg.grid == (16, 16)
    with pytest.raises(InputError, match="unknown key 'codebooksize'"):
        create_config("tiny", **{"quantizer.codebooksize": 3})
    with pytest.raises(InputError, match="not a config section"):
        create_config("tiny", **{"embed_dim.width": 3})
    with pytest.raises(InputError, match="unknown tokenizer preset"):
        create_config("huge")
    with pytest.raises(InputError, match="downsample"):
        create_config("tiny", downsample=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architecture": "unet"}, "architecture"),
        ({"downsample": 64}, "not divisible"),
        ({"channels": (8, 16, 32, 64, 128)}, "resolution levels"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"decoder_width": 30, "decoder_heads": 4}, "decoder_width"),
        ({"version": 99}, "version"),
        ({"patch_size": 3}, "patch_size"),
        ({"patch_size": 8}, "patch_size"),
    ],
)
def test_tokenizer_config_validation(overrides, message):
    with pytest.raises(InputError, match=message):
        create_config("tiny", **overrides)


def test_configs_are_hydra_structured_schemas():
    node = OmegaConf.structured(PRESETS["small"]())
    restored = OmegaConf.to_object(node)
    assert isinstance(restored, TokenizerConfig) and restored.channels == (64, 128)
    assert restored.patch_size == 4


# ---- model -------------------------------------------------------------------------------------
def test_tiny_shapes_and_dtypes(tiny):
    cfg = tiny.config
    x = _images(cfg)
    z = tiny.encode(x)
    assert z.shape == (2, 8, 8, 8) and tiny.grid == (8, 8)
    out = tiny(x)
    assert out.reconstruction.shape == x.shape
    assert out.codes.shape == (2, 2, 8, 8) and out.codes.dtype == torch.long
    assert out.quantized.shape == z.shape and out.vq_loss.ndim == 0
    assert out.perplexity.shape == (2,) and out.usage.shape == (2,)
    assert tiny.last_layer is tiny.decoder.conv_out.weight


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"patch_size": 2, "channels": (16,)},
        VIT_TINY,
        {"quantizer": {"kind": "fsq", "codebook_size": 15, "fsq_levels": (5, 3), "codebook_dim": 2}},
    ],
)
def test_codes_round_trip_contract(overrides):
    """decode_codes(encode_to_codes(x)) == decode(quantize(encode(x))) exactly, and determinism."""
    model = ImageTokenizer(create_config("tiny", **overrides)).eval()
    x = _images(model.config, batch=3)
    codes = model.encode_to_codes(x)
    assert codes.shape == (3, model.config.quantizer.num_codebooks, *model.grid)
    with torch.no_grad():
        via_codes = model.decode_codes(codes)
        via_latent = model.decode(model.quantize(model.encode(x)).quantized)
    assert torch.equal(via_codes, via_latent) and via_codes.shape == x.shape
    assert torch.equal(model.encode_to_codes(x), codes)
    assert torch.equal(model.encode_to_codes(x[1:2]), codes[1:2])  # batch-independent


def test_contract_holds_under_bf16_autocast(tiny):
    x = _images(tiny.config, batch=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        codes = tiny.encode_to_codes(x)
        assert torch.equal(tiny.decode_codes(codes), tiny.decode(tiny.quantize(tiny.encode(x)).quantized))


def test_training_step_reaches_every_trainable_parameter():
    model = ImageTokenizer(create_config("tiny", embed_dim=16)).train()
    x = _images(model.config)
    out = model(x)
    loss = (out.reconstruction - x).square().mean() + out.vq_loss + model.image_embedding(out.quantized).sum()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_tiny_tokenizer_fits_a_fixed_batch():
    """Gradients reach the encoder through the quantizer: reconstruction error falls fast."""
    model = ImageTokenizer(create_config("tiny")).train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disks = [
        torch.tanh(3 * (0.5 - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt())) for cx, cy in [(-0.3, 0.2), (0.4, 0)]
    ]
    x = torch.stack(disks)[:, None].expand(-1, 3, -1, -1).contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    errors = []
    for _ in range(20):
        out = model(x)
        error = (out.reconstruction - x).square().mean()
        optimizer.zero_grad()
        (error + out.vq_loss).backward()
        optimizer.step()
        errors.append(error.item())
    assert errors[-1] < 0.25 * errors[0], errors


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = ImageTokenizer(create_config("tiny")).train()
    checkpointed = ImageTokenizer(create_config("tiny", grad_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = _images(plain.config)
    for model in (plain, checkpointed):
        model.decoder(model.encoder(x)).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_input_checks_name_what_was_expected(tiny):
    with pytest.raises(InputError, match=r"\(B, 3, 32, 32\)"):
        tiny.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(InputError, match=r"\(B, 3, 32, 32\)"):
        tiny.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(InputError, match="float tensor"):
        tiny.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    bad = torch.zeros(2, 3, 32, 32)
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        tiny.encode(bad)
    with pytest.raises(InputError, match=r"values in \[0, 16\)"):
        tiny.decode_codes(torch.full((1, 2, 8, 8), 16))
    with pytest.raises(InputError, match=r"\(B, 2, 8, 8\)"):
        tiny.decode_codes(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        tiny.decode_codes(torch.zeros(1, 2, 8, 8))
    with pytest.raises(InputError, match="quantized"):
        tiny.decode(torch.zeros(1, 8, 4, 4))


def test_alignment_head_and_reset(tiny):
    x = _images(tiny.config)
    with pytest.raises(InputError, match="embed_dim is None"):
        tiny.embed_image(x)
    model = ImageTokenizer(create_config("tiny", embed_dim=12)).eval()
    emb = model.embed_image(x)
    assert emb.shape == (2, 12)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    quantized = model.quantize(model.encode(x)).quantized
    torch.testing.assert_close(model.image_embedding(quantized), emb)
    model.reset_align_head(20)
    assert model.config.embed_dim == 20 and model.embed_image(x).shape == (2, 20)
    assert ImageTokenizer(model.config).align_head[1].out_features == 20  # config describes the new head


class _FakeTextEncoder(nn.Module):
    embed_dim = 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 6)
        self.requires_grad_(False)

    def forward(self, texts):
        lengths = torch.tensor([[float(len(t))] for t in texts])
        return nn.functional.normalize(self.proj(lengths), dim=-1)


def test_embed_text_uses_configured_encoder(monkeypatch, tiny):
    with pytest.raises(InputError, match="no text encoder"):
        tiny.embed_text(["a"])
    built = []

    def fake_build(cfg):
        built.append(cfg)
        return _FakeTextEncoder()

    monkeypatch.setattr(tokenizer.text_encoder, "build_text_encoder", fake_build)
    text_cfg = tokenizer.text_encoder.TextEncoderConfig()
    model = ImageTokenizer(create_config("tiny", text_encoder=text_cfg, embed_dim=6))
    assert built == [text_cfg]
    out = model.embed_text(["left lung nodule", "normal"])
    assert out.shape == (2, 6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert not model.train().text_encoder.training  # stays frozen in eval mode
    with pytest.raises(InputError, match="list of strings"):
        model.embed_text("one string")
    with pytest.raises(InputError, match="embeds to 6"):
        ImageTokenizer(create_config("tiny", text_encoder=text_cfg, embed_dim=8))


def test_vit_grid_mismatch_is_reported():
    with pytest.raises(InputError, match="token grid"):
        ImageTokenizer(create_config("tiny", **{**VIT_TINY, "downsample": 8}))


def test_timm_weights_from_local_safetensors(tmp_path):
    cfg = create_config("tiny", **VIT_TINY)
    source = create_timm_model(cfg.encoder_name, None, num_classes=0, img_size=64)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = ImageTokenizer(cfg)
    load_encoder_weights(model, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.encoder.backbone.state_dict()[key], value), key
    with pytest.raises(InputError, match="file not found"):
        load_encoder_weights(model, str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="no timm encoder"):
        load_encoder_weights(ImageTokenizer(create_config("tiny")), str(path))


def test_channels_last_and_single_channel_inputs():
    model = ImageTokenizer(create_config("tiny", preprocess={"channels": 1})).eval()
    x = _images(model.config)
    reference = model.encode_to_codes(x)
    model = model.to(memory_format=torch.channels_last)
    assert torch.equal(model.encode_to_codes(x.contiguous(memory_format=torch.channels_last)), reference)
    assert model.decode_codes(reference).shape == (2, 1, 32, 32)


def test_state_dict_is_loadable_into_a_fresh_model(tiny):
    fresh = ImageTokenizer(dataclasses.replace(tiny.config))
    fresh.load_state_dict(tiny.state_dict(), strict=True)
    fresh.eval()
    x = _images(tiny.config)
    assert torch.equal(fresh.encode_to_codes(x), tiny.encode_to_codes(x))


@pytest.mark.parametrize(("preset", "low", "high"), [("tiny", 2e4, 2e5), ("small", 2e5, 5e6)])
def test_parameter_counts(preset, low, high):
    assert low < count_parameters(ImageTokenizer(create_config(preset))) < high


@pytest.mark.slow
def test_large_preset_forward():
    """MedITok scale: ViTamin-L encoder + ViT-L decoder; one forward on CPU."""
    model = ImageTokenizer(create_config("large")).eval()
    assert 5e8 < count_parameters(model) < 8e8
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        out = model(x)
        assert out.reconstruction.shape == x.shape and out.codes.shape == (1, 8, 16, 16)
        assert torch.equal(model.decode_codes(out.codes), out.reconstruction)


def _train_step_ms(cfg: TokenizerConfig, batch: int, bf16: bool, repeats: int = 5) -> float:
    """Best wall time of forward + L1/L2/VQ loss + backward, in ms."""
    model = ImageTokenizer(cfg).train()
    x = _images(cfg, batch=batch)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            rec = out.reconstruction.float()
            loss = 0.2 * (rec - x).abs().mean() + (rec - x).square().mean() + out.vq_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times[1:])


@pytest.mark.slow
def test_small_preset_training_step_speed():
    """small preset, batch 16: forward + backward well under 1 s on 2 CPU cores (bf16 autocast)."""
    cfg = create_config("small")
    bf16, fp32 = _train_step_ms(cfg, 16, True), _train_step_ms(cfg, 16, False)
    print(
        f"small preset, batch 16, {torch.get_num_threads()} threads: bf16 {bf16:.0f} ms, fp32 {fp32:.0f} ms"
    )
    assert bf16 < 1000
