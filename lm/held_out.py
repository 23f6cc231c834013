"""Held-out data of the LM benchmarks: their configs and the items they read.

``GenerationEvalConfig`` and ``UnderstandingEvalConfig`` (both a :class:`HeldOutConfig`) configure
:func:`lm.evaluation.evaluate_generation` and :func:`lm.evaluation.evaluate_understanding`;
:func:`held_out_items` gives the items either benchmark reads: phantoms ``PhantomDataset(n, seed=data_seed)``
at the image tokenizer's size and channels, with QA pairs drawn exactly as ``tools/encode_dataset.py`` draws
them (:class:`PhantomItems`), or the captioned rows of a code shard (:class:`ShardItems`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lm.api import UnifiedModel
from lm.generate import SamplingConfig
from lm.metrics import Attributes
from tokenizer.data.phantom_vocab import Finding, canonical_findings
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError
from tokenizer.metrics import FeatureExtractorConfig
from tokenizer.probe import ZERO_SHOT_PROMPTS
from tokenizer.shards import CodeShard

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class HeldOutConfig:
    """Which held-out items a benchmark reads, and how it batches them."""

    data_seed: int = 1
    """Seed of the held-out phantom set (training shards are encoded from seed 0)."""
    modalities: list[str] | None = None
    """Only these phantom modalities (None: all five); with ``shard``, only rows of these modalities."""
    shard: str | None = None
    """A code shard directory to read instead of phantoms (its captioned rows; K, V, grid must match)."""
    shard_split: str | None = None
    """With ``shard``: only rows whose ``split`` is this (None: every row)."""
    batch_size: int = 16
    """Prompts / images per generation call."""
    seed: int = 0
    """Sampling seed; batch b uses ``seed + b``."""
    num_grid: int = 8
    """Items shown in the PNG figure."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 1 <= self.num_grid <= 32 or self.data_seed < 0 or self.seed < 0:
            raise InputError(
                f"need batch_size >= 1, 1 <= num_grid <= 32 and seeds >= 0, got batch_size={self.batch_size}, "
                f"num_grid={self.num_grid}, data_seed={self.data_seed}, seed={self.seed}"
            )


@dataclass
class GenerationEvalConfig(HeldOutConfig):
    """Text→image benchmark: held-out captions → images → analytic reader, FID / KID, alignment."""

    num_prompts: int = 64
    """Held-out captions used as prompts (one image each per guidance scale)."""
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    """Classifier-free guidance scales to compare (1.0 = no guidance)."""
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """Guidance applies to image positions p with start <= p / (h·w) < end (``SamplingConfig.cfg_interval``)."""
    temperature: float = 0.7
    """Image sub-code sampling temperature (0 = greedy). 0.7, not 1: at 1 a rare sub-code sampled early sends a
    small model's raster into another modality (docs/BENCHMARKS.md, the sampling-temperature sweep)."""
    top_k: int = 0
    """Image top-k (0 = off)."""
    top_p: float = 1.0
    """Image nucleus mass (1 = off)."""
    prompt_modality: bool = True
    """Fill the template's {modality} with the item's modality (as training does); False: "medical"."""
    negative_prompt: str | None = None
    """Guide against this description, laid out like each prompt (same template and modality), instead of
    the unconditional ``<bos><boi>``; e.g. "No abnormality is seen." pushes from a normal study of the
    prompted modality towards the prompted findings (``lm.api.generate_image``'s ``negative_prompt``)."""
    features: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    """FID / KID / precision-recall features; "random" by default (offline; not comparable to papers)."""
    kid_subsets: int = 100
    """Random subsets averaged by KID."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_prompts < 1 or not self.cfg_scales or min(self.cfg_scales) < 0 or self.kid_subsets < 1:
            raise InputError(
                f"need num_prompts >= 1, non-empty cfg_scales >= 0 and kid_subsets >= 1, got {self.num_prompts}, "
                f"{self.cfg_scales}, {self.kid_subsets}"
            )
        if len({f"{float(s):g}" for s in self.cfg_scales}) != len(self.cfg_scales):
            raise InputError(f"cfg_scales: expected distinct values, got {self.cfg_scales}")
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise InputError("negative_prompt: expected a non-empty description or null (unconditional)")
        SamplingConfig(
            image_temperature=self.temperature,
            image_top_k=self.top_k,
            image_top_p=self.top_p,
            cfg_interval=self.cfg_interval,
        )


@dataclass
class UnderstandingEvalConfig(HeldOutConfig):
    """Image→text benchmark: reports (BLEU-4, ROUGE-L, parsed attributes), closed VQA, zero-shot."""

    num_images: int = 64
    """Held-out images described."""
    max_new_tokens: int = 64
    """Text budget of a report (phantom captions take at most ~45 tokens of the default BPE)."""
    vqa: bool = True
    """Ask every closed question of each item (phantoms: ``phantom_questions``; shards: the ``qa`` field)."""
    vqa_max_new_tokens: int = 12
    """Text budget of an answer."""
    report_first: bool = False
    """Describe-then-answer VQA: the LM writes a one-line report of the image, then answers after it (for an
    LM trained with ``data.vqa_report_first > 0``); False asks each question right after the image."""
    max_questions: int | None = None
    """At most this many questions per image (None: all)."""
    temperature: float = 0.0
    """Text sampling temperature (0 = greedy)."""
    zero_shot: bool = True
    """Zero-shot modality and finding-present classification when the image tokenizer has a text encoder."""
    zero_shot_prompts: int = ZERO_SHOT_PROMPTS
    """Captions averaged into each class embedding (a prompt ensemble drawn from the caption generator)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_images < 1 or self.max_new_tokens < 1 or self.vqa_max_new_tokens < 1:
            raise InputError(
                f"need num_images, max_new_tokens and vqa_max_new_tokens >= 1, got {self.num_images}, "
                f"{self.max_new_tokens}, {self.vqa_max_new_tokens}"
            )
        if (self.max_questions is not None and self.max_questions < 1) or self.zero_shot_prompts < 1:
            raise InputError(
                f"need max_questions >= 1 or None and zero_shot_prompts >= 1, got {self.max_questions}"
            )
        SamplingConfig(text_temperature=self.temperature)


