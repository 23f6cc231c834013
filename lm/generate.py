"""The generation engine: static KV cache, modality-constrained sampling and classifier-free guidance.

The model sees ids only. A batch of prompts (each ``(T_i, K)`` rows of global ids) is left-padded,
prefilled once into a pre-allocated cache, then decoded one position per step. Each sequence runs a
small state machine, vectorised over the batch:

- outside an image only text ids, ``<eos>``, ``<eot>`` and ``<boi>`` may be sampled, and ``<boi>`` only
  while the remaining budget holds a whole image (h*w positions + ``<eoi>``);
- inside an image exactly h*w positions are sampled through the depth head (K sub-code steps each),
  then ``<eoi>`` is forced.

Classifier-free guidance doubles the batch: the second half holds the unconditional prompt
``<bos><boi>`` (plus the rows of an image the prompt already started) and is fed the same sampled
positions; at every sub-code step the depth logits become ``u + s * (c - u)`` inside ``cfg_interval``.
A negative prompt per item (``negative_prompts``) replaces ``<bos><boi>``: guidance then pushes away from
that description rather than from no description at all.

Each decode position is two tensor-only functions, the backbone step (:meth:`DecoderLM.decode_step` over the
static cache) and the K depth-head steps with sampling (:func:`_image_position`, its random draws made
beforehand); ``compile=True`` runs both through ``torch.compile`` with static shapes and no graph breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lm.model import DecoderLM, HFBackbone
from lm.vocab import Vocab
from tokenizer.errors import InputError


def _cache_dtype(model: DecoderLM) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the keys the model will produce (the autocast dtype inside autocast)."""
    param = next(model.parameters())
    device = param.device
    if torch.is_autocast_enabled(device.type):
        return device, torch.get_autocast_dtype(device.type)
    return device, param.dtype


