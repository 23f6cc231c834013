"""LM records -> token sequences -> padded batches (DESIGN §5, §6).

Record forms::

    {"segments": [{"text": "..."}, {"image": "<shard>:<row>"}, ...], "loss_on": [0, 2]}   # default: all
    {"messages": [{"role": "user" | "assistant", "content": "..." | [{"text": ...}, {"image": ...}]}]}

Layout: ``<bos> block block … <eos>``. A text segment is its text ids; an image segment is
``<boi> [h·w image positions] <eoi>``; a chat message is ``<user>|<assistant> content… <eot>``.

Loss: a position *carries loss* when the model must learn to produce it. In segment form every token of
a ``loss_on`` segment (for an image: ``<boi>``, the h·w positions and ``<eoi>``) carries loss; in chat form
the assistant's content and its closing ``<eot>`` do, never the role markers or user content. ``<eos>``
carries loss when the last segment / message does. ``labels[t] = tokens[t + 1]`` where position t + 1
carries loss, else -100, so ``labels[t]`` is exactly what position t must predict.

Over-long records are cut at block boundaries (a segment, or a whole chat message; never inside an image
or a text segment) and then have no ``<eos>``; a record that cannot be cut to fit, or keeps no loss, is
rejected with :class:`RecordRejected` whose ``reason`` the data pipeline counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lm.vocab import Vocab
from tokenizer.errors import InputError

IGNORE_INDEX = -100
REASONS = ("bad_record", "empty", "unknown_image", "bad_image", "too_long", "no_loss")
ROLES = {"user": "<user>", "assistant": "<assistant>"}

Encode = Callable[[str], list[int]]
Resolve = Callable[[str], torch.Tensor]


class RecordRejected(InputError):
    """A record that cannot become a training sequence; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass
