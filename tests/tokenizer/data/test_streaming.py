"""LitData streams: conversion, per-rank / per-worker splitting, seeded order, resume, Lightning wiring."""

from __future__ import annotations

import filecmp
import io
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.data.datamodule import DataConfig, build_dataset
from tokenizer.data.datasets import ManifestDataset
from tokenizer.data.intensity import CT_WINDOWS, PreprocessConfig, resize_square
from tokenizer.data.io import LoadedImage
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.data.streaming import (
    ShardOptions,
    StreamingImageDataset,
    decode_image,
    encode_image,
    stream_loader,
    write_manifest_stream,
    write_phantom_stream,
)
from tokenizer.errors import InputError

SIZE = 32
NUM = 64
CFG = PreprocessConfig(image_size=SIZE, channels=3)
# Small chunks so the 64 samples span many chunk files (about 5 samples each).
FAST = ShardOptions(num_workers=2, chunk_bytes="16KB", start_method="fork")


@pytest.fixture(autouse=True)
def _writer_cache(tmp_path, monkeypatch):
    """litdata's writers keep scratch files under these folders (default: the system temp dir)."""
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "writer_cache"))
    monkeypatch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp_path / "writer_data"))


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict:
    """The same 64 phantoms written twice (determinism) plus a second, smaller stream for validation."""
    root = tmp_path_factory.mktemp("streams")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(root / "writer_cache"))
        mp.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(root / "writer_data"))
        reports = [write_phantom_stream(root / name, NUM, seed=0, size=SIZE, options=FAST) for name in "ab"]
    return {"dir": root / "a", "copy": root / "b", "report": reports[0]}


def _loader(path, *, seed=3, shuffle=True, train=False, workers=2, batch=4):
    dataset = StreamingImageDataset(path, CFG, shuffle=shuffle, seed=seed, train=train)
    return stream_loader(dataset, batch_size=batch, num_workers=workers)


def _indices(batches) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


# ----------------------------------------------------------------------------------------------
# Conversion.


def test_phantom_stream_matches_the_dataset(streams):
    report = streams["report"]
    assert (report.num_inputs, report.num_written, report.num_dropped) == (NUM, NUM, 0)
    chunks = sorted(p.name for p in streams["dir"].glob("*.bin"))
    assert len(chunks) >= 8 and {name.split("-")[1] for name in chunks} == {"0", "1"}  # both writers
    dataset = StreamingImageDataset(streams["dir"], CFG)
    reference = PhantomDataset(NUM, seed=0, size=SIZE)
    assert len(dataset) == NUM
    for position in range(NUM):
        sample = dataset[position]
        expected = reference[sample["index"]]
        assert sample.keys() == expected.keys()
        assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
        assert (sample["image"] - expected["image"]).abs().max() <= 1 / 65535 + 1e-6  # 16-bit storage
        assert [sample[k] for k in ("caption", "modality", "source")] == [
            expected[k] for k in ("caption", "modality", "source")
        ]
    gray = StreamingImageDataset(streams["dir"], PreprocessConfig(image_size=SIZE, channels=1))
    sample = gray[0]
    expected = PhantomDataset(NUM, seed=0, size=SIZE, channels=1)[sample["index"]]["image"]
    assert sample["image"].shape == (1, SIZE, SIZE)
    assert (sample["image"] - expected).abs().max() < 1e-4


def test_conversion_is_deterministic(streams):
    names = sorted(p.name for p in streams["dir"].iterdir())
    assert names == sorted(p.name for p in streams["copy"].iterdir())
    chunks = [name for name in names if name.endswith(".bin")]
    _, mismatch, errors = filecmp.cmpfiles(streams["dir"], streams["copy"], chunks, shallow=False)
    assert not mismatch and not errors
    index = [json.loads((streams[k] / "index.json").read_text())["chunks"] for k in ("dir", "copy")]
    assert index[0] == index[1]


