"""LM benchmarks (DESIGN §7): text→image generation and image→text understanding on held-out data.

The library behind ``tools/eval_generation.py`` and ``tools/eval_understanding.py``; the quickstart and the
benchmarks call it without Hydra::

    generation = evaluate_generation(model, GenerationEvalConfig(num_prompts=64, cfg_scales=[1.0, 3.0]))
    generation.scales["3"]["attributes"]["exact"], generation.scales["3"]["fid"]
    understanding = evaluate_understanding(model, UnderstandingEvalConfig(num_images=64))
    understanding.captioning["attributes"]["exact"], understanding.vqa["accuracy"]

``results.to_dict()`` is the JSON of ``metrics.json``; the tools' ``write_report(results, out_dir, command)``
write it with ``metrics.md`` and the PNG figures (:func:`save_figure`).

Conventions (also written into every report):

* Held-out items: phantoms ``PhantomDataset(n, seed=data_seed)`` at the image tokenizer's size and channels
  (training shards use seed 0; ``dataset_seed`` makes the sets disjoint), with QA pairs drawn exactly as
  ``tools/encode_dataset.py`` draws them; or the captioned rows of a code shard (``shard``), whose index gives
  caption, modality and, for phantom shards, ``attributes`` and ``qa``.
* Prompts are laid out as in training (:mod:`lm.api`): text→image ``<bos>`` + "Generate a {modality} image:
  {caption}" + ``<boi>`` with the item's modality (what the shard index gives training), guided against
  ``<bos><boi>``; image→text ``<bos><boi> codes <eoi>`` + the first instruction (or the question) + "\\n".
  Images enter as the tokenizer's codes of the [-1, 1] input, as ``tools/encode_dataset.py`` encodes them.
* Deterministic: batch ``b`` samples with seed ``seed + b``; results depend on ``batch_size``.
* Outputs that cannot be read (unparseable captions, non-finite images) count as wrong; nothing raises for a
  bad model output. Metrics that need more samples than there are are None.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.api import UnifiedModel, describe_image, text_to_image_prompt_tokens
from lm.generate import SamplingConfig, generate_image_codes
from lm.metrics import (
    AttributeAccuracy,
    Attributes,
    caption_attributes,
    corpus_bleu,
    mean_rouge_l,
    paired_cosine,
    question_kind,
    vqa_accuracy,
)
from tokenizer.api import detokenize
from tokenizer.data.phantoms import (
    MODALITIES,
    Finding,
    PhantomDataset,
    answer_matches,
    canonical_findings,
    phantom_questions,
    read_phantom,
)
from tokenizer.encode import PHANTOM_QA_STREAM
from tokenizer.errors import InputError
from tokenizer.evaluation import RELIABLE_FID_IMAGES, build_features, finite_json, resolve_device
from tokenizer.metrics import FeatureExtractorConfig, FIDAccumulator
from tokenizer.probe import zero_shot
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
    temperature: float = 1.0
    """Image sub-code sampling temperature (0 = greedy)."""
    top_k: int = 0
    """Image top-k (0 = off)."""
    top_p: float = 1.0
    """Image nucleus mass (1 = off)."""
    prompt_modality: bool = True
    """Fill the template's {modality} with the item's modality (as training does); False: "medical"."""
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
        SamplingConfig(image_temperature=self.temperature, image_top_k=self.top_k, image_top_p=self.top_p)


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
    max_questions: int | None = None
    """At most this many questions per image (None: all)."""
    temperature: float = 0.0
    """Text sampling temperature (0 = greedy)."""
    zero_shot: bool = True
    """Zero-shot modality and finding-present classification when the image tokenizer has a text encoder."""
    zero_shot_prompts: int = 16
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
        sample, phantom = self.dataset[i], self.dataset.phantom(i)
        rng = np.random.default_rng([self.dataset.seed, i, PHANTOM_QA_STREAM])
        return HeldOutItem(
            source=sample["source"],
            caption=phantom.caption,
            modality=phantom.modality,
            truth=(phantom.modality, phantom.findings),
            qa=phantom_questions(phantom, rng),
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


def _pixels_and_codes(
    items: list[HeldOutItem], model: UnifiedModel
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Real pixels (B, C, H, W) on the tokenizer's device (None for shards) and codes (B, K, h, w) on the CPU."""
    tokenizer = model.image_tokenizer
    if items[0].image is None:
        return None, torch.stack([it.codes for it in items])
    pixels = torch.stack([it.image for it in items]).to(next(tokenizer.parameters()).device)
    return pixels, tokenizer.encode_to_codes(pixels).cpu()


