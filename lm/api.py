"""The LM's public API: create, save and load a :class:`UnifiedModel`; generate images, text or both.

A saved model is a directory::

    config.json          {"format", "format_version", "architecture", "lm": LMConfig, "vocab": Vocab layout}
    lm.safetensors       every DecoderLM weight
    text_tokenizer/      the text tokenizer (Hugging Face files)
    image_tokenizer/     the image tokenizer checkpoint (``save_tokenizer``)
    hf_backbone/         only for a Hugging Face backbone: its config.json (+ an empty weights file, so
                         transformers can rebuild the architecture offline; the weights are in lm.safetensors)

Prompts are laid out exactly like the training records of :mod:`lm.data`: text→image is ``<bos>`` + the
first :data:`~lm.data.TEXT_TO_IMAGE_TEMPLATES` phrasing + ``<boi>``, guided against ``<bos><boi>``;
image→text is ``<bos><boi> image <eoi>`` + the instruction (the first of
:data:`~lm.data.IMAGE_TO_TEXT_INSTRUCTIONS`, or the question) + ``"\\n"``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lm.config import LMConfig, lm_config
from lm.data import (
    DEFAULT_MODALITY,
    IMAGE_TO_TEXT_INSTRUCTIONS,
    REPORT_FIRST_INSTRUCTION,
    TEXT_TO_IMAGE_TEMPLATES,
    one_line,
    text_to_image_prompt,
)
from lm.generate import SamplingConfig, generate_image_codes, generate_tokens
from lm.model import DecoderLM
from lm.sequence import prompt_tokens
from lm.text_tokenizer import TextTokenizer
from lm.vocab import Vocab
from tokenizer.api import detokenize, tokenize_image
from tokenizer.atomic import atomic_write, atomic_write_bytes
from tokenizer.checkpoint import check_state, load_tokenizer, read_weights, save_tokenizer
from tokenizer.errors import InputError
from tokenizer.model import ImageTokenizer

log = logging.getLogger(__name__)

FORMAT = "medtok-lm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "lm.safetensors"
TEXT_DIR = "text_tokenizer"
IMAGE_DIR = "image_tokenizer"
HF_DIR = "hf_backbone"
ARCHITECTURES: dict[str, type[DecoderLM]] = {"decoder_lm": DecoderLM}
"""Registry of LM architectures a checkpoint may name."""
DEFAULT_TEXT_VOCAB = 1024
"""Upper bound on the default BPE's vocabulary (the phantom corpus yields fewer merges)."""


# --------------------------------------------------------------------------------------------- model
class UnifiedModel(nn.Module):
    """The LM with its vocabulary, its text tokenizer and its image tokenizer.

    Args:
        lm: the decoder; ``lm.vocab`` must match both tokenizers (checked).
        text_tokenizer: owns the text ids ``[0, vocab.num_text)``.
        image_tokenizer: encodes images to the (K, h, w) codes the vocabulary expects, and back.
    """

    def __init__(self, lm: DecoderLM, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer) -> None:
        super().__init__()
        check_parts(lm.vocab, text_tokenizer, image_tokenizer, "UnifiedModel")
        self.lm, self.text_tokenizer, self.image_tokenizer = lm, text_tokenizer, image_tokenizer

    @property
    def vocab(self) -> Vocab:
        return self.lm.vocab

    @property
    def config(self) -> LMConfig:
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def image_codes(self, image, *, modality=None, window=None, slice_index=None) -> list[torch.Tensor]:
        """Codes (K, h, w) of each image: anything ``tokenize_image`` accepts, a list of those, a batch
        (B, C, H, W) in [-1, 1], or integer codes (K, h, w) / (B, K, h, w) used as they are."""
        expected = (self.vocab.num_codebooks, *self.vocab.grid)
        is_codes = isinstance(image, torch.Tensor) and not image.dtype.is_floating_point
        if is_codes and image.ndim in (3, 4) and tuple(image.shape[-3:]) == expected:
            codes = image.long().cpu().reshape(-1, *expected)
            self.vocab.codes_to_ids(codes.movedim(1, -1))  # range check
            return list(codes)
        items = list(image) if isinstance(image, list | tuple) else [image]
        out = []
        for item in items:
            if isinstance(item, torch.Tensor) and not item.dtype.is_floating_point and item.shape == expected:
                out += self.image_codes(item)
                continue
            codes = tokenize_image(
                item, self.image_tokenizer, modality=modality, window=window, slice_index=slice_index
            )
            out += list(codes.reshape(-1, *expected))
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model directory (layout in the module docstring); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lm_dict = self.config.to_dict()
        if self.config.hf_backbone is not None:
            _save_hf_architecture(self.lm, directory / HF_DIR)
            lm_dict["hf_backbone"] = HF_DIR  # relative: resolved against the directory at load
        state = {k: v.detach().cpu().contiguous() for k, v in self.lm.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
        self.text_tokenizer.save(directory / TEXT_DIR)
        save_tokenizer(self.image_tokenizer, directory / IMAGE_DIR)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": "decoder_lm",
            "lm": lm_dict,
            "vocab": self.vocab.to_dict(),
            "hf_backbone_source": self.config.hf_backbone,
        }
        # config.json last: a directory without it is an unfinished save
        atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2).encode())
        return directory


