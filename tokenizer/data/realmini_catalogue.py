"""The realmini catalogue: which PyPI packages ship medical images, where, and under which licence.

Beyond what the files' headers say, it records per DICOM image group (:func:`dicom_group`) licences and
exclusions (``DICOM_NOTES``), which files are re-encodings or crops of one image (``DICOM_ALIASES``),
and the phrases of captions built from DICOM headers (:func:`dicom_caption`). Used by
:mod:`tokenizer.data.realmini`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_NEMA = "NEMA WG04 DICOM test images (no restriction stated), redistributed with pydicom (MIT)"
_GDCM = "BSD-3-Clause (GDCM test data), redistributed with pydicom (MIT)"
_TCIA = "TCIA de-identified data (CC BY 3.0), redistributed with pydicom (MIT)"
_PYDICOM = "MIT (pydicom); origin per pydicom/data/test_files/README.txt"
_PYDICOM_DATA = "MIT (pydicom-data); origin per pydicom/data/test_files/README.txt"


@dataclass(frozen=True)
class FileSpec:
    """What the catalogue knows about one file (non-DICOM) or one DICOM image group."""

    modality: str | None = None
    """Canonical modality; None: from the DICOM Modality tag."""
    description: str | None = None
    """Caption base; None: built from the DICOM header."""
    licence: str | None = None
    """Licence of this image; None: the package's."""
    volume: bool = False
    """A 3D volume sliced along all three axes (NIfTI)."""
    exclude: str | None = None
    """Why the image is left out although its header looks usable."""


@dataclass(frozen=True)
class PackageSpec:
    """A package that ships medical images."""

    import_name: str
    """Top-level import name, used to find the installed copy."""
    data_dir: str
    """Folder holding the images, relative to the folder that contains the import package."""
    licence: str
    """Licence recorded for images the catalogue has no better note for."""
    files: dict[str, FileSpec] = field(default_factory=dict)
    """Non-DICOM packages: the files used, by name (every other file is ignored)."""
    scan_dicom: bool = False
    """Use every DICOM file under ``data_dir`` (modality from its tags)."""


# DICOM image groups, by the key :func:`dicom_group` gives: catalogue notes beyond the header.
DICOM_NOTES: dict[str, FileSpec] = {
    **{k: FileSpec(licence=_NEMA) for k in ("ct_small", "mr_small", "mr2", "rg1", "rg3", "us1", "nm1")},
    "ect_supplemental": FileSpec(exclude="CT perfusion map with a supplemental palette: values are not HU"),
    "gdcm-us-aloka-16": FileSpec(licence=_GDCM),
    "mr-siemens-dicom-withoverlays": FileSpec(licence=_GDCM),
    "explicit_vr-un": FileSpec(licence=_TCIA),
}
# Files that are crops, renames or re-encodings of another image (pydicom's README says which).
DICOM_ALIASES: dict[str, str] = {
    "examples_jpeg2k.dcm": "us1",
    "examples_rgb_color.dcm": "us1",
    "examples_overlay.dcm": "mr-siemens-dicom-withoverlays",
    "examples_palette.dcm": "obxxxx1a",
    "examples_ybr_color.dcm": "color3d_jpeg_baseline",
    "no_meta.dcm": "ct_small",
    "color-px.dcm": "color-pl",
    **{
        f: "nm1"
        for f in ("JPEG-LL.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "JPEG2000.dcm", "JPEG2000_UNC.dcm")
    },
    "JPEG2000-embedded-sequence-delimiter.dcm": "nm1",
}
_ENCODING_TOKENS = frozenset(
    ["j2ki", "j2kr", "unci", "uncr", "rle", "expb", "bigendian", "big", "endian", "implicit", "padded"]
    + ["jp2klossless", "jpeg", "ls", "2k", "lossless", "too", "short", "1frame", "2frame", "16bit", "32bit"]
)

PACKAGES: dict[str, PackageSpec] = {
    "pydicom": PackageSpec("pydicom", "pydicom/data/test_files", _PYDICOM, scan_dicom=True),
    "pydicom-data": PackageSpec("data_store", "data_store/data", _PYDICOM_DATA, scan_dicom=True),
    "nibabel": PackageSpec(
        "nibabel",
        "nibabel/tests/data",
        "MIT (nibabel test data)",
        {"example4d.nii.gz": FileSpec("mr", "functional MRI (EPI) of the brain", volume=True)},
    ),
    "nilearn": PackageSpec(
        "nilearn",
        "nilearn/datasets/data",
        "BSD-3-Clause (nilearn)",
        {
            "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": FileSpec(
                "mr",
                "T1-weighted MRI brain template (MNI ICBM152)",
                "MNI ICBM152 2009 licence (copyright McConnell Brain Imaging Centre; use with "
                "attribution), redistributed with nilearn (BSD-3-Clause)",
                volume=True,
            )
        },
    ),
    "scikit-image": PackageSpec(
        "skimage",
        "skimage/data",
        "BSD-3-Clause (scikit-image)",
        {
            "retina.jpg": FileSpec("fundus", "colour fundus photograph of a normal left eye", "CC0-1.0"),
            "microaneurysms.png": FileSpec(
                "fundus", "fundus photograph detail (green channel) with microaneurysms", "CC0-1.0"
            ),
            "ihc.png": FileSpec(
                "histology",
                "immunohistochemistry of colonic glands (DAB, haematoxylin counterstain)",
                "no known copyright restrictions (scikit-image data)",
            ),
        },
    ),
}

_BODY_PARTS = {
    "head": "head", "brain": "brain", "chest": "chest", "thorax": "chest", "abdomen": "abdomen",
    "liver": "liver", "pancreas": "pancreas", "pelvis": "pelvis", "shoulder": "shoulder", "knee": "knee",
    "cspine": "cervical spine", "spine": "spine", "extremity": "extremity", "heart": "heart",
    "echocardiogram": "heart", "breast": "breast", "wholebody": "whole body", "whole": "whole body",
}  # fmt: skip
_MODALITY_PHRASES = {
    "ct": "CT image", "mr": "MRI", "xray": "radiograph", "us": "ultrasound image", "fundus": "fundus photograph",
    "histology": "histology image", "other": "nuclear medicine image",
}  # fmt: skip


def dicom_group(name: str) -> str:
    """Group key of a DICOM file name: aliases first, else the stem without encoding suffixes."""
    if name in DICOM_ALIASES:
        return DICOM_ALIASES[name]
    tokens = name.removesuffix(".dcm").split("_")
    while len(tokens) > 1 and tokens[-1].lower() in _ENCODING_TOKENS:
        tokens.pop()
    return "_".join(tokens).lower()


def dicom_caption(ds: Any, modality: str) -> str:
    code = str(ds.get("Modality", "")).upper()
    phrase = {"NM": "nuclear medicine scan", "PT": "PET image"}.get(code, _MODALITY_PHRASES[modality])
    for tag in ("BodyPartExamined", "StudyDescription", "SeriesDescription"):
        words = re.split(r"[^a-z]+", str(ds.get(tag, "")).lower())
        part = next((_BODY_PARTS[w] for w in words if w in _BODY_PARTS), None)
        if part:
            phrase += f" of the {part}"
            break
    view = str(ds.get("ViewPosition", "")).strip()
    return f"{phrase}, {view} view" if view else phrase
