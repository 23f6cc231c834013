"""LM benchmarks (DESIGN §7): text→image generation and image→text understanding on held-out data.

The library behind ``tools/eval_generation.py`` and ``tools/eval_understanding.py``; the quickstart and the
benchmarks call it without Hydra::

    generation = evaluate_generation(model, GenerationEvalConfig(num_prompts=64, cfg_scales=[1.0, 3.0]))
    generation.scales["3"]["attributes"]["exact"], generation.scales["3"]["fid"]
    understanding = evaluate_understanding(model, UnderstandingEvalConfig(num_images=64))
    understanding.captioning["attributes"]["exact"], understanding.vqa["accuracy"]

``results.to_dict()`` is the JSON of ``metrics.json``; the tools' ``write_report(results, out_dir, command)``
write it with ``metrics.md`` and the PNG figures (:func:`lm.report.save_figure`).

Conventions (also written into every report):

* Held-out items (:mod:`lm.held_out`): phantoms ``PhantomDataset(n, seed=data_seed)`` at the image tokenizer's
  size and channels (training shards use seed 0; ``dataset_seed`` makes the sets disjoint), with QA pairs drawn
  exactly as ``tools/encode_dataset.py`` draws them; or the captioned rows of a code shard (``shard``), whose
  index gives caption, modality and, for phantom shards, ``attributes`` and ``qa``.
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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lm.api import UnifiedModel, describe_image, text_to_image_prompt_tokens
from lm.generate import SamplingConfig, generate_image_codes
from lm.held_out import (
    GenerationEvalConfig,
    HeldOutConfig,
    HeldOutItem,
    UnderstandingEvalConfig,
    held_out_items,
)
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
from tokenizer.data.phantom_reader import read_phantom
from tokenizer.data.phantom_text import answer_matches
from tokenizer.data.phantom_vocab import MODALITIES
from tokenizer.errors import InputError
from tokenizer.evaluation import RELIABLE_FID_IMAGES, build_features, finite_json, resolve_device
from tokenizer.metrics import FIDAccumulator
from tokenizer.probe import zero_shot

log = logging.getLogger(__name__)


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
            image_temperature=cfg.temperature,
            image_top_k=cfg.top_k,
            image_top_p=cfg.top_p,
            cfg_scale=scale,
            cfg_interval=cfg.cfg_interval,
        )
        self.scale, self.key = scale, f"{scale:g}"
        self.features, self.alignment, self.images = [], [], []
        self.attributes, self.per_modality = AttributeAccuracy(), {}
        self.seconds = 0.0

    def generate(self, model: UnifiedModel, rows: list[torch.Tensor], negatives, seed: int) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] for the prompt rows (guided against ``negatives``, if any), timed."""
        started = time.perf_counter()
        codes = generate_image_codes(model.lm, rows, self.sampling, seed, negative_prompts=negatives).cpu()
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
        modalities = [it.modality if cfg.prompt_modality else None for it in batch]
        rows = [
            text_to_image_prompt_tokens(model, it.caption, m) for it, m in zip(batch, modalities, strict=True)
        ]
        negatives = None
        if cfg.negative_prompt is not None:
            negatives = [text_to_image_prompt_tokens(model, cfg.negative_prompt, m) for m in modalities]
        for run in runs:
            images = run.generate(model, rows, negatives, cfg.seed + b)
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
        "sampling": {
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "cfg_interval": list(cfg.cfg_interval),
            "negative_prompt": cfg.negative_prompt,
        },
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
) -> tuple[list[list[dict[str, Any]]], list[str] | None]:
    """Per item of ``batch``: ``[{"question", "answer", "predicted", "kind", "correct"}]``; and with
    ``cfg.report_first`` the one-line report each item's answers follow (else None)."""
    asked = [(j, q, a) for j, it in enumerate(batch) for q, a in it.qa[: cfg.max_questions]]
    out: list[list[dict[str, Any]]] = [[] for _ in batch]
    reports = None
    if cfg.report_first and asked:  # each image's report once, then every question after it
        reports = describe_image(
            model,
            codes,
            report_first=True,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
        )
    for start in range(0, len(asked), cfg.batch_size):
        chunk = asked[start : start + cfg.batch_size]
        predicted = describe_image(
            model,
            codes[[j for j, _, _ in chunk]],
            [q for _, q, _ in chunk],
            report=None if reports is None else [reports[j] for j, _, _ in chunk],
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
    return out, reports


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
        answers, vqa_reports = (
            _answer_questions(model, batch, codes, cfg, cfg.seed + b)
            if cfg.vqa
            else ([[] for _ in batch], None)
        )
        vqa_reports = vqa_reports or [None] * len(batch)
        for item, report, qa, vqa_report in zip(batch, reports, answers, vqa_reports, strict=True):
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
            if vqa_report is not None:
                sample["vqa_report"] = vqa_report
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
        "report_first": cfg.report_first,
        "max_questions": cfg.max_questions,
        "temperature": cfg.temperature,
    }
    zs = _zero_shot(model, cfg, embeddings, truths) if zero_shot else None
    return UnderstandingResults(settings, captioning, vqa, zs, samples, grid)