def check_parts(vocab: Vocab, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer, where: str):
    """Raise :class:`InputError` naming every way the tokenizers disagree with the vocabulary."""
    q = image_tokenizer.config.quantizer
    try:
        vocab.check_tokenizer(q.num_codebooks, q.codebook_size, image_tokenizer.grid)
    except InputError as e:
        raise InputError(f"{where}: image tokenizer: {e}") from None
    try:
        vocab.check_text(text_tokenizer.vocab_size)
    except InputError as e:
        raise InputError(f"{where}: text tokenizer: {e}") from None


def _save_hf_architecture(lm: DecoderLM, directory: Path) -> None:
    """The Hugging Face config plus a tensor-free weights file: enough to rebuild the module offline."""
    directory.mkdir(parents=True, exist_ok=True)
    lm.backbone.hf_config.save_pretrained(str(directory))
    atomic_write(directory / "model.safetensors", lambda tmp: save_file({}, tmp, metadata={"format": FORMAT}))


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report while a backbone is rebuilt from an empty weights file."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------- create / load
@functools.lru_cache(maxsize=4)
def phantom_text_corpus(num_images: int = 1000, seed: int = 0) -> tuple[str, ...]:
    """Captions and VQA text of ``num_images`` random phantom findings, plus the fixed prompt phrasings."""
    from tokenizer.data.phantom_text import caption_for, phantom_questions
    from tokenizer.data.phantom_vocab import MAX_FINDINGS, MODALITIES, Phantom, random_findings

    rng = np.random.default_rng(seed)
    texts: list[str] = [*IMAGE_TO_TEXT_INSTRUCTIONS, REPORT_FIRST_INSTRUCTION]
    for m in (*MODALITIES, DEFAULT_MODALITY):
        texts += [t.format(modality=m, caption="") for t in TEXT_TO_IMAGE_TEMPLATES]
    for i in range(num_images):
        modality = MODALITIES[i % len(MODALITIES)]
        findings = random_findings(rng, int(rng.integers(MAX_FINDINGS + 1)))
        caption = caption_for(modality, findings, rng)
        phantom = Phantom(np.zeros((1, 1), np.float32), modality, findings, caption, i)
        texts.append(caption)
        texts += [t for qa in phantom_questions(phantom, rng) for t in qa]
    return tuple(texts)


@functools.lru_cache(maxsize=2)
def default_text_tokenizer(vocab_size: int = DEFAULT_TEXT_VOCAB) -> TextTokenizer:
    """The embedded default: a byte-level BPE trained on :func:`phantom_text_corpus` (offline, ~1 s)."""
    return TextTokenizer.train_bpe(phantom_text_corpus(), vocab_size=vocab_size)


def _as_image_tokenizer(tokenizer) -> ImageTokenizer:
    if isinstance(tokenizer, ImageTokenizer):
        return tokenizer
    if isinstance(tokenizer, str | os.PathLike):
        return load_tokenizer(tokenizer)
    raise InputError(
        "create_model: tokenizer must be an ImageTokenizer or a tokenizer checkpoint directory "
        f"(tokenizer.api.create_tokenizer('tiny') gives a random one), got {type(tokenizer).__name__}"
    )


