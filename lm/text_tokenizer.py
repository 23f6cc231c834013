"""The LM's text tokenizer: any Hugging Face tokenizer, or a byte-level BPE trained on the captions.

The text tokenizer owns the ids ``[0, vocab_size)`` of the interleaved vocabulary (``lm/vocab.py``). It
never adds special tokens to an encoding: ``<bos>``, ``<boi>`` and the rest belong to the vocabulary and
are placed by ``lm/sequence.py``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizer.errors import InputError

log = logging.getLogger(__name__)

MIN_BPE_VOCAB = 256  # the byte alphabet


class TextTokenizer:
    """A thin wrapper over a ``transformers`` tokenizer with a fixed, special-token-free interface.

    Args:
        tokenizer: a ``transformers.PreTrainedTokenizerBase`` (fast or slow).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self._vocab_size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **kwargs) -> TextTokenizer:
        """Load any Hugging Face tokenizer from a local directory or a Hub name.

        Extra keyword arguments go to ``AutoTokenizer.from_pretrained`` (e.g. ``revision``).
        """
        from transformers import AutoTokenizer

        # a tokenizer_config.json naming Python code is refused, never run (and never asked about)
        kwargs["trust_remote_code"] = False
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir), **kwargs)
        except (OSError, ValueError) as e:
            raise InputError(f"text tokenizer {str(name_or_dir)!r}: could not be loaded ({e})") from None
        return cls(tokenizer)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TextTokenizer:
        """Load a tokenizer saved by :meth:`save` (local only)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(f"{directory}: not a text tokenizer directory")
        return cls.from_pretrained(directory, local_files_only=True)

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2
    ) -> TextTokenizer:
        """Train a byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) on ``texts``.

        Args:
            texts: training strings, e.g. the captions and QA text of the training shards.
            vocab_size: upper bound on the vocabulary, >= 256 (the byte alphabet); a small corpus may
                yield fewer merges.
            min_frequency: a pair must occur this often to be merged.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        if vocab_size < MIN_BPE_VOCAB:
            raise InputError(
                f"train_bpe: vocab_size must be >= {MIN_BPE_VOCAB} (the byte alphabet), got {vocab_size}"
            )
        if min_frequency < 1:
            raise InputError(f"train_bpe: min_frequency must be >= 1, got {min_frequency}")
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
        log.info("trained a byte-level BPE with %d ids", len(wrapped))
        return cls(wrapped)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer files (``tokenizer.json`` etc.) to ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        return directory

    # ----------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce: the ``num_text`` of the vocabulary."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids in [0, vocab_size), without any special tokens."""
        if not isinstance(text, str):
            raise InputError(f"encode: expected a str, got {type(text).__name__}")
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several strings at once (faster for fast tokenizers)."""
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids in [0, vocab_size) -> text; no whitespace clean-up, so a byte-level BPE round-trips exactly."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise InputError(f"decode: ids must lie in [0, {self._vocab_size}), got {bad[:5]}")
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @functools.cached_property
    def line_break_ids(self) -> tuple[int, ...]:
        """The ids whose text holds a line break: where a one-line answer ends (see ``lm.data.vqa_record``)."""
        pieces = self.tokenizer.batch_decode(
            [[i] for i in range(self._vocab_size)],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        return tuple(i for i, piece in enumerate(pieces) if "\n" in piece)

    def __repr__(self) -> str:
        return f"TextTokenizer({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"
