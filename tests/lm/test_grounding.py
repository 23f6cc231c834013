import numpy as np
import torch

from lm.grounding import (
    COLUMN_KIND,
    KINDS,
    NUM_CLASSES,
    NUM_TARGETS,
    answer_starts,
    finding_class,
    named_region,
    quadrant_map,
    region_classes,
    row_classes,
    row_modality,
    sequence_targets,
)
from lm.sequence import IGNORE_INDEX


def test_region_classes_and_quadrants():
    found = [
        {"region": "right lower", "size": "large", "intensity": "dark"},
        {"region": "left upper", "size": "small", "intensity": "bright"},
    ]
    assert region_classes(found).tolist() == [
        finding_class("small", "bright"),
        0,
        0,
        finding_class("large", "dark"),
    ]
    assert sorted({finding_class(s, i) for s in ("small", "large") for i in ("bright", "dark")}) == [
        1,
        2,
        3,
        4,
    ]
    assert NUM_CLASSES == 5 and NUM_TARGETS == 7 and len(COLUMN_KIND) == NUM_TARGETS
    assert [KINDS[k] for k in COLUMN_KIND] == ["place", *["summary"] * 4, "answer", "modality"]
    assert region_classes([{"region": "middle", "size": "large", "intensity": "dark"}]) is None
    assert region_classes([{"region": "left upper", "size": "huge", "intensity": "dark"}]) is None
    assert row_classes({"caption": "no attributes"}) is None
    assert row_classes({"attributes": {"findings": []}}).tolist() == [0, 0, 0, 0]
    assert row_modality({"attributes": {"modality": "fundus"}}) == 3  # MODALITIES order
    assert row_modality({"attributes": {"modality": "pet"}}) is None
    assert row_modality({"modality": "ct"}) is None  # only the phantom attributes count
    # REGIONS order: left upper, right upper, left lower, right lower (as displayed)
    assert quadrant_map((2, 4)).reshape(2, 4).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert quadrant_map((3, 3)).reshape(3, 3).tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3]]


def test_sequence_targets_place_and_summary():
    image_pos = torch.tensor([-1, -1, 0, 1, 2, 3, -1, -1])  # <bos> <boi> 2x2 positions <eoi> <eos>
    eoi = torch.zeros(8, dtype=torch.bool)
    eoi[6] = True
    classes = np.array([1, 0, 3, 4])
    got = sequence_targets(image_pos, eoi, classes, (2, 2), place=True)
    assert got.shape == (8, NUM_TARGETS)
    assert got[:, 0].tolist() == [IGNORE_INDEX, 1, 0, 3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert got[6, 1:5].tolist() == [1, 0, 3, 4] and (got[torch.arange(8) != 6, 1:5] == IGNORE_INDEX).all()
    assert (got[:, 5:] == IGNORE_INDEX).all()  # no answers, no modality given
    no_place = sequence_targets(image_pos, eoi, classes, (2, 2), place=False, modality=2)
    assert (no_place[:, 0] == IGNORE_INDEX).all() and torch.equal(no_place[:, 1:], got[:, 1:])
    with_modality = sequence_targets(image_pos, eoi, classes, (2, 2), place=True, modality=2)
    assert with_modality[:, 6].tolist() == [IGNORE_INDEX] + [2] * 4 + [IGNORE_INDEX] * 3  # where place is
    assert torch.equal(with_modality[:, :6], got[:, :6])


def test_answer_targets_name_the_asked_region():
    assert named_region("Is the lesion in the right lower region small?") == 3
    assert named_region("Is there a finding in the LEFT UPPER region?") == 0
    assert named_region("Where is the lesion?") is None
    assert named_region("the left upper region or the right upper region?") is None  # two regions
    assert named_region("in the left uppermost region") is None
    assert named_region("Is the finding in the upper-right quadrant large?") == 1  # parse_caption's phrasings
    # <bos> <boi> img <eoi> q q | a a | q | a <eos>: labels set where an answer token is predicted
    labels = torch.tensor([-100, -100, -100, -100, -100, 7, 8, -100, 9, 2])
    assert answer_starts(labels) == [5, 8]
    assert answer_starts(torch.tensor([3, 4, -100])) == [0]
    image_pos = torch.tensor([-1, -1, 0, -1, -1, -1, -1, -1, -1, -1])
    eoi = torch.zeros(10, dtype=torch.bool)
    eoi[3] = True
    got = sequence_targets(image_pos, eoi, np.array([1, 0, 3, 4]), (1, 1), False, [(5, 3), (8, 1)])
    assert got[:, 5].tolist() == [IGNORE_INDEX] * 5 + [4, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]