def _as_text_tokenizer(text_tokenizer, config: LMConfig) -> TextTokenizer:
    if isinstance(text_tokenizer, TextTokenizer):
        return text_tokenizer
    if isinstance(text_tokenizer, str | os.PathLike):
        return TextTokenizer.from_pretrained(text_tokenizer)
    if text_tokenizer is not None:
        raise InputError(
            f"create_model: text_tokenizer must be a TextTokenizer, a path / hub name or None, got {type(text_tokenizer).__name__}"
        )
    hf = config.hf_backbone
    if hf is not None and any(
        (Path(hf) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return TextTokenizer.from_pretrained(hf, local_files_only=True)  # the backbone's own tokenizer
    return default_text_tokenizer()


def create_model(
    preset: str = "tiny",
    tokenizer: ImageTokenizer | str | os.PathLike | None = None,
    text_tokenizer: TextTokenizer | str | os.PathLike | None = None,
    **overrides,
) -> UnifiedModel:
    """A randomly initialised LM for an image tokenizer, in eval mode on the CPU.

    Args:
        preset: LM size from :data:`lm.config.PRESETS` ("tiny", "small", "base", "large").
        tokenizer: the image tokenizer, or its checkpoint directory (required).
        text_tokenizer: a TextTokenizer, a Hugging Face tokenizer directory / hub name, or None: the
            tokenizer of ``hf_backbone`` when that directory has one, else :func:`default_text_tokenizer`.
        overrides: LMConfig fields, e.g. ``hf_backbone="path/to/llama"``, ``depth_layers=2``.
    """
    if tokenizer is None:
        raise InputError("create_model: tokenizer is required (an ImageTokenizer or a checkpoint directory)")
    image_tokenizer = _as_image_tokenizer(tokenizer)
    config = lm_config(preset, **overrides)
    text = _as_text_tokenizer(text_tokenizer, config)
    vocab = vocab_for(text, image_tokenizer)
    if config.hf_backbone is None and vocab.image_length + 3 > config.max_seq_len:
        raise InputError(
            f"create_model: an image takes {vocab.image_length} + 2 positions, more than max_seq_len={config.max_seq_len} allows"
        )
    return UnifiedModel(DecoderLM(config, vocab), text, image_tokenizer).eval()


def vocab_for(text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer) -> Vocab:
    """The id layout for a text tokenizer and an image tokenizer (K, V and the grid from its config)."""
    q = image_tokenizer.config.quantizer
    return Vocab(text_tokenizer.vocab_size, q.num_codebooks, q.codebook_size, image_tokenizer.grid)


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise InputError(
            f"{directory}: not a saved LM (no {CONFIG_NAME}; UnifiedModel.save_pretrained writes one)"
        )
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"{path}: 'format' must be {FORMAT!r}, got {found!r}")
    if not isinstance(raw.get("format_version"), int) or raw["format_version"] > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {raw.get('format_version')!r} is not one this code reads (<= {FORMAT_VERSION})"
        )
    if raw.get("architecture") not in ARCHITECTURES:
        raise InputError(
            f"{path}: unknown architecture {raw.get('architecture')!r}; expected one of {sorted(ARCHITECTURES)}"
        )
    if not isinstance(raw.get("lm"), dict) or not isinstance(raw.get("vocab"), dict):
        raise InputError(f"{path}: expected objects 'lm' (LMConfig) and 'vocab' (the id layout)")
    return raw