def _read(image: torch.Tensor) -> Attributes | None:
    """The analytic reader on one (C, H, W) image in [-1, 1]; None when it cannot read it."""
    try:
        return read_phantom(((image.float() + 1) / 2).clamp(0, 1).cpu().numpy())
    except InputError as e:
        log.debug("unreadable image: %s", e)
        return None


def _safe(what: str, fn: Callable[[], Any]) -> Any:
    """Run a metric; None (and a warning) when it cannot be computed, e.g. on non-finite features."""
    try:
        return fn()
    except (InputError, RuntimeError, ValueError, np.linalg.LinAlgError) as e:
        log.warning("%s not computed: %s", what, e)
        return None


def _has_alignment(model: UnifiedModel) -> bool:
    tokenizer = model.image_tokenizer
    return tokenizer.text_encoder is not None and tokenizer.align_head is not None


def _settings(model: UnifiedModel, items, cfg: HeldOutConfig, device: torch.device) -> dict:
    t, v = model.image_tokenizer.config, model.vocab
    return {
        "items": items.kind,
        "data_seed": cfg.data_seed if items.kind == "phantoms" else None,
        "shard": cfg.shard,
        "shard_split": cfg.shard_split,
        "image_size": t.preprocess.image_size,
        "channels": t.preprocess.channels,
        "vocab": {"num_text": v.num_text, "K": v.num_codebooks, "V": v.codebook_size, "grid": list(v.grid)},
        "lm": model.config.to_dict(),
        "aligned_text_encoder": _has_alignment(model),
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "device": str(device),
    }


# --------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationResults:
    """What :func:`evaluate_generation` measured (see :meth:`to_dict` for the JSON form)."""

    settings: dict[str, Any]
    reference: dict[str, Any]
    """Ceilings on the same items: the reader on real images and on tokenizer reconstructions, alignment of
    real image-caption pairs (and of shuffled pairs, a chance level)."""
    scales: dict[str, dict[str, Any]]
    """Guidance scale (as text) -> attributes, per-modality attributes, FID, KID, precision, recall, alignment."""
    samples: list[dict[str, Any]]
    """Per prompt: source, caption, truth and per scale what the reader saw."""
    grid: dict[str, Any] = field(default_factory=dict, repr=False)
    """captions (n,), "real" (n, C, H, W) and per scale (n, C, H, W) images in [-1, 1] on the CPU."""

    def to_dict(self) -> dict[str, Any]:
        return finite_json(
            {
                "settings": self.settings,
                "reference": self.reference,
                "scales": self.scales,
                "num_prompts": len(self.samples),
            }
        )


