"""Metrics of the LM benchmarks (DESIGN §7): text overlap, closed VQA, phantom attributes, zero-shot.

* :func:`corpus_bleu`: BLEU (Papineni et al. 2002) over a corpus, n-grams up to ``max_order`` (BLEU-4):
  clipped n-gram precisions summed over all sentences, geometric mean, times the brevity penalty
  ``exp(1 - r / c)`` when the hypotheses are shorter (c) than the references (r; per sentence the reference
  length closest to the hypothesis length, the shorter on ties). Tokens: lower-cased words and single
  punctuation marks (:func:`text_tokens`).
* :func:`rouge_l`: ROUGE-L (Lin 2004) of one sentence: LCS-based F-measure ``(1 + b²) P R / (R + b² P)`` with
  ``P = LCS / len(hypothesis)``, ``R = LCS / len(reference)``, b = 1 (the ``rouge-score`` package's F1);
  the best reference counts. Tokens: lower-cased words, punctuation dropped.
* :func:`vqa_accuracy`: closed-question accuracy with :func:`~tokenizer.data.phantom_text.answer_matches`
  (synonyms accepted), overall and per question kind.
* :class:`AttributeAccuracy`: phantom attributes (modality, count, exact findings set; per true finding its
  region, size and intensity) of read-back images or parsed captions against the truth; an unreadable
  output is wrong on every attribute.
* :func:`paired_cosine`: image-text alignment through aligned embeddings (zero-shot lives in
  :mod:`tokenizer.probe`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenizer.data.phantom_text import answer_matches, parse_caption
from tokenizer.data.phantom_vocab import Finding
from tokenizer.errors import InputError

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")


def text_tokens(text: str, *, punctuation: bool = True) -> list[str]:
    """Lower-cased words (``\\w+``), plus every punctuation mark as its own token when ``punctuation``."""
    return (_WORD_OR_MARK if punctuation else _WORD).findall(str(text).lower())


# ------------------------------------------------------------------------------------------------ BLEU
@dataclass
class BleuScore:
    """Corpus BLEU with its parts."""

    score: float
    """BLEU in [0, 1]."""
    precisions: list[float]
    """Modified (clipped) n-gram precision per order 1..max_order."""
    brevity_penalty: float
    hypothesis_length: int
    """Tokens over all hypotheses (c)."""
    reference_length: int
    """Effective reference tokens (r): per sentence the reference length closest to the hypothesis."""


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_references(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    max_order: int = 4,
    smooth: bool = False,
) -> BleuScore:
    """BLEU of ``hypotheses[i]`` against ``references[i]`` (a str or a list of alternative references).

    Args:
        hypotheses: N generated texts.
        references: N references, each a str or a non-empty list of str.
        max_order: longest n-gram (4 = BLEU-4).
        smooth: add one to every order's matches and totals (Lin & Och 2004), so one missing order does not
            zero the score; off = the standard corpus BLEU.
    """
    refs = _as_references(references)
    if len(hypotheses) != len(refs):
        raise InputError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(refs)} references")
    if max_order < 1 or any(not r for r in refs):
        raise InputError("corpus_bleu: need max_order >= 1 and at least one reference per hypothesis")
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, alternatives in zip(hypotheses, refs, strict=True):
        hyp = text_tokens(hypothesis)
        ref_tokens = [text_tokens(r) for r in alternatives]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_order + 1):
            counts = _ngrams(hyp, n)
            best: Counter = Counter()
            for r in ref_tokens:
                best |= _ngrams(r, n)  # element-wise max: clip by the most generous reference
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if smooth:
        precisions = [(m + 1) / (t + 1) for m, t in zip(matches, totals, strict=True)]
    else:
        precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    brevity = 0.0 if hyp_len == 0 else 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    score = (
        brevity * math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    )
    return BleuScore(score, precisions, brevity, hyp_len, ref_len)


# --------------------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)·len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, references: str | Sequence[str], *, beta: float = 1.0) -> float:
    """Sentence ROUGE-L F-measure in [0, 1], the best over the references (0 when either side is empty)."""
    hyp = text_tokens(hypothesis, punctuation=False)
    best = 0.0
    for reference in [references] if isinstance(references, str) else references:
        ref = text_tokens(reference, punctuation=False)
        lcs = lcs_length(hyp, ref)
        if lcs == 0:
            continue
        precision, recall = lcs / len(hyp), lcs / len(ref)
        best = max(best, (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return best


def mean_rouge_l(
    hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *, beta: float = 1.0
) -> float:
    """Mean of :func:`rouge_l` over sentence pairs (0 for an empty corpus)."""
    if len(hypotheses) != len(references):
        raise InputError(f"mean_rouge_l: {len(hypotheses)} hypotheses but {len(references)} references")
    scores = [rouge_l(h, r, beta=beta) for h, r in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


# ------------------------------------------------------------------------------------------------- VQA
_QUESTION_KINDS = (  # first match wins; the phrasings of tokenizer.data.phantom_text.phantom_questions
    ("modality", re.compile(r"\bmodality\b")),
    ("count", re.compile(r"^how many\b")),
    ("presence", re.compile(r"^is there\b")),
    ("location", re.compile(r"^where\b")),
    ("intensity", re.compile(r"\b(?:bright|dark)\b")),
    ("size", re.compile(r"\b(?:small|large)\b")),
)


def question_kind(question: str) -> str:
    """ "modality", "count", "presence", "location", "intensity", "size" or "other" for a closed question."""
    text = str(question).strip().lower()
    return next((kind for kind, pattern in _QUESTION_KINDS if pattern.search(text)), "other")


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[str], questions: Sequence[str] | None = None
) -> dict:
    """Closed VQA accuracy: ``{"accuracy", "n", "per_kind": {kind: {"accuracy", "n"}}}``.

    A prediction is right when :func:`~tokenizer.data.phantom_text.answer_matches` accepts it (synonyms, case
    and punctuation ignored); an empty or off-vocabulary answer is wrong. ``per_kind`` needs ``questions``.
    Accuracies are None for n = 0.
    """
    if len(predictions) != len(answers) or (questions is not None and len(questions) != len(answers)):
        raise InputError("vqa_accuracy: predictions, answers and questions must have the same length")
    hits = [answer_matches(p, a) for p, a in zip(predictions, answers, strict=True)]
    per_kind: dict[str, list[bool]] = {}
    for question, hit in zip(questions or [], hits, strict=False):
        per_kind.setdefault(question_kind(question), []).append(hit)

    def rate(values: list[bool]) -> dict:
        return {"accuracy": sum(values) / len(values) if values else None, "n": len(values)}

    return {**rate(hits), "per_kind": {k: rate(v) for k, v in sorted(per_kind.items())}}


# ------------------------------------------------------------------------------------------ attributes
Attributes = tuple[str | None, tuple[Finding, ...]]
"""(modality, findings in canonical order), as ``read_phantom`` and ``parse_caption`` return them."""


def caption_attributes(text: str) -> Attributes | None:
    """``parse_caption(text)``, or None when the text names neither a modality nor a complete finding."""
    modality, findings = parse_caption(text)
    return None if modality is None and not findings else (modality, findings)


@dataclass
class AttributeScores:
    """Attribute accuracy of one set of outputs; rates in [0, 1], None where undefined."""

    n: int
    """Outputs scored."""
    modality: float | None
    """Fraction with the right modality."""
    count: float | None
    """Fraction with the right number of findings."""
    findings: float | None
    """Fraction with exactly the right set of findings (region, size and intensity of each)."""
    exact: float | None
    """Fraction with modality and findings both right."""
    finding_precision: float | None
    """Predicted findings that are true (micro-averaged over outputs)."""
    finding_recall: float | None
    """True findings that were predicted."""
    finding_f1: float | None
    region: float | None
    """True findings whose region holds a predicted finding (region recall)."""
    size: float | None
    """True findings whose region holds a predicted finding of the right size (a missed finding is wrong)."""
    intensity: float | None
    """True findings whose region holds a predicted finding of the right intensity."""
    attribute_mean: float | None
    """Mean of the modality, count, region, size and intensity rates (the defined ones)."""
    unreadable: int
    """Outputs that could not be read or parsed (counted wrong on every attribute)."""


class AttributeAccuracy:
    """Accumulates :class:`AttributeScores` of predicted against true attributes."""

    def __init__(self) -> None:
        self._flags: list[tuple[bool, bool, bool]] = []
        self.true_positives = self.false_positives = self.false_negatives = self.unreadable = 0
        self.per_finding = Counter()  # "total", "region", "size", "intensity" over true findings

    def add(self, predicted: Attributes | None, truth: Attributes) -> dict[str, bool]:
        """Score one output (None = unreadable); returns its flags ``{"modality", "count", "findings", "exact"}``."""
        true_set = set(truth[1])
        if predicted is None:
            self.unreadable += 1
            flags = (False, False, False)
            self.false_negatives += len(true_set)
        else:
            found = set(predicted[1])
            flags = (predicted[0] == truth[0], len(predicted[1]) == len(truth[1]), found == true_set)
            self.true_positives += len(found & true_set)
            self.false_positives += len(found - true_set)
            self.false_negatives += len(true_set - found)
            at = {f.region: f for f in predicted[1]}
            for f in true_set:
                hit = at.get(f.region)
                self.per_finding.update(
                    region=hit is not None,
                    size=hit is not None and hit.size == f.size,
                    intensity=hit is not None and hit.intensity == f.intensity,
                )
        self.per_finding["total"] += len(true_set)
        self._flags.append(flags)
        return {"modality": flags[0], "count": flags[1], "findings": flags[2], "exact": flags[0] and flags[2]}

    def scores(self) -> AttributeScores:
        n = len(self._flags)

        def rate(values) -> float | None:
            return sum(values) / n if n else None

        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        total = self.per_finding["total"]
        per_finding = {
            k: self.per_finding[k] / total if total else None for k in ("region", "size", "intensity")
        }
        modality, count = rate(f[0] for f in self._flags), rate(f[1] for f in self._flags)
        defined = [r for r in (modality, count, *per_finding.values()) if r is not None]
        return AttributeScores(
            n=n,
            modality=modality,
            count=count,
            findings=rate(f[2] for f in self._flags),
            exact=rate(f[0] and f[2] for f in self._flags),
            finding_precision=tp / (tp + fp) if tp + fp else None,
            finding_recall=tp / (tp + fn) if tp + fn else None,
            finding_f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            **per_finding,
            attribute_mean=sum(defined) / len(defined) if defined else None,
            unreadable=self.unreadable,
        )


# ------------------------------------------------------------------------------------------ embeddings
def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row pairs: (N, D), (N, D) -> (N,) float32."""
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(
            f"paired_cosine: expected two (N, D) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    return F.cosine_similarity(a.float(), b.float(), dim=1)
