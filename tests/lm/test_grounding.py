import numpy as np
import torch

from lm.grounding import (
    NUM_CLASSES,
    NUM_TARGETS,
    finding_class,
    quadrant_map,
    region_classes,
    row_classes,
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
    assert NUM_CLASSES == 5 and NUM_TARGETS == 5
    assert region_classes([{"region": "middle", "size": "large", "intensity": "dark"}]) is None
    assert region_classes([{"region": "left upper", "size": "huge", "intensity": "dark"}]) is None
    assert row_classes({"caption": "no attributes"}) is None
    assert row_classes({"attributes": {"findings": []}}).tolist() == [0, 0, 0, 0]
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
    assert got[6, 1:].tolist() == [1, 0, 3, 4] and (got[torch.arange(8) != 6, 1:] == IGNORE_INDEX).all()
    no_place = sequence_targets(image_pos, eoi, classes, (2, 2), place=False)
    assert (no_place[:, 0] == IGNORE_INDEX).all() and torch.equal(no_place[:, 1:], got[:, 1:])