class _ScaleRun:
    """Running results of one guidance scale."""

    def __init__(self, scale: float, cfg: GenerationEvalConfig) -> None:
        self.sampling = SamplingConfig(
            image_temperature=cfg.temperature, image_top_k=cfg.top_k, image_top_p=cfg.top_p, cfg_scale=scale
        )
        self.scale, self.key = scale, f"{scale:g}"
        self.features, self.alignment, self.images = [], [], []
        self.attributes, self.per_modality = AttributeAccuracy(), {}
        self.seconds = 0.0

    def generate(self, model: UnifiedModel, rows: list[torch.Tensor], seed: int) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] for the prompt rows, timed."""
        started = time.perf_counter()
        codes = generate_image_codes(model.lm, rows, self.sampling, seed).cpu()
        images = detokenize(codes, model.image_tokenizer)
        self.seconds += time.perf_counter() - started
        return images

    def add(self, model, batch, images, feature_net, text_emb, samples: list[dict], keep: int) -> None:
        """Measure one batch of generated images (B, C, H, W); fills each item's sample entry."""
        self.features.append(feature_net(images).cpu())
        if text_emb is not None:
            emb = _safe("alignment", lambda: model.image_tokenizer.embed_image(images).cpu())  # NaN raises
            self.alignment.append(
                torch.full((len(batch),), float("nan")) if emb is None else paired_cosine(emb, text_emb)
            )
        self.images.append(images[:keep].cpu())
        for item, image, sample in zip(batch, images, samples, strict=True):
            read = _read(image)
            entry = {"read": _jsonable(read)}
            if item.truth is not None:
                entry.update(self.attributes.add(read, item.truth))
                self.per_modality.setdefault(item.truth[0], AttributeAccuracy()).add(read, item.truth)
            sample[f"cfg_{self.key}"] = entry

    def finish(self, real_features: torch.Tensor, kid_subsets: int) -> dict[str, Any]:
        fake = torch.cat(self.features)
        n = min(len(fake), len(real_features))
        fid = FIDAccumulator(keep_features=True)
        fid.update(real_features, real=True)
        fid.update(fake, real=False)
        kid = (
            _safe("KID", lambda: fid.kid(num_subsets=kid_subsets, subset_size=min(1000, n)))
            if n >= 2
            else None
        )
        pr = _safe("precision/recall", fid.precision_recall) if n > 3 else None
        return {
            "cfg_scale": self.scale,
            "attributes": dataclasses.asdict(self.attributes.scores()),
            "per_modality": {m: dataclasses.asdict(a.scores()) for m, a in sorted(self.per_modality.items())},
            "fid": _safe("FID", fid.compute) if n >= 2 else None,
            "kid": kid[0] if kid else None,
            "kid_std": kid[1] if kid else None,
            "precision": pr[0] if pr else None,
            "recall": pr[1] if pr else None,
            "alignment": float(torch.cat(self.alignment).mean()) if self.alignment else None,
            "seconds_per_image": self.seconds / max(len(fake), 1),
        }


class _RealReference:
    """The held-out images themselves: FID reference features, reader ceilings, alignment of real pairs."""

    def __init__(self) -> None:
        self.features, self.image_emb, self.text_emb = [], [], []
        self.reader_real, self.reader_recon = AttributeAccuracy(), AttributeAccuracy()

    def add(self, model, batch, feature_net, aligned: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Measure one batch; returns the real images (B, C, H, W) and the captions' embeddings (or None)."""
        pixels, codes = _pixels_and_codes(batch, model)
        recon = detokenize(codes, model.image_tokenizer)
        real = pixels if pixels is not None else recon  # shards hold no pixels: their decoding stands in
        self.features.append(feature_net(real).cpu())
        for j, item in enumerate(batch):
            if item.truth is not None:
                if pixels is not None:
                    self.reader_real.add(_read(pixels[j]), item.truth)
                self.reader_recon.add(_read(recon[j]), item.truth)
        if not aligned:
            return real, None
        self.text_emb.append(model.image_tokenizer.embed_text([it.caption for it in batch]).float().cpu())
        self.image_emb.append(model.image_tokenizer.embed_image(real).float().cpu())
        return real, self.text_emb[-1]

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: dataclasses.asdict(acc.scores()) if acc.scores().n else None
            for name, acc in (("reader_real", self.reader_real), ("reader_reconstruction", self.reader_recon))
        }
        out["alignment_real"] = out["alignment_shuffled"] = None
        if self.text_emb:
            images, texts = torch.cat(self.image_emb), torch.cat(self.text_emb)
            out["alignment_real"] = float(paired_cosine(images, texts).mean())
            if len(texts) > 1:
                out["alignment_shuffled"] = float(paired_cosine(images, texts.roll(1, 0)).mean())
        return out


