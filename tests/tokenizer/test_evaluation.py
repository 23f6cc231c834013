"""tokenizer/evaluation.py: the reconstruction benchmark against direct computations on the same images."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.api import create_tokenizer
from tokenizer.data.datasets import BadSample
from tokenizer.data.phantom_reader import read_phantom
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError
from tokenizer.evaluation import (
    LPIPSConfig,
    ReconResults,
    evaluate_reconstruction,
    markdown_report,
    write_report,
)
from tokenizer.metrics import (
    FeatureExtractorConfig,
    FIDAccumulator,
    LPIPSMetric,
    build_feature_extractor,
    codebook_stats,
    psnr,
    ssim,
)

NUM = 16


@pytest.fixture(scope="module")
def tokenizer():
    return create_tokenizer("tiny").eval()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return PhantomDataset(NUM, seed=1, size=tokenizer.config.preprocess.image_size)


@pytest.fixture(scope="module")
def lpips_net():
    return LPIPSMetric()


@pytest.fixture(scope="module")
def results(tokenizer, dataset, lpips_net) -> ReconResults:
    return evaluate_reconstruction(
        tokenizer, dataset, batch_size=5, features=FeatureExtractorConfig("random"), lpips=lpips_net
    )


@pytest.fixture(scope="module")
def direct(tokenizer, dataset):
    """Every image, its reconstruction and codes, computed here without the benchmark."""
    x = torch.stack([dataset[i]["image"] for i in range(NUM)])
    with torch.no_grad():
        codes = tokenizer.encode_to_codes(x)
        rec = tokenizer.decode_codes(codes).clamp(-1, 1)
    modalities = [dataset[i]["modality"] for i in range(NUM)]
    return x, rec, codes, modalities


def _select(direct, modality):
    x, rec, codes, modalities = direct
    keep = torch.tensor([m == modality or modality is None for m in modalities])
    return x[keep], rec[keep], codes[keep]


def test_rows_per_modality_and_finite_numbers(results, direct):
    modalities = direct[3]
    assert sorted(results.per_modality) == sorted(set(modalities))
    assert results.overall.n == NUM and results.num_bad == 0
    assert {k: m.n for k, m in results.per_modality.items()} == {
        m: modalities.count(m) for m in set(modalities)
    }
    for m in [results.overall, *results.per_modality.values()]:
        for value in (m.psnr, m.ssim, m.lpips, m.rfid, m.kid):
            assert value is not None and math.isfinite(value)
        assert len(m.codebook_usage) == len(m.codebook_perplexity) == 2  # tiny: K = 2
        assert m.reader_accuracy_original is not None
    assert results.settings["features_random"] and results.settings["lpips_random"]


@pytest.mark.parametrize("modality", [None, "ct", "xray"])
def test_psnr_ssim_lpips_codebook_match_direct_computation(results, direct, lpips_net, modality):
    x, rec, codes = _select(direct, modality)
    group = results.overall if modality is None else results.per_modality[modality]
    x01, r01 = (x + 1) / 2, (rec + 1) / 2
    assert group.psnr == pytest.approx(float(psnr(r01, x01, 1.0).mean()), rel=1e-6)
    # PSNR on [-1, 1] with range 2 is the same number; SSIM is computed on [0, 1] with range 1
    assert group.psnr == pytest.approx(float(psnr(rec, x, 2.0).mean()), rel=1e-6)
    assert group.ssim == pytest.approx(float(ssim(r01, x01, 1.0).mean()), rel=1e-6)
    assert group.lpips == pytest.approx(float(lpips_net(rec, x).mean()), rel=1e-5)
    stats = codebook_stats(codes, 16)
    assert group.codebook_usage == pytest.approx(stats.usage.tolist())
    assert group.codebook_perplexity == pytest.approx(stats.perplexity.tolist())


def test_gray_tint_only_on_grayscale_originals(results, direct):
    x, rec, _, modalities = direct
    for modality, group in results.per_modality.items():
        if modality in ("fundus", "histology"):  # colour phantoms: no grayscale original
            assert group.gray_tint is None
            continue
        keep = torch.tensor([m == modality for m in modalities])
        r01 = (rec[keep] + 1) / 2
        expected = (r01 - r01.mean(1, keepdim=True)).abs().mean(dim=(1, 2, 3)).mean()
        assert group.gray_tint == pytest.approx(float(expected), rel=1e-5)
    assert results.overall.gray_tint is not None


def test_rfid_and_reader_match_direct_computation(results, direct, dataset):
    x, rec, _, _ = direct
    net = build_feature_extractor(FeatureExtractorConfig("random"))
    fid = FIDAccumulator(keep_features=True)
    fid.update(net(x), real=True)
    fid.update(net(rec), real=False)
    assert results.overall.rfid == pytest.approx(fid.compute(), rel=1e-6)
    assert results.overall.kid == pytest.approx(fid.kid(subset_size=NUM)[0], rel=1e-6, abs=1e-12)
    truth = [(dataset.phantom(i).modality, dataset.phantom(i).findings) for i in range(NUM)]
    on_original = np.mean([read_phantom((x[i] + 1) / 2) == truth[i] for i in range(NUM)])
    on_recon = np.mean([read_phantom((rec[i] + 1) / 2) == truth[i] for i in range(NUM)])
    assert results.overall.reader_accuracy_original == pytest.approx(on_original)
    assert results.overall.reader_accuracy_reconstruction == pytest.approx(on_recon)
    assert on_original >= 0.8  # the reader works on the originals even at 32 px


def test_batching_does_not_change_numbers_and_grids_are_capped(tokenizer, dataset, results, lpips_net):
    again = evaluate_reconstruction(tokenizer, dataset, batch_size=NUM, lpips=lpips_net, num_grid=2)
    first = results.to_dict()["per_modality"]
    for name, metrics in again.to_dict()[
        "per_modality"
    ].items():  # conv sums differ by batch in the last bits
        for key, value in metrics.items():
            expected = first[name][key]
            assert value == (None if expected is None else pytest.approx(expected, rel=1e-5)), key
    for modality, (originals, reconstructions) in again.grids.items():
        assert originals.shape == reconstructions.shape
        assert len(originals) == min(2, again.per_modality[modality].n)
    original, _ = results.grids["ct"]
    first_ct = next(i for i in range(NUM) if dataset[i]["modality"] == "ct")
    assert torch.equal(original[0], dataset[first_ct]["image"])


def test_max_images_disabled_lpips_and_determinism(tokenizer, dataset):
    runs = [
        evaluate_reconstruction(
            tokenizer, dataset, batch_size=4, max_images=6, lpips=LPIPSConfig(enabled=False)
        )
        for _ in range(2)
    ]
    out = runs[0]
    assert out.overall.n == 6 and out.overall.lpips is None and out.settings["lpips"] is None
    first, second = (r.to_dict() for r in runs)
    assert first["overall"] == second["overall"] and first["per_modality"] == second["per_modality"]


class WithBadRows(torch.utils.data.Dataset):
    """The phantoms, with every third item unreadable."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return BadSample(i, f"file{i}.png", "cannot identify image file") if i % 3 == 0 else self.base[i]


