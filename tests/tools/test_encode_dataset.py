import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from torch.utils.data import DistributedSampler, IterableDataset

from tokenizer.api import create_tokenizer, tokenize_image
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.data.datasets import BadSample, FolderDataset, ManifestDataset
from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.phantom_text import phantom_questions
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.encode import (
    PendingRowSampler,
    RecordedDataset,
    ShardPredictionWriter,
    normalise_qa,
    rank_share,
)
from tokenizer.errors import InputError
from tokenizer.shards import CodeShard
from tools.encode_dataset import encode
from tools.schemas import EncodeRun

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tokenizer(create_tokenizer("tiny").eval(), tmp_path_factory.mktemp("tok") / "tiny")


class Stream(IterableDataset):
    def __iter__(self):
        return iter(())


def make_run(*overrides: str) -> EncodeRun:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("encode_dataset", overrides=["trainer.progress_bar=false", *overrides])
    return OmegaConf.to_object(cfg)


def shard_arrays(directory: Path) -> tuple[np.ndarray, list[dict]]:
    shard = CodeShard(directory)
    return np.stack([shard.codes(i).numpy() for i in range(len(shard))]), shard.rows()


def test_config_composes_with_fp32_and_required_fields(checkpoint, tmp_path):
    run = make_run(
        f"tokenizer.checkpoint={checkpoint}",
        f"out={tmp_path}",
        "trainer=ddp",
        "data=manifest",
        "data.path=m.jsonl",
    )
    assert isinstance(run, EncodeRun) and run.trainer.strategy == "ddp"
    assert run.trainer.precision == "32-true"  # the YAML keeps codes identical to tokenize_image's
    with pytest.raises(MissingMandatoryValue):
        make_run(f"out={tmp_path}")  # no tokenizer.checkpoint


def test_rank_shares_partition_the_pending_rows():
    pending = [0, 2, 3, 7, 8, 9, 11]
    for world in (1, 2, 3, 8):
        shares = [rank_share(pending, r, world) for r in range(world)]
        assert sum(shares, []) == pending and max(map(len, shares)) - min(map(len, shares)) <= 1
    sampler = PendingRowSampler(pending, rank=1, world_size=2)
    assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it instead of injecting its own
    assert list(sampler) == [7, 8, 9, 11] and len(sampler) == 4
    assert normalise_qa([["q?", "a"]], "x") == [{"question": "q?", "answer": "a"}]
    with pytest.raises(InputError, match="x: a 'qa' entry"):
        normalise_qa([["only one"]], "x")
    with pytest.raises(InputError, match="fixed row numbers"):  # e.g. data=stream
        ShardPredictionWriter(
            "s",
            Stream(),
            tokenizer_config={},
            num_codebooks=1,
            codebook_size=2,
            grid=(1, 1),
            max_bad_fraction=0.0,
        )


def test_phantom_shard_equals_encode_to_codes(checkpoint, tmp_path):
    out = tmp_path / "phantoms"
    encode(
        make_run(
            f"tokenizer.checkpoint={checkpoint}",
            f"out={out}",
            "data.num_train=10",
            "data.seed=3",
            "data.batch_size=4",
            "split=val",
        )
    )
    codes, rows = shard_arrays(out)
    tok = load_tokenizer(checkpoint)
    dataset = PhantomDataset(10, seed=3, size=32)
    images = torch.stack([dataset[i]["image"] for i in range(10)])
    np.testing.assert_array_equal(codes, tok.encode_to_codes(images).numpy())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (checkpoint / "config.json").read_text()
    )
    for i, row in enumerate(rows):
        phantom = dataset.phantom(i)
        qa = phantom_questions(phantom, np.random.default_rng([3, i, 0x0A]))  # as tools/make_phantoms
        assert row["source"] == f"phantom:3:{i}" and row["split"] == "val" and "bad" not in row
        assert (row["caption"], row["modality"]) == (phantom.caption, phantom.modality)
        assert row["attributes"] == phantom.attributes()
        assert row["qa"] == [{"question": q, "answer": a} for q, a in qa]


