"""tools/eval_generation.py and tools/eval_understanding.py: configs compose; end to end on a tiny random LM."""

import json
import math
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

import lm
from tokenizer.api import create_tokenizer
from tokenizer.text_encoder import TextEncoderConfig
from tools import eval_generation, eval_understanding
from tools.quickstart_report import json_numbers
from tools.schemas import EvalGenerationRun, EvalUnderstandingRun, command_line, compose


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    tokenizer = create_tokenizer("tiny", text_encoder=TextEncoderConfig(), embed_dim=64).eval()
    return lm.create_model("tiny", tokenizer).save_pretrained(tmp_path_factory.mktemp("lm") / "model")


def test_configs_compose_and_check_keys(saved, tmp_path):
    run = compose(
        "eval_generation", [f"model={saved}", f"out={tmp_path}", "num_prompts=7", "cfg_scales=[1.0,2.5]"]
    )
    assert isinstance(run, EvalGenerationRun) and run.num_prompts == 7 and run.cfg_scales == [1.0, 2.5]
    assert run.features.kind == "random" and run.data_seed == 1 and run.device == "auto"
    assert run.cfg_interval == [0.0, 1.0]
    run = compose("eval_understanding", [f"model={saved}", f"out={tmp_path}", "num_images=3", "vqa=false"])
    assert isinstance(run, EvalUnderstandingRun) and run.num_images == 3 and not run.vqa
    with pytest.raises(MissingMandatoryValue):
        compose("eval_generation", [f"out={tmp_path}"])
    with pytest.raises(ConfigCompositionException):
        compose("eval_understanding", [f"model={saved}", f"out={tmp_path}", "num_imags=3"])
    with pytest.raises(Exception, match="num_prompts"):
        compose("eval_generation", [f"model={saved}", f"out={tmp_path}", "num_prompts=0"])


def test_eval_generation_end_to_end(saved, tmp_path):
    out = tmp_path / "gen"
    overrides = [f"model={saved}", f"out={out}", "num_prompts=4", "cfg_scales=[1.0,3.0]", "kid_subsets=3",
                 "num_grid=2", "cfg_interval=[0.25,1.0]", "progress_bar=false"]  # fmt: skip
    command = command_line("tools.eval_generation", overrides)
    eval_generation.evaluate(compose("eval_generation", overrides), command)
    data = json.loads((out / "metrics.json").read_text())
    assert data["command"] == command and command.startswith("python -m tools.eval_generation ")
    assert data["num_prompts"] == 4 and set(data["scales"]) == {"1", "3"}
    assert data["settings"]["features_random"] and data["settings"]["model"] == str(saved)
    for m in data["scales"].values():
        assert m["attributes"]["n"] == 4 and 0 <= m["attributes"]["exact"] <= 1
        for key in ("fid", "kid", "precision", "recall", "alignment"):
            assert m[key] is not None and math.isfinite(m[key]), key
    assert all(math.isfinite(x) for x in json_numbers(data))
    markdown = (out / "metrics.md").read_text()
    assert markdown.splitlines()[3] == command and "RANDOM weights" in markdown
    assert data["settings"]["sampling"]["cfg_interval"] == [0.25, 1.0] and "0.25 <= p / (h·w) < 1" in markdown
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"cfg_1", "cfg_3", "caption", "truth"} <= set(json.loads(lines[0]))
    with Image.open(out / "generation_grid.png") as image:
        assert image.size[0] > 200 and image.size[1] > 300
    assert (out / ".eval" / "config.json").is_file()


def test_eval_understanding_describe_then_answer(saved, tmp_path):
    overrides = [f"model={saved}", f"out={tmp_path / 'und'}", "num_images=2", "max_new_tokens=8",
                 "vqa_max_new_tokens=3", "max_questions=2", "report_first=true", "zero_shot=false",
                 "progress_bar=false"]  # fmt: skip
    eval_understanding.evaluate(compose("eval_understanding", overrides), "cmd")
    rows = [json.loads(line) for line in (tmp_path / "und" / "reports.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["vqa_report"], str) and len(r["vqa"]) == 2 for r in rows)
    assert "Describe-then-answer" in (tmp_path / "und" / "metrics.md").read_text()


def test_eval_understanding_end_to_end(saved, tmp_path):
    out = tmp_path / "und"
    overrides = [f"model={saved}", f"out={out}", "num_images=3", "max_new_tokens=12", "vqa_max_new_tokens=4",
                 "max_questions=3", "num_grid=2", "progress_bar=false"]  # fmt: skip
    command = command_line("tools.eval_understanding", overrides)
    eval_understanding.evaluate(compose("eval_understanding", overrides), command)
    data = json.loads((out / "metrics.json").read_text())
    assert data["command"] == command and data["num_images"] == 3
    cap = data["captioning"]
    assert 0 <= cap["bleu4"] <= 1 and 0 <= cap["rouge_l"] <= 1 and cap["attributes"]["n"] == 3
    assert data["vqa"]["n"] == 9 and 0 <= data["vqa"]["accuracy"] <= 1
    assert data["zero_shot"]["modality"]["n"] == 3 and data["zero_shot"]["finding_present"]["n"] == 3
    assert all(math.isfinite(x) for x in json_numbers(data))
    markdown = (out / "metrics.md").read_text()
    assert markdown.splitlines()[3] == command and "Closed VQA" in markdown and "Zero-shot" in markdown
    rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["vqa"]) == 3 and isinstance(r["report"], str) for r in rows)
    with Image.open(out / "reports.png") as image:
        assert image.size[0] > 100