def test_bad_rows_are_skipped_counted_and_limited(tokenizer, dataset):
    out = evaluate_reconstruction(
        tokenizer, WithBadRows(dataset), batch_size=4, lpips=LPIPSConfig(enabled=False)
    )
    assert out.num_bad == 6 and out.overall.n == NUM - 6
    assert out.overall.reader_accuracy_original is None  # not a PhantomDataset: no ground truth
    assert "file0.png: cannot identify image file" in out.bad_examples[0]
    all_bad = [BadSample(i, f"f{i}", "unreadable") for i in range(3)]
    with pytest.raises(InputError, match="no usable image"):
        evaluate_reconstruction(tokenizer, all_bad, batch_size=2, lpips=LPIPSConfig(enabled=False))


def test_bad_arguments_raise(tokenizer, dataset):
    with pytest.raises(InputError, match="precision"):
        evaluate_reconstruction(tokenizer, dataset, precision="fp8")
    with pytest.raises(InputError, match="max_images"):
        evaluate_reconstruction(tokenizer, dataset, max_images=0)
    with pytest.raises(InputError, match="LPIPSConfig.net"):
        LPIPSConfig(net="resnet")


def test_bf16_autocast_on_cpu_runs_and_stays_close(tokenizer, dataset, results):
    out = evaluate_reconstruction(
        tokenizer, dataset, batch_size=8, precision="bf16", lpips=LPIPSConfig(enabled=False)
    )
    assert out.settings["autocast"].startswith("bf16")
    assert out.overall.psnr == pytest.approx(results.overall.psnr, abs=0.5)


def test_write_report(results, tmp_path):
    command = "python -m tools.eval_recon tokenizer.checkpoint=ckpt out=x"
    write_report(results, tmp_path, command)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["command"] == command and data["overall"]["n"] == NUM
    assert set(data["per_modality"]) == set(results.per_modality)
    assert data["overall"]["psnr"] == pytest.approx(results.overall.psnr)
    text = (tmp_path / "metrics.md").read_text()
    assert text == markdown_report(results, command) + text[len(markdown_report(results, command)) :]
    lines = text.splitlines()
    assert command in lines[:5]
    for modality in results.per_modality:
        assert sum(line.startswith(f"| {modality} |") for line in lines) == 1
        recon = Image.open(tmp_path / f"recon_{modality}.png")
        error = Image.open(tmp_path / f"error_{modality}.png")
        n = len(results.grids[modality][0])
        tile = 128 + 2  # 32 px images enlarged 4x, 2 px padding
        assert recon.size == (n * tile + 2, 2 * tile + 2)
        assert error.size == (n * tile + 2, tile + 2) and error.mode == "RGB"
    assert "| **overall** | 16 |" in text
    assert "biased" in text and "RANDOM" in text


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu(tokenizer, dataset, results):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = create_tokenizer("tiny")
    model.load_state_dict(tokenizer.state_dict())
    out = evaluate_reconstruction(model, dataset, batch_size=8, lpips=LPIPSConfig(), device="cuda")
    assert out.settings["device"].startswith("cuda") and out.settings["autocast"].startswith("bf16")
    assert out.overall.psnr == pytest.approx(results.overall.psnr, abs=0.5)
    assert out.overall.ssim == pytest.approx(results.overall.ssim, abs=0.02)
    assert out.overall.rfid is not None and math.isfinite(out.overall.rfid)