@torch.no_grad()
def evaluate_generation(
    model: UnifiedModel,
    cfg: GenerationEvalConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> GenerationResults:
    """Generate one image per held-out caption and guidance scale and measure it (module docstring).

    Args:
        model: the unified model; moved to ``device`` and put in eval mode.
        cfg: items, scales, sampling and FID features (default :class:`GenerationEvalConfig`).
        device: "cuda", "cpu", ...; None / "auto" = CUDA when present.
        progress: called with the number of images finished after every generation call.
    """
    cfg = cfg or GenerationEvalConfig()
    device = resolve_device(device)
    model.to(device).eval()
    items = held_out_items(model, cfg, cfg.num_prompts)
    feature_net = build_features(cfg.features).to(device)
    runs, reference = [_ScaleRun(float(s), cfg) for s in cfg.cfg_scales], _RealReference()
    samples: list[dict[str, Any]] = []
    grid: dict[str, Any] = {"captions": [], "real": []}
    for b, start in enumerate(range(0, len(items), cfg.batch_size)):
        batch = [items[i] for i in range(start, min(start + cfg.batch_size, len(items)))]
        real, text_emb = reference.add(model, batch, feature_net, _has_alignment(model))
        new = [{"source": it.source, "caption": it.caption, "truth": _jsonable(it.truth)} for it in batch]
        samples += new
        keep = max(0, cfg.num_grid - len(grid["captions"]))
        grid["captions"] += [it.caption for it in batch[:keep]]
        grid["real"].append(real[:keep].cpu())
        rows = [
            text_to_image_prompt_tokens(model, it.caption, it.modality if cfg.prompt_modality else None)
            for it in batch
        ]
        for run in runs:
            images = run.generate(model, rows, cfg.seed + b)
            run.add(model, batch, images, feature_net, text_emb, new, keep)
            if progress is not None:
                progress(len(batch))
    settings = _settings(model, items, cfg, device) | {
        "features": feature_net.description,
        "features_random": "random" in feature_net.description.lower(),
        "fid_reference": "held-out phantom images"
        if items.kind == "phantoms"
        else "tokenizer decoding of the shard codes",
        "fid_reliable": len(items) >= RELIABLE_FID_IMAGES,
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p},
        "prompt_modality": cfg.prompt_modality,
    }
    real_features = torch.cat(reference.features)
    grid = {"captions": grid["captions"], "real": torch.cat(grid["real"])}
    grid |= {run.key: torch.cat(run.images) for run in runs}
    scales = {run.key: run.finish(real_features, cfg.kid_subsets) for run in runs}
    return GenerationResults(settings, reference.finish(), scales, samples, grid)


def _jsonable(attributes: Attributes | None) -> dict | None:
    if attributes is None:
        return None
    return {"modality": attributes[0], "findings": [f.as_dict() for f in attributes[1]]}


# ------------------------------------------------------------------------------------------ understanding
@dataclass
class UnderstandingResults:
    """What :func:`evaluate_understanding` measured (see :meth:`to_dict` for the JSON form)."""

    settings: dict[str, Any]
    captioning: dict[str, Any]
    """BLEU-4 (with n-gram precisions, brevity penalty), ROUGE-L, parsed attributes overall / per modality."""
    vqa: dict[str, Any] | None
    """Closed VQA accuracy overall and per question kind; None when off or no item has questions."""
    zero_shot: dict[str, Any] | None
    """Zero-shot modality / finding-present accuracy with majority baselines; None without a text encoder."""
    samples: list[dict[str, Any]]
    """Per image: source, reference caption, generated report, parsed attributes, flags, questions."""
    grid: dict[str, Any] = field(default_factory=dict, repr=False)
    """"images" (n, C, H, W) in [-1, 1] on the CPU, "reports" and "captions" (n,)."""

    def to_dict(self) -> dict[str, Any]:
        return finite_json(
            {
                "settings": self.settings,
                "num_images": len(self.samples),
                "captioning": self.captioning,
                "vqa": self.vqa,
                "zero_shot": self.zero_shot,
            }
        )


