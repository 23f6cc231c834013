"""What the tokens know: zero-shot classification through the aligned embeddings, and a linear probe.

Both read phantom truth (modality; finding present or not). Zero-shot needs a tokenizer trained with stage
``text`` (it compares ``embed_image`` with ``embed_text`` of caption ensembles); the linear probe works on any
tokenizer, on the mean-pooled quantized latent -- the very vectors the LM sees -- so a ``recon`` baseline
without a text head is measured on the same footing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizer.data.phantom_text import caption_for
from tokenizer.data.phantom_vocab import MAX_FINDINGS, MODALITIES, Finding, random_findings
from tokenizer.errors import InputError

Truth = tuple[str, tuple[Finding, ...]]
"""(modality, findings) of one phantom."""
ZERO_SHOT_PROMPTS = 64
"""Captions averaged into each class embedding by default (16 left the result at the mercy of the draw)."""

TASKS = ("modality", "finding_present")
"""The two phantom classification tasks."""


def task_labels(truths: Sequence[Truth], classes: Sequence[str]) -> dict[str, tuple[list[int], list[str]]]:
    """Per task: (integer label per image, class names)."""
    return {
        "modality": ([classes.index(t[0]) for t in truths], list(classes)),
        "finding_present": ([int(bool(t[1])) for t in truths], ["normal", "abnormal"]),
    }


def classification_summary(predicted: Tensor, labels: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean per-class recall) and the majority-class baseline."""
    truth = torch.as_tensor(list(labels))
    hits = (predicted.cpu() == truth).double()
    counts = np.bincount(truth.numpy(), minlength=len(names))
    recalls = [float(hits[truth == c].mean()) for c in range(len(names)) if counts[c]]
    return {
        "classes": list(names),
        "n": len(truth),
        "accuracy": float(hits.mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "majority_baseline": float(counts.max() / len(truth)),
    }


# ------------------------------------------------------------------------------------------------ zero-shot
def zero_shot_predict(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """Index of the most cosine-similar class per image: (N, D), (C, D) -> (N,) long."""
    if (
        image_embeddings.ndim != 2
        or class_embeddings.ndim != 2
        or image_embeddings.shape[1] != class_embeddings.shape[1]
    ):
        raise InputError(
            f"zero_shot_predict: expected (N, D) and (C, D), got {tuple(image_embeddings.shape)}, "
            f"{tuple(class_embeddings.shape)}"
        )
    similarity = F.normalize(image_embeddings.float(), dim=1) @ F.normalize(class_embeddings.float(), dim=1).T
    return similarity.argmax(dim=1)


def class_prompts(classes: Sequence[str], prompts: int, seed: int) -> dict[str, list[list[str]]]:
    """Caption ensembles per task and class, drawn from the phantom caption generator.

    ``modality``: per class, captions of that modality with 0..MAX_FINDINGS random findings;
    ``finding_present``: normal captions, then captions with 1..MAX_FINDINGS findings, both of random
    modalities among ``classes``.
    """
    rng = np.random.default_rng(seed)

    def draw(modality: Callable[[], str], count: Callable[[], int]) -> list[str]:
        return [caption_for(modality(), random_findings(rng, count()), rng) for _ in range(prompts)]

    any_class = lambda: classes[int(rng.integers(len(classes)))]  # noqa: E731
    return {
        "modality": [draw(lambda m=m: m, lambda: int(rng.integers(MAX_FINDINGS + 1))) for m in classes],
        "finding_present": [
            draw(any_class, lambda: 0),
            draw(any_class, lambda: int(rng.integers(1, MAX_FINDINGS + 1))),
        ],
    }


def zero_shot(
    embed_text: Callable[[list[str]], Tensor],
    image_embeddings: Tensor,
    truths: Sequence[Truth],
    classes: Sequence[str] = MODALITIES,
    prompts: int = ZERO_SHOT_PROMPTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero-shot modality and finding-present classification of (N, D) image embeddings.

    Each class embedding is the normalised mean of ``embed_text`` over ``prompts`` captions of that class
    (:func:`class_prompts`); an image takes the most cosine-similar class.
    """
    if image_embeddings.ndim != 2 or len(image_embeddings) != len(truths) or not len(truths):
        raise InputError(
            f"zero_shot: expected (N, D) embeddings for N = {len(truths)} truths (N >= 1), "
            f"got {tuple(image_embeddings.shape)}"
        )
    if prompts < 1:
        raise InputError(f"zero_shot: prompts must be >= 1, got {prompts}")
    out: dict[str, Any] = {"prompts_per_class": prompts}
    labels = task_labels(truths, classes)
    for task, ensembles in class_prompts(classes, prompts, seed).items():
        centres = torch.stack([F.normalize(embed_text(c).float().mean(0).cpu(), dim=0) for c in ensembles])
        predicted = zero_shot_predict(image_embeddings.cpu(), centres)
        out[task] = classification_summary(predicted, *labels[task])
    return out


# ------------------------------------------------------------------------------------------------ linear probe
@torch.no_grad()
def pooled_latent(tokenizer, images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, K*d): the quantized latent averaged over the code grid."""
    return tokenizer.quantizer.embed(tokenizer.encode_to_codes(images)).float().mean(dim=(2, 3))


def linear_probe(
    train_x: Tensor,
    train_y: Sequence[int],
    test_x: Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    steps: int = 200,
) -> Tensor:
    """Multinomial logistic regression on standardised features (L-BFGS, L2 penalty); test predictions."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise InputError(
            f"linear_probe: expected (N, D) train and (M, D) test features, got {tuple(train_x.shape)}, "
            f"{tuple(test_x.shape)}"
        )
    y = torch.as_tensor(list(train_y))
    if len(y) != len(train_x) or not len(y) or y.min() < 0 or y.max() >= num_classes:
        raise InputError(
            f"linear_probe: expected {len(train_x)} labels in [0, {num_classes}), got {y.tolist()[:8]}..."
        )
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, x_test = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(x.shape[1], num_classes).double()
    x, x_test = x.double(), x_test.double()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return head(x_test).argmax(1)


def probe_tasks(
    train_x: Tensor,
    train_truths: Sequence[Truth],
    test_x: Tensor,
    test_truths: Sequence[Truth],
    classes: Sequence[str] = MODALITIES,
) -> dict[str, Any]:
    """Linear-probe accuracy of both phantom tasks: fit on (train_x, train_truths), score on the test set."""
    train, test = task_labels(train_truths, classes), task_labels(test_truths, classes)
    out: dict[str, Any] = {"train_images": len(train_truths), "features": int(train_x.shape[1])}
    for task in TASKS:
        names = test[task][1]
        predicted = linear_probe(train_x, train[task][0], test_x, len(names))
        out[task] = classification_summary(predicted, test[task][0], names)
    return out