def load_model(directory: str | os.PathLike, device: str | torch.device | None = None) -> UnifiedModel:
    """Load a directory written by :meth:`UnifiedModel.save_pretrained`; returned in eval mode.

    Checks the vocabulary against both tokenizers (K, V, grid, num_text) and every weight's name and
    shape against the config, and refuses unknown formats or architectures, with an :class:`InputError`
    naming the mismatch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a model directory")
    raw = _read_config(directory)
    path = directory / CONFIG_NAME
    try:
        vocab = Vocab.from_dict(raw["vocab"])
        lm_dict = dict(raw["lm"])
        if lm_dict.get("hf_backbone") is not None:
            inside = Path(lm_dict["hf_backbone"])
            if inside.is_absolute() or ".." in inside.parts:  # save_pretrained writes "hf_backbone"
                raise ValueError(f"lm.hf_backbone must name a folder inside {directory}, got {str(inside)!r}")
            lm_dict["hf_backbone"] = str(directory / inside)
        config = LMConfig.from_dict(lm_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    image_tokenizer = load_tokenizer(directory / IMAGE_DIR)
    text_tokenizer = TextTokenizer.load(directory / TEXT_DIR)
    check_parts(vocab, text_tokenizer, image_tokenizer, str(directory))
    weights = directory / WEIGHTS_NAME
    state = read_weights(weights)
    with _quiet_transformers() if config.hf_backbone is not None else contextlib.nullcontext():
        lm = ARCHITECTURES[raw["architecture"]](config, vocab)
    check_state(lm.state_dict(), state, str(weights))
    lm.load_state_dict(state, strict=True)
    return UnifiedModel(lm, text_tokenizer, image_tokenizer).to(device or "cpu").eval()


# --------------------------------------------------------------------------------------------- prompts
def _prompt(model: UnifiedModel, segments: list[dict], codes: list[torch.Tensor]) -> torch.Tensor:
    """``<bos>`` + segments as (T, K) ids; ``{"image": "i"}`` refers to ``codes[i]``."""
    return prompt_tokens(segments, model.vocab, model.text_tokenizer.encode, lambda ref: codes[int(ref)])


def text_to_image_prompt_tokens(
    model: UnifiedModel, prompt: str, modality: str | None = None
) -> torch.Tensor:
    """The (T, K) ids of a text→image prompt, as in training (without the ``<boi>`` generation adds)."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt: expected a str, got {type(prompt).__name__}")
    return _prompt(model, [{"text": text_to_image_prompt(prompt.strip(), modality)}], [])


def image_to_text_prompt_tokens(
    model: UnifiedModel, codes: torch.Tensor, question: str | None = None
) -> torch.Tensor:
    """The (T, K) ids of ``<bos><boi> image <eoi> instruction\\n``: the caption instruction or a VQA question."""
    _check_question(question)
    instruction = IMAGE_TO_TEXT_INSTRUCTIONS[0] if question is None else question.strip()
    return _prompt(model, [{"image": "0"}, {"text": f"{instruction}\n"}], [codes])


def report_first_prompt_tokens(
    model: UnifiedModel, codes: torch.Tensor, report: str | None = None, question: str | None = None
) -> torch.Tensor:
    """Describe-then-answer prompts, laid out as ``data.vqa_report_first`` records are:
    ``<bos><boi> image <eoi> REPORT_FIRST_INSTRUCTION\\n`` (asks for the report when ``report`` is None),
    then ``report\\n`` on one line and, with a question, ``question\\n``."""
    _check_question(question)
    if report is None and question is not None:
        raise InputError("report_first_prompt_tokens: a question needs the report it follows")
    segments = [{"image": "0"}, {"text": f"{REPORT_FIRST_INSTRUCTION}\n"}]
    segments += [] if report is None else [{"text": f"{one_line(report)}\n"}]
    segments += [] if question is None else [{"text": f"{question.strip()}\n"}]
    return _prompt(model, segments, [codes])


def _check_question(question) -> None:
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise InputError(f"question: expected a non-empty str or None, got {question!r}")


def split_segments(model: UnifiedModel, rows: torch.Tensor) -> list[str | torch.Tensor]:
    """Generated rows (T, K) -> text runs (str) and image codes (K, h, w); stops at ``<eos>``.

    Specials other than the image brackets are dropped; an image cut off before ``<eoi>`` is dropped too.
    """
    vocab, hw, first = model.vocab, model.vocab.image_length, rows[:, 0].tolist()
    out: list[str | torch.Tensor] = []
    text: list[int] = []
    t = 0
    while t < len(first) and first[t] != vocab.eos:
        if first[t] == vocab.boi:
            span = rows[t + 1 : t + 1 + hw]
            if (
                t + 1 + hw >= len(first)
                or first[t + 1 + hw] != vocab.eoi
                or not vocab.is_image(span[:, 0]).all()
            ):
                log.warning("generated image at position %d is incomplete; dropped", t)
                break
            out += [model.text_tokenizer.decode(text)] if text else []
            out.append(vocab.rows_to_image(span.cpu()))
            text, t = [], t + hw + 2
            continue
        if 0 <= first[t] < vocab.num_text:
            text.append(first[t])
        t += 1
    return out + ([model.text_tokenizer.decode(text)] if text else [])