class KVCache:
    """Pre-allocated keys/values (B, H_kv, T_max, d) per layer for one left-padded batch.

    All rows share the write index ``length``; per row the cache keeps which slots hold real tokens
    (``key_valid``) and the next RoPE position (``next_pos``), so left padding costs nothing but masked
    slots. Decode steps attend over the whole (static) buffer with a mask. With a Hugging Face backbone
    the keys live in a transformers ``DynamicCache`` instead and only the bookkeeping is shared.
    """

    def __init__(
        self, batch_size: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int, *, device, dtype
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.hf_cache = None
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self._slots = torch.arange(max_len, device=device)
        # the slots the next update() writes, a tensor so that compiled decode steps stay static
        self._write = self._slots[:0]
        self._cursor = torch.zeros(1, dtype=torch.long, device=device)  # the next decode step's slot

    @classmethod
    def for_model(cls, model: DecoderLM, batch_size: int, max_len: int) -> KVCache:
        """A cache for the model's backbone (a transformers DynamicCache for a Hugging Face backbone)."""
        device, dtype = _cache_dtype(model)
        if isinstance(model.backbone, HFBackbone):
            from transformers import DynamicCache

            cache = cls(batch_size, max_len, 0, 1, 1, device=device, dtype=dtype)
            cache.hf_cache = DynamicCache()
            return cache
        config = model.config
        if max_len > config.max_seq_len:
            raise InputError(
                f"KVCache: {max_len} positions exceed the model's max_seq_len={config.max_seq_len}"
            )
        return cls(
            batch_size, max_len, config.n_layers, config.n_kv_heads, config.head_dim, device=device, dtype=dtype,
        )  # fmt: skip

    def begin(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Register T new positions (attention_mask (B, T) bool, False = padding).

        Returns RoPE positions (B, T) and the attention mask (B, 1, T, T_max) over the whole buffer
        (None for a Hugging Face backbone, which builds its own from :meth:`hf_attention_mask`).
        """
        t = attention_mask.shape[1]
        start = self.length
        if start + t > self.max_len:
            raise InputError(f"KVCache: writing {t} positions at {start} overflows max_len={self.max_len}")
        keep = attention_mask.bool()
        self.length = start + t
        if t == 1 and self.hf_cache is None:
            self._cursor.fill_(start)
            return self.step_begin(keep[:, 0])
        self._cursor.fill_(self.length)
        self.key_valid[:, start : start + t] = keep
        self._write = self._slots[start : start + t]
        if t == 1:
            positions = self.next_pos[:, None].clone()
            self.next_pos += keep[:, 0]
            return positions, None
        positions = (self.next_pos[:, None] + keep.long().cumsum(1) - 1).clamp(min=0)
        self.next_pos += keep.sum(1)
        if self.hf_cache is not None:
            return positions, None
        query_slot = self._slots[start : start + t, None]  # (T, 1)
        visible = self._slots[None, :] <= query_slot  # causal over absolute slots
        # a query always sees its own slot, so a padded query never has an empty (NaN) softmax row
        mask = (self.key_valid[:, None, :] & visible[None]) | (self._slots[None, :] == query_slot)[None]
        return positions, mask.unsqueeze(1)

    def step_begin(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Register one decode position at the cursor slot (valid (B,) bool); advances the cursor.

        Tensor operations only (no Python integers change), so a compiled decode step sees the same
        graph at every position. The caller accounts for :attr:`length` (see :meth:`advance`).
        Returns RoPE positions (B, 1) and the mask (B, 1, 1, T_max).
        """
        slot = self._cursor.clone()
        self._cursor += 1
        self._write = slot
        self.key_valid.index_copy_(1, slot, valid[:, None])
        positions = self.next_pos[:, None].clone()
        self.next_pos += valid
        # the new slot is the last written one, so validity alone is the mask; a query always sees its
        # own slot (no empty softmax row for padding)
        mask = self.key_valid.index_fill(1, slot, True)
        return positions, mask[:, None, None, :]

    def advance(self) -> None:
        """Account on the host for one :meth:`step_begin` position (checks the buffer is not full)."""
        if self.length + 1 > self.max_len:
            raise InputError(f"KVCache: writing 1 position at {self.length} overflows max_len={self.max_len}")
        self.length += 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, d) at the current slots; return the whole buffers (B, H_kv, T_max, d)."""
        self.k[layer].index_copy_(2, self._write, k)
        self.v[layer].index_copy_(2, self._write, v)
        return self.k[layer], self.v[layer]

    def hf_attention_mask(self) -> torch.Tensor:
        """(B, length) key mask over everything written so far (Hugging Face backbones)."""
        return self.key_valid[:, : self.length]


class DepthCache:
    """Keys/values (N, H_kv, K, d) per depth-head layer for the K sub-code steps of one image position.

    Step k writes slot k and attends to slots 0..k, all valid, so no mask is built. Each position
    overwrites the slots of the previous one; nothing needs clearing.
    """

    def __init__(self, model: DecoderLM, batch_size: int) -> None:
        device, dtype = _cache_dtype(model)
        attn = model.depth.blocks[0].attn
        shape = (batch_size, attn.n_kv_heads, model.vocab.num_codebooks, attn.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.depth.blocks]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.depth.blocks]
        self.step = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (N, H_kv, 1, d) at slot ``step``; return slots 0..step (N, H_kv, step + 1, d)."""
        self.k[layer][:, :, self.step] = k[:, :, 0]
        self.v[layer][:, :, self.step] = v[:, :, 0]
        return self.k[layer][:, :, : self.step + 1], self.v[layer][:, :, : self.step + 1]


@dataclass
class SamplingConfig:
    """Per-modality sampling and classifier-free guidance settings."""

    text_temperature: float = 1.0
    """Temperature for text positions; 0 = greedy."""
    text_top_k: int = 0
    """Keep only the k most likely text ids; 0 = off."""
    text_top_p: float = 1.0
    """Nucleus sampling mass for text positions; 1 = off."""
    image_temperature: float = 1.0
    """Temperature for every image sub-code step; 0 = greedy."""
    image_top_k: int = 0
    """Keep only the k most likely codes at each sub-code step; 0 = off."""
    image_top_p: float = 1.0
    """Nucleus sampling mass at each sub-code step; 1 = off."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale s (logits = u + s (c - u)); 1 = no guidance (no doubled batch)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Guidance applies to image position p when start <= p / (h*w) < end."""
    max_new_tokens: int = 256
    """Budget of generated positions per sequence (an image costs h*w + 2 with <boi> and <eoi>)."""

    def __post_init__(self) -> None:
        for name in ("text_temperature", "image_temperature"):
            if getattr(self, name) < 0:
                raise InputError(f"SamplingConfig.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("text_top_k", "image_top_k"):
            if getattr(self, name) < 0:
                raise InputError(f"SamplingConfig.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("text_top_p", "image_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InputError(f"SamplingConfig.{name}: expected (0, 1], got {getattr(self, name)}")
        self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        if len(self.cfg_interval) != 2 or not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0:
            raise InputError(
                f"SamplingConfig.cfg_interval: expected 0 <= start <= end <= 1, got {self.cfg_interval}"
            )
        if self.max_new_tokens < 1:
            raise InputError(f"SamplingConfig.max_new_tokens: expected >= 1, got {self.max_new_tokens}")


def noise_width(num_ids: int, top_k: int) -> int:
    """Draws a sampling step needs per row: k with top-k, else every id."""
    return top_k if 0 < top_k < num_ids else num_ids


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Exp(1) draws for :func:`pick` (drawn outside compiled code, which cannot take a Generator)."""
    return torch.empty(shape, device=device).exponential_(1.0, generator=generator)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """Sample one id per row from fp32 logits (N, V) (-inf = forbidden); returns (N,) long."""
    noise = None
    if temperature != 0:
        noise = exponential_noise(
            (logits.shape[0], noise_width(logits.shape[-1], top_k)), generator, logits.device
        )
    return pick(logits, temperature, top_k, top_p, noise)


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, noise) -> torch.Tensor:
    """:func:`sample` with its Exp(1) draws given: noise (N, ``noise_width``) or None when greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:  # draw among the k best only: softmax and noise over k, not V
        values, index = torch.topk(logits, top_k, dim=-1)
        return index.gather(-1, _race(values / temperature, top_p, noise)[:, None])[:, 0]
    return _race(logits / temperature, top_p, noise)


def _race(logits: torch.Tensor, top_p: float, noise: torch.Tensor) -> torch.Tensor:
    """Index (N,) drawn from softmax(logits) (N, V), restricted to the nucleus of mass ``top_p``."""
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # exponential race: argmax(p / E), E ~ Exp(1), draws from p without a normalisation or multinomial call
    return (probs / noise).argmax(-1)


# --------------------------------------------------------------------------------------------- prompts
def _scan_prompt(vocab: Vocab, prompt: torch.Tensor, index: int) -> tuple[torch.Tensor, int | None]:
    """Check one prompt (T, K); return its image_pos (T,) and the rows of an image it leaves open (or None)."""
    k, hw = vocab.num_codebooks, vocab.image_length
    where = f"prompts[{index}]"
    if prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] != k:
        raise InputError(f"{where}: expected (T, K={k}) ids with T >= 1, got shape {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise InputError(f"{where}: expected integer ids, got {prompt.dtype}")
    prompt = prompt.long()
    first = prompt[:, 0]
    is_image = vocab.is_image(first)
    if bool(((first < 0) | (first >= vocab.size)).any()):
        raise InputError(f"{where}: ids must lie in [0, {vocab.size})")
    if bool((prompt[~is_image] != first[~is_image, None]).any()):
        raise InputError(f"{where}: a text/special row must repeat its id in all K columns")
    if bool(is_image.any()):
        vocab.ids_to_codes(prompt[is_image])
    positions, open_rows = [], None
    for t, (tok, img) in enumerate(zip(first.tolist(), is_image.tolist(), strict=True)):
        if img:
            if open_rows is None or open_rows >= hw:
                raise InputError(f"{where}: image row {t} is outside a <boi> span of {hw} positions")
            positions.append(open_rows)
            open_rows += 1
            continue
        if open_rows is not None and (open_rows < hw or tok != vocab.eoi):
            raise InputError(f"{where}: row {t}: an image span needs exactly {hw} positions then <eoi>")
        open_rows = 0 if tok == vocab.boi else None
        positions.append(-1)
    return torch.tensor(positions, dtype=torch.long), open_rows


def unconditional_prompt(
    vocab: Vocab, prompt: torch.Tensor, negative: torch.Tensor | None = None
) -> torch.Tensor:
    """The guidance partner of a prompt that ends inside an image: ``<bos><boi>`` + the image rows it has.

    ``negative``: (T, K) text rows (``<bos>`` + a negative prompt, outside any image) used instead of
    ``<bos>``; ``<boi>`` and the open image's rows follow it.
    """
    _, open_rows = _scan_prompt(vocab, prompt, 0)
    if open_rows is None:
        raise InputError("classifier-free guidance needs a prompt that ends inside an image (<boi> ...)")
    if negative is None:
        head = vocab.text_rows([vocab.bos, vocab.boi]).to(prompt.device)
    else:
        _, negative_open = _scan_prompt(vocab, negative, 0)
        if negative_open is not None or bool(vocab.is_image(negative[:, 0]).any()):
            raise InputError("negative prompt: expected text rows only (no image, not ending in <boi>)")
        head = torch.cat([negative.to(prompt.device).long(), vocab.text_rows([vocab.boi]).to(prompt.device)])
    return torch.cat([head, prompt[prompt.shape[0] - open_rows :].long()])


def _left_pad(vocab: Vocab, rows: list[torch.Tensor], positions: list[torch.Tensor], device):
    """Left-pad (T_i, K) prompts -> tokens (B, T, K), image_pos (B, T), attention_mask (B, T)."""
    t = max(r.shape[0] for r in rows)
    tokens = torch.full((len(rows), t, vocab.num_codebooks), vocab.pad, dtype=torch.long, device=device)
    image_pos = torch.full((len(rows), t), -1, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), t, dtype=torch.bool, device=device)
    for i, (r, p) in enumerate(zip(rows, positions, strict=True)):
        tokens[i, t - r.shape[0] :] = r
        image_pos[i, t - r.shape[0] :] = p
        mask[i, t - r.shape[0] :] = True
    return tokens, image_pos, mask


# --------------------------------------------------------------------------------------------- decoding
class _Decoder:
    """One generation run: holds the cache (or the growing recompute buffers) and steps the model."""

    def __init__(self, model, tokens, image_pos, mask, max_new: int, use_cache: bool, compile: bool) -> None:
        self.model, self.use_cache = model, use_cache
        # native backbone + cache: the tensor-only decode step (compiled on request); HF backbones use forward
        self.fast = use_cache and not isinstance(model.backbone, HFBackbone)
        self.backbone_step = _compiled(_backbone_step) if compile and self.fast else _backbone_step
        b, t, k = tokens.shape
        total = t + max_new
        if compile and self.fast:  # a few cache lengths, so new prompt lengths rarely mean a new compile
            total = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, max(model.config.max_seq_len, total))
        self.cache = KVCache.for_model(model, b, total) if use_cache else None
        if not use_cache:  # reference path: recompute the whole left-padded sequence every step
            self.tokens = tokens.new_full((b, total, k), model.vocab.pad)
            self.image_pos = image_pos.new_full((b, total), -1)
            self.mask = mask.new_zeros(b, total)
            self.tokens[:, :t], self.image_pos[:, :t], self.mask[:, :t] = tokens, image_pos, mask
        self.length = t
        self.prefill = (tokens, image_pos, mask)

    def first(self) -> torch.Tensor:
        """Prefill; returns the last hidden state (B, D)."""
        return self.model(*self.prefill, kv_cache=self.cache).hidden[:, -1]

    def step(self, rows: torch.Tensor, image_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed one position rows (B, K), image_pos (B,), valid (B,); returns the new hidden state (B, D)."""
        if self.fast:
            self.cache.advance()
            return self.backbone_step(self.model, rows, image_pos, valid, self.cache)
        if self.use_cache:
            out = self.model(rows[:, None], image_pos[:, None], valid[:, None], kv_cache=self.cache)
            return out.hidden[:, -1]
        n = self.length
        self.tokens[:, n], self.image_pos[:, n], self.mask[:, n] = rows, image_pos, valid
        self.length = n + 1
        out = self.model(self.tokens[:, : n + 1], self.image_pos[:, : n + 1], self.mask[:, : n + 1])
        return out.hidden[:, -1]


def _image_position(model, hidden, image_idx, noise, depth_cache, sampling: SamplingConfig, guided: bool):
    """K sub-code steps through the depth head -> codes (B, K); hidden is (2B, D) when guided.

    noise: (K, B, ``noise_width``) Exp(1) draws, None when greedy. Tensor operations only (compiled with
    ``compile=True``).
    """
    vocab = model.vocab
    b = image_idx.shape[0]
    if guided:
        frac = image_idx.float() / vocab.image_length
        start, end = sampling.cfg_interval
        scale = torch.where((frac >= start) & (frac < end), sampling.cfg_scale - 1.0, 0.0)[:, None]
    inputs, codes = hidden, []
    for k in range(vocab.num_codebooks):
        logits = model.depth_decode(inputs, k, depth_cache)  # (B', V) fp32
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = cond + scale * (cond - uncond)  # == uncond + s (cond - uncond); exact cond at s = 1
        code = pick(
            logits, sampling.image_temperature, sampling.image_top_k, sampling.image_top_p,
            None if noise is None else noise[k],
        )  # fmt: skip
        codes.append(code)
        if k + 1 < vocab.num_codebooks:
            inputs = model.subcode_embedding(code.repeat(2) if guided else code, k)
    return torch.stack(codes, dim=1)


def _backbone_step(model, rows, image_pos, valid, cache):
    return model.decode_step(rows, image_pos, valid, cache)


CACHE_BUCKET = 128
"""With ``compile=True`` the KV cache length is rounded up to a multiple of this (its shape is static)."""
_COMPILED: dict[str, object] = {}


def _compiled(fn):
    """``torch.compile(fn)`` once per process: static shapes, and no graph break allowed (fullgraph)."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn.__name__]


def _text_bias(vocab: Vocab, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks (num_non_image,) for text positions: with and without <boi> allowed."""
    bias = torch.zeros(vocab.num_non_image, device=device)
    for name in vocab.specials:
        if name not in ("<eos>", "<eot>", "<boi>"):
            bias[vocab.special(name)] = float("-inf")
    no_boi = bias.clone()
    no_boi[vocab.boi] = float("-inf")
    return bias, no_boi


def _prepare(vocab: Vocab, prompts, max_new: int, force_image: bool, guided: bool, device, negatives=None):
    """Checked, left-padded batch (doubled when guided), open-image counts and forced prefixes per prompt."""
    if not prompts:
        raise InputError("prompts: expected at least one prompt")
    hw = vocab.image_length
    rows, positions, open_rows, forced = [], [], [], []
    for i, prompt in enumerate(prompts):
        pos, n = _scan_prompt(vocab, prompt, i)
        prompt, prefix = prompt.to(device).long(), prompt.new_zeros(0, vocab.num_codebooks).to(device).long()
        if force_image and n is None:
            prefix, n = vocab.text_rows([vocab.boi]).to(device), 0
            prompt, pos = torch.cat([prompt, prefix]), torch.cat([pos, pos.new_full((1,), -1)])
        if n is not None and hw - n + 1 > max_new:
            raise InputError(
                f"prompts[{i}]: finishing its image needs {hw - n + 1} positions, max_new_tokens={max_new}"
            )
        rows.append(prompt)
        positions.append(pos.to(device))
        open_rows.append(n)
        forced.append(prefix)
    if guided:
        if any(n is None for n in open_rows):
            raise InputError(
                "classifier-free guidance needs every prompt to end inside an image (<boi> ...) or force_image=True"
            )
        negatives = [None] * len(rows) if negatives is None else list(negatives)
        if len(negatives) != len(rows):
            raise InputError(f"negative_prompts: {len(negatives)} for {len(rows)} prompts")
        partners = [unconditional_prompt(vocab, r, neg) for r, neg in zip(rows, negatives, strict=True)]
        for n, partner in zip(open_rows, partners, strict=True):
            head = partner.shape[0] - n
            positions.append(torch.cat([torch.full((head,), -1), torch.arange(n)]).to(device))
        rows = rows + partners
    return _left_pad(vocab, rows, positions, device), open_rows, forced


@torch.no_grad()
def generate_tokens(
    model: DecoderLM,
    prompts: list[torch.Tensor],
    sampling: SamplingConfig,
    *,
    seed: int,
    stop_at_eos: bool = True,
    stop_ids: Sequence[int] = (),
    force_image: bool = False,
    use_cache: bool = True,
    compile: bool = False,
    negative_prompts: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Continue each prompt under the modality constraints (see the module docstring).

    Args:
        model: the LM (put it in eval mode).
        prompts: list of (T_i, K) global-id rows; they may end inside an image (e.g. with ``<boi>``).
        sampling: temperatures, top-k / top-p, guidance and the budget ``max_new_tokens``.
        seed: seeds the torch.Generator that drives every draw; same seed -> same output.
        stop_at_eos: a sequence stops after it samples ``<eos>``.
        stop_ids: text ids that end a sequence too, kept in its output (e.g. the line breaks that end a
            one-line answer: :attr:`lm.text_tokenizer.TextTokenizer.line_break_ids`).
        force_image: append ``<boi>`` to every prompt that is not already inside an image.
        use_cache: False recomputes the whole sequence every step (a reference for tests).
        compile: run the per-position backbone step and the K depth-head steps through ``torch.compile``
            (static shapes, no graph breaks). The first call per batch shape and setting compiles (tens of
            seconds on a CPU); later ones are faster (docs/BENCHMARKS.md). Native backbone only.
        negative_prompts: with guidance, one (T, K) text prompt per item (``<bos>`` + text) whose
            continuation guidance pushes away from, instead of the unconditional ``<bos>``.

    Returns:
        Per prompt the rows (T_out, K) appended after it (a forced ``<boi>`` included), up to and
        including the stop (``<eos>`` or one of ``stop_ids``).
    """
    guided = sampling.cfg_scale != 1.0
    stops = [*([model.vocab.eos] if stop_at_eos else []), *stop_ids]
    return _generate(
        model, prompts, sampling, seed, stops, force_image, guided, use_cache, compile, negative_prompts
    )


def _generate(
    model, prompts, sampling, seed, stops, force_image, guided, use_cache, compile, negatives=None
) -> list[torch.Tensor]:
    vocab: Vocab = model.vocab
    device = next(model.parameters()).device
    stops = torch.tensor(stops, dtype=torch.long, device=device)
    hw, k, max_new = vocab.image_length, vocab.num_codebooks, sampling.max_new_tokens
    (tokens, image_pos, mask), open_rows, forced = _prepare(
        vocab, prompts, max_new, force_image, guided, device, negatives
    )
    b = len(prompts)
    in_image = torch.tensor([n is not None for n in open_rows], device=device)
    image_idx = torch.tensor([n or 0 for n in open_rows], device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.full((b,), max_new, device=device)
    out = torch.full((b, max_new, k), vocab.pad, dtype=torch.long, device=device)
    pad_row, eoi_row = out[:, 0].clone(), torch.full_like(out[:, 0], vocab.eoi)
    bias_boi, bias_no_boi = _text_bias(vocab, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = _Decoder(model, tokens, image_pos, mask, max_new, use_cache, compile)
    depth_cache = DepthCache(model, tokens.shape[0])
    image_step = _compiled(_image_position) if compile else _image_position
    noise_shape = (k, b, noise_width(vocab.codebook_size, sampling.image_top_k))
    hidden = decoder.first()
    need_text, need_image = bool((~in_image).any()), bool((in_image & (image_idx < hw)).any())
    steps = 0
    for step in range(max_new):
        text_rows = image_rows = pad_row
        if need_text:
            bias = bias_boi if max_new - step - 1 >= hw + 1 else bias_no_boi
            logits = model.text_logits(hidden[:b]) + bias
            ids = sample(
                logits, sampling.text_temperature, sampling.text_top_k, sampling.text_top_p, generator
            )
            text_rows = ids[:, None].expand(b, k)
        if need_image:
            idx = image_idx.clamp(max=hw - 1)
            noise = None
            if sampling.image_temperature != 0:
                noise = exponential_noise(noise_shape, generator, device)
            codes = image_step(model, hidden, idx, noise, depth_cache, sampling, guided)
            image_rows = vocab.codes_to_ids(codes)
        finishing = in_image & (image_idx >= hw)
        drawing = in_image & ~finishing
        new = torch.where(drawing[:, None], image_rows, torch.where(finishing[:, None], eoi_row, text_rows))
        new = torch.where(done[:, None], pad_row, new)
        new_pos = torch.where(drawing, image_idx, -1)
        valid = ~done
        out[:, step] = new
        starting = valid & ~in_image & (new[:, 0] == vocab.boi)
        image_idx = torch.where(drawing, image_idx + 1, torch.where(starting, 0, image_idx))
        in_image = drawing | starting
        if len(stops):
            ending = valid & torch.isin(new[:, 0], stops)
            lengths = torch.where(ending, step + 1, lengths)
            done = done | ending
        steps = step + 1
        # one host sync per position: whether to stop and which branches the next step needs
        flags = torch.stack([done.all(), (~in_image & ~done).any(), (in_image & (image_idx < hw)).any()])
        all_done, need_text, need_image = flags.tolist()
        if all_done or steps == max_new:
            break
        if guided:
            new, new_pos, valid = new.repeat(2, 1), new_pos.repeat(2), valid.repeat(2)
        hidden = decoder.step(new, new_pos, valid)
    lengths = lengths.clamp(max=steps).tolist()
    return [torch.cat([forced[i], out[i, : lengths[i]]]) for i in range(b)]


@torch.no_grad()
def generate_image_codes(
    model: DecoderLM,
    prompts: list[torch.Tensor],
    sampling: SamplingConfig,
    seed: int,
    compile: bool = False,
    negative_prompts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One image per prompt (an image is started right after the prompt); returns codes (B, K, h, w).

    ``compile``, ``negative_prompts``: as in :func:`generate_tokens`.
    """
    vocab = model.vocab
    hw = vocab.image_length
    sampling = replace(sampling, max_new_tokens=hw + 1)
    outs = generate_tokens(
        model,
        prompts,
        sampling,
        seed=seed,
        stop_at_eos=False,
        force_image=True,
        compile=compile,
        negative_prompts=negative_prompts,
    )
    images = []
    for prompt, new in zip(prompts, outs, strict=True):
        seq = torch.cat([prompt.to(new.device).long(), new])
        image_rows = seq[vocab.is_image(seq[:, 0])][-hw:]  # the last span is the generated (complete) one
        images.append(vocab.rows_to_image(image_rows))
    return torch.stack(images)
