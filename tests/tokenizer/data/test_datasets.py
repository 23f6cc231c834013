"""Manifests, datasets, collation, bad-row accounting, augmentation and the data module."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from tokenizer.data.datamodule import DataConfig, build_dataset
from tokenizer.data.datasets import (
    Augment,
    AugmentConfig,
    BadRowTracker,
    BadSample,
    FolderDataset,
    ManifestDataset,
    VolumeSliceDataset,
    collate_samples,
)
from tokenizer.data.intensity import PreprocessConfig
from tokenizer.data.io import read_image
from tokenizer.data.manifest import read_manifest
from tokenizer.errors import InputError

DICOM_DIR = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
CFG = PreprocessConfig(image_size=16, channels=3)
KEYS = {"image", "caption", "modality", "index", "source"}


def _png(path: pathlib.Path, seed: int = 0, size: tuple[int, int] = (20, 24)) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)
    return path


def _write_jsonl(path: pathlib.Path, lines: list) -> pathlib.Path:
    raw = [
        line
        if isinstance(line, bytes)
        else (json.dumps(line) if not isinstance(line, str) else line).encode()
        for line in lines
    ]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def test_jsonl_manifest_good_and_bad_rows(tmp_path):
    _png(tmp_path / "img" / "a.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "image": "img/a.png",
                "caption": "a\u2028b",
                "modality": "CT",
                "split": "train",
                "window": "lung",
                "slice": 0,
                "attributes": {"count": 2},
                "qa": [["q", "a"]],
            },
            "",
            {"image": "img/a.png", "window": [-100, 300]},
            "{not json",
            b'{"image": "img/a.png", "caption": "caf\xe9"}',
            {"caption": "no image"},
            {"image": 7},
            {"image": "img/a.png", "caption": 3},
            {"image": "img/a.png", "slice": -1},
            {"image": "img/a.png", "slice": True},
            {"image": "img/a.png", "window": "brain"},
            {"image": "img/a.png", "modality": "spectroscopy"},
            ["img/a.png"],
            {"image": "../outside.png"},
            {"image": "/etc/passwd"},
        ],
    )
    rows, bad = read_manifest(manifest)
    assert [r.line for r in rows] == [1, 3]
    first = rows[0]
    assert first.image == tmp_path / "img" / "a.png" and first.image.is_absolute()
    assert first.caption == "a\u2028b" and first.modality == "ct" and first.split == "train"
    assert first.window == "lung" and first.slice_index == 0
    assert first.extra == {"attributes": {"count": 2}, "qa": [["q", "a"]]}
    assert rows[1].window == (-100.0, 300.0) and rows[1].caption == "" and rows[1].modality is None
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == list(range(4, 16))
    expected = {
        4: "invalid JSON",
        5: "not valid UTF-8",
        6: "missing 'image'",
        7: "'image' must be a string",
        8: "'caption' must be a string",
        9: "'slice' must be a non-negative integer",
        10: "'slice' must be a non-negative integer",
        11: "'window' must be one of",
        12: "unknown modality 'spectroscopy'",
        13: "expected a JSON object",
        14: "escapes the manifest folder",
        15: "escapes the manifest folder",
    }
    for line, text in expected.items():
        assert text in reasons[line], (line, reasons[line])


def test_outside_root_allowed_when_asked(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = _write_jsonl(tmp_path / "sub" / "m.jsonl", [{"image": "../x.png"}, {"image": "./a/../y.png"}])
    rows, bad = read_manifest(manifest, allow_outside_root=True)
    assert [r.image for r in rows] == [tmp_path / "x.png", tmp_path / "sub" / "y.png"] and not bad
    rows, bad = read_manifest(manifest)
    assert [r.image for r in rows] == [tmp_path / "sub" / "y.png"] and bad[0].line == 1


def test_csv_manifest(tmp_path):
    text = (
        "image,caption,window,slice,attributes\n"
        'a.png,"two\nlines",lung,3,x=1\n'
        '"b.png","plain","-150,250",,\n'
        "c.png,too,many,fields,here,now\n"
        "d.png,cap,full,notanumber,\n"
    )
    data = text.encode() + b"e.png,bad \xff byte,,,\n"
    (tmp_path / "m.csv").write_bytes(data)
    rows, bad = read_manifest(tmp_path / "m.csv")
    assert [(r.image.name, r.line) for r in rows] == [("a.png", 2), ("b.png", 4)]
    assert (
        rows[0].caption == "two\nlines"
        and rows[0].slice_index == 3
        and rows[0].extra == {"attributes": "x=1"}
    )
    assert rows[1].window == (-150.0, 250.0) and rows[1].slice_index is None
    assert [(b.line, b.reason.split(" ")[0]) for b in bad] == [(5, "has"), (6, "column"), (7, "the")]
    assert "not valid UTF-8" in bad[2].reason
    (tmp_path / "nohead.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(InputError, match="nohead.csv: the CSV header .* has no 'image' column"):
        read_manifest(tmp_path / "nohead.csv")
    with pytest.raises(InputError, match="manifest must be"):
        read_manifest(_png(tmp_path / "m.png"))


def _dataset_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    shutil.copy(DICOM_DIR / "CT_small.dcm", tmp_path / "ct.dcm")
    lines = [
        {"image": "a.png", "caption": "first", "split": "train"},
        {"image": "missing.png", "caption": "gone", "split": "train"},
        {"image": "ct.dcm", "split": "val", "window": "soft_tissue"},
        {"image": "b.png", "modality": "xray", "split": "val"},
        "{broken",
    ]
    _write_jsonl(tmp_path / "data.jsonl", lines)
    return tmp_path / "data.jsonl"


def test_manifest_dataset_samples_and_bad_samples(tmp_path, caplog):
    manifest = _dataset_dir(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = ManifestDataset(manifest, CFG)
    assert "line 5 skipped: invalid JSON" in caplog.text
    assert len(dataset) == 4 and dataset.num_rows_read == 4 and len(dataset.bad_rows) == 1
    sample = dataset[0]
    assert set(sample) == KEYS and sample["caption"] == "first" and sample["modality"] == ""
    assert sample["image"].shape == (3, 16, 16) and sample["image"].min() >= -1 and sample["image"].max() <= 1
    assert sample["source"] == str(tmp_path / "a.png") and sample["index"] == 0
    missing = dataset[1]
    assert (
        isinstance(missing, BadSample)
        and missing.index == 1
        and "missing.png: file not found" in missing.reason
    )
    ct = dataset[2]
    assert ct["modality"] == "ct" and ct["caption"] == ""
    expected = torch.tensor(read_image(tmp_path / "ct.dcm").pixels)
    assert ct["image"][0].mean() != pytest.approx(float(expected.mean()))  # windowed, not raw
    assert dataset[3]["modality"] == "xray"

    batch = collate_samples([dataset[i] for i in range(4)], image_shape=(3, 16, 16))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["index"].tolist() == [0, 2, 3]
    assert batch["caption"] == ["first", "", ""] and batch["bad"][0][:2] == (1, str(tmp_path / "missing.png"))
    empty = collate_samples([missing], image_shape=(3, 16, 16))
    assert empty["image"].shape == (0, 3, 16, 16) and empty["index"].numel() == 0 and len(empty["bad"]) == 1

    val = ManifestDataset(manifest, CFG, split="val")
    assert [r.image.name for r in val.rows] == ["ct.dcm", "b.png"]
    with pytest.raises(InputError, match="no rows with split 'test'; splits present: \\['train', 'val'\\]"):
        ManifestDataset(manifest, CFG, split="test")


def test_training_samples_are_random_but_reproducible(tmp_path):
    manifest = _dataset_dir(tmp_path)
    dataset = ManifestDataset(manifest, CFG, train=True)
    torch.manual_seed(3)
    first = [dataset[2]["image"] for _ in range(6)]
    torch.manual_seed(3)
    again = [dataset[2]["image"] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(first[0], x) for x in first[1:])


def test_bad_row_tracker(caplog):
    tracker = BadRowTracker(max_fraction=0.1, min_rows=20)
    with caplog.at_level(logging.WARNING):
        tracker.update(5, [(1, "x.png", "x.png: broken"), BadSample(2, "y.png", "truncated")])
    assert "skipped row 1: x.png: broken" in caplog.text and "skipped row 2: y.png: truncated" in caplog.text
    assert tracker.num_rows == 7 and tracker.num_bad == 2  # 28 % bad, but fewer than min_rows seen
    tracker.update(12, [])
    assert tracker.fraction == pytest.approx(2 / 19)
    with pytest.raises(
        InputError, match=r"too many bad rows: dropped 3 of 20 rows \(15.00%\).*limit is 10.00%"
    ):
        tracker.update(0, [(9, "z.png", "gone")])
    assert "x.png: x.png: broken" in tracker.summary()
    ok = BadRowTracker(max_fraction=0.5, min_rows=1)
    ok.update(3, [(0, "a", "b")])
    assert ok.summary().startswith("dropped 1 of 4 rows (25.00%)")


def test_folder_dataset_recursive_sorted(tmp_path):
    _png(tmp_path / "z" / "b.png", 1)
    _png(tmp_path / "a.PNG", 2)
    _png(tmp_path / "z" / "a" / "c.png", 3)
    _png(tmp_path / ".hidden" / "d.png", 4)
    _png(tmp_path / "._e.png", 5)
    (tmp_path / "notes.txt").write_text("x")
    shutil.copy(DICOM_DIR / "MR_small.dcm", tmp_path / "z" / "mr.dcm")
    dataset = FolderDataset(tmp_path, CFG, modality="xray")
    names = [p.relative_to(tmp_path).as_posix() for p in dataset.files]
    assert names == ["a.PNG", "z/a/c.png", "z/b.png", "z/mr.dcm"]
    assert dataset[0]["modality"] == "xray" and dataset[3]["modality"] == "mr"
    only_dicom = FolderDataset(tmp_path, CFG, extensions=(".dcm",))
    assert len(only_dicom) == 1 and only_dicom[0]["modality"] == "mr"
    with pytest.raises(InputError, match="no files ending in"):
        FolderDataset(tmp_path / "z" / "a", CFG, extensions=(".nii",))


def test_volume_slice_dataset(tmp_path):
    volume = np.zeros((6, 5, 4), dtype=np.int16)
    volume[1:4, 1:3, 1] = 100  # slices 0, 2, 3 along axis 2 are constant
    volume[2, 2, 2] = -50
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "broken.nii").write_bytes(b"\x00" * 10)
    paths = [tmp_path / "v.nii.gz", tmp_path / "broken.nii", DICOM_DIR / "rtdose.dcm"]
    dataset = VolumeSliceDataset(paths, CFG, modality="ct")
    assert (
        dataset.slices[:2] == [(0, 1), (0, 2)] and len(dataset.skipped) == 1 and dataset.skipped[0].line == 1
    )
    assert len(dataset) == 2 + 15
    sample = dataset[0]
    assert (
        set(sample) == KEYS and sample["modality"] == "ct" and sample["source"].endswith("[axis=2,slice=1]")
    )
    assert sample["image"].shape == (3, 16, 16)
    assert dataset[2]["modality"] == "ct" and dataset[2]["source"].endswith("rtdose.dcm[axis=2,slice=0]")
    everything = VolumeSliceDataset(tmp_path / "v.nii.gz", CFG, drop_empty=False, axis=0)
    assert len(everything) == 6
    expected = read_image(tmp_path / "v.nii.gz", axis=0, slice_index=2).pixels
    direct = ManifestDataset(
        _write_jsonl(tmp_path / "m.jsonl", [{"image": "v.nii.gz", "slice": 2}]), CFG, axis=0
    )
    assert torch.equal(everything[2]["image"], direct[0]["image"]) and expected.shape == (4, 5)
    from_dir = VolumeSliceDataset(tmp_path, CFG)
    assert len(from_dir) == 2 and len(from_dir.skipped) == 1  # broken.nii is found and skipped
    with pytest.raises(InputError, match="no usable slices"):
        VolumeSliceDataset([tmp_path / "broken.nii"], CFG)


def test_augment_switches():
    image = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    off = AugmentConfig(crop_scale=(1.0, 1.0), hflip=0, vflip=0, rotate90=0, grayscale=0)
    assert torch.equal(Augment(off)(image), image)
    flip = AugmentConfig(crop_scale=(1.0, 1.0), hflip=1, vflip=0, rotate90=0, grayscale=0)
    assert torch.equal(Augment(flip)(image), image.flip(-1))
    turn = Augment(AugmentConfig(crop_scale=(1.0, 1.0), hflip=0, vflip=0, rotate90=1, grayscale=0))(image)
    assert torch.equal(turn, torch.rot90(image, 1, (1, 2))) or torch.equal(
        turn, torch.rot90(image, -1, (1, 2))
    )
    gray = Augment(AugmentConfig(crop_scale=(1.0, 1.0), hflip=0, vflip=0, rotate90=0, grayscale=1))(image)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    crop = Augment(AugmentConfig(crop_scale=(0.5, 0.6), hflip=0, vflip=0, rotate90=0, grayscale=0))
    out = crop(image, generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape and not torch.equal(out, image) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, crop(image, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="hflip is a probability"):
        AugmentConfig(hflip=2.0)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.9, 0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "parquet"}, "data kind must be one of"),
        ({"kind": "folder"}, "needs a path"),
        ({"batch_size": 0}, "batch_size >= 1"),
        ({"max_bad_fraction": 1.5}, "max_bad_fraction"),
        ({"axis": 3}, "axis must be"),
        ({"modalities": ["ct", "pet-ct"]}, "unknown modality 'pet-ct'"),
    ],
)
def test_data_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_manifest_with_too_many_bad_lines_fails_early(tmp_path):
    lines = [{"image": f"{i}.png", "split": "train"} for i in range(60)] + ["{bad"] * 3
    manifest = _write_jsonl(tmp_path / "m.jsonl", lines)
    data = DataConfig(kind="manifest", path=str(manifest), max_bad_fraction=0.01)
    with pytest.raises(InputError, match="too many bad rows: dropped 3 of 63 rows"):
        build_dataset(data, CFG, "train")
    lenient = DataConfig(kind="manifest", path=str(manifest), max_bad_fraction=0.1)
    assert len(build_dataset(lenient, CFG, "train")) == 60
    assert build_dataset(DataConfig(kind="manifest", path=str(manifest), val_split=None), CFG, "val") is None


def test_phantom_kind_uses_phantom_dataset(monkeypatch):
    calls = []

    class FakePhantoms(torch.utils.data.Dataset):
        def __init__(self, num_images, *, seed, size, channels, modalities):
            calls.append((num_images, seed, size, channels, modalities))

    fake = types.ModuleType("tokenizer.data.phantoms")
    fake.PhantomDataset = FakePhantoms
    monkeypatch.setitem(sys.modules, "tokenizer.data.phantoms", fake)
    data = DataConfig(num_train=10, num_val=3, seed=5, modalities=["ct", "mr"])
    assert isinstance(build_dataset(data, CFG, "train"), FakePhantoms)
    build_dataset(data, CFG, "val")
    assert calls == [(10, 5, 16, 3, ["ct", "mr"]), (3, 6, 16, 3, ["ct", "mr"])]


def test_datamodule_loaders_and_bad_fraction(tmp_path):
    from tokenizer.data.datamodule import ImageDataModule

    for i in range(6):
        _png(tmp_path / "train" / f"{i}.png", i)
    (tmp_path / "train" / "bad.png").write_bytes(b"junk")
    _png(tmp_path / "val" / "v.png", 9)
    data = DataConfig(
        kind="folder",
        path=str(tmp_path / "train"),
        val_path=str(tmp_path / "val"),
        batch_size=4,
        num_workers=0,
        max_bad_fraction=0.2,
        min_rows_before_failing=1,
    )
    module = ImageDataModule(data, CFG)
    batches = list(module.predict_dataloader())
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert batches[1]["bad"][0][0] == 6 and batches[1]["image"].shape == (2, 3, 16, 16)
    for batch in batches:
        module.on_before_batch_transfer(batch, 0)
    assert module.tracker.num_bad == 1 and module.tracker.num_rows == 7
    train = list(module.train_dataloader())
    assert all(b["image"].shape[0] + len(b["bad"]) == 4 for b in train)  # last partial batch dropped
    assert len(list(module.val_dataloader())) == 1
    strict = ImageDataModule(
        DataConfig(
            kind="folder",
            path=str(tmp_path / "train"),
            batch_size=7,
            num_workers=0,
            min_rows_before_failing=1,
        ),
        CFG,
    )
    assert strict.val_dataloader() == []
    with pytest.raises(InputError, match="too many bad rows: dropped 1 of 7"):
        strict.on_before_batch_transfer(next(iter(strict.predict_dataloader())), 0)


def test_reading_modules_do_not_import_lightning():
    code = (
        "import sys, tokenizer.data.datamodule, tokenizer.data.datasets, tokenizer.data.intensity, "
        "tokenizer.data.manifest; assert 'lightning' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