class Sequence:
    """One training sequence of T positions with K ids each."""

    tokens: torch.Tensor
    """(T, K) long: text / special ids repeated over K, or the K global sub-code ids of an image position."""
    labels: torch.Tensor
    """(T, K) long: the ids position t must predict (tokens[t + 1]) or -100 where there is no loss."""
    image_pos: torch.Tensor
    """(T,) long: index 0..h*w-1 within the image span for image positions, -1 elsewhere."""
    grounding: torch.Tensor | None = None
    """(T, G) long grounding targets (:mod:`lm.grounding`), -100 where there is none; or None."""

    def __post_init__(self) -> None:
        T = self.tokens.shape[0]
        if self.tokens.dim() != 2 or tuple(self.labels.shape) != tuple(self.tokens.shape):
            raise InputError(
                f"Sequence: tokens and labels must both be (T, K), got {tuple(self.tokens.shape)} and {tuple(self.labels.shape)}"
            )
        if tuple(self.image_pos.shape) != (T,):
            raise InputError(f"Sequence: image_pos must be (T,) = ({T},), got {tuple(self.image_pos.shape)}")
        if self.grounding is not None and (self.grounding.dim() != 2 or self.grounding.shape[0] != T):
            raise InputError(f"Sequence: grounding must be (T={T}, G), got {tuple(self.grounding.shape)}")
        for name in ("tokens", "labels", "image_pos", "grounding"):
            if getattr(self, name) is not None and getattr(self, name).dtype != torch.long:
                raise InputError(f"Sequence: {name} must be torch.long, got {getattr(self, name).dtype}")

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class Batch:
    """Sequences padded to one length T; ``attention_mask`` marks the real positions."""

    tokens: torch.Tensor
    """(B, T, K) long; padding holds <pad>."""
    labels: torch.Tensor
    """(B, T, K) long; -100 at padding and wherever there is no loss."""
    image_pos: torch.Tensor
    """(B, T) long; -1 outside images and at padding."""
    attention_mask: torch.Tensor
    """(B, T) bool; True at real positions."""
    grounding: torch.Tensor | None = None
    """(B, T, G) long grounding targets, -100 where none; None when no sequence of the batch has any."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records dropped while this batch was assembled, by reason (for logging; not part of the data)."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> Batch:
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)


# --------------------------------------------------------------------------------- records -> blocks
@dataclass
class _Piece:
    kind: str  # "ids" | "text" | "image"
    value: object  # list[int] | str | image ref
    loss: bool


def _segment_piece(segment: object, loss: bool, where: str) -> _Piece:
    if not isinstance(segment, dict) or len(segment) != 1 or not ({"text", "image"} & set(segment)):
        raise RecordRejected(
            "bad_record",
            f"{where}: a segment must be {{'text': str}} or {{'image': ref}}, got {segment!r:.80}",
        )
    kind, value = next(iter(segment.items()))
    if not isinstance(value, str):
        raise RecordRejected(
            "bad_record", f"{where}: segment {kind!r} must be a string, got {type(value).__name__}"
        )
    return _Piece(kind, value, loss)


def _segment_blocks(record: dict, where: str) -> list[list[_Piece]]:
    segments = record["segments"]
    if not isinstance(segments, list):
        raise RecordRejected("bad_record", f"{where}: 'segments' must be a list")
    loss_on = record.get("loss_on")
    if loss_on is None:
        loss_on = list(range(len(segments)))
    if not isinstance(loss_on, list) or not all(
        isinstance(i, int) and 0 <= i < len(segments) for i in loss_on
    ):
        raise RecordRejected(
            "bad_record",
            f"{where}: 'loss_on' must list segment indices in [0, {len(segments)}), got {loss_on!r}",
        )
    return [[_segment_piece(s, i in loss_on, f"{where} segment {i}")] for i, s in enumerate(segments)]


def _chat_blocks(record: dict, vocab: Vocab, where: str) -> list[list[_Piece]]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise RecordRejected("bad_record", f"{where}: 'messages' must be a list")
    missing = [m for m in ROLES.values() if m not in vocab.specials]
    if missing:
        raise InputError(
            f"{where}: chat records need the role markers {missing} in the vocabulary's specials"
        )
    blocks = []
    for i, message in enumerate(messages):
        here = f"{where} message {i}"
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise RecordRejected(
                "bad_record", f"{here}: expected {{'role': 'user'|'assistant', 'content': ...}}"
            )
        loss = message["role"] == "assistant"
        content = message["content"]
        content = [{"text": content}] if isinstance(content, str) else content
        if not isinstance(content, list):
            raise RecordRejected("bad_record", f"{here}: 'content' must be a string or a list of segments")
        block = [_Piece("ids", [vocab.special(ROLES[message["role"]])], False)]
        block += [_segment_piece(s, loss, f"{here} content {j}") for j, s in enumerate(content)]
        block.append(_Piece("ids", [vocab.eot], loss))
        blocks.append(block)
    return blocks


def _blocks(record: object, vocab: Vocab, where: str) -> list[list[_Piece]]:
    if not isinstance(record, dict) or ("segments" in record) == ("messages" in record):
        raise RecordRejected("bad_record", f"{where}: a record needs exactly one of 'segments' or 'messages'")
    return _segment_blocks(record, where) if "segments" in record else _chat_blocks(record, vocab, where)


# --------------------------------------------------------------------------------- pieces -> ids
def _image_ids(ref: str, vocab: Vocab, resolve: Resolve, where: str) -> torch.Tensor:
    try:
        codes = resolve(ref)
    except (KeyError, IndexError, InputError) as e:
        raise RecordRejected("unknown_image", f"{where}: unknown image reference {ref!r} ({e})") from None
    try:
        return vocab.image_rows(torch.as_tensor(codes))
    except InputError as e:
        raise RecordRejected("bad_image", f"{where}: image {ref!r}: {e}") from None


def _piece_rows(piece: _Piece, vocab: Vocab, encode: Encode, resolve: Resolve, where: str):
    """(rows (n, K), image_pos (n,), loss (n,)) of one piece."""
    if piece.kind == "image":
        span = _image_ids(piece.value, vocab, resolve, where)
        rows = torch.cat([vocab.text_rows([vocab.boi]), span, vocab.text_rows([vocab.eoi])])
        pos = torch.cat([torch.tensor([-1]), torch.arange(span.shape[0]), torch.tensor([-1])])
    else:
        ids = encode(piece.value) if piece.kind == "text" else piece.value
        if piece.kind == "text" and ids and not 0 <= min(ids) <= max(ids) < vocab.num_text:
            raise InputError(
                f"{where}: text tokenizer produced ids outside [0, {vocab.num_text}); vocab mismatch"
            )
        rows = vocab.text_rows(ids)
        pos = torch.full((rows.shape[0],), -1, dtype=torch.long)
    return rows, pos, torch.full((rows.shape[0],), piece.loss, dtype=torch.bool)


def build_sequence(
    record: dict,
    vocab: Vocab,
    encode: Encode,
    resolve: Resolve,
    *,
    max_len: int | None = None,
    truncate: bool = True,
    where: str = "record",
) -> Sequence:
    """Turn one record into a :class:`Sequence` (layout and loss rules in the module docstring).

    Args:
        record: a segments or chat record.
        vocab: the id layout.
        encode: text -> text ids, e.g. ``TextTokenizer.encode``.
        resolve: image reference -> codes (K, h, w); KeyError / IndexError / InputError mean unknown.
        max_len: longest allowed sequence; None for no limit.
        truncate: cut an over-long record at a block boundary (True) or reject it (False).
        where: names the record in error messages, e.g. ``"docs.jsonl:12"``.

    Raises:
        RecordRejected: with a ``reason`` from :data:`REASONS`.
    """
    blocks = _blocks(record, vocab, where)
    encoded, content = [], 0
    for b, block in enumerate(blocks):
        parts = [_piece_rows(p, vocab, encode, resolve, f"{where} block {b}") for p in block]
        content += sum(
            int(rows.shape[0]) for p, (rows, _, _) in zip(block, parts, strict=True) if p.kind != "ids"
        )
        encoded.append(tuple(torch.cat(x) for x in zip(*parts, strict=True)))
    if content == 0:
        raise RecordRejected("empty", f"{where}: no text and no image")
    bos = (vocab.text_rows([vocab.bos]), torch.tensor([-1]), torch.tensor([False]))
    eos = (vocab.text_rows([vocab.eos]), torch.tensor([-1]), torch.tensor([blocks[-1][-1].loss]))
    total = 2 + sum(int(e[0].shape[0]) for e in encoded)
    if max_len is not None and total > max_len:
        if not truncate:
            raise RecordRejected("too_long", f"{where}: {total} positions > max_len {max_len}")
        keep, length = 0, 1
        while keep < len(encoded) and length + encoded[keep][0].shape[0] <= max_len:
            length += int(encoded[keep][0].shape[0])
            keep += 1
        if keep == 0:
            raise RecordRejected("too_long", f"{where}: first block alone exceeds max_len {max_len}")
        encoded, eos = encoded[:keep], None
    parts = [bos, *encoded] + ([eos] if eos is not None else [])
    tokens, image_pos, loss = (torch.cat(x) for x in zip(*parts, strict=True))
    if not loss.any():
        raise RecordRejected(
            "no_loss", f"{where}: no position carries loss{' after truncation' if eos is None else ''}"
        )
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = torch.where(loss[1:, None], tokens[1:], IGNORE_INDEX)
    return Sequence(tokens=tokens, labels=labels, image_pos=image_pos)


def prompt_tokens(
    segments: list[dict], vocab: Vocab, encode: Encode, resolve: Resolve, *, open_image: bool = False
) -> torch.Tensor:
    """A generation prompt ``<bos> segments…`` (+ ``<boi>`` when ``open_image``): (T, K) long.

    Laid out exactly like the training sequences, without ``<eos>``; ``image_positions`` gives its image_pos.
    """
    rows = [vocab.text_rows([vocab.bos])]
    for i, segment in enumerate(segments):
        rows.append(
            _piece_rows(
                _segment_piece(segment, False, f"prompt segment {i}"),
                vocab,
                encode,
                resolve,
                f"prompt segment {i}",
            )[0]
        )
    if open_image:
        rows.append(vocab.text_rows([vocab.boi]))
    return torch.cat(rows)


def image_positions(tokens: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Index within the current image span for image positions, -1 elsewhere.

    Args:
        tokens: (..., T, K) ids.
    Returns:
        (..., T) long.
    """
    is_image = vocab.is_image(tokens[..., 0])
    t = torch.arange(tokens.shape[-2], device=tokens.device).expand_as(is_image)
    last_other = torch.where(is_image, torch.full_like(t, -1), t).cummax(dim=-1).values
    return torch.where(is_image, t - last_other - 1, torch.full_like(t, -1))


