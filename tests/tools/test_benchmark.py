"""``tools/benchmark.py --quick``: every section measured, finite positive figures, JSON and Markdown written."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import benchmark
from tools.quickstart_report import json_numbers

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("tokenizer", "quantizer", "lm_prefill", "lm_decode", "training")


def check_report(out: Path, device: str) -> dict:
    report = json.loads((out / "benchmark.json").read_text())
    sections = report["results"][device]
    for name in SECTIONS:
        rows = sections[name]
        assert rows, name
        figures = list(json_numbers(rows))
        assert figures and all(math.isfinite(x) and x > 0 for x in figures), (name, rows)
    decode = sections["lm_decode"]
    assert sorted((r["batch"], r["cfg_scale"]) for r in decode) == [(1, 1.0), (1, 3.0), (8, 1.0), (8, 3.0)]
    for row in decode:  # quick times both Hugging Face references everywhere
        assert row["speedup_vs_hf_positions"] > 0 and row["speedup_vs_hf_subcodes"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["ours_ms_per_position"] * 64 / 1e3))
    assert [r["model"] for r in sections["training"]] == ["tokenizer", "lm"]
    assert {r["codebook_size"] for r in sections["quantizer"]} == {64}
    assert {b["bar"].split(" ")[0] for b in report["bars"]} == {"quantizer", "decode"}

    table = (out / "benchmark.md").read_text()
    for name in SECTIONS:
        assert f"## {device}: {name}" in table
    assert table.count("| tiny |") >= 4  # tokenizer rows (batch 1 and 8) and training rows
    assert report["meta"]["quick"] is True and report["meta"]["command"].endswith(str(out))
    return report


def test_quick_run_writes_every_section(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--reps", "1", "--threads", "1", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    check_report(tmp_path, "cpu")
    assert "benchmark.md" in capsys.readouterr().out


def test_script_mode_imports_the_repository(tmp_path):
    """``python tools/benchmark.py`` works from any folder: tools/tokenize.py must not shadow the stdlib's."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout and "--peak-tflops" in proc.stdout


def test_sections_pick_what_is_measured(tmp_path):
    argv = ["--quick", "--device", "cpu", "--reps", "1", "--sections", "tokenizer", "channels_last"]
    assert benchmark.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    measured = {k for k, v in report["results"]["cpu"].items() if isinstance(v, list)}
    assert measured == {"tokenizer", "channels_last"} and report["bars"] == []
    rows = report["results"]["cpu"]["channels_last"]
    assert [r["memory_format"] for r in rows] == ["contiguous", "channels_last"]
    for row in rows:
        assert row["batch"] == 8 and all(row[k] > 0 for k in ("encode_images_per_s", "train_steps_per_s"))


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--reps", "0"])
    assert "--reps and --threads must be >= 1" in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_run_on_cuda(tmp_path):
    assert torch.cuda.is_available()
    assert benchmark.main(["--quick", "--device", "cuda", "--reps", "1", "--out", str(tmp_path)]) == 0
    report = check_report(tmp_path, "cuda")
    cuda = report["results"]["cuda"]
    assert 0 < cuda["training"][1]["mfu"] < 1 and all(0 < r["mfu"] < 1 for r in cuda["lm_prefill"])
