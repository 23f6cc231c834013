"""lm/metrics.py: BLEU / ROUGE-L against hand computations, VQA, phantom attributes, zero-shot helpers."""

import math

import numpy as np
import pytest
import torch

from lm.metrics import (
    AttributeAccuracy,
    caption_attributes,
    corpus_bleu,
    lcs_length,
    mean_rouge_l,
    paired_cosine,
    question_kind,
    rouge_l,
    text_tokens,
    vqa_accuracy,
)
from tokenizer.data.phantom_text import phantom_questions
from tokenizer.data.phantom_vocab import Finding
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError


def test_text_tokens():
    assert text_tokens("CT: two Lesions.") == ["ct", ":", "two", "lesions", "."]
    assert text_tokens("CT: two Lesions.", punctuation=False) == ["ct", "two", "lesions"]
    assert text_tokens("X-ray (left upper)") == ["x", "-", "ray", "(", "left", "upper", ")"]


def test_bleu_hand_computed_with_brevity_penalty():
    # hypothesis 6 tokens, reference 7: n-gram matches 6/6, 4/5, 3/4, 2/3; BP = exp(1 - 7/6)
    score = corpus_bleu(["the cat sat on the mat"], ["the cat sat on the red mat"])
    assert score.precisions == pytest.approx([1.0, 4 / 5, 3 / 4, 2 / 3])
    assert (score.hypothesis_length, score.reference_length) == (6, 7)
    assert score.brevity_penalty == pytest.approx(math.exp(1 - 7 / 6))
    assert score.score == pytest.approx(math.exp(1 - 7 / 6) * (4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_bleu_clipping_references_and_corpus_sums():
    # Papineni's example: "the" counted at most twice (its count in the reference); longer hypothesis, BP = 1
    unigram = corpus_bleu(["the the the the the the the"], ["the cat is on the mat"], max_order=1)
    assert unigram.score == pytest.approx(2 / 7) and unigram.brevity_penalty == 1.0
    # clipping by the most generous reference; effective reference length = the closest one (3, not 6)
    multi = corpus_bleu(["a b c d"], [["a b c d e f", "a b c"]])
    assert multi.score == pytest.approx(1.0) and multi.reference_length == 3
    tie = corpus_bleu(["a b c d"], [["a b c", "a b c d e"]])  # equally close: the shorter counts
    assert tie.reference_length == 3
    # corpus BLEU sums counts over sentences: 4/8, 3/6, 2/4, 1/2 -> 0.5
    corpus = corpus_bleu(["a b c d", "w x y z"], ["a b c d", "p q r s"])
    assert corpus.precisions == pytest.approx([0.5] * 4) and corpus.score == pytest.approx(0.5)
    assert corpus_bleu(["Two lesions."], ["two LESIONS ."], max_order=3).score == pytest.approx(1.0)


def test_bleu_short_sentences_smoothing_and_errors():
    assert corpus_bleu(["a b c"], ["a b c"]).score == 0.0  # no 4-gram at all: standard BLEU-4 is zero
    assert corpus_bleu(["a b c"], ["a b c"], smooth=True).score == pytest.approx(1.0)
    smoothed = corpus_bleu(["a b x"], ["a b c"], smooth=True)  # (2+1)/(3+1), (1+1)/(2+1), 1/2, 1/1
    assert smoothed.score == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1) ** 0.25)
    assert corpus_bleu([""], ["a b c d"]).score == 0.0
    assert corpus_bleu([], []).score == 0.0
    with pytest.raises(InputError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(InputError, match="at least one reference"):
        corpus_bleu(["a"], [[]])


def test_rouge_l_hand_computed():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    assert rouge_l("the gunman police killed", "police killed the gunman") == pytest.approx(0.5)
    # P = 1, R = 1/2: F1 = 2/3; beta = 2 weighs recall: 5 * 0.5 / (0.5 + 4) = 5/9
    assert rouge_l("a b", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("a b", "a b c d", beta=2.0) == pytest.approx(5 / 9)
    assert rouge_l("A, b.", "a b") == pytest.approx(1.0)  # punctuation and case ignored
    assert rouge_l("a b", ["x y", "a b c d"]) == pytest.approx(2 / 3)  # best reference
    assert rouge_l("", "a b") == 0.0 and rouge_l("a b", "") == 0.0
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_vqa_accuracy_and_question_kinds():
    dataset = PhantomDataset(40, seed=3, size=32)
    pairs = [qa for i in range(40) for qa in phantom_questions(dataset.phantom(i), np.random.default_rng(i))]
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    kinds = {question_kind(q) for q in questions}
    assert kinds == {"modality", "count", "presence", "intensity", "size", "location"}
    perfect = vqa_accuracy(answers, answers, questions)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == len(pairs)
    assert all(v["accuracy"] == 1.0 for v in perfect["per_kind"].values())
    assert sum(v["n"] for v in perfect["per_kind"].values()) == len(pairs)
    assert vqa_accuracy([""] * len(answers), answers)["accuracy"] == 0.0  # empty answers are wrong
    result = vqa_accuracy(
        ["Yes.", "MRI", "two", "", "upper left"], ["yes", "MR", "three", "no", "left upper"]
    )
    assert result["accuracy"] == pytest.approx(3 / 5) and result["per_kind"] == {}
    assert vqa_accuracy([], [])["accuracy"] is None
    assert question_kind("Is the lesion in the left upper region bright or dark?") == "intensity"
    assert question_kind("Is the finding in the right lower region large?") == "size"
    assert question_kind("Is there an abnormality in the left lower region?") == "presence"


def test_attribute_accuracy_on_hand_made_findings():
    a, b = Finding("left upper", "small", "bright"), Finding("right lower", "large", "dark")
    truth = ("ct", (a, b))
    acc = AttributeAccuracy()
    assert acc.add(("ct", (a, b)), truth) == {
        "modality": True,
        "count": True,
        "findings": True,
        "exact": True,
    }
    assert acc.add(("mr", (a, b)), truth) == {
        "modality": False,
        "count": True,
        "findings": True,
        "exact": False,
    }
    wrong_size = ("ct", (a, Finding("right lower", "small", "dark")))
    assert acc.add(wrong_size, truth) == {"modality": True, "count": True, "findings": False, "exact": False}
    assert acc.add(None, truth) == dict.fromkeys(("modality", "count", "findings", "exact"), False)
    s = acc.scores()
    assert (s.n, s.modality, s.count, s.findings, s.exact) == (4, 0.5, 0.75, 0.5, 0.25)
    # findings: TP 2 + 2 + 1 + 0, FP 1, FN 0 + 0 + 1 + 2 (the unreadable output misses both)
    assert s.finding_precision == pytest.approx(5 / 6) and s.finding_recall == pytest.approx(5 / 8)
    assert s.finding_f1 == pytest.approx(10 / 14) and s.unreadable == 1
    # per true finding (8): regions found 2 + 2 + 2 + 0, right sizes 2 + 2 + 1 + 0, right intensities 6
    assert (s.region, s.size, s.intensity) == (6 / 8, 5 / 8, 6 / 8)
    assert s.attribute_mean == pytest.approx((0.5 + 0.75 + 6 / 8 + 5 / 8 + 6 / 8) / 5)
    empty = AttributeAccuracy().scores()
    assert empty.n == 0 and empty.exact is None and empty.finding_f1 is None and empty.attribute_mean is None
    normal = AttributeAccuracy()
    normal.add(("ct", ()), ("ct", ()))
    assert normal.scores().exact == 1.0 and normal.scores().finding_precision is None


def test_caption_attributes():
    dataset = PhantomDataset(30, seed=5, size=32)
    for i in range(30):
        p = dataset.phantom(i)
        assert caption_attributes(p.caption) == (p.modality, p.findings)
    assert caption_attributes("CT image with no abnormality.") == ("ct", ())
    assert caption_attributes("") is None and caption_attributes("��� slide uc") is None
    # a finding without a modality still counts as parsed (the modality is then wrong)
    assert caption_attributes("a small bright nodule in the left upper region") == (
        None,
        (Finding("left upper", "small", "bright"),),
    )


def test_paired_cosine():
    cos = paired_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [-1.0, -1.0]]))
    assert cos.tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(InputError):
        paired_cosine(torch.zeros(2, 3), torch.zeros(3, 3))
