"""Reconstruction / generation metrics of tokenizer/metrics.py, checked against reference packages."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenizer.errors import InputError
from tokenizer.metrics import (
    FeatureExtractorConfig,
    FIDAccumulator,
    LPIPSMetric,
    build_feature_extractor,
    codebook_stats,
    frechet_distance,
    kid,
    precision_recall,
    psnr,
    ssim,
)


def _pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Known pairs in [-1, 1]: noise, a smooth image vs a shifted / noisy copy, grey images."""
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(-1, 1, 30)
    smooth = (ramp[None, :, None] * ramp[None, None, :]).expand(3, 30, 30)[:, :24]
    noisy = (smooth + 0.1 * torch.randn(smooth.shape, generator=g)).clamp(-1, 1)
    a, b = torch.rand(3, 24, 30, generator=g) * 2 - 1, torch.rand(3, 24, 30, generator=g) * 2 - 1
    grey = torch.rand(1, 16, 16, generator=g) * 2 - 1
    return [(a, b), (smooth, noisy), (smooth, smooth * 0.8 + 0.1), (grey, grey.flip(-1))]


# ---------------------------------------------------------------------------------------------- psnr / ssim
def test_psnr_matches_skimage_and_hand_value():
    for x, y in _pairs():
        ours = float(psnr(x, y, data_range=2.0)[0])
        assert math.isclose(ours, peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=2.0), rel_tol=1e-6)
    x = torch.zeros(2, 3, 8, 8)
    values = psnr(x, x + 0.1, data_range=2.0)
    assert values.shape == (2,)
    torch.testing.assert_close(values, torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64))
    assert math.isclose(
        float(psnr((x + 1) / 2, (x + 1.1) / 2, data_range=1.0)[0]), float(values[0]), rel_tol=1e-6
    )
    assert torch.isinf(psnr(x, x, 2.0)).all()
    with pytest.raises(InputError, match="psnr"):
        psnr(x, x[:1], 2.0)


