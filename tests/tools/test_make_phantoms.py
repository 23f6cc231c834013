import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenizer.data.phantom_reader import read_phantom
from tokenizer.data.phantom_text import ANSWERS, parse_caption
from tokenizer.data.phantom_vocab import Finding
from tokenizer.data.phantoms import PhantomDataset
from tools.make_phantoms import main

ROOT = Path(__file__).resolve().parents[2]


def test_cli_writes_pngs_and_manifest(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--num", "12", "--size", "64", "--seed", "3", "--modalities", "ct", "fundus"]
    main([*argv, "--split-fraction", "0.25"])
    assert str(out) in capsys.readouterr().out.strip().splitlines()[-1]

    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and sum(r["split"] == "val" for r in rows) == 3
    dataset = PhantomDataset(12, seed=3, size=64, modalities=["ct", "fundus"])
    for i, row in enumerate(rows):
        assert row["image"] == f"images/{i:06d}.png"
        assert set(row) == {"image", "caption", "modality", "split", "attributes", "qa"}
        phantom = dataset.phantom(i)
        assert row["caption"] == phantom.caption and row["attributes"] == phantom.attributes()
        findings = tuple(Finding(**f) for f in row["attributes"]["findings"])
        assert parse_caption(row["caption"]) == (row["modality"], findings)
        assert all(len(pair) == 2 and pair[1] in ANSWERS for pair in row["qa"])

        image = Image.open(out / row["image"])
        assert image.size == (64, 64) and image.mode == ("RGB" if row["modality"] == "fundus" else "L")
        pixels = np.asarray(image, dtype=np.float32) / 255
        assert np.abs(pixels - phantom.image).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
        assert read_phantom(pixels) == (row["modality"], findings)


def test_cli_is_deterministic_and_splits_are_seeded(tmp_path):
    for name in ("a", "b"):
        main(["--out", str(tmp_path / name), "--num", "5", "--size", "32", "--split-fraction", "0.4"])
    assert (tmp_path / "a/manifest.jsonl").read_text() == (tmp_path / "b/manifest.jsonl").read_text()
    assert (tmp_path / "a/images/000004.png").read_bytes() == (tmp_path / "b/images/000004.png").read_bytes()


@pytest.mark.parametrize(
    "bad", [["--num", "0"], ["--num", "3", "--split-fraction", "1.0"], ["--num", "3", "--modalities", "pet"]]
)
def test_cli_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), *bad])


def test_cli_runs_as_module(tmp_path):
    cmd = [sys.executable, "-m", "tools.make_phantoms", "--out", str(tmp_path), "--num", "2", "--size", "32"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 phantoms" in done.stdout and (tmp_path / "images/000001.png").exists()
