"""tools/eval_alignment.py: config composition and an end-to-end run on tiny random tokenizers."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tokenizer.api import create_tokenizer
from tokenizer.checkpoint import save_tokenizer
from tokenizer.text_encoder import TextEncoderConfig
from tools.eval_alignment import evaluate
from tools.schemas import EvalAlignmentRun

ROOT = Path(__file__).resolve().parents[2]


def make_run(*overrides: str) -> EvalAlignmentRun:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval_alignment", overrides=["progress_bar=false", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("with_text", [True, False])
def test_end_to_end_writes_zero_shot_only_with_a_text_encoder(tmp_path, with_text):
    extra = {"text_encoder": TextEncoderConfig(), "embed_dim": 64} if with_text else {}
    checkpoint = save_tokenizer(create_tokenizer("tiny", **extra).eval(), tmp_path / "tok")
    out = tmp_path / "eval"
    run = make_run(f"tokenizer.checkpoint={checkpoint}", "data.num_train=40", "data.num_val=20", f"out={out}")
    metrics = evaluate(run, command="test")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["command"] == "test" and saved["test_images"] == 20
    for task in ("modality", "finding_present"):
        probe = metrics["linear_probe"][task]
        assert probe["n"] == 20 and 0.0 <= probe["accuracy"] <= 1.0
    assert (metrics["zero_shot"] is not None) == with_text
    if with_text:
        assert metrics["zero_shot"]["modality"]["n"] == 20
    report = (out / "metrics.md").read_text()
    assert "linear probe" in report and ("zero-shot" in report)


def test_other_data_kinds_are_refused(tmp_path):
    checkpoint = save_tokenizer(create_tokenizer("tiny").eval(), tmp_path / "tok")
    run = make_run(f"tokenizer.checkpoint={checkpoint}", f"out={tmp_path}", "data.kind=folder", "data.path=x")
    with pytest.raises(ValueError, match="phantom truth"):
        evaluate(run)