def write_manifest(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(
            {
                "image": f"{i}.png",
                "caption": f"image {i}",
                "modality": "xray",
                "split": "train",
                "attributes": {"i": i},
                "qa": [[f"which {i}?", "this"]],
            }
        )
    rows.insert(2, {"image": "gone.png", "caption": "missing", "split": "train"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def test_manifest_with_a_bad_row(checkpoint, tmp_path):
    manifest = write_manifest(tmp_path / "data")
    out = tmp_path / "shard"
    base = [
        f"tokenizer.checkpoint={checkpoint}",
        f"out={out}",
        "data=manifest",
        f"data.path={manifest}",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.min_rows_before_failing=1",
    ]
    with pytest.raises(InputError, match="too many bad rows"):
        encode(make_run(*base, "data.max_bad_fraction=0.1"))
    assert not (out / "index.jsonl").exists()  # a failed run is never finalized
    with pytest.raises(InputError, match=r"1 of 5 rows are bad .*not finalized"):
        encode(make_run(*base, "data.max_bad_fraction=0.1", "data.batch_size=8"))  # rows done, still too many
    encode(make_run(*base, "data.max_bad_fraction=0.3"))

    codes, rows = shard_arrays(out)
    assert codes.shape == (5, 2, 8, 8)
    bad = rows[2]
    assert bad["bad"] and "gone.png" in bad["bad"] and bad["caption"] == "" and "qa" not in bad
    assert not codes[2].any()
    tok = load_tokenizer(checkpoint)
    good = [0, 1, 3, 4]
    expected = tokenize_image([manifest.parent / f"{i}.png" for i in range(4)], tok, modality="xray")
    np.testing.assert_array_equal(codes[good], expected.numpy())
    for n, i in enumerate(good):
        assert rows[i]["source"] == str(manifest.parent / f"{n}.png")
        assert rows[i]["attributes"] == {"i": n} and rows[i]["qa"] == [
            {"question": f"which {n}?", "answer": "this"}
        ]
        assert (rows[i]["caption"], rows[i]["split"], rows[i]["modality"]) == (f"image {n}", "train", "xray")


def _complete_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def test_sigkill_then_resume_equals_an_uninterrupted_run(checkpoint, tmp_path, caplog):
    num = 60
    args = [f"tokenizer.checkpoint={checkpoint}", f"data.num_train={num}", "data.batch_size=2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tools.encode_dataset", *args, f"out={killed}", "trainer.progress_bar=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log_path = killed / "index.rank0.jsonl"
    deadline = time.monotonic() + 240
    while _complete_lines(log_path) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done = _complete_lines(log_path)
    assert 10 <= done < num and not (killed / "index.jsonl").exists()

    with caplog.at_level(logging.INFO, logger="tokenizer.encode"):
        encode(make_run(*args, f"out={killed}", "data.batch_size=3"))
    assert f"{done} of {num} rows finished earlier, {num - done} to encode" in caplog.text
    clean = tmp_path / "clean"
    encode(make_run(*args, f"out={clean}"))
    killed_codes, killed_rows = shard_arrays(killed)
    clean_codes, clean_rows = shard_arrays(clean)
    assert len(killed_rows) == num and [r["row"] for r in killed_rows] == list(range(num))
    np.testing.assert_array_equal(killed_codes, clean_codes)
    assert killed_rows == clean_rows
    assert not list(killed.glob("index.rank*.jsonl"))


@pytest.mark.slow
def test_two_ddp_ranks_on_cpu_equal_one(checkpoint, tmp_path):
    args = [
        f"tokenizer.checkpoint={checkpoint}",
        "data.num_train=21",
        "data.batch_size=4",
        "trainer.progress_bar=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "tools.encode_dataset",
        *args,
        f"out={tmp_path / 'ddp'}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
    encode(make_run(*args, f"out={tmp_path / 'one'}"))
    ddp_codes, ddp_rows = shard_arrays(tmp_path / "ddp")
    one_codes, one_rows = shard_arrays(tmp_path / "one")
    np.testing.assert_array_equal(ddp_codes, one_codes)
    assert ddp_rows == one_rows


def test_records_of_folders_and_malformed_manifest_rows(tmp_path):
    cfg = PreprocessConfig(image_size=16, channels=1)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    item = RecordedDataset(FolderDataset(tmp_path, cfg, modality="mr"), split="test")[0]
    assert item["record"] == {
        "source": str(tmp_path / "a.png"),
        "modality": "mr",
        "caption": "",
        "split": "test",
    }

    rows = [{"image": "a.png", "qa": "not a list"}, {"image": "a.png", "source": "clash"}, {"image": "a.png"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = RecordedDataset(ManifestDataset(tmp_path / "m.jsonl", cfg))
    first, second, third = (dataset[i] for i in range(3))
    assert isinstance(first, BadSample) and "m.jsonl:1: 'qa' must be a list" in first.reason
    assert isinstance(second, BadSample) and "['source'] are reserved" in second.reason
    assert third["record"]["source"] == str(tmp_path / "a.png") and third["image"].shape == (1, 16, 16)