def test_ssim_matches_skimage():
    for x, y in _pairs():
        ref = structural_similarity(
            x.numpy(),
            y.numpy(),
            data_range=2.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert math.isclose(float(ssim(x, y, data_range=2.0)[0]), ref, rel_tol=1e-6, abs_tol=1e-9)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(x, x, 2.0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(InputError, match="at least 11 px"):
        ssim(x[..., :8, :8], x[..., :8, :8], 2.0)


# ---------------------------------------------------------------------------------------------- lpips
def test_random_lpips_backbone_is_seeded():
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(123)
    first = LPIPSMetric()(x, y)
    assert torch.equal(LPIPSMetric()(x, y), first)  # the caller's RNG state does not matter
    assert not torch.equal(LPIPSMetric(seed=1)(x, y), first)


def test_lpips_metric_and_backbone_file(tmp_path):
    metric = LPIPSMetric("squeeze")  # the cheapest backbone; "alex" (default) and "vgg" load the same way
    assert "RANDOM" in metric.description
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(metric(x, x), torch.zeros(2), atol=1e-6)
    far = metric(x, -x)
    assert far.shape == (2,) and (far > metric(x, (x + 0.05).clamp(-1, 1))).all()
    grey = torch.rand(1, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(metric(grey, -grey), metric(grey.repeat(1, 3, 1, 1), -grey.repeat(1, 3, 1, 1)))

    # a torchvision-style backbone file (features.{i}.*) lands in LPIPS's slices; the heads stay calibrated
    backbone = {}
    for key, value in metric.model.net.state_dict().items():
        _, index, param = key.split(".", 2)
        backbone[f"features.{index}.{param}"] = torch.randn_like(value)
    save_file(backbone, tmp_path / "squeeze.safetensors")
    loaded = LPIPSMetric("squeeze", weights=tmp_path / "squeeze.safetensors")
    state = loaded.model.state_dict()
    assert torch.equal(state["net.slice1.0.weight"], backbone["features.0.weight"])
    assert torch.equal(state["net.slice7.12.expand3x3.bias"], backbone["features.12.expand3x3.bias"])
    torch.testing.assert_close(loaded.model.lin0.model[1].weight, metric.model.lin0.model[1].weight)
    assert "RANDOM" not in loaded.description
    save_file({"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="do not belong to LPIPS"):
        LPIPSMetric("squeeze", weights=tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- features
def test_random_features_are_deterministic_and_take_grey_images():
    extractor = build_feature_extractor(FeatureExtractorConfig(kind="random"))
    x = torch.rand(4, 1, 48, 40) * 2 - 1
    feats = extractor(x)
    assert feats.shape == (4, extractor.feature_dim) and feats.dtype == torch.float32
    torch.testing.assert_close(build_feature_extractor(FeatureExtractorConfig())(x.repeat(1, 3, 1, 1)), feats)
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(InputError):
        extractor(torch.zeros(1, 2, 8, 8))
    with pytest.raises(InputError, match="FeatureExtractorConfig.kind"):
        FeatureExtractorConfig(kind="vgg")
    with pytest.raises(InputError, match="weights file"):
        FeatureExtractorConfig(kind="inception")


def test_inception_features_load_local_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as m:  # a randomly initialised network, to have a weights file to load
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        random_net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    save_file(random_net.state_dict(), tmp_path / "inception.safetensors")
    extractor = build_feature_extractor(
        FeatureExtractorConfig(kind="inception", weights=str(tmp_path / "inception.safetensors"))
    )
    loaded = extractor.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in random_net.state_dict().items())
    seen = []
    forward = extractor.net.forward
    monkeypatch.setattr(extractor.net, "forward", lambda t: seen.append(t) or forward(t))
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    feats = extractor(x)
    assert feats.shape == (1, 2048) and feats.isfinite().all()
    torch.testing.assert_close(seen[0], ((x.repeat(1, 3, 1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_dinov2_and_clip_towers_give_unnormalised_features(tmp_path):
    import timm

    assert timm.is_model("vit_small_patch14_dinov2.lvd142m")  # the default; a tiny ViT keeps this test fast
    dino = build_feature_extractor(FeatureExtractorConfig(kind="dinov2", name="test_vit", image_size=32))
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    feats = dino(x)
    assert feats.shape == (2, dino.feature_dim) and "RANDOM" in dino.description
    assert not torch.allclose(feats.norm(dim=-1), torch.ones(2))
    clip_cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_cfg}))
    clip = build_feature_extractor(FeatureExtractorConfig(kind="clip", name=f"local-dir:{tmp_path}"))
    assert clip(x).shape == (2, 8)


# ------------------------------------------------------------------------------------------- FID / KID / PR
def _feature_sets(n_real: int = 300, n_fake: int = 260, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    mix = torch.randn(dim, dim, generator=g) / 4
    real = torch.randn(n_real, dim, generator=g) @ (torch.eye(dim) + mix)
    fake = torch.randn(n_fake, dim, generator=g) * 1.3 + 0.4
    return real.double(), fake.double()


def test_fid_matches_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    real, fake = _feature_sets()
    acc = FIDAccumulator()
    for chunk in real.split(37):
        acc.update(chunk, real=True)
    for chunk in fake.split(50):
        acc.update(chunk, real=False)
    ref_real, ref_fake = fid_features_to_statistics(real), fid_features_to_statistics(fake)
    mu, sigma = acc.statistics(real=True)
    np.testing.assert_allclose(mu, ref_real["mu"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_real["sigma"], rtol=1e-8, atol=1e-12)
    reference = fid_statistics_to_metric(ref_fake, ref_real, verbose=False)["frechet_inception_distance"]
    assert math.isclose(acc.compute(), reference, rel_tol=1e-3)  # agreement measured ~1e-12
    # a large common offset leaves FID unchanged: the streaming statistics are centred
    shifted = FIDAccumulator()
    shifted.update(real + 1e4, real=True)
    shifted.update(fake + 1e4, real=False)
    assert math.isclose(shifted.compute(), acc.compute(), rel_tol=1e-6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_accumulator_errors():
    acc = FIDAccumulator()
    acc.update(torch.randn(4, 8), real=True)
    with pytest.raises(InputError, match="width"):
        acc.update(torch.randn(4, 6), real=False)
    with pytest.raises(InputError, match="fake"):
        acc.compute()
    with pytest.raises(InputError, match="keep_features"):
        acc.kid()


def test_kid_and_precision_recall_match_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _feature_sets()
    ours = kid(real, fake, num_subsets=10, subset_size=50, seed=5)
    ref = kid_features_to_metric(fake, real, kid_subsets=10, kid_subset_size=50, rng_seed=5, verbose=False)
    assert math.isclose(ours[0], ref["kernel_inception_distance_mean"], rel_tol=1e-9)
    assert math.isclose(ours[1], ref["kernel_inception_distance_std"], rel_tol=1e-9)
    precision, recall = precision_recall(real, fake, k=3)
    assert (precision, recall) == pytest.approx(calculate_precision_recall_full(fake, real, 3))
    assert 0 < precision < 1 and 0 < recall < 1
    acc = FIDAccumulator(keep_features=True)
    acc.update(real, real=True)
    acc.update(fake, real=False)
    assert acc.kid(num_subsets=10, subset_size=50, seed=5) == pytest.approx(ours)
    assert acc.precision_recall() == pytest.approx((precision, recall))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(InputError, match="subset_size"):
        kid(real[:10], fake, subset_size=50)


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real, fake = _feature_sets()
        acc = FIDAccumulator(keep_features=True)
        acc.update(real[rank::world], real=True)
        if rank == 0:  # one rank without fake samples still merges
            acc.update(fake, real=False)
        acc.sync()
        mu, sigma = acc.statistics(real=True)
        result = {
            "fid": torch.tensor([acc.compute()], dtype=torch.float64),
            "mu": torch.from_numpy(mu),
            "sigma": torch.from_numpy(sigma),
        }
        result["kept"] = torch.tensor([len(acc._kept(True)), len(acc._kept(False))])
        save_file(result, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_fid_sync_across_ranks_equals_one_process(tmp_path):
    world = 2
    args = (world, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_sync_worker, args=args, nprocs=world, join=True, start_method="fork")
    real, fake = _feature_sets()
    acc = FIDAccumulator()
    acc.update(real, real=True)
    acc.update(fake, real=False)
    mu, sigma = acc.statistics(real=True)
    for rank in range(world):
        result = load_file(tmp_path / f"rank{rank}.safetensors")
        assert math.isclose(float(result["fid"][0]), acc.compute(), rel_tol=1e-9)
        np.testing.assert_allclose(result["mu"].numpy(), mu, rtol=1e-10)
        np.testing.assert_allclose(result["sigma"].numpy(), sigma, rtol=1e-9, atol=1e-12)
        assert result["kept"].tolist() == [len(real), len(fake)]


def test_fid_of_random_features_separates_distributions():
    extractor = build_feature_extractor(FeatureExtractorConfig())
    g = torch.Generator().manual_seed(0)
    smooth = [
        torch.nn.functional.avg_pool2d(torch.rand(32, 1, 32, 32, generator=g), 5, 1, 2) * 2 - 1
        for _ in range(3)
    ]
    noise = torch.rand(32, 1, 32, 32, generator=g) * 2 - 1

    def fid(a: torch.Tensor, b: torch.Tensor) -> float:
        acc = FIDAccumulator()
        acc.update(extractor(a), real=True)
        acc.update(extractor(b), real=False)
        return acc.compute()

    assert fid(smooth[0], smooth[1]) < 0.5 * fid(smooth[2], noise)


# ---------------------------------------------------------------------------------------------- codebooks
def test_codebook_stats():
    v = 8
    uniform = torch.arange(v).repeat(4).view(2, 1, 4, 4)  # (N, K=1, h, w): every code four times
    stats = codebook_stats(uniform, v)
    assert stats.usage.tolist() == [1.0] and math.isclose(float(stats.perplexity[0]), v, rel_tol=1e-9)
    codes = torch.stack([uniform[:, 0], torch.full_like(uniform[:, 0], 3)], dim=1)  # K = 2
    stats = codebook_stats(codes, v)
    assert stats.usage.tolist() == [1.0, 1 / v]
    assert math.isclose(float(stats.perplexity[1]), 1.0) and stats.counts[1, 3] == 32
    two = torch.tensor([[[0, 0, 0, 1]]]).view(1, 1, 4)  # p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert math.isclose(float(codebook_stats(two, 4).perplexity[0]), expected, rel_tol=1e-12)
    with pytest.raises(InputError, match=r"\[0, 8\)"):
        codebook_stats(codes + 5, v)
    with pytest.raises(InputError, match="integer codes"):
        codebook_stats(codes.float(), v)