def _write_png(path: pathlib.Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.name


def _manifest_folder(root: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40]
    smooth = (yy * 3 + xx * 2).astype(np.float64)
    _write_png(root / "gray8.png", (smooth / smooth.max() * 255).astype(np.uint8))
    _write_png(root / "gray16.png", (smooth / smooth.max() * 60000).astype(np.uint16))
    _write_png(root / "rgb.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    hu = np.stack([smooth * 10 - 1000 + 20 * k for k in range(3)], axis=-1).astype(np.int16)  # (48, 40, 3)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "ct.nii.gz"))
    rows = [
        {"image": "gray8.png", "caption": "eight", "modality": "xray", "split": "train"},
        {"image": "gray16.png", "caption": "sixteen", "modality": "mr", "split": "train"},
        "{not json",
        {"image": "rgb.png", "caption": "colour", "modality": "fundus", "split": "train"},
        {"image": "missing.png", "split": "train"},
        {"image": "ct.nii.gz", "modality": "ct", "slice": 1, "window": "soft_tissue", "split": "train"},
        {"image": "ct.nii.gz", "modality": "ct", "slice": 2, "split": "train"},
        {"image": "gray8.png", "split": "val"},
    ]
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def test_manifest_stream_rows_bad_rows_and_stored_forms(tmp_path):
    manifest = _manifest_folder(tmp_path / "data")
    options = ShardOptions(start_method="fork")
    report = write_manifest_stream(
        manifest, tmp_path / "stream", CFG, split="train", max_bad_fraction=1.0, options=options
    )
    assert (report.num_inputs, report.num_written) == (6, 5)
    assert [b.line for b in report.bad_rows] == [3]
    assert len(report.failures) == 1 and report.failures[0][:2] == (3, str(tmp_path / "data" / "missing.png"))
    assert "dropped 2 (1 bad manifest lines, 1 unreadable)" in report.summary()

    from litdata import StreamingDataset

    raw = {r["index"]: r for r in (StreamingDataset(str(tmp_path / "stream"))[i] for i in range(5))}
    dtypes = {i: (r["pixels"].dtype.name, r["pixels"].shape) for i, r in raw.items()}
    assert dtypes == {
        0: ("uint8", (1, SIZE, SIZE)),
        1: ("uint16", (1, SIZE, SIZE)),
        2: ("uint8", (3, SIZE, SIZE)),
        4: ("int16", (1, SIZE, SIZE)),
        5: ("int16", (1, SIZE, SIZE)),
    }
    assert raw[4]["window"] == b"soft_tissue" and raw[5]["window"] == b""

    stream = StreamingImageDataset(tmp_path / "stream", CFG)
    reference = ManifestDataset(manifest, CFG, split="train")
    tolerance = {0: 1 / 255, 1: 1 / 65535, 2: 1 / 255}
    for position in range(5):
        sample = stream[position]
        expected = reference[sample["index"]]
        assert [sample[k] for k in ("caption", "modality", "source")] == [
            expected[k] for k in ("caption", "modality", "source")
        ]
        difference = (sample["image"] - expected["image"]).abs()
        if sample["index"] in tolerance:  # same order of operations, only the storage rounding differs
            assert difference.max() <= tolerance[sample["index"]] + 1e-5
        else:  # CT: the window is applied after the resize instead of before
            assert difference.mean() < 0.02

    with pytest.raises(InputError, match="too many bad rows: dropped 2 of 7 rows"):
        write_manifest_stream(
            manifest, tmp_path / "strict", CFG, split="train", min_rows_before_failing=1, options=options
        )
    with pytest.raises(InputError, match="a stream is already there"):
        write_manifest_stream(manifest, tmp_path / "stream", CFG, options=options)
    with pytest.raises(InputError, match="no usable rows"):
        write_manifest_stream(manifest, tmp_path / "none", CFG, split="test", options=options)


def test_encode_decode_ct_windows_and_bad_arrays():
    hu = np.linspace(-1200, 1500, 40 * 40, dtype=np.float32).reshape(40, 40)
    stored = encode_image(LoadedImage(hu, "ct", "<hu>", {"is_hu": True, "dtype": "int16"}), CFG)
    assert stored.dtype == np.int16 and stored.shape == (1, SIZE, SIZE)
    expected_hu = resize_square(torch.from_numpy(hu)[None], SIZE)[0]
    low, high = CT_WINDOWS["lung"]
    expected = ((expected_hu - low) / (high - low)).clamp(0, 1) * 2 - 1
    image = decode_image(stored, CFG, window="lung")
    assert image.shape == (3, SIZE, SIZE) and (image[0] - expected).abs().max() < 2 / (high - low) + 1e-5
    assert torch.equal(decode_image(stored, CFG), decode_image(stored, CFG, window=CFG.eval_ct_window))
    drawn = {decode_image(stored, CFG, rng=np.random.default_rng(seed)).sum().item() for seed in range(12)}
    assert len(drawn) > 1  # training draws among cfg.train_ct_windows
    assert decode_image(stored, CFG, window=(-100.0, 300.0)).shape == (3, SIZE, SIZE)
    resized = decode_image(stored, PreprocessConfig(image_size=16, channels=1), window="lung")
    assert resized.shape == (1, 16, 16)
    eight_bit_ct = encode_image(LoadedImage(hu.clip(0, 255), "ct", "<png>", {"dtype": "uint8"}), CFG)
    assert eight_bit_ct.dtype == np.uint8  # an 8-bit CT export is not in HU (rule 2 of to_unit)
    with pytest.raises(InputError, match=r"<x>: stored pixels float32 \(1, 4, 4\)"):
        decode_image(np.zeros((1, 4, 4), np.float32), CFG, source="<x>")
    with pytest.raises(InputError, match="<x>: stored pixels int16"):
        decode_image(np.zeros((3, 4, 4), np.int16), CFG, source="<x>")
    with pytest.raises(InputError, match="<bad>: image of shape"):
        encode_image(LoadedImage(np.zeros((4, 4, 2), np.float32), None, "<bad>", {}), CFG)


# ----------------------------------------------------------------------------------------------
# Reading: splitting, order, resume.


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(streams, monkeypatch):
    per_rank: list[list[list[int]]] = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")  # litdata's override of the torch.distributed world
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = _loader(streams["dir"])
        assert len(loader) == NUM // 2 // 4
        per_rank.append([_indices(loader) for _epoch in range(2)])
    for epoch in range(2):
        rank0, rank1 = per_rank[0][epoch], per_rank[1][epoch]
        assert len(rank0) == len(rank1) == NUM // 2
        assert sorted(rank0 + rank1) == list(range(NUM))  # no duplicates, no gaps
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled every epoch


def test_order_is_deterministic_per_seed(streams):
    first = _indices(_loader(streams["dir"], seed=3))
    assert sorted(first) == list(range(NUM))
    assert _indices(_loader(streams["dir"], seed=3)) == first
    assert _indices(_loader(streams["dir"], seed=4)) != first
    assert sorted(_indices(_loader(streams["dir"], shuffle=False, workers=0))) == list(range(NUM))


def test_resume_from_half_an_epoch_yields_exactly_the_unseen_samples(streams, tmp_path):
    full_loader = _loader(streams["dir"], train=True)
    full = list(full_loader)
    loader = _loader(streams["dir"], train=True)
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(len(full) // 2)]
    state = loader.state_dict()
    del iterator
    buffer = io.BytesIO()
    torch.save(state, buffer)  # checkpoint-safe: plain containers only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed_loader = _loader(streams["dir"], train=True)
    resumed_loader.load_state_dict(state)
    rest = list(resumed_loader)
    assert sorted(_indices(seen) + _indices(rest)) == list(range(NUM))
    assert _indices(seen) == _indices(full[: len(seen)]) and _indices(rest) == _indices(full[len(seen) :])
    for mine, theirs in zip(rest, full[len(seen) :], strict=True):  # same windows and augmentations
        assert torch.equal(mine["image"], theirs["image"])
    assert sorted(_indices(resumed_loader)) == list(range(NUM))  # the next epoch is whole again

    counted = _loader(streams["dir"], train=True)  # stop by counting batches, as Lightning may
    counted.load_state_dict(state)
    iterator = iter(counted)
    assert _indices(next(iterator) for _ in range(len(rest))) == _indices(rest)
    del iterator
    assert sorted(_indices(counted)) == list(range(NUM))  # a new epoch, not the restored rest again


def test_training_samples_are_augmented_and_seeded(streams):
    plain = StreamingImageDataset(streams["dir"], CFG)
    train = StreamingImageDataset(streams["dir"], CFG, train=True, seed=1)
    again = StreamingImageDataset(streams["dir"], CFG, train=True, seed=1)
    other = StreamingImageDataset(streams["dir"], CFG, train=True, seed=2)
    images = [[d[i]["image"] for i in range(8)] for d in (plain, train, again, other)]
    assert all(torch.equal(a, b) for a, b in zip(images[1], images[2], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(images[0], images[1], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(images[1], images[3], strict=True))
    assert all(image.abs().max() <= 1.0 for image in images[1])


def test_not_a_stream(tmp_path):
    with pytest.raises(InputError, match="not a stream"):
        StreamingImageDataset(tmp_path, CFG)


# ----------------------------------------------------------------------------------------------
# Config, data module, Lightning checkpoints, CLI.


def test_stream_kind_in_config_and_data_module(streams):
    from litdata import StreamingDataLoader

    from tokenizer.data.datamodule import ImageDataModule

    with pytest.raises(ValueError, match="needs a path"):
        DataConfig(kind="stream")
    data = DataConfig(kind="stream", path=str(streams["dir"]), batch_size=8, num_workers=2, seed=5)
    assert isinstance(build_dataset(data, CFG, "train"), StreamingImageDataset)
    assert build_dataset(data, CFG, "val") is None
    module = ImageDataModule(data, CFG)
    loader = module.train_dataloader()
    assert isinstance(loader, StreamingDataLoader) and loader.dataset.train and loader.dataset.shuffle
    batches = list(loader)
    assert sorted(_indices(batches)) == list(range(NUM))
    assert batches[0]["image"].shape == (8, 3, SIZE, SIZE) and batches[0]["bad"] == []
    module.on_before_batch_transfer(batches[0], 0)
    assert module.tracker.num_rows == 8
    assert module.val_dataloader() == []
    predict = module.predict_dataloader()
    assert not predict.dataset.train and not predict.dataset.shuffle


def test_stream_preset_composes(streams):
    from tools.schemas import compose

    run = compose("train_tokenizer", ["data=stream", f"data.path={streams['dir']}", "data.seed=7"])
    assert (run.data.kind, run.data.path, run.data.seed) == ("stream", str(streams["dir"]), 7)


def test_lightning_checkpoint_resumes_the_stream_position(streams, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tokenizer.data.datamodule import ImageDataModule

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.weight - batch["image"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(run: str, ckpt_path=None) -> list[list[int]]:
        path = str(streams["dir"])
        data = DataConfig(kind="stream", path=path, val_path=path, batch_size=16, num_workers=2, seed=1)
        model = Recorder()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            val_check_interval=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            callbacks=[ModelCheckpoint(tmp_path / run, every_n_train_steps=3, save_top_k=-1)],
        )
        trainer.fit(model, datamodule=ImageDataModule(data, CFG), ckpt_path=ckpt_path, weights_only=True)
        return model.seen

    whole = fit("whole")  # 4 batches per epoch, 2 epochs; validation inside each epoch
    assert sorted(sum(whole[:4], [])) == sorted(sum(whole[4:], [])) == list(range(NUM))
    checkpoint = next((tmp_path / "whole").glob("*step=3.ckpt"))  # mid-epoch
    state = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["num_samples_yielded"] == 48  # exactly the three batches trained on
    # The rest of epoch 1, then a whole, identically shuffled epoch 2 (no replay of the restored rest).
    assert fit("resumed", ckpt_path=checkpoint) == whole[3:]


def test_cli_writes_and_measures(tmp_path, capsys):
    from tools.make_stream import main

    out = tmp_path / "cli"
    main(["phantoms", str(out), "--num", "8", "--size", "16", "--seed", "2", "--start-method", "fork"])
    assert "wrote 8 samples" in capsys.readouterr().out
    main(["measure", str(out), "--size", "16", "--workers", "0", "--batch-size", "4", "--eval"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 8 and result["images_per_s"] > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["phantoms", str(out), "--num", "8", "--start-method", "fork"])
    assert exit_info.value.code == 1 and "a stream is already there" in capsys.readouterr().err
