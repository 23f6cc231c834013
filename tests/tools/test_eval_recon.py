"""tools/eval_recon.py: config composition and an end-to-end run on a tiny random tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from tokenizer.api import create_tokenizer
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.metrics import psnr
from tools.eval_recon import evaluate
from tools.schemas import EvalReconRun, command_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tokenizer(create_tokenizer("tiny").eval(), tmp_path_factory.mktemp("tok") / "tiny")


def make_run(*overrides: str) -> EvalReconRun:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval_recon", overrides=["progress_bar=false", *overrides])
    return OmegaConf.to_object(cfg)


def test_config_composes_and_checks_keys(checkpoint, tmp_path):
    run = make_run(
        f"tokenizer.checkpoint={checkpoint}",
        f"out={tmp_path}",
        "data.num_val=500",
        "features.kind=dinov2",
        "lpips.net=vgg",
        "max_images=10",
    )
    assert isinstance(run, EvalReconRun)
    assert run.data.kind == "phantoms" and run.data.num_val == 500
    assert run.features.kind == "dinov2" and run.lpips.net == "vgg" and run.max_images == 10
    assert make_run(f"tokenizer.checkpoint={checkpoint}", f"out={tmp_path}").features.kind == "random"
    with pytest.raises(MissingMandatoryValue):
        make_run(f"out={tmp_path}")  # no tokenizer.checkpoint
    with pytest.raises(ConfigCompositionException):
        make_run(f"tokenizer.checkpoint={checkpoint}", f"out={tmp_path}", "lpipz.weights=a.safetensors")
    with pytest.raises(Exception, match="inception"):  # inception features need a local weights file
        make_run(f"tokenizer.checkpoint={checkpoint}", f"out={tmp_path}", "features.kind=inception")


def test_phantom_benchmark_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "eval"
    overrides = [f"tokenizer.checkpoint={checkpoint}", "data.num_val=16", "data.batch_size=6", f"out={out}"]
    command = command_line("tools.eval_recon", overrides)
    evaluate(make_run(*overrides), command)
    data = json.loads((out / "metrics.json").read_text())
    assert data["command"] == command and command.startswith("python -m tools.eval_recon ")
    assert data["num_images"] == 16 and data["num_bad"] == 0
    assert data["settings"]["checkpoint"] == str(checkpoint) and data["settings"]["features_random"]
    # the held-out phantoms are the val role: seed data.seed + 1 = 1
    dataset = PhantomDataset(16, seed=1, size=32)
    modalities = [dataset[i]["modality"] for i in range(16)]
    assert set(data["per_modality"]) == set(modalities)
    x = torch.stack([dataset[i]["image"] for i in range(16)])
    tok = load_tokenizer(checkpoint)
    with torch.no_grad():
        rec = tok.decode_codes(tok.encode_to_codes(x)).clamp(-1, 1)
    expected = psnr((rec + 1) / 2, (x + 1) / 2, 1.0)
    assert data["overall"]["psnr"] == pytest.approx(float(expected.mean()), rel=1e-6)
    for name, metrics in data["per_modality"].items():
        keep = torch.tensor([m == name for m in modalities])
        assert metrics["n"] == int(keep.sum())
        assert metrics["psnr"] == pytest.approx(float(expected[keep].mean()), rel=1e-6)
        for key in ("ssim", "lpips", "rfid", "kid"):
            assert np.isfinite(metrics[key]), (name, key)
        assert (out / f"recon_{name}.png").is_file() and (out / f"error_{name}.png").is_file()
    text = (out / "metrics.md").read_text()
    lines = text.splitlines()
    assert command in lines[:5] and sum(line.startswith("| **overall** | 16 |") for line in lines) == 1
    for name in set(modalities):
        assert sum(line.startswith(f"| {name} | ") for line in lines) == 1
    assert (out / ".eval" / "config.json").is_file()


def test_folder_with_a_bad_file_is_counted(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "eval"
    overrides = [
        f"tokenizer.checkpoint={checkpoint}",
        "data=folder",
        f"data.path={images}",
        "data.modality=xray",
        "data.num_workers=0",
        "lpips.enabled=false",
        f"out={out}",
    ]
    evaluate(make_run(*overrides), "cmd")
    data = json.loads((out / "metrics.json").read_text())
    assert data["num_images"] == 3 and data["num_bad"] == 1 and "broken.png" in data["bad_examples"][0]
    assert list(data["per_modality"]) == ["xray"] and data["overall"]["lpips"] is None
    assert data["overall"]["reader_accuracy_original"] is None  # no ground truth outside phantoms