def _zero_shot(
    model: UnifiedModel, cfg: UnderstandingEvalConfig, embeddings, truths
) -> dict[str, Any] | None:
    """Zero-shot modality and finding-present classification (:func:`tokenizer.probe.zero_shot`)."""
    classes = list(cfg.modalities or MODALITIES)
    keep = [i for i, t in enumerate(truths) if t is not None and t[0] in classes]
    if not keep:
        return None
    return zero_shot(
        model.image_tokenizer.embed_text,
        torch.cat(embeddings)[keep],
        [truths[i] for i in keep],
        classes,
        cfg.zero_shot_prompts,
        cfg.seed,
    )


def _answer_questions(
    model: UnifiedModel,
    batch: list[HeldOutItem],
    codes: torch.Tensor,
    cfg: UnderstandingEvalConfig,
    seed: int,
) -> list[list[dict[str, Any]]]:
    """Per item of ``batch``: ``[{"question", "answer", "predicted", "kind", "correct"}]``."""
    asked = [(j, q, a) for j, it in enumerate(batch) for q, a in it.qa[: cfg.max_questions]]
    out: list[list[dict[str, Any]]] = [[] for _ in batch]
    for start in range(0, len(asked), cfg.batch_size):
        chunk = asked[start : start + cfg.batch_size]
        predicted = describe_image(
            model,
            codes[[j for j, _, _ in chunk]],
            [q for _, q, _ in chunk],
            max_new_tokens=cfg.vqa_max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
        )
        for (j, question, answer), text in zip(chunk, predicted, strict=True):
            out[j].append(
                {
                    "question": question,
                    "answer": answer,
                    "predicted": text,
                    "kind": question_kind(question),
                    "correct": answer_matches(text, answer),
                }  # fmt: skip
            )
    return out


def _captioning_summary(samples: list[dict], attributes: AttributeAccuracy, per_modality: dict) -> dict:
    """BLEU-4, ROUGE-L and attribute scores of the reports in ``samples`` against their captions."""
    reports, references = [s["report"] for s in samples], [s["caption"] for s in samples]
    bleu = corpus_bleu(reports, references)
    return {
        "bleu4": bleu.score,
        "bleu": dataclasses.asdict(bleu),
        "rouge_l": mean_rouge_l(reports, references),
        "empty_reports": sum(not r.strip() for r in reports),
        "attributes": dataclasses.asdict(attributes.scores()) if attributes.scores().n else None,
        "per_modality": {m: dataclasses.asdict(a.scores()) for m, a in sorted(per_modality.items())},
    }