# --------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_image(
    model: UnifiedModel,
    prompt: str | Sequence[str],
    *,
    cfg_scale: float = 1.5,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    modality: str | None = None,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    negative_prompt: str | Sequence[str] | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image per prompt, with classifier-free guidance against ``<bos><boi>`` (or a negative prompt).

    Args:
        model: the unified model.
        prompt: a description (e.g. a caption) or a list of them; ``""`` is unconditional.
        cfg_scale: guidance scale; 1 disables guidance.
        temperature, top_k, top_p: image sub-code sampling (temperature 0 = greedy). The defaults (guidance
            1.5, temperature 0.7) gave the best prompt-following images in docs/BENCHMARKS.md's sweep;
            larger scales draw more of the prompted findings at the cost of the modality's look.
        seed: same seed, same images.
        modality: the ``{modality}`` of the training prompt template (the shard index's modality,
            e.g. "ct"); None = "medical", as for training rows without one.
        cfg_interval: guidance applies to image positions p with start <= p / (h*w) < end.
        negative_prompt: a description guidance pushes away from instead of ``<bos><boi>`` (one for all
            prompts, or one per prompt), laid out like the prompts (same template and ``modality``).
        compile: decode through ``torch.compile`` (worth it for many images: the first call per batch
            size compiles for about a minute on a CPU; see :func:`lm.generate.generate_tokens`).

    Returns:
        images (B, C, H, W) float in [-1, 1] on the image tokenizer's device, codes (B, K, h, w) long (CPU).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("prompt: expected a str or a non-empty list of str")
    rows = [text_to_image_prompt_tokens(model, p, modality) for p in prompts]
    negatives = None
    if negative_prompt is not None:
        negative = _per_item(negative_prompt, len(rows), "negative_prompt", "prompts")
        negatives = [text_to_image_prompt_tokens(model, n, modality) for n in negative]
    sampling = SamplingConfig(
        image_temperature=temperature,
        image_top_k=top_k,
        image_top_p=top_p,
        cfg_scale=cfg_scale,
        cfg_interval=cfg_interval,
    )
    codes = generate_image_codes(
        model.lm, rows, sampling, seed, compile=compile, negative_prompts=negatives
    ).cpu()
    return detokenize(codes, model.image_tokenizer), codes


@torch.no_grad()
def describe_image(
    model: UnifiedModel,
    image,
    question: str | Sequence[str | None] | None = None,
    *,
    report_first: bool = False,
    report: str | Sequence[str] | None = None,
    max_new_tokens: int = 64,
    max_report_tokens: int = 96,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    modality: str | None = None,
    window: str | tuple[float, float] | None = None,
    slice_index: int | None = None,
) -> str | list[str]:
    """A report of an image (``question=None``) or the answer to a question about it.

    Args:
        model: the unified model.
        image: anything ``tokenize_image`` accepts (path, PIL image, array, tensor), or integer codes
            (K, h, w); a list of those (or a batch tensor) gives a list of answers.
        question: None for the report instruction, a question, or one per image (an answer ends at its
            first line break, as the model was trained to end it).
        report_first: describe-then-answer (for a model trained with ``data.vqa_report_first > 0``): the model
            first writes a one-line report of each distinct image under ``REPORT_FIRST_INSTRUCTION``, then
            answers each question after it; with ``question=None`` that report is returned.
        report: the report(s) to answer after (one, or one per image), instead of having the model write them;
            implies ``report_first``.
        max_new_tokens: text budget per answer (per report when ``question`` is None).
        max_report_tokens: text budget of a report written before answering.
        temperature, top_k, top_p: text sampling (temperature 0 = greedy).
        seed: seeds sampling.
        modality, window, slice_index: preprocessing hints passed to ``tokenize_image``.
    """
    codes = model.image_codes(image, modality=modality, window=window, slice_index=slice_index)
    single = not isinstance(image, list | tuple) and not (isinstance(image, torch.Tensor) and image.ndim == 4)
    questions = _per_item(question, len(codes), "question", "images")
    sampling = SamplingConfig(
        text_temperature=temperature, text_top_k=top_k, text_top_p=top_p, max_new_tokens=max_new_tokens
    )
    if report is not None:
        reports = _per_item(report, len(codes), "report", "images")
        if not all(isinstance(r, str) for r in reports):
            raise InputError(f"report: expected a str or one str per image, got {report!r:.80}")
    elif report_first:
        budget = max_report_tokens if any(q is not None for q in questions) else max_new_tokens
        reports = _one_line_reports(model, codes, replace(sampling, max_new_tokens=budget), seed)
    else:
        reports = None
    if reports is None:
        prompts = [image_to_text_prompt_tokens(model, c, q) for c, q in zip(codes, questions, strict=True)]
    else:
        asked = [i for i, q in enumerate(questions) if q is not None]
        prompts = [report_first_prompt_tokens(model, codes[i], reports[i], questions[i]) for i in asked]
    lines = [q is not None for q in questions] if reports is None else [True] * len(prompts)
    texts = _complete(model, prompts, lines, sampling, seed)
    if reports is not None:
        answers = iter(texts)
        texts = [reports[i] if q is None else next(answers) for i, q in enumerate(questions)]
    return texts[0] if single else texts