# --------------------------------------------------------------------------------- batching
def pack(sequences: list[Sequence], max_len: int, pad_id: int, *, pad_to_max: bool = False) -> Batch:
    """Right-pad sequences into a :class:`Batch` (one sequence per row) for training.

    Args:
        sequences: B >= 1 sequences with the same K, each at most ``max_len`` long.
        max_len: the longest allowed sequence.
        pad_id: the vocabulary's ``<pad>`` id.
        pad_to_max: pad to ``max_len`` (static shapes) instead of the longest sequence.
    """
    if not sequences:
        raise InputError("pack: no sequences")
    Ks = {s.tokens.shape[1] for s in sequences}
    if len(Ks) != 1:
        raise InputError(f"pack: sequences have different K: {sorted(Ks)}")
    lengths = [len(s) for s in sequences]
    if max(lengths) > max_len:
        raise InputError(f"pack: a sequence of length {max(lengths)} exceeds max_len {max_len}")
    B, T, K = len(sequences), (max_len if pad_to_max else max(lengths)), Ks.pop()
    tokens = torch.full((B, T, K), pad_id, dtype=torch.long)
    labels = torch.full((B, T, K), IGNORE_INDEX, dtype=torch.long)
    image_pos = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    grounding, widths = None, {s.grounding.shape[1] for s in sequences if s.grounding is not None}
    if len(widths) > 1:
        raise InputError(f"pack: sequences have grounding targets of different widths: {sorted(widths)}")
    if widths:
        grounding = torch.full((B, T, widths.pop()), IGNORE_INDEX, dtype=torch.long)
    for b, (s, n) in enumerate(zip(sequences, lengths, strict=True)):
        tokens[b, :n], labels[b, :n], image_pos[b, :n], mask[b, :n] = s.tokens, s.labels, s.image_pos, True
        if s.grounding is not None:
            grounding[b, :n] = s.grounding
    return Batch(tokens=tokens, labels=labels, image_pos=image_pos, attention_mask=mask, grounding=grounding)