# ------------------------------------------------------------------------------------------ held-out items
@dataclass
class HeldOutItem:
    """One evaluation item: pixels (phantoms) or codes (shards), caption, truth and closed QA."""

    source: str
    caption: str
    modality: str | None
    truth: Attributes | None
    """(modality, findings) when known (phantoms, phantom shards)."""
    qa: list[tuple[str, str]]
    image: torch.Tensor | None = None
    """(C, H, W) float in [-1, 1]."""
    codes: torch.Tensor | None = None
    """(K, h, w) long."""


class PhantomItems:
    """Held-out phantoms at the image tokenizer's size and channels."""

    kind = "phantoms"

    def __init__(self, num: int, seed: int, model: UnifiedModel, modalities: list[str] | None = None) -> None:
        pre = model.image_tokenizer.config.preprocess
        self.dataset = PhantomDataset(
            num, seed=seed, size=pre.image_size, channels=pre.channels, modalities=modalities
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> HeldOutItem:
        sample, phantom = self.dataset[i], self.dataset.phantom(i)  # generated once (PhantomDataset.phantom)
        return HeldOutItem(
            source=sample["source"],
            caption=phantom.caption,
            modality=phantom.modality,
            truth=(phantom.modality, phantom.findings),
            qa=self.dataset.questions(i),
            image=sample["image"],
        )


class ShardItems:
    """The captioned rows of a code shard (optionally of one split / some modalities), first ``num``."""

    kind = "shard"

    def __init__(self, directory: str, num: int, model: UnifiedModel, split=None, modalities=None) -> None:
        self.shard = CodeShard(directory)
        v = model.vocab
        if (self.shard.K, self.shard.V, tuple(self.shard.grid)) != (
            v.num_codebooks,
            v.codebook_size,
            tuple(v.grid),
        ):
            raise InputError(
                f"{directory}: shard codes are K={self.shard.K}, V={self.shard.V}, grid={self.shard.grid}; the model "
                f"expects K={v.num_codebooks}, V={v.codebook_size}, grid={v.grid}"
            )
        rows = [
            r
            for r in self.shard.rows()
            if isinstance(r.get("caption"), str)
            and r["caption"].strip()
            and (split is None or r.get("split") == split)
            and (modalities is None or r.get("modality") in modalities)
        ]
        if not rows:
            raise InputError(f"{directory}: no captioned rows (split={split!r}, modalities={modalities})")
        self.rows = rows[:num]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> HeldOutItem:
        row = self.rows[i]
        qa = [(q["question"], q["answer"]) for q in row.get("qa") or [] if isinstance(q, dict)]
        return HeldOutItem(
            source=f"{self.shard.name}:{row['row']}",
            caption=row["caption"].strip(),
            modality=row.get("modality"),
            truth=_row_truth(row),
            qa=[(q, a) for q, a in qa if isinstance(q, str) and isinstance(a, str)],
            codes=self.shard.codes(row["row"]),
        )


def _row_truth(row: dict) -> Attributes | None:
    attributes = row.get("attributes")
    if not isinstance(attributes, dict):
        return None
    try:
        findings = canonical_findings(Finding(**f) for f in attributes["findings"])
        return attributes["modality"], findings
    except (KeyError, TypeError, InputError) as e:
        log.warning("row %s: unusable 'attributes' (%s); no attribute truth", row.get("row"), e)
        return None


def held_out_items(model: UnifiedModel, cfg: HeldOutConfig, num: int) -> PhantomItems | ShardItems:
    """The items a benchmark reads: ``num`` phantoms of ``cfg.data_seed``, or rows of ``cfg.shard``."""
    if cfg.shard is not None:
        return ShardItems(cfg.shard, num, model, cfg.shard_split, cfg.modalities)
    return PhantomItems(num, cfg.data_seed, model, cfg.modalities)
