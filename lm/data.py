"""LM training data: code-shard rows and JSONL documents -> records -> batches.

Tasks (mixed per epoch by ``LMDataConfig.mix``):

* ``caption``: every shard row with a caption, as image→text (an instruction from
  :data:`IMAGE_TO_TEXT_INSTRUCTIONS`, loss on the caption) with probability ``image_first``, otherwise as
  text→image (a prompt from :data:`TEXT_TO_IMAGE_TEMPLATES`, loss on the image span). With probability
  ``cond_dropout`` a text→image record loses its prompt, giving the unconditional ``<bos><boi>`` + image that
  classifier-free guidance uses.
* ``vqa``: a row's ``"qa"`` list (``{"question", "answer"}`` entries) as image→text records of
  ``vqa_turns`` question/answer turns each (all of them by default), in random order, loss on every answer:
  one pass over the image teaches every answer, as in LLaVA's multi-turn instruction data. With probability
  ``vqa_report_first`` the record first has the model write the row's caption as a one-line report
  (:data:`REPORT_FIRST_INSTRUCTION`), then answer: describe-then-answer, which ``describe_image(...,
  report_first=True)`` follows at inference. With ``vqa_explain`` the yes/no answers about a region's size or
  intensity name the seen value first ("small, so no"; :func:`explain`).
* ``records``: JSONL segment / chat records (interleaved documents), images referenced as ``"<shard>:<row>"``
  where ``<shard>`` is the shard directory's name.
* ``compare``: the last step of each explained answer as a text-only record: the question and the seen value
  given, loss on the yes/no (:func:`compare_record`). A yes/no answer is the XOR of the asked and the seen
  value, which the answers alone do not teach a small LM in a CPU budget (docs/BENCHMARKS.md); these records
  are a few dozen tokens each, so batches of them (``group_by_task``) cost little.

With ``understanding_image_loss`` (a share) the image→text records of ``caption`` and ``vqa`` also carry loss on
the image they open with: ``<bos><boi> image`` is the unconditional record guidance contrasts with, so each becomes one
more beside the ``cond_dropout`` records (the backbone runs over those positions anyway; the depth head has more to
do).

With ``grounding`` the sequences of rows whose ``attributes`` list phantom findings also carry the auxiliary
targets of :mod:`lm.grounding` (what each region holds; in text→image records, at every image position; in VQA
records, the class of the region each question names, where its answer is predicted; the modality at every
image position of a text→image record).

An epoch's plan is fixed by (seed, epoch): each task's items repeated ``mix`` times (a fraction draws a random
subset), shuffled, split evenly over ranks, and cut into batches (of one task each with ``group_by_task``; with
``length_pool``, each run of that many batches re-cut by sequence length, in a seeded random order); a DataLoader
worker takes every ``num_workers``-th batch, so the batches do not depend on the number of workers.
Every random choice of an item (direction, phrasing, dropout) is seeded by (seed, epoch, plan position). A bad
record (unknown image, over-long, empty, malformed) is skipped, counted by reason, and replaced by the next item
of the plan so every rank yields the same number of batches; the run fails once the skipped fraction passes
``max_bad_fraction``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lm.grounding import answer_starts, named_region, row_classes, row_modality, sequence_targets
from lm.sequence import RecordRejected, Sequence, build_sequence, pack
from lm.text_tokenizer import TextTokenizer
from lm.vocab import Vocab
from tokenizer.data.phantom_text import seen_value
from tokenizer.data.resumable import PassPosition
from tokenizer.errors import InputError
from tokenizer.shards import CodeShard

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "records", "compare")
IMAGE_TO_TEXT_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image.",
    "Write a short report for this image.",
    "What does this image show?",
    "Describe the findings in this image.",
    "Summarize this scan in one sentence.",
)
"""Instructions of image→text records; the first is the one inference uses."""
TEXT_TO_IMAGE_TEMPLATES: tuple[str, ...] = (
    "Generate a {modality} image: {caption}",
    "Create a {modality} image of {caption}",
    "Synthesize a {modality} scan: {caption}",
    "Draw a {modality} image matching this description: {caption}",
)
"""Prompts of text→image records; the first is the one inference uses."""
REPORT_FIRST_INSTRUCTION = "Describe the image, then answer the questions."
"""Instruction of describe-then-answer VQA records: a one-line report, then the question/answer turns."""
EXPLAINED_ANSWER = "{value}, so {answer}"
"""An explained yes/no answer: the seen value, then the verdict."""
DEFAULT_MODALITY = "medical"
MAX_REPLACEMENTS = 64  # consecutive bad items tolerated before giving up
MIN_SEEN_FOR_LIMIT = 100  # records seen before the bad fraction is checked mid-epoch


# --------------------------------------------------------------------------------- record builders
def image_to_text_record(image_ref: str, instruction: str, answer: str) -> dict:
    """``<bos><boi> image <eoi> instruction\\n answer <eos>`` with loss on the answer (and ``<eos>``)."""
    return {
        "segments": [{"image": image_ref}, {"text": f"{instruction}\n"}, {"text": answer}],
        "loss_on": [2],
    }


def text_to_image_prompt(caption: str, modality: str | None = None, template: int = 0) -> str:
    """The conditioning text of a text→image record; ``""`` for an empty caption (unconditional)."""
    if not caption:
        return ""
    return TEXT_TO_IMAGE_TEMPLATES[template].format(modality=modality or DEFAULT_MODALITY, caption=caption)


def text_to_image_record(prompt: str, image_ref: str) -> dict:
    """``<bos> prompt <boi> image <eoi> <eos>`` with loss on the image span; ``prompt=""`` is unconditional."""
    return {"segments": [{"text": prompt}, {"image": image_ref}], "loss_on": [1]}


def caption_record(
    row: dict, image_ref: str, rng: np.random.Generator, *, image_first: float, cond_dropout: float
) -> dict:
    """One direction of an (image, caption) pair, chosen with ``rng`` (see the module docstring)."""
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise RecordRejected("empty", f"{image_ref}: no caption")
    caption = caption.strip()
    if rng.random() < image_first:
        instruction = IMAGE_TO_TEXT_INSTRUCTIONS[rng.integers(len(IMAGE_TO_TEXT_INSTRUCTIONS))]
        return image_to_text_record(image_ref, instruction, caption)
    if rng.random() < cond_dropout:
        return text_to_image_record("", image_ref)
    template = int(rng.integers(len(TEXT_TO_IMAGE_TEMPLATES)))
    return text_to_image_record(text_to_image_prompt(caption, row.get("modality"), template), image_ref)


def one_line(text: str) -> str:
    """``text`` with every run of white space (line breaks included) made one space."""
    return " ".join(text.split())


def is_qa(qa) -> bool:
    """True for a well-formed ``{"question": str, "answer": str}`` entry (both non-empty)."""
    return isinstance(qa, dict) and all(
        isinstance(qa.get(k), str) and qa[k].strip() for k in ("question", "answer")
    )


def vqa_record(
    entries: list, image_ref: str, rng: np.random.Generator | None = None, report: str | None = None
) -> dict:
    """``{"question", "answer"}`` entries of one image -> an image→text record with loss on the answers only.

    ``<bos><boi> image <eoi> question\\n answer\\n question\\n answer … <eos>`` in ``rng``'s random order (the
    given order without ``rng``). Every answer is trained together with its end (the newline, or ``<eos>``
    after the last), so a model stops after answering; the first turn is laid out exactly like a
    single-question prompt, so inference asks one question at a time.

    With a ``report`` the turns follow ``REPORT_FIRST_INSTRUCTION\\n report\\n`` (the report on one line,
    trained like an answer): the model describes the image, then answers from what it wrote.
    """
    for j, qa in enumerate(entries):
        if not is_qa(qa):
            raise RecordRejected(
                "bad_record",
                f"{image_ref}: qa entry {j} must be {{'question': str, 'answer': str}}, got {qa!r:.80}",
            )
    if not entries:
        raise RecordRejected("empty", f"{image_ref}: no qa entries")
    order = list(rng.permutation(len(entries)) if rng is not None else range(len(entries)))
    segments, loss_on = [{"image": image_ref}], []
    if report is not None:
        if not isinstance(report, str) or not report.strip():
            raise RecordRejected("empty", f"{image_ref}: empty report for a describe-then-answer record")
        segments += [{"text": f"{REPORT_FIRST_INSTRUCTION}\n"}, {"text": f"{one_line(report)}\n"}]
        loss_on.append(2)
    for j in order:
        answer = entries[j]["answer"].strip()
        segments.append({"text": f"{entries[j]['question'].strip()}\n"})
        segments.append({"text": answer if j == order[-1] else f"{answer}\n"})  # the last one ends in <eos>
        loss_on.append(len(segments) - 1)
    return {"segments": segments, "loss_on": loss_on}


def explain(entries: list) -> list:
    """``{"question", "answer"}`` entries with the yes/no answers about a size or an intensity in the form
    :data:`EXPLAINED_ANSWER` ("Is the lesion in the left upper region large?" -> "small, so no"); every other
    entry (and any malformed one, left for :func:`vqa_record` to reject) as it is."""
    out = []
    for qa in entries:
        value = seen_value(qa["question"], qa["answer"]) if is_qa(qa) else None
        if value is not None:
            qa = {**qa, "answer": EXPLAINED_ANSWER.format(value=value, answer=qa["answer"].strip().lower())}
        out.append(qa)
    return out


def compare_record(question: str, answer: str) -> dict:
    """Text only: ``<bos> question\\n value, so`` given, loss on `` yes`` / `` no`` (and ``<eos>``): the last
    step of the explained answer to ``question``, in the words that follow the image in a VQA record.
    RecordRejected for a question :func:`~tokenizer.data.phantom_text.seen_value` cannot explain."""
    value = seen_value(question, answer)
    if value is None:
        raise RecordRejected(
            "bad_record", f"not a yes/no question about a size or intensity: {question!r:.80}"
        )
    given, _, verdict = EXPLAINED_ANSWER.format(value=value, answer=answer.strip().lower()).rpartition(" ")
    segments = [{"text": f"{question.strip()}\n"}, {"text": given}, {"text": f" {verdict}"}]
    return {"segments": segments, "loss_on": [2]}


def text_corpus(shard: CodeShard | str | os.PathLike) -> list[str]:
    """Text to train the default BPE on: captions, QA questions and answers, and the fixed phrasings."""
    shard = shard if isinstance(shard, CodeShard) else CodeShard(shard)
    texts, modalities = [], set()
    for row in shard.rows():
        if isinstance(row.get("caption"), str) and row["caption"].strip():
            texts.append(row["caption"].strip())
        modalities.add(row.get("modality") or DEFAULT_MODALITY)
        for qa in row.get("qa") or []:
            if isinstance(qa, dict):
                texts += [qa[k] for k in ("question", "answer") if isinstance(qa.get(k), str)]
    texts += [*IMAGE_TO_TEXT_INSTRUCTIONS, REPORT_FIRST_INSTRUCTION]
    texts += [t.format(modality=m, caption="") for t in TEXT_TO_IMAGE_TEMPLATES for m in sorted(modalities)]
    return texts


class ShardResolver:
    """Image reference ``"<shard name>:<row>"`` -> codes (K, h, w); KeyError / InputError when unknown."""

    def __init__(self, shards: list[CodeShard]) -> None:
        self.shards = {s.name: s for s in shards}
        if len(self.shards) != len(shards):
            raise InputError(
                f"shard directory names must be unique, got {[str(s.directory) for s in shards]}"
            )

    def __call__(self, ref: str) -> torch.Tensor:
        name, _, row = ref.rpartition(":")
        if name not in self.shards or not row.isdigit():
            raise KeyError(f"no shard {name!r} (known: {sorted(self.shards)}) or bad row {row!r}")
        return self.shards[name].codes(int(row))


def learn_leading_image(seq: Sequence, vocab: Vocab) -> None:
    """Give a sequence that opens with ``<bos><boi>`` loss on that ``<boi>``, its image positions and ``<eoi>``
    (in place), as an unconditional text→image record has."""
    tokens = seq.tokens[:, 0]
    if len(tokens) < 2 or tokens[1] != vocab.boi:
        return
    ends = (tokens == vocab.eoi).nonzero()
    last = int(ends[0, 0]) if len(ends) else len(tokens) - 1  # a cut record keeps what it has
    seq.labels[:last] = seq.tokens[1 : last + 1]


# --------------------------------------------------------------------------------- config
@dataclass
class LMDataConfig:
    """What the LM trains on and how it is batched."""

    shard_dirs: list[str] = field(default_factory=list)
    """Code shard directories; records refer to their images as ``"<directory name>:<row>"``."""
    record_files: list[str] = field(default_factory=list)
    """JSONL files of segment / chat records for training (interleaved documents, instructions)."""
    val_record_files: list[str] = field(default_factory=list)
    """JSONL record files for validation."""
    mix: dict[str, float] = field(
        default_factory=lambda: {"caption": 1.0, "vqa": 1.0, "records": 1.0, "compare": 0.0}
    )
    """Times each task's items appear per epoch (tasks: caption, vqa, records, compare; 0.5 = a random half)."""
    image_first: float = 0.5
    """Probability that a caption pair becomes image→text rather than text→image."""
    cond_dropout: float = 0.1
    """Probability that a text→image record loses its prompt (unconditional, for guidance)."""
    vqa_turns: int = 0
    """Question/answer turns per ``vqa`` record; 0 = all of an image's pairs in one record, 1 = one pair each."""
    vqa_report_first: float = 0.0
    """Probability that a ``vqa`` record of a captioned row opens with the caption as a one-line report
    (describe-then-answer, ``describe_image(..., report_first=True)``); the others ask directly."""
    vqa_explain: bool = False
    """Yes/no answers about a region's size or intensity name the seen value first ("small, so no"; needed by
    the ``compare`` task)."""
    understanding_image_loss: float = 0.0
    """Share of the image→text records (reports, VQA) that also learn the image they open with (0 = none,
    1 = all). Their ``<bos><boi> image`` is the unconditional layout guidance contrasts with, and the backbone
    runs over it anyway, so this adds unconditional image training at the cost of depth-head work (the
    quickstart's LM steps took 1.29 times as long at 1, 1.16 at 0.5; docs/BENCHMARKS.md)."""
    grounding: bool = False
    """Grounding targets (:mod:`lm.grounding`) for the records of rows whose ``attributes`` list phantom
    findings: each region's finding at ``<eoi>``, and in text→image records each image position's; trained
    when ``optim.grounding_weight`` > 0."""
    max_len: int = 1024
    """Longest sequence in positions."""
    truncate: bool = True
    """Cut over-long records at a segment boundary; False rejects them."""
    pad_to_max: bool = False
    """Pad every batch to max_len (static shapes) instead of its longest sequence."""
    group_by_task: bool = False
    """Training batches of one task each (in random order), so short caption sequences are not padded to
    the length of an all-turns VQA sequence in the same batch."""
    length_pool: int = 0
    """Training batches of similar length: each run of this many batches of the plan has its records sorted
    by length, cut into batches again and those shuffled (0 = off). Less padding for batches less mixed; the
    quickstart's batches were 29 % padding, 3 % with 16, and its LM steps 27 % faster on CPU, but at its 560
    steps the grounding learnt less (docs/BENCHMARKS.md), so it stays off there. Lengths are measured by building
    each record without its image codes, in every DataLoader worker (a batch took 26 ms to build, 17 without)."""
    batch_size: int = 8
    """Sequences per batch per device."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 0
    """Seeds the plan and every per-item random choice."""
    train_split: str = "train"
    """Shard rows with this split (or none) train."""
    val_split: str = "val"
    """Shard rows with this split validate."""
    max_bad_fraction: float = 0.05
    """Fail when more than this fraction of records is skipped."""

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(TASKS)
        if unknown or any(w < 0 for w in self.mix.values()) or not sum(self.mix.values()) > 0:
            raise ValueError(
                f"mix must map tasks {TASKS} to weights >= 0 with a positive sum, got {dict(self.mix)}"
            )
        if self.mix.get("compare", 0) > 0 and not self.vqa_explain:
            raise ValueError(
                f"mix.compare={self.mix['compare']} trains the last step of explained answers; set vqa_explain=true"
            )
        shares = ("image_first", "cond_dropout", "vqa_report_first", "understanding_image_loss")
        for name in (*shares, "max_bad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.vqa_turns < 0:
            raise ValueError(f"vqa_turns must be >= 0 (0 = all pairs in one record), got {self.vqa_turns}")
        if self.max_len < 4 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"need max_len >= 4, batch_size >= 1, num_workers >= 0, got {self.max_len}, {self.batch_size}, {self.num_workers}"
            )
        if self.length_pool < 0:
            raise ValueError(f"length_pool must be >= 0 batches (0 = off), got {self.length_pool}")


# --------------------------------------------------------------------------------- dataset
def _read_records(paths: list[str]) -> list[tuple[str, list[str]]]:
    files = []
    for path in paths:
        try:
            files.append((str(path), Path(path).read_text().splitlines()))
        except OSError as e:
            raise InputError(f"{path}: cannot read record file ({e})") from None
    return files


class LMDataset(IterableDataset):
    """Yields :class:`~lm.sequence.Batch` es of one epoch for one rank (see the module docstring).

    Args:
        shards: the code shards.
        record_files: (path, lines) of JSONL record files.
        split: which shard rows to use.
        config: the data config.
        vocab, text_tokenizer: the id layout and the text tokenizer.
        shuffle: shuffle and apply ``mix`` (training); False: every item once, in order (validation).
    """

    def __init__(
        self,
        shards,
        record_files,
        split: str,
        config: LMDataConfig,
        vocab: Vocab,
        text_tokenizer: TextTokenizer,
        *,
        shuffle: bool = True,
    ) -> None:
        self.shards, self.record_files, self.config = shards, record_files, config
        self.vocab, self.text_tokenizer, self.shuffle = vocab, text_tokenizer, shuffle
        self.resolver = ShardResolver(shards)
        self.items = self._items(split)
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self.start_batch = 0
        """Batches of the epoch to skip (trained on before a resume); set by :class:`EpochDataLoader`."""

    def _items(self, split: str) -> dict[str, np.ndarray]:
        """Per task, an (n, 3) int64 array of (source, index, sub-index: a vqa record's first qa entry)."""
        items: dict[str, list] = {t: [] for t in TASKS}
        default = split == self.config.train_split
        for s, shard in enumerate(self.shards):
            for i, row in enumerate(shard.rows()):
                if not (row.get("split") == split or (default and row.get("split") is None)):
                    continue
                if isinstance(row.get("caption"), str) and row["caption"].strip():
                    items["caption"].append((s, i, 0))
                qa = row.get("qa")
                if isinstance(qa, list) and qa:
                    items["vqa"] += [(s, i, j) for j in range(0, len(qa), self._turns(qa))]
                    # only when trained: a task without items draws nothing, so older configs keep their plans
                    if self.config.mix.get("compare", 0) > 0:
                        items["compare"] += [
                            (s, i, j)
                            for j, e in enumerate(qa)
                            if is_qa(e) and seen_value(e["question"], e["answer"])
                        ]
        for f, (_, lines) in enumerate(self.record_files):
            items["records"] += [(f, n, 0) for n, line in enumerate(lines) if line.strip()]
        return {t: np.asarray(v, dtype=np.int64).reshape(-1, 3) for t, v in items.items()}

    def _turns(self, qa: list) -> int:
        """QA entries per vqa record of a row with the list ``qa``."""
        return self.config.vqa_turns or len(qa)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size = rank, world_size

    def plan(self) -> np.ndarray:
        """This rank's items of the current epoch: (n, 4) int64 of (task, source, index, sub-index)."""
        rng = np.random.default_rng([self.config.seed, self.epoch])
        chunks = []
        for t, task in enumerate(TASKS):
            items = self.items[task]
            weight = self.config.mix.get(task, 0.0) if self.shuffle else 1.0
            whole, part = int(weight), weight - int(weight)
            picked = [items] * whole + [
                items[np.sort(rng.permutation(len(items))[: round(part * len(items))])]
            ]
            chunk = np.concatenate(picked)
            chunks.append(np.concatenate([np.full((len(chunk), 1), t, dtype=np.int64), chunk], axis=1))
        plan = np.concatenate(chunks)
        if self.shuffle:
            plan = plan[rng.permutation(len(plan))]
        per_rank = len(plan) // self.world_size
        if len(plan) == 0:
            raise InputError("LM data: no items (check shard_dirs, record_files, the split names and mix)")
        if per_rank == 0:
            raise InputError(f"LM data: {len(plan)} items cannot be split over {self.world_size} ranks")
        plan = plan[self.rank :: self.world_size][:per_rank]
        return self._grouped(plan) if self.config.group_by_task and self.shuffle else plan

    def _grouped(self, plan: np.ndarray) -> np.ndarray:
        """``plan`` reordered into whole batches of one task in random order; the partial ones go last."""
        bs, rng = self.config.batch_size, np.random.default_rng([self.config.seed, self.epoch, self.rank, 1])
        full, partial = [], []
        for t in range(len(TASKS)):
            rows = plan[plan[:, 0] == t]
            for start in range(0, len(rows), bs):
                (full if start + bs <= len(rows) else partial).append(rows[start : start + bs])
        full = [full[i] for i in rng.permutation(len(full))]
        return np.concatenate(full + partial)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(len(self.plan()) / self.config.batch_size)

    def record(self, item: np.ndarray, rng: np.random.Generator) -> tuple[dict, str]:
        """The record of one plan item and a name for it in messages."""
        task, source, index, sub = (int(v) for v in item)
        if TASKS[task] == "records":
            path, lines = self.record_files[source]
            where = f"{path}:{index + 1}"
            try:
                return json.loads(lines[index]), where
            except json.JSONDecodeError as e:
                raise RecordRejected("bad_record", f"{where}: not valid JSON ({e})") from None
        shard = self.shards[source]
        ref = f"{shard.name}:{index}"
        row = shard.row(index)
        cfg = self.config
        if TASKS[task] == "compare":
            return compare_record(row["qa"][sub]["question"], row["qa"][sub]["answer"]), f"{ref} qa {sub}"
        if TASKS[task] == "vqa":
            entries = row["qa"][sub : sub + self._turns(row["qa"])]
            entries = explain(entries) if cfg.vqa_explain else entries
            caption = row.get("caption")
            has_caption = isinstance(caption, str) and bool(caption.strip())
            # no draw when the option is off, so the plans of older configs stay as they were
            report_first = has_caption and cfg.vqa_report_first > 0 and rng.random() < cfg.vqa_report_first
            return vqa_record(entries, ref, rng, caption if report_first else None), f"{ref} qa {sub}"
        return caption_record(row, ref, rng, image_first=cfg.image_first, cond_dropout=cfg.cond_dropout), ref

    def _build(self, plan: np.ndarray, position: int, resolver) -> tuple[Sequence, dict, np.random.Generator]:
        """``plan[position]``'s record, built with ``resolver`` for its images, and the item's generator (its
        further draws follow); raises RecordRejected."""
        rng = np.random.default_rng([self.config.seed, self.epoch, position * self.world_size + self.rank])
        record, where = self.record(plan[position], rng)
        cfg = self.config
        seq = build_sequence(
            record,
            self.vocab,
            self.text_tokenizer.encode,
            resolver,
            max_len=cfg.max_len,
            truncate=cfg.truncate,
            where=where,
        )
        return seq, record, rng

    def sequence(self, plan: np.ndarray, position: int) -> Sequence:
        """Build the sequence of ``plan[position]``; raises RecordRejected."""
        seq, record, rng = self._build(plan, position, self.resolver)
        cfg = self.config
        task, source, index, _ = (int(v) for v in plan[position])
        if cfg.grounding and TASKS[task] in ("caption", "vqa"):
            row = self.shards[source].row(index)
            classes = row_classes(row)
            if classes is not None:
                eoi = seq.tokens[:, 0] == self.vocab.eoi
                # a text→image record (loss on its image) with a prompt: every image position gets a target
                place = record["loss_on"] == [1] and bool(record["segments"][0].get("text"))
                answers = []
                if TASKS[task] == "vqa":  # each answer follows its question (or the report its instruction)
                    asked = [named_region(record["segments"][i - 1]["text"]) for i in record["loss_on"]]
                    starts = answer_starts(seq.labels[:, 0])  # fewer when truncated
                    answers = [(t, r) for t, r in zip(starts, asked, strict=False) if r is not None]
                seq.grounding = sequence_targets(
                    seq.image_pos, eoi, classes, self.vocab.grid, place, answers, row_modality(row)
                )
        # last: the grounding above finds the answers as the trained text spans, which the image must not join
        # (the draw comes after every other one, so the share leaves the rest of the record as it was)
        if TASKS[task] in ("caption", "vqa") and rng.random() < cfg.understanding_image_loss:
            learn_leading_image(seq, self.vocab)  # an image→text record's image (a no-op for text→image)
        return seq

    def _pool(self, plan: np.ndarray, pool: int) -> list[np.ndarray]:
        """The plan positions of each batch of pool ``pool`` (``length_pool`` batches), sorted by length."""
        bs, size = self.config.batch_size, self.config.length_pool
        positions = np.arange(pool * size * bs, min((pool + 1) * size * bs, len(plan)))
        ordered = positions[np.argsort(self._lengths(plan, positions), kind="stable")]
        batches = [ordered[i : i + bs] for i in range(0, len(ordered), bs)]
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, 2, pool])
        return [batches[i] for i in rng.permutation(len(batches))]

    def _lengths(self, plan: np.ndarray, positions: np.ndarray) -> list[int]:
        """The positions of each ``plan[positions]``'s sequence, built with blank image codes (0 if rejected; an
        unknown image is only found by the real build)."""
        blank = torch.zeros(self.vocab.num_codebooks, *self.vocab.grid, dtype=torch.long)

        def length(position: int) -> int:
            try:
                return len(self._build(plan, position, lambda ref: blank)[0].tokens)
            except RecordRejected:  # sequence() rejects it again and replaces it
                return 0

        return [length(int(p)) for p in positions]

    def _replaceable(self, plan: np.ndarray, position: int, skipped: Counter) -> Sequence:
        for attempt in range(MAX_REPLACEMENTS):
            try:
                return self.sequence(plan, (position + attempt) % len(plan))
            except RecordRejected as e:
                skipped[e.reason] += 1
                log.debug("skipped: %s", e)
        raise InputError(
            f"LM data: {MAX_REPLACEMENTS} bad records in a row from plan position {position}: {dict(skipped)}"
        )

    def _check_limit(self, skipped: Counter, seen: int, final: bool) -> None:
        bad = sum(skipped.values())
        if (final or seen >= MIN_SEEN_FOR_LIMIT) and seen and bad / seen > self.config.max_bad_fraction:
            raise InputError(
                f"LM data: skipped {bad} of {seen} records ({dict(skipped)}), more than max_bad_fraction "
                f"{self.config.max_bad_fraction}"
            )

    def __iter__(self):
        worker = get_worker_info()
        wid, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plan, bs, size = self.plan(), self.config.batch_size, self.config.length_pool if self.shuffle else 0
        total, seen, pool = Counter(), 0, (-1, [])
        for b in range(self.start_batch + wid, math.ceil(len(plan) / bs), num_workers):
            skipped = Counter()
            if size:  # the batch's positions as its pool sorts them: the same whatever the workers or start
                if pool[0] != b // size:
                    pool = (b // size, self._pool(plan, b // size))
                positions = pool[1][b % size].tolist()
            else:
                positions = range(b * bs, min((b + 1) * bs, len(plan)))
            seqs = [self._replaceable(plan, p, skipped) for p in positions]
            batch = pack(seqs, self.config.max_len, self.vocab.pad, pad_to_max=self.config.pad_to_max)
            batch.skipped = dict(skipped)
            total += skipped
            seen += len(seqs) + sum(skipped.values())
            self._check_limit(total, seen, final=False)
            yield batch
        self._check_limit(total, seen, final=True)
        if total:
            log.info(
                "LM data epoch %d rank %d worker %d: skipped %d of %d records %s",
                self.epoch,
                self.rank,
                wid,
                sum(total.values()),
                seen,
                dict(total),
            )


class EpochDataLoader(PassPosition, DataLoader):
    """A DataLoader that tells its :class:`LMDataset` the epoch and rank before every pass.

    ``epoch_fn`` gives the epoch (e.g. the trainer's); without it passes are counted from 0. Workers are
    started afresh each pass (no persistent workers) so they see the new epoch. The position (epoch, batches
    yielded) is ``state_dict()``, which Lightning keeps in checkpoints: a resumed pass of the same epoch skips
    the batches already trained on, so a run killed mid-epoch continues exactly where it stopped.
    """

    def __init__(self, dataset: LMDataset, *, epoch_fn=None, **kwargs) -> None:
        # a private generator: starting a pass must not draw from the global one that the model uses
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_fn = epoch_fn

    def _sync_rank(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.dataset.set_rank(torch.distributed.get_rank(), torch.distributed.get_world_size())

    def __len__(self) -> int:
        self._sync_rank()
        return super().__len__()

    def __iter__(self):
        epoch = self._next_epoch()
        self.dataset.set_epoch(epoch)
        self._sync_rank()
        start = self._start_batch(epoch, len(self))
        self.dataset.start_batch = start
        for batch in super().__iter__():
            self._advance()
            yield batch


def build_vocab(text_tokenizer: TextTokenizer, shards: list[CodeShard], vocab: Vocab | None = None) -> Vocab:
    """The vocabulary for a text tokenizer and shards; checks a given one against both."""
    if not shards and vocab is None:
        raise InputError("LM data: no shard_dirs and no vocab; cannot tell K, V and the grid")
    if vocab is None:
        first = shards[0]
        vocab = Vocab(
            num_text=text_tokenizer.vocab_size, num_codebooks=first.K, codebook_size=first.V, grid=first.grid
        )
    vocab.check_text(text_tokenizer.vocab_size)
    for shard in shards:
        try:
            vocab.check_tokenizer(shard.K, shard.V, shard.grid)
        except InputError as e:
            raise InputError(f"{shard.directory}: {e}") from None
    return vocab


def _data_module_class():
    import lightning.pytorch as pl

    class LMDataModule(pl.LightningDataModule):
        """Train / val :class:`EpochDataLoader` s of Batches for the LM.

        Args:
            config: the data config.
            text_tokenizer: the LM's text tokenizer.
            vocab: the LM's vocabulary; built from the tokenizer and the shards when None.
        """

        def __init__(
            self, config: LMDataConfig, text_tokenizer: TextTokenizer, vocab: Vocab | None = None
        ) -> None:
            super().__init__()
            self.config, self.text_tokenizer = config, text_tokenizer
            self.shards = [CodeShard(d) for d in config.shard_dirs]
            self.vocab = build_vocab(text_tokenizer, self.shards, vocab)
            self.train_set: LMDataset | None = None
            self.val_set: LMDataset | None = None

        def setup(self, stage: str | None = None) -> None:
            cfg = self.config
            common = {"config": cfg, "vocab": self.vocab, "text_tokenizer": self.text_tokenizer}
            if self.train_set is None:
                self.train_set = LMDataset(
                    self.shards, _read_records(cfg.record_files), cfg.train_split, **common
                )
            if self.val_set is None:
                val = LMDataset(
                    self.shards, _read_records(cfg.val_record_files), cfg.val_split, shuffle=False, **common
                )
                self.val_set = val if any(len(v) for v in val.items.values()) else None

        def _epoch(self) -> int:
            return self.trainer.current_epoch if self.trainer is not None else 0

        def train_dataloader(self) -> EpochDataLoader:
            self.setup()
            return EpochDataLoader(
                self.train_set,
                epoch_fn=self._epoch if self.trainer else None,
                num_workers=self.config.num_workers,
            )

        def val_dataloader(self) -> EpochDataLoader | list:
            self.setup()
            if self.val_set is None:
                return []
            return EpochDataLoader(self.val_set, epoch_fn=lambda: 0, num_workers=self.config.num_workers)

    LMDataModule.__module__ = __name__
    return LMDataModule


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    # LMDataModule subclasses LightningDataModule; build it on first use so importing lm.data stays light.
    if name == "LMDataModule":
        if name not in _LAZY:
            _LAZY[name] = _data_module_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_TO_TEXT_INSTRUCTIONS",
    "REPORT_FIRST_INSTRUCTION",
    "TASKS",
    "TEXT_TO_IMAGE_TEMPLATES",
    "EpochDataLoader",
    "LMDataConfig",
    "LMDataModule",  # noqa: F822 — provided lazily by __getattr__
    "LMDataset",
    "ShardResolver",
    "build_vocab",
    "caption_record",
    "image_to_text_record",
    "one_line",
    "text_corpus",
    "text_to_image_prompt",
    "text_to_image_record",
    "vqa_record",
]