@torch.no_grad()
def evaluate_understanding(
    model: UnifiedModel,
    cfg: UnderstandingEvalConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> UnderstandingResults:
    """Describe held-out images, answer their closed questions, classify them zero-shot (module docstring).

    Args:
        model: the unified model; moved to ``device`` and put in eval mode.
        cfg: items, budgets, sampling (default :class:`UnderstandingEvalConfig`).
        device: "cuda", "cpu", ...; None / "auto" = CUDA when present.
        progress: called with the number of images finished after every batch.
    """
    cfg = cfg or UnderstandingEvalConfig()
    device = resolve_device(device)
    model.to(device).eval()
    tokenizer = model.image_tokenizer
    zero_shot = cfg.zero_shot and _has_alignment(model)
    items = held_out_items(model, cfg, cfg.num_images)
    attributes, per_modality = AttributeAccuracy(), {}
    samples: list[dict[str, Any]] = []
    embeddings, truths = [], []
    grid: dict[str, Any] = {"images": [], "reports": [], "captions": []}
    for b, start in enumerate(range(0, len(items), cfg.batch_size)):
        batch = [items[i] for i in range(start, min(start + cfg.batch_size, len(items)))]
        pixels, codes = _pixels_and_codes(batch, model)
        reports = describe_image(
            model,
            codes,
            None,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed + b,
        )
        answers = (
            _answer_questions(model, batch, codes, cfg, cfg.seed + b) if cfg.vqa else [[] for _ in batch]
        )
        for item, report, qa in zip(batch, reports, answers, strict=True):
            parsed = caption_attributes(report)
            sample = {
                "source": item.source,
                "caption": item.caption,
                "report": report,
                "parsed": _jsonable(parsed),
            }
            if item.truth is not None:
                sample["truth"] = _jsonable(item.truth)
                sample.update(attributes.add(parsed, item.truth))
                per_modality.setdefault(item.truth[0], AttributeAccuracy()).add(parsed, item.truth)
            samples.append(sample | {"vqa": qa})
            truths.append(item.truth)
        if zero_shot:
            embeddings.append(
                tokenizer.image_embedding(tokenizer.quantizer.embed(codes.to(device))).float().cpu()
            )
        keep = max(0, cfg.num_grid - len(grid["reports"]))
        if keep:
            shown = pixels[:keep] if pixels is not None else detokenize(codes[:keep], tokenizer)
            grid["images"].append(shown.cpu())
            grid["reports"] += reports[:keep]
            grid["captions"] += [it.caption for it in batch[:keep]]
        if progress is not None:
            progress(len(batch))
    grid["images"] = torch.cat(grid["images"])
    captioning = _captioning_summary(samples, attributes, per_modality)
    asked = [qa for s in samples for qa in s["vqa"]]
    keys = ("predicted", "answer", "question")
    vqa = vqa_accuracy(*([q[k] for q in asked] for k in keys)) if asked else None
    settings = _settings(model, items, cfg, device) | {
        "max_new_tokens": cfg.max_new_tokens,
        "vqa_max_new_tokens": cfg.vqa_max_new_tokens,
        "max_questions": cfg.max_questions,
        "temperature": cfg.temperature,
    }
    zs = _zero_shot(model, cfg, embeddings, truths) if zero_shot else None
    return UnderstandingResults(settings, captioning, vqa, zs, samples, grid)


# ----------------------------------------------------------------------------------------------- figures
def save_figure(
    rows: list[tuple[str, torch.Tensor]],
    titles: list[str],
    path: str | Path,
    *,
    footers: list[str] | None = None,
    wrap: int = 34,
) -> Path:
    """A PNG grid drawn with matplotlib: one row per ``(label, images (n, C, H, W) in [-1, 1])``, a title
    above each column (e.g. the prompt) and optionally a footer below the last row (e.g. the reference)."""
    from matplotlib.figure import Figure

    def printable(text: str) -> str:  # generated text may hold control bytes no font has glyphs for
        return "".join(c if c.isprintable() else "\ufffd" for c in text)

    titles, footers = [printable(t) for t in titles], footers and [printable(t) for t in footers]
    n = len(titles)
    title_lines = max(len(textwrap.wrap(t, wrap)) or 1 for t in titles)
    footer_lines = max((len(textwrap.wrap(t, wrap)) for t in footers), default=0) if footers else 0
    height = 1.9 * len(rows) + 0.11 * (title_lines + footer_lines) + 0.3
    fig = Figure(figsize=(2.1 * n, height), dpi=110, layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = ((images[j].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            gray = image.shape[-1] == 1
            ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(textwrap.fill(titles[j], wrap), fontsize=5.5, loc="left")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if footers and i == len(rows) - 1:
                ax.set_xlabel(textwrap.fill(footers[j], wrap), fontsize=5.5, loc="left")
    path = Path(path)
    fig.savefig(path)
    return path


def write_outputs(
    out_dir: str | Path, data: dict, markdown: str, samples: list[dict], samples_name: str
) -> Path:
    """Write ``metrics.json``, ``metrics.md`` and the per-item ``samples_name`` (JSONL) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / "metrics.md").write_text(markdown)
    with open(out / samples_name, "w") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    return out
