"""Phantom text: captions, caption parsing and closed visual question answering.

Captions name findings the way a reader of each modality would (nodule / cyst, lesion, opacity /
lucency, exudate / hemorrhage, clear area / nuclear cluster; hyperdense, hyperintense, radiopaque, ...);
``parse_caption`` maps every such synonym back to the fixed vocabulary of
:mod:`tokenizer.data.phantom_vocab`. ``phantom_questions`` asks closed questions about a phantom, answered
from ``ANSWERS``; ``answer_matches`` scores a model's free-text answer against the truth; ``seen_value``
gives the value a yes/no answer about a size or an intensity implies, for answers that say it first.
"""

from __future__ import annotations

import re

import numpy as np

from tokenizer.data.phantom_vocab import (
    INTENSITIES,
    REGIONS,
    SIZES,
    Finding,
    Phantom,
    canonical_findings,
    modality_name,
)

# ----------------------------------------------------------------------------- captions

_MODALITY_NAMES = {
    "ct": ("CT", "chest CT", "axial CT", "computed tomography"),
    "mr": ("MR", "MRI", "brain MRI", "magnetic resonance"),
    "xray": ("X-ray", "chest X-ray", "radiograph", "chest radiograph"),
    "fundus": ("fundus photograph", "retinal fundus image", "fundus image", "retinal photograph"),
    "histology": ("histology", "H&E histology", "histopathology", "H&E slide"),
}
_NOUNS = {
    "ct": {"bright": ("nodule", "lesion"), "dark": ("cyst", "lesion")},
    "mr": {"bright": ("lesion", "focus"), "dark": ("lesion", "focus")},
    "xray": {"bright": ("opacity", "nodular opacity"), "dark": ("lucency", "lucent area")},
    "fundus": {"bright": ("exudate", "hard exudate"), "dark": ("hemorrhage", "blot hemorrhage")},
    "histology": {"bright": ("clear area", "vacuole"), "dark": ("nuclear cluster", "cell cluster")},
}
_INTENSITY_WORDS = {
    "ct": {"bright": ("bright", "hyperdense"), "dark": ("dark", "hypodense")},
    "mr": {"bright": ("bright", "hyperintense"), "dark": ("dark", "hypointense")},
    "xray": {"bright": ("bright", "radiopaque"), "dark": ("dark", "radiolucent")},
    "fundus": {"bright": ("bright", "bright yellow"), "dark": ("dark", "dark red")},
    "histology": {"bright": ("bright", "pale"), "dark": ("dark", "hyperchromatic")},
}
_SIZE_WORDS = {"small": ("small",), "large": ("large", "big")}
_COUNT_WORDS = ("zero", "one", "two", "three")
_FINDING_TEMPLATES = (
    "a {size} {intensity} {noun} in the {region} {zone}",
    "a {size} {intensity} {noun} ({region} {zone})",
    "in the {region} {zone} a {size} {intensity} {noun}",
    "{size} {intensity} {noun} at the {region}",
)
_CAPTION_TEMPLATES = (
    "{Mod} image showing {count} {plural}: {listed}.",
    "{Mod} with {count} {plural}. {semi}.",
    "There {be} {count} {plural} on this {mod}: {listed}.",
    "Findings on {mod}: {semi}. Total: {count} {plural}.",
    "{Mod}: {count} {plural}; {semi}.",
)
_NORMAL_TEMPLATES = (
    "{Mod} image with no abnormality.",
    "Normal {mod}: no findings.",
    "No abnormality is seen on this {mod}.",
    "{Mod}: zero findings, no lesion detected.",
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption_for(modality: str, findings, rng: np.random.Generator, template: int | None = None) -> str:
    """English caption stating the modality, the count and every finding's region, size and intensity.

    Args:
        modality: one of ``MODALITIES``.
        findings: iterable of :class:`Finding` (captions list them in canonical order).
        rng: draws the template and the synonyms.
        template: force a sentence template (index into the 5 finding / 4 normal templates).
    """
    modality = modality_name(modality, "caption_for")
    findings = canonical_findings(findings)
    mod = _pick(rng, _MODALITY_NAMES[modality])
    templates = _CAPTION_TEMPLATES if findings else _NORMAL_TEMPLATES
    chosen = templates[int(rng.integers(len(templates))) if template is None else template % len(templates)]
    if not findings:
        return _cap(chosen.format(Mod=_cap(mod), mod=mod))
    phrases = []
    for f in findings:
        side, level = f.region.split()
        phrases.append(
            _pick(rng, _FINDING_TEMPLATES).format(
                size=_pick(rng, _SIZE_WORDS[f.size]),
                intensity=_pick(rng, _INTENSITY_WORDS[modality][f.intensity]),
                noun=_pick(rng, _NOUNS[modality][f.intensity]),
                region=f.region if rng.random() < 0.5 else f"{level} {side}",
                zone=_pick(rng, ("region", "quadrant")),
            )
        )
    n = len(findings)
    plural = (
        _pick(rng, ("finding", "abnormality", "lesion"))
        if n == 1
        else _pick(rng, ("findings", "abnormalities", "lesions"))
    )
    listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = chosen.format(
        Mod=_cap(mod),
        mod=mod,
        count=_COUNT_WORDS[n],
        plural=plural,
        be="is" if n == 1 else "are",
        listed=listed,
        semi="; ".join(phrases),
    )
    return _cap(text)


_MODALITY_PATTERNS = {
    "ct": r"\bct\b|computed tomograph",
    "mr": r"\bmri?\b|magnetic resonance",
    "xray": r"\bx[\s-]?rays?\b|radiograph",
    "fundus": r"fundus|retina",
    "histology": r"histolog|histopatholog|\bh\s?&\s?e\b|patholog",
}
_REGION_RE = re.compile(r"\b(left|right)[\s-]+(upper|lower)\b|\b(upper|lower)[\s-]+(left|right)\b")
_PARSE_WORDS = {
    "size": {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")},
    "intensity": {
        "bright": ("bright", "hyperdense", "hyperintense", "radiopaque", "pale", "white"),
        "dark": ("dark", "hypodense", "hypointense", "radiolucent", "lucent", "hyperchromatic", "black"),
    },
}
_WORD_RES = {
    field: [(value, re.compile(r"\b(?:" + "|".join(words) + r")\b")) for value, words in table.items()]
    for field, table in _PARSE_WORDS.items()
}
_CLAUSE_RE = re.compile(r"[;,.!?\n]|\band\b")


def _parse_modality(text: str) -> str | None:
    hits = [(m.start(), name) for name, pat in _MODALITY_PATTERNS.items() if (m := re.search(pat, text))]
    return min(hits)[1] if hits else None


def parse_caption(text: str) -> tuple[str | None, tuple[Finding, ...]]:
    """Recover (modality, findings) from a caption of ours or a language model's near miss.

    Each clause (split at punctuation and "and") that names a region yields a finding if it also
    names a size and an intensity (any synonym of ``_PARSE_WORDS``). With several regions in one clause,
    attribute words go to the region after them (before them when the clause opens with a region).
    The first mention of a region wins.
    Returns (None, ()) when nothing is recognised.
    """
    text = str(text).lower()
    found: dict[str, Finding] = {}
    for clause in _CLAUSE_RE.split(text):
        regions = [(m.start(), m.end(), _region_of(m)) for m in _REGION_RE.finditer(clause)]
        if not regions:
            continue
        words = sorted(
            (m.start(), m.end(), field, value)
            for field, patterns in _WORD_RES.items()
            for value, pattern in patterns
            for m in pattern.finditer(clause)
        )
        # Several regions in one clause: attributes belong to the next region when the clause opens
        # with attributes ("small bright ... left upper ..."), else to the previous one.
        leading = bool(words) and words[0][0] < regions[0][0]
        attrs: list[dict[str, str]] = [{} for _ in regions]
        for start, end, field, value in words:
            if leading:
                owner = next((i for i, r in enumerate(regions) if r[0] >= end), len(regions) - 1)
            else:
                owner = max((i for i, r in enumerate(regions) if r[1] <= start), default=0)
            attrs[owner].setdefault(field, value)
        for (_, _, region), a in zip(regions, attrs, strict=True):
            if "size" in a and "intensity" in a and region not in found:
                found[region] = Finding(region, a["size"], a["intensity"])
    return _parse_modality(text), canonical_findings(found.values())


def _region_of(match: re.Match) -> str:
    side = match.group(1) or match.group(4)
    level = match.group(2) or match.group(3)
    return f"{side} {level}"


def named_regions(text: str) -> set[str]:
    """The :data:`REGIONS` a text names, in any of the phrasings ``parse_caption`` reads ("left upper",
    "upper-left", …)."""
    return {_region_of(m) for m in _REGION_RE.finditer(str(text).lower())}


# ----------------------------------------------------------------------------- closed VQA

_MODALITY_ANSWERS = {"ct": "CT", "mr": "MR", "xray": "X-ray", "fundus": "fundus", "histology": "histology"}
ANSWERS = ("yes", "no", *_COUNT_WORDS, *_MODALITY_ANSWERS.values(), *SIZES, *INTENSITIES, *REGIONS)
"""The closed answer vocabulary of ``phantom_questions``."""
_ANSWER_SYNONYMS = {  # canonical answer -> regex of the ways a model may say it
    "yes": r"yes|yeah|true|present",
    "no": r"no|false|absent",
    "zero": r"zero|none|0|no (?:findings?|abnormalit(?:y|ies)|lesions?)",
    "one": r"one|1|single",
    "two": r"two|2",
    "three": r"three|3",
    "ct": r"ct|computed tomography",
    "mr": r"mri?|magnetic resonance",
    "x-ray": r"x[\s-]?rays?|radiograph|chest radiograph",
    "fundus": r"fundus|retinal?(?: photograph)?",
    "histology": r"histology|histopathology|h\s?&\s?e|pathology",
    "small": r"small|tiny|little",
    "large": r"large|big|huge",
    "bright": r"bright|hyperdense|hyperintense|radiopaque|pale",
    "dark": r"dark|hypodense|hypointense|radiolucent|lucent|hyperchromatic",
    **{r: rf"{r.split()[0]}[\s-]+{r.split()[1]}|{r.split()[1]}[\s-]+{r.split()[0]}" for r in REGIONS},
}
_ANSWER_GROUPS = (
    ("yes", "no"),
    ("zero", "one", "two", "three"),
    ("ct", "mr", "x-ray", "fundus", "histology"),
    SIZES,
    INTENSITIES,
    REGIONS,
)
_ANSWER_PATTERNS = {key: re.compile(rf"\b(?:{pattern})\b") for key, pattern in _ANSWER_SYNONYMS.items()}


def canonical_answer(text: str, group: tuple[str, ...] | None = None) -> str | None:
    """The first closed answer named in ``text`` (lower-case canonical form), or None.

    Args:
        text: free text, e.g. a model's answer.
        group: only look for these canonical answers (one of the answer groups); None looks for all.
    """
    text = str(text).lower()
    best: tuple[int, int, str] | None = None  # (start, -length, key): earliest, then longest
    for key in group or _ANSWER_PATTERNS:
        m = _ANSWER_PATTERNS[key].search(text)
        if m and (best is None or (m.start(), m.start() - m.end()) < best[:2]):
            best = (m.start(), m.start() - m.end(), key)
    return None if best is None else best[2]


def answer_matches(pred: str, truth: str) -> bool:
    """True when ``pred`` names ``truth`` first among the answers of truth's kind (yes/no, count, ...).

    Synonyms, case and punctuation are ignored: "Yes." matches "yes", "No findings" matches "zero",
    "MRI" matches "MR", "upper left" matches "left upper".
    """
    expected = canonical_answer(truth)
    if expected is None:
        return False
    group = next(g for g in _ANSWER_GROUPS if expected in g)
    return canonical_answer(pred, group) == expected


def phantom_questions(phantom: Phantom, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Closed question-answer pairs about one phantom; every answer is in ``ANSWERS``.

    Asks the modality, the count, whether each region holds a finding and, for each finding, its
    intensity and size (yes/no or either-or, drawn from ``rng``); with a single finding also where it is.
    """
    article, noun, nouns = _pick(
        rng,
        (("a", "finding", "findings"), ("a", "lesion", "lesions"), ("an", "abnormality", "abnormalities")),
    )
    qa = [
        (
            _pick(rng, ("What imaging modality is this?", "Which modality was used to acquire this image?")),
            _MODALITY_ANSWERS[phantom.modality],
        ),
        (
            _pick(rng, (f"How many {nouns} are there?", f"How many {nouns} are visible?")),
            _COUNT_WORDS[len(phantom.findings)],
        ),
    ]
    by_region = {f.region: f for f in phantom.findings}
    for region in REGIONS:
        f = by_region.get(region)
        qa.append((f"Is there {article} {noun} in the {region} region?", "yes" if f else "no"))
        if f is None:
            continue
        for field, values in (("intensity", INTENSITIES), ("size", SIZES)):
            value = getattr(f, field)
            if rng.random() < 0.5:
                asked = _pick(rng, values)
                qa.append(
                    (f"Is the {noun} in the {region} region {asked}?", "yes" if asked == value else "no")
                )
            else:
                qa.append((f"Is the {noun} in the {region} region {values[0]} or {values[1]}?", value))
    if len(phantom.findings) == 1:
        qa.append((f"Where is the {noun}?", phantom.findings[0].region))
    return qa


_ATTRIBUTE_QUESTION = re.compile(r"is the (?:finding|lesion|abnormality) in the .+ region (\w+)\?")


def seen_value(question: str, answer: str) -> str | None:
    """The size or intensity that a yes/no answer to a ``phantom_questions`` attribute question implies, or None
    for every other question.

    "Is the lesion in the left upper region large?" answered "no" -> "small"; answered "yes" -> "large". A
    yes/no answer is the XOR of the asked and the seen value; an answer that names the seen value first
    ("small, so no") splits it into reading the image and comparing two words (``lm.data``'s
    ``vqa_explain``).
    """
    match = _ATTRIBUTE_QUESTION.fullmatch(question.strip().lower())
    verdict = answer.strip().lower()
    if match is None or verdict not in ("yes", "no"):
        return None
    asked = match.group(1)
    for values in (SIZES, INTENSITIES):
        if asked in values and len(values) == 2:  # "no" names the other value only when there is one other
            return asked if verdict == "yes" else next(v for v in values if v != asked)
    return None