def unpack(batch: Batch) -> list[Sequence]:
    """Exact inverse of :func:`pack`: the right-padded rows back as sequences."""
    lengths = batch.attention_mask.sum(dim=1)
    T = batch.attention_mask.shape[1]
    expected = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]
    if not torch.equal(expected, batch.attention_mask):
        raise InputError("unpack: attention_mask is not right padding (every row must be True… then False…)")
    return [
        Sequence(
            tokens=batch.tokens[b, :n].clone(),
            labels=batch.labels[b, :n].clone(),
            image_pos=batch.image_pos[b, :n].clone(),
            grounding=None if batch.grounding is None else batch.grounding[b, :n].clone(),
        )
        for b, n in enumerate(lengths.tolist())
    ]


def left_pad(prompts: list[torch.Tensor | Sequence], vocab: Vocab) -> Batch:
    """Left-pad generation prompts (each (T_i, K) ids or a Sequence) into a :class:`Batch`.

    Labels are all -100; image_pos comes from the ids (:func:`image_positions`), so a prompt may end
    inside an image span.
    """
    if not prompts:
        raise InputError("left_pad: no prompts")
    rows = [p.tokens if isinstance(p, Sequence) else torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if any(r.dim() != 2 or r.shape[1] != vocab.num_codebooks or r.shape[0] == 0 for r in rows):
        raise InputError(
            f"left_pad: every prompt must be (T_i >= 1, K={vocab.num_codebooks}), got {[tuple(r.shape) for r in rows]}"
        )
    B, T, K = len(rows), max(r.shape[0] for r in rows), vocab.num_codebooks
    tokens = torch.full((B, T, K), vocab.pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, T - r.shape[0] :], mask[b, T - r.shape[0] :] = r, True
    image_pos = torch.where(mask, image_positions(tokens, vocab), torch.full_like(mask, -1, dtype=torch.long))
    labels = torch.full_like(tokens, IGNORE_INDEX)
    return Batch(tokens=tokens, labels=labels, image_pos=image_pos, attention_mask=mask)
