"""Grounding targets: auxiliary training signals that tie the words of a caption to places in its image.

For a shard row whose ``attributes`` list findings in the phantom vocabulary (region = image quadrant as
displayed, size, intensity), each quadrant has a class: 0 when it holds no finding, else ``1 + 2 * size +
intensity`` (indices into :data:`SIZES` and :data:`INTENSITIES`). A sequence carries them as a (T, 1 + 4 + 1 + 1)
target, -100 where there is none:

* column 0, **place**: in a text→image record with a prompt, the hidden state that predicts an image position
  also predicts the class of that position's quadrant; every position of the image gets a target that
  depends on the prompt's region words, where the image loss ties them only through the few positions a
  finding covers (generation: a text names a place);
* columns 1-4, **summary**: at the ``<eoi>`` of such an image, in every record, the class of each quadrant in
  :data:`REGIONS` order, so the model holds a per-region reading of the image where a question can look it
  up (understanding: a question names a place);
* column 5, **answer**: in an image→text record, the hidden state that predicts the answer to a question
  naming a region ("Is the lesion in the left upper region small?") predicts that region's class, whatever
  the question asks, so every question about a region (presence, size, intensity) trains the same look-up
  of a place from its name, with the whole class as the target instead of one yes/no;
* column 6, **modality**: at the positions of column 0, the index of the row's modality in
  :data:`MODALITIES`, so every image position also carries the modality the prompt names (the place targets
  alone pull the prompt's region words into those states, and the drawn images lose their modality).

The loss sums each kind's mean cross-entropy times its weight (``LMOptimConfig.grounding_kind_weights``), so
the few summary and answer targets of a batch do not weigh by their count against its hundreds of place ones.

A linear head kept in the training system predicts them (``LMOptimConfig.grounding_weight``); it is a training
aid and not part of the saved model.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenizer.data.phantom_text import named_regions
from tokenizer.data.phantom_vocab import INTENSITIES, MODALITIES, REGIONS, SIZES, Finding
from tokenizer.errors import InputError

NUM_CLASSES = 1 + len(SIZES) * len(INTENSITIES)
"""No finding in the quadrant, or one of the size × intensity combinations."""
assert len(MODALITIES) <= NUM_CLASSES, "the modality column shares the head's class axis"
NUM_TARGETS = 1 + len(REGIONS) + 1 + 1
"""Columns of a sequence's grounding target: the place, one per region (the summary), the answer, the modality."""
KINDS = ("place", "summary", "answer", "modality")
COLUMN_KIND = (0, *[1] * len(REGIONS), 2, 3)
"""Index into :data:`KINDS` of each column."""


def finding_class(size: str, intensity: str) -> int:
    """The class (1..4) of a finding of this size and intensity."""
    return 1 + SIZES.index(size) * len(INTENSITIES) + INTENSITIES.index(intensity)


def region_classes(findings: list) -> np.ndarray | None:
    """(4,) int64 class of each region in :data:`REGIONS` order for ``findings`` (``{"region", "size",
    "intensity"}`` dicts), or None when one is not a phantom :class:`Finding` (no grounding target then)."""
    try:
        found = [Finding(**f) for f in findings]
    except (InputError, TypeError):  # a value outside the vocabulary, a missing or extra key, not a dict
        return None
    out = np.zeros(len(REGIONS), dtype=np.int64)
    for f in found:
        out[REGIONS.index(f.region)] = finding_class(f.size, f.intensity)
    return out


def row_classes(row: dict) -> np.ndarray | None:
    """:func:`region_classes` of a shard row's ``attributes.findings``; None without them."""
    attributes = row.get("attributes")
    if not isinstance(attributes, dict) or not isinstance(attributes.get("findings"), list):
        return None
    return region_classes(attributes["findings"])


def row_modality(row: dict) -> int | None:
    """Index into :data:`MODALITIES` of a shard row's ``attributes.modality``; None without one of them."""
    attributes = row.get("attributes")
    modality = attributes.get("modality") if isinstance(attributes, dict) else None
    return MODALITIES.index(modality) if modality in MODALITIES else None


def quadrant_map(grid: tuple[int, int]) -> torch.Tensor:
    """(h·w,) long index into :data:`REGIONS` of each raster position's quadrant (left/right as displayed)."""
    h, w = grid
    rows, cols = torch.arange(h * w).div(w, rounding_mode="floor"), torch.arange(h * w) % w
    index = torch.tensor(
        [[REGIONS.index(f"{side} {level}") for side in ("left", "right")] for level in ("upper", "lower")]
    )
    return index[(rows >= h / 2).long(), (cols >= w / 2).long()]


def named_region(question: str) -> int | None:
    """Index into :data:`REGIONS` of the region a question names ("… in the left upper region …"), or None
    when it names none or more than one."""
    found = named_regions(question)
    return REGIONS.index(found.pop()) if len(found) == 1 else None


def answer_starts(labels: torch.Tensor) -> list[int]:
    """Positions that predict the first token of each trained span of a sequence, in order.

    Args:
        labels: (T,) the sequence's next-token labels of the first sub-code, -100 where untrained.
    """
    on = labels != -100
    start = on & torch.cat([torch.ones(1, dtype=torch.bool), ~on[:-1]])
    return start.nonzero().flatten().tolist()


def sequence_targets(
    image_pos: torch.Tensor,
    eoi: torch.Tensor,
    classes: np.ndarray,
    grid: tuple[int, int],
    place: bool,
    answers: list[tuple[int, int]] = (),
    modality: int | None = None,
) -> torch.Tensor:
    """(T, 1 + 4 + 1 + 1) long grounding targets of a sequence with one image, -100 where there is none.

    Args:
        image_pos: (T,) the sequence's image_pos (0..h·w-1 on image positions, -1 elsewhere).
        eoi: (T,) bool, True at the image's ``<eoi>``.
        classes: (4,) the image's region classes (:func:`row_classes`).
        grid: the image grid (h, w).
        place: also fill column 0 (a text→image record with a prompt).
        answers: (position, region index) pairs for column 5: the position that predicts an answer and
            the region its question names.
        modality: the row's :func:`row_modality`, for column 6 where column 0 is filled; None = no target.
    """
    target = torch.full((image_pos.shape[0], NUM_TARGETS), -100, dtype=torch.long)
    classes = torch.as_tensor(classes, dtype=torch.long)
    if place:
        per_position = classes[quadrant_map(grid)]
        nxt = image_pos[1:]
        on = nxt >= 0  # position t predicts the image position t + 1
        target[:-1, 0][on] = per_position[nxt[on]]
        if modality is not None:
            target[:-1, -1][on] = modality
    target[eoi, 1 : 1 + len(REGIONS)] = classes
    for position, region in answers:
        target[position, 1 + len(REGIONS)] = classes[region]
    return target
