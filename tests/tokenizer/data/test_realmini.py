"""realmini: builds from installed packages, split by source, readable manifest, determinism, bad files."""

from __future__ import annotations

import collections
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage
import torch
from PIL import Image

from tokenizer.data.datasets import ManifestDataset
from tokenizer.data.intensity import CT_WINDOWS, PreprocessConfig
from tokenizer.data.manifest import read_manifest
from tokenizer.data.realmini import (
    RealminiConfig,
    Source,
    assign_splits,
    discover_sources,
    find_packages,
)
from tokenizer.data.realmini_catalogue import dicom_group
from tokenizer.data.realmini_render import informative, pyramid
from tools.make_realmini import main

ROOT = Path(__file__).resolve().parents[3]
DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
SKIMAGE_DIR = Path(skimage.__file__).parent / "data"
FAST = ["--size", "64", "--max-per-source", "40", "--max-per-test-source", "20", "--max-slices-per-axis", "8"]
FAST += ["--max-frames", "4"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realmini") / "a"
    main(["--out", str(out), *FAST])
    return out


def test_build_from_installed_packages(built):
    rows = _rows(built)
    modalities = {r["modality"] for r in rows}
    assert {"ct", "mr", "us", "fundus", "histology"} <= modalities, modalities
    assert {r["split"] for r in rows} == {"train", "test"}
    assert {r["source_package"] for r in rows} >= {"pydicom", "nibabel", "scikit-image"}
    required = (
        "image",
        "caption",
        "modality",
        "split",
        "source_package",
        "source_file",
        "licence",
        "source_id",
    )
    for row in rows:
        assert all(isinstance(row[k], str) and row[k] for k in required), row
        assert "slice" not in row and "window" not in row  # those columns mean "read this from a volume"
        image = Image.open(built / row["image"])
        assert image.size == (64, 64) and image.mode in ("L", "RGB")
        assert (image.mode == "RGB") <= (row["modality"] in ("us", "fundus", "histology"))
        assert (built / row["image"]).resolve().is_relative_to(built.resolve())
    ct = [r for r in rows if r["modality"] == "ct"]
    assert {r["ct_window"] for r in ct if r["split"] == "test"} == {"common"}
    assert {r["ct_window"] for r in ct if r["split"] == "train"} == set(CT_WINDOWS)
    assert all(r["ct_window"].replace("_", " ") in r["caption"] for r in ct)
    mr_slices = [r for r in rows if r["source_id"] == "nibabel:example4d"]
    assert mr_slices and all(r["source_axis"] == 2 and "axial slice" in r["caption"] for r in mr_slices)
    summary = (built / "summary.md").read_text()
    assert "| modality | train | test | total |" in summary and "metadata captions" in summary


def test_split_is_by_source_and_every_modality_is_tested(built):
    rows = _rows(built)
    by_split = {split: {r["source_file"] for r in rows if r["split"] == split} for split in ("train", "test")}
    assert by_split["train"] and by_split["test"] and not by_split["train"] & by_split["test"]
    ids = {split: {r["source_id"] for r in rows if r["split"] == split} for split in ("train", "test")}
    assert not ids["train"] & ids["test"]
    sources = collections.defaultdict(set)
    for row in rows:
        sources[row["modality"]].add((row["source_id"], row["split"]))
    for modality, pairs in sources.items():
        splits = [split for _, split in pairs]
        assert "test" in splits, modality
        assert len(pairs) < 2 or "train" in splits, modality


def test_manifest_reads_into_a_dataset(built):
    rows, bad = read_manifest(built / "manifest.jsonl")
    assert not bad and len(rows) == len(_rows(built))
    assert rows[0].extra["source_package"] and rows[0].slice_index is None and rows[0].window is None
    dataset = ManifestDataset(built / "manifest.jsonl", PreprocessConfig(image_size=64), split="test")
    for index in range(0, len(dataset), max(1, len(dataset) // 8)):
        sample = dataset[index]
        assert isinstance(sample, dict), sample
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
        png = np.asarray(Image.open(dataset.rows[index].image).convert("RGB"), dtype=np.float32)
        expected = torch.from_numpy(png / 127.5 - 1.0).permute(2, 0, 1)  # 8-bit PNG: only / 255 applies
        assert torch.allclose(sample["image"], expected, atol=1e-5)


def test_two_builds_are_identical(built, tmp_path):
    main(["--out", str(tmp_path / "b"), *FAST])
    assert (built / "manifest.jsonl").read_text() == (tmp_path / "b" / "manifest.jsonl").read_text()
    for row in _rows(built)[::37]:
        assert (built / row["image"]).read_bytes() == (tmp_path / "b" / row["image"]).read_bytes()


def test_existing_build_needs_overwrite(built, tmp_path):
    shutil.copytree(built, tmp_path / "c")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["--out", str(tmp_path / "c"), *FAST])
    main(
        [
            "--out",
            str(tmp_path / "c"),
            "--overwrite",
            "--no-installed",
            "--source-root",
            str(_fake_root(tmp_path)),
        ]
    )
    assert {r["source_package"] for r in _rows(tmp_path / "c")} == {"pydicom", "scikit-image"}


def _fake_root(tmp_path: Path) -> Path:
    """An unpacked-wheel folder: two good files, two bad DICOMs, one licence record."""
    root = tmp_path / "wheels"
    dicoms = root / "pydicom" / "data" / "test_files"
    dicoms.mkdir(parents=True)
    shutil.copy(DICOM_DIR / "CT_small.dcm", dicoms)
    shutil.copy(DICOM_DIR / "MR_small.dcm", dicoms)
    (dicoms / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(600))
    raw = (DICOM_DIR / "MR_small.dcm").read_bytes()
    (dicoms / "MR_small_padded.dcm").write_bytes(raw[: len(raw) - 3000])  # header intact, pixels cut
    (root / "skimage" / "data").mkdir(parents=True)
    shutil.copy(SKIMAGE_DIR / "ihc.png", root / "skimage" / "data")
    info = root / "scikit_image-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: scikit-image\nVersion: 9.9\nLicense-Expression: X\n"
    )
    return root


def test_source_roots_bad_files_and_licences(tmp_path):
    packages = find_packages([_fake_root(tmp_path)], installed=False)
    assert [(p.name, p.version, p.licence) for p in packages] == [
        ("pydicom", "unknown", "see package"),
        ("scikit-image", "9.9", "X"),
    ]
    sources, skips = discover_sources(packages, RealminiConfig(size=64))
    reasons = {Path(s.file).name: s.category for s in skips}
    assert reasons["garbage.dcm"] == "no image" and reasons["MR_small_padded.dcm"] == "duplicate"
    assert reasons["retina.jpg"] == "missing" and reasons["microaneurysms.png"] == "missing"
    assert [s.key for s in sources] == ["dicom:ct_small", "dicom:mr_small", "scikit-image:ihc"]
    assert sources[2].licence.startswith("no known copyright") and sources[0].licence.startswith("NEMA")
    # the cut file groups with MR_small (same stem), which outranks it; alone it is unreadable:
    (tmp_path / "wheels" / "pydicom" / "data" / "test_files" / "MR_small.dcm").unlink()
    sources, skips = discover_sources(packages, RealminiConfig(size=64))
    cut = next(s for s in skips if s.file.endswith("MR_small_padded.dcm"))
    assert cut.category == "unreadable" and "pixel data" in cut.reason
    with pytest.raises(ValueError, match="not a directory"):
        find_packages([tmp_path / "nowhere"])


def test_dicom_groups():
    assert dicom_group("RG1_UNCR.dcm") == dicom_group("RG1_J2KI.dcm") == "rg1"
    assert dicom_group("MR_small_jpeg_ls_lossless.dcm") == dicom_group("MR_small.dcm") == "mr_small"
    assert dicom_group("emri_small_jpeg_2k_lossless_too_short.dcm") == "emri_small"
    assert dicom_group("OBXXXX1A_expb_2frame.dcm") == dicom_group("examples_palette.dcm") == "obxxxx1a"
    assert dicom_group("SC_jpeg_no_color_transform_2.dcm") != dicom_group("SC_jpeg_no_color_transform.dcm")


def _source(key: str, modality: str) -> Source:
    return Source(key, None, Path(key), modality, "", "")


def test_assign_splits_is_stratified_and_stable():
    sources = [_source(f"k{i}", "ct") for i in range(20)] + [_source("alone", "us")]
    sources += [_source("a", "mr"), _source("b", "mr")]
    splits = assign_splits(sources, 0.15)
    assert sum(splits[f"k{i}"] == "test" for i in range(20)) == 3
    assert splits["alone"] == "test" and sorted(splits[k] for k in "ab") == ["test", "train"]
    assert assign_splits(list(reversed(sources)), 0.15) == splits


def test_pyramid_levels_overlap_and_empty_tiles():
    image = np.random.default_rng(0).random((300, 520)).astype(np.float32)
    tiles = list(pyramid(image, 64))
    scales = sorted({round(t[0], 3) for t in tiles})
    assert scales == [round(64 / 300, 3), round(128 / 300, 3), round(256 / 300, 3)]  # 300 < 1.5 * 256
    assert all(t[4].shape == (64, 64) for t in tiles)
    level1 = [t for t in tiles if round(t[0], 3) == round(128 / 300, 3)]
    assert len(level1) == 2 * 3 and level1[0][3] == (2, 3)
    overlapped = [t for t in pyramid(image, 64, overlap=True) if round(t[0], 3) == round(128 / 300, 3)]
    assert len(overlapped) == 3 * 5
    big = list(pyramid(np.zeros((400, 400, 3), np.float32), 64))
    assert max(t[0] for t in big) == 1.0 and big[-1][4].shape == (64, 64, 3)  # native level: 400 >= 384
    assert not informative(np.full((8, 8), 0.4, np.float32), 0.03, 0.75)
    half = np.zeros((8, 8), np.float32)
    half[:, :1] = 1.0
    assert not informative(half, 0.03, 0.75) and informative(image[:64, :64], 0.03, 0.75)


def test_config_validation():
    with pytest.raises(ValueError, match="CT window"):
        RealminiConfig(train_ct_windows=("brain",))
    with pytest.raises(ValueError, match="test_fraction"):
        RealminiConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match="max_"):
        replace(RealminiConfig(), max_frames=0)
    assert RealminiConfig(size=128).smallest_side == 86 and RealminiConfig(min_side=10).smallest_side == 10
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--size", "8"])


def test_data_preset_composes():
    """conf/data/realmini.yaml against its schema (registered as tools/schemas.py does, without its imports)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from tokenizer.data.datamodule import DataConfig

    ConfigStore.instance().store(group="schema", name="data", node=DataConfig)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        data = OmegaConf.to_object(compose("data/realmini").data)
    assert isinstance(data, DataConfig)
    assert (data.kind, data.path) == ("manifest", "data/realmini/manifest.jsonl")
    assert (data.train_split, data.val_split, data.predict_split) == ("train", "test", "test")
