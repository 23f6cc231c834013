"""tokenizer/probe.py: zero-shot through aligned embeddings and the linear probe, on known answers."""

import pytest
import torch

from tokenizer.data.phantom_text import parse_caption
from tokenizer.data.phantom_vocab import MODALITIES, Finding
from tokenizer.errors import InputError
from tokenizer.probe import (
    class_prompts,
    classification_summary,
    linear_probe,
    probe_tasks,
    zero_shot,
    zero_shot_predict,
)


def attribute_vector(modality: str, findings) -> torch.Tensor:
    """A perfectly aligned toy embedding: one-hot modality plus an 'abnormal' flag."""
    v = torch.zeros(len(MODALITIES) + 1)
    v[MODALITIES.index(modality)] = 1.0
    v[-1] = float(bool(findings))
    return v


def oracle_text_encoder(captions: list[str]) -> torch.Tensor:
    return torch.stack([attribute_vector(*parse_caption(c)) for c in captions])


def test_zero_shot_predict_picks_the_most_similar_class():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[3.0, 1.0], [0.1, 2.0], [-1.0, 0.5]])
    assert zero_shot_predict(images, classes).tolist() == [0, 1, 1]
    with pytest.raises(InputError):
        zero_shot_predict(images, torch.zeros(2, 3))


def test_class_prompts_are_captions_of_their_class():
    prompts = class_prompts(MODALITIES, 8, seed=3)
    for modality, captions in zip(MODALITIES, prompts["modality"], strict=True):
        assert len(captions) == 8 and all(parse_caption(c)[0] == modality for c in captions)
    normal, abnormal = prompts["finding_present"]
    assert all(parse_caption(c)[1] == () for c in normal)
    assert all(parse_caption(c)[1] for c in abnormal)
    assert class_prompts(MODALITIES, 8, seed=3) == prompts  # deterministic


def test_zero_shot_with_an_oracle_encoder_is_perfect_and_a_shuffled_one_is_not():
    finding = (Finding("left upper", "small", "bright"),)
    truths = [(m, finding if i % 2 else ()) for i, m in enumerate(MODALITIES * 4)]
    images = torch.stack([attribute_vector(*t) for t in truths])
    result = zero_shot(oracle_text_encoder, images, truths, prompts=12)
    assert result["modality"]["accuracy"] == 1.0 and result["finding_present"]["accuracy"] == 1.0
    assert result["modality"]["majority_baseline"] == pytest.approx(0.2)
    wrong = zero_shot(oracle_text_encoder, images.roll(1, dims=0), truths, prompts=12)
    assert wrong["modality"]["accuracy"] == 0.0
    with pytest.raises(InputError, match="expected"):
        zero_shot(oracle_text_encoder, images[:3], truths)


def test_linear_probe_separates_separable_data_and_summary_counts():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4
    labels = torch.arange(300) % 3
    x = centres[labels] + torch.randn(300, 16, generator=g)
    predicted = linear_probe(x[:200], labels[:200].tolist(), x[200:], 3)
    summary = classification_summary(predicted, labels[200:].tolist(), ["a", "b", "c"])
    assert summary["accuracy"] == 1.0 and summary["n"] == 100
    chance = linear_probe(torch.randn(200, 16, generator=g), labels[:200].tolist(), x[200:], 3)
    assert classification_summary(chance, labels[200:].tolist(), ["a", "b", "c"])["accuracy"] < 0.7
    with pytest.raises(InputError, match="labels"):
        linear_probe(x[:10], [0, 1, 5] + [0] * 7, x, 3)


def test_probe_tasks_reads_modality_and_presence():
    finding = (Finding("right lower", "large", "dark"),)
    truths = [(m, finding if i % 3 == 0 else ()) for i, m in enumerate(MODALITIES * 20)]
    x = torch.stack([attribute_vector(*t) for t in truths]) + 0.05 * torch.randn(len(truths), 6)
    result = probe_tasks(x[:60], truths[:60], x[60:], truths[60:])
    assert result["modality"]["accuracy"] == 1.0 and result["finding_present"]["accuracy"] == 1.0
    assert result["train_images"] == 60 and result["features"] == 6