def _per_item(value, n: int, name: str, items: str) -> list:
    """``value`` for each of ``n`` items: a str or None stands for all of them, a sequence gives one each."""
    values = [value] * n if value is None or isinstance(value, str) else list(value)
    if len(values) != n:
        raise InputError(f"{name}: {len(values)} for {n} {items}")
    return values


def _complete(model, prompts, at_line: list[bool], sampling: SamplingConfig, seed: int) -> list[str]:
    """Text continuations of the prompts; those marked ``at_line`` (answers) end at their first line."""
    if not prompts:
        return []
    # an answer ends at its line (as trained), a report at <eos>; a batch of only answers stops there
    stop_ids = model.text_tokenizer.line_break_ids if all(at_line) else ()
    outs = generate_tokens(model.lm, prompts, sampling, seed=seed, stop_ids=stop_ids)
    texts = []
    for rows, line in zip(outs, at_line, strict=True):
        text = " ".join(p for p in split_segments(model, rows) if isinstance(p, str)).strip()
        texts.append(text.split("\n", 1)[0].strip() if line else text)
    return texts


def _one_line_reports(model, codes: list[torch.Tensor], sampling: SamplingConfig, seed: int) -> list[str]:
    """The one-line report a describe-then-answer model writes of each image (once per distinct image)."""
    keys = [c.numpy().tobytes() for c in codes]
    first: dict[bytes, int] = {}  # distinct image -> its first index
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    prompts = [report_first_prompt_tokens(model, codes[i]) for i in first.values()]
    written = dict(zip(first, _complete(model, prompts, [True] * len(prompts), sampling, seed), strict=True))
    return [written[k] for k in keys]


@torch.no_grad()
def generate(
    model: UnifiedModel,
    segments: Sequence,
    *,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    modality: str | None = None,
    window: str | tuple[float, float] | None = None,
) -> list[str | torch.Tensor]:
    """Continue an interleaved document; returns the new segments: text (str) and images (C, H, W) in [-1, 1].

    Args:
        model: the unified model.
        segments: the document so far: a str is text; anything else is an image (a ``pathlib.Path``,
            PIL image, array, float tensor (C, H, W), or integer codes (K, h, w)).
        sampling: temperatures, top-k / top-p per modality and ``max_new_tokens`` (default
            :class:`SamplingConfig`); guidance needs a prompt that ends in an image, so use
            :func:`generate_image` for guided images.
        seed: seeds sampling.
        modality, window: preprocessing hints for the prompt's images.
    """
    sampling = sampling or SamplingConfig()
    if sampling.cfg_scale != 1.0:
        raise InputError("generate: classifier-free guidance needs an image prompt; use generate_image")
    if not segments:
        raise InputError("segments: expected at least one text or image")
    pieces, codes = [], []
    for segment in segments:
        if isinstance(segment, str):
            pieces.append({"text": segment})
        else:
            found = model.image_codes(segment, modality=modality, window=window)
            if len(found) != 1:
                raise InputError(f"segments: each image segment must be one image, got {len(found)}")
            pieces.append({"image": str(len(codes))})
            codes.append(found[0])
    (rows,) = generate_tokens(model.lm, [_prompt(model, pieces, codes)], sampling, seed=seed)
    parts = split_segments(model, rows)
    images = [p for p in parts if isinstance(p, torch.Tensor)]
    decoded = iter(detokenize(torch.stack(images), model.image_tokenizer)) if images else iter(())
    return [p if isinstance(p, str) else next(decoded) for p in parts]
