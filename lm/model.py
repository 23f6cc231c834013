"""The unified decoder-only LM over interleaved text and image positions (DESIGN §5).

A sequence is ``tokens (B, T, K)``: a text/special position repeats its id in all K columns, an image
position holds its K global sub-code ids (see :mod:`lm.vocab`). Inputs: text positions embed their id,
image positions embed as the sum of their K sub-code embeddings plus a learned 2D (row + column)
position embedding. Outputs: a text head over the ``num_non_image`` ids for positions whose target is
text, and a depth head (a small causal transformer over K steps, RQ-Transformer style) for positions
whose target is an image position. The backbone is Llama-style (RMSNorm, SwiGLU, RoPE, QK-norm, no
biases) or any Hugging Face causal LM loaded from a local path.

The model sees ids only: sampling, the KV cache and guidance live in :mod:`lm.generate`. A cache passed
to :meth:`DecoderLM.forward` must provide ``begin(attention_mask) -> (positions, mask)`` and
``update(layer, k, v) -> (k_all, v_all)`` (native backbone) or ``hf_cache`` / ``hf_attention_mask()``
(Hugging Face backbone); :class:`lm.generate.KVCache` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm.config import LMConfig
from lm.vocab import Vocab
from tokenizer.errors import InputError

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class LMOutput:
    """What :meth:`DecoderLM.forward` returns; the losses are None when no labels were given."""

    hidden: torch.Tensor
    """(B, T, D) final (normalised) hidden states."""
    text_loss: torch.Tensor | None = None
    """Mean cross-entropy over positions whose target is a text or special id."""
    image_loss: torch.Tensor | None = None
    """Mean cross-entropy over the K sub-codes of positions whose target is an image position."""
    z_loss: torch.Tensor | None = None
    """``z_loss_weight * mean(logsumexp(text_logits)^2)`` (already weighted)."""
    num_text_targets: int = 0
    """Positions that contributed to ``text_loss``."""
    num_image_targets: int = 0
    """Image positions that contributed to ``image_loss`` (each with K sub-codes)."""

    def total_loss(self, text_weight: float = 1.0, image_weight: float = 1.0) -> torch.Tensor:
        """``text_weight * text_loss + image_weight * image_loss + z_loss``."""
        if self.text_loss is None or self.image_loss is None or self.z_loss is None:
            raise InputError("LMOutput.total_loss: the forward pass was run without labels")
        return text_weight * self.text_loss + image_weight * self.image_loss + self.z_loss


# --------------------------------------------------------------------------------------------- blocks
def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_len, head_dim) for rotary embeddings (half-split convention, halves repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d) by cos/sin (B, 1, T, d): x cos + rotate_half(x) sin, in fp32."""
    xf = x if x.dtype == torch.float32 else x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = xf * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _xformers_attention(q, k, v, mask, is_causal, dropout_p):
    """xformers memory-efficient attention on (B, H, T, d) tensors with a bool mask (B, 1, Tq, Tk)."""
    xops = importlib.import_module("xformers.ops")
    heads = q.shape[1]
    if k.shape[1] != heads:  # GQA: expand the kv heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, d)
    if mask is None:
        bias = xops.LowerTriangularMask() if is_causal else None
    else:
        b, _, tq, tk = mask.shape
        # xformers wants the bias' last dimension padded to a multiple of 8
        storage = q.new_zeros(b, heads, tq, (tk + 7) // 8 * 8)
        bias = storage[..., :tk]
        bias.masked_fill_(~mask.expand(b, heads, tq, tk), float("-inf"))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)
    return out.transpose(1, 2)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype, so bf16 autocast keeps torch's fused kernel
    (a bf16 input with an fp32 weight falls back to the unfused path, with a warning per call site)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def _sdpa(q, k, v, mask, is_causal: bool, dropout_p: float, gqa: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on the CPU in fp32 whatever the autocast: torch's CPU kernels are
    ~2.5x slower in bf16 than in fp32 at these head sizes, forward + backward, so a bf16-autocast training step of
    the ``small`` LM is ~20 % faster this way (docs/BENCHMARKS.md)."""
    if q.device.type != "cpu" or (q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=gqa
        )
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
            enable_gqa=gqa,
        )  # fmt: skip
    return y.to(q.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with QK-norm and RoPE; no biases."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v projections in one matmul (fewer kernel launches per decode step)
        self.split = (config.n_heads * self.head_dim, config.n_kv_heads * self.head_dim)
        self.wqkv = nn.Linear(config.dim, self.split[0] + 2 * self.split[1], bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        norm = config.qk_norm
        self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps) if norm else nn.Identity()
        self.backend, self.dropout = config.attn_backend, config.dropout

    def forward(self, x, rope, mask, is_causal, kv_cache=None, layer: int = 0) -> torch.Tensor:
        """x (B, T, D); rope (cos, sin) each (B, 1, T, d/2) or None; mask (B, 1, T, Tk) bool or None."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split((self.split[0], self.split[1], self.split[1]), dim=-1)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, t, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:  # one rotation for queries and keys together (fewer ops per decode step)
            q, k = apply_rope(torch.cat((q, k), dim=1), *rope).split((self.n_heads, self.n_kv_heads), dim=1)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.backend == "xformers":
            y = _xformers_attention(q, k, v, mask, is_causal, dropout_p)
        else:
            y = _sdpa(q, k, v, mask, is_causal and mask is None, dropout_p, self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, with w1 and w3 stacked in one matrix ``w13``."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.mlp_hidden, bias=False)
        self.w2 = nn.Linear(config.mlp_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = config.dropout

    def forward(self, x, rope=None, mask=None, is_causal=True, kv_cache=None, layer: int = 0):
        h = self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache, layer)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, True)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, True)
        return x + h


def _init_linear_and_embedding(module: nn.Module, std: float, residual_std: float) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            is_residual_out = name.endswith(("attn.wo", "mlp.w2"))
            nn.init.normal_(sub.weight, 0.0, residual_std if is_residual_out else std)


# --------------------------------------------------------------------------------------------- backbones
class NativeBackbone(nn.Module):
    """Llama-style stack of blocks with a final RMSNorm; works on embeddings (B, T, D)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        _init_linear_and_embedding(self, config.init_std, config.init_std / math.sqrt(2 * config.n_layers))
        if config.attn_backend == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ImportError(
                "LMConfig.attn_backend='xformers' but the xformers package is not installed; "
                "install the 'gpu' extra or use attn_backend='sdpa'"
            )

    def forward(self, x, positions, mask, is_causal, kv_cache=None) -> torch.Tensor:
        """x (B, T, D); positions (B, T) RoPE positions; mask (B, 1, T, Tk) bool or None."""
        rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        use_ckpt = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(block, x, rope, mask, is_causal, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, is_causal, kv_cache, i)
        return self.norm(x)


class HFBackbone(nn.Module):
    """The transformer of a Hugging Face causal LM (local path) used on our input embeddings.

    Its token embedding and LM head are handed to :class:`DecoderLM` (``take_text_weights``) and the
    model's own embedding module is replaced, so the state dict holds each weight once.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        path = Path(config.hf_backbone)
        if not path.is_dir():
            raise InputError(f"LMConfig.hf_backbone: {path} is not a local model directory")
        full = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=False,
        )
        self.hf = full.get_decoder()
        self.dim = int(full.config.hidden_size)
        self._text_weights = (
            full.get_input_embeddings().weight.data,
            full.get_output_embeddings().weight.data,
        )
        self.hf.set_input_embeddings(nn.Identity())  # we always pass inputs_embeds
        self.hf_config = full.config
        if config.grad_checkpointing:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("loaded HF backbone %s (%s, width %d)", path, type(full).__name__, self.dim)

    def take_text_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embedding (V_hf, D), output head (V_hf, D)) of the loaded model, once."""
        weights, self._text_weights = self._text_weights, None
        return weights

    def forward(self, x, positions, attention_mask, kv_cache=None) -> torch.Tensor:
        """x (B, T, D); positions (B, T); attention_mask (B, T) bool over the keys (past + new) or None."""
        out = self.hf(
            inputs_embeds=x,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            position_ids=positions,
            past_key_values=None if kv_cache is None else kv_cache.hf_cache,
            use_cache=kv_cache is not None,
        )
        return out.last_hidden_state


# --------------------------------------------------------------------------------------------- heads
class DepthHead(nn.Module):
    """Predicts the K sub-codes of one image position from the backbone state (RQ-Transformer style).

    Step 0 sees the hidden state h; step k > 0 also sees the embeddings of sub-codes 0..k-1 (the shared
    image sub-code table of the model) through a causal transformer over the K steps. Each step has its
    own output matrix over the V codes of its sub-codebook.
    """

    def __init__(self, config: LMConfig, num_codebooks: int, codebook_size: int) -> None:
        super().__init__()
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        inner = config.depth_config()
        # inputs (backbone state, sub-code embeddings) are dim wide; a narrower head projects them first
        self.proj = nn.Linear(config.dim, inner.dim, bias=False) if inner.dim != config.dim else nn.Identity()
        self.step_embed = nn.Parameter(torch.randn(num_codebooks, inner.dim) * config.init_std)
        self.blocks = nn.ModuleList(Block(inner) for _ in range(config.depth_layers))
        self.norm = RMSNorm(inner.dim, eps=config.norm_eps)
        self.head = nn.Parameter(torch.randn(num_codebooks, codebook_size, inner.dim) * config.init_std)
        _init_linear_and_embedding(self.proj, config.init_std, config.init_std)
        _init_linear_and_embedding(
            self.blocks, config.init_std, config.init_std / math.sqrt(2 * config.depth_layers)
        )

    def run(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Causal transformer over the steps: x (N, S, D) -> (N, S, D) normalised.

        Without a cache S = K (teacher forcing, causal mask); with a :class:`lm.generate.DepthCache`
        one new step (S = 1) attends to itself and the cached earlier steps, so no mask is needed.
        """
        for i, block in enumerate(self.blocks):
            x = block(x, None, None, kv_cache is None, kv_cache, i)
        return self.norm(x)

    def logits(self, y: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """fp32 logits: y (N, K, D) -> (N, K, V) for all steps, or y (N, D) of one ``step`` -> (N, V)."""
        with torch.autocast(y.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            if step is None:
                return torch.einsum("nkd,kvd->nkv", y.float(), self.head.float())
            return y.float() @ self.head[step].float().T


class DecoderLM(nn.Module):
    """Decoder-only LM over (B, T, K) interleaved text/image positions; see the module docstring."""

    def __init__(self, config: LMConfig, vocab: Vocab) -> None:
        super().__init__()
        self.config, self.vocab = config, vocab
        if config.hf_backbone is not None:
            self.backbone = HFBackbone(config)
            hf = self.backbone.hf_config
            depth_config = replace(
                config,
                dim=self.backbone.dim,
                n_heads=hf.num_attention_heads,
                n_kv_heads=hf.num_attention_heads,
            )
        else:
            self.backbone = NativeBackbone(config)
            depth_config = config
        dim = self.backbone.dim
        self.dim = dim
        std = config.init_std
        self.text_embed = nn.Embedding(vocab.num_non_image, dim)
        self.image_embed = nn.Embedding(vocab.num_image_ids, dim)
        self.row_embed = nn.Embedding(vocab.grid[0], dim)
        self.col_embed = nn.Embedding(vocab.grid[1], dim)
        self.text_head = nn.Linear(dim, vocab.num_non_image, bias=False)
        for module in (self.text_embed, self.image_embed, self.row_embed, self.col_embed, self.text_head):
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(self.backbone, HFBackbone):
            self._copy_hf_text_weights(*self.backbone.take_text_weights())
        self.depth = DepthHead(depth_config, vocab.num_codebooks, vocab.codebook_size)

    def _copy_hf_text_weights(self, embedding: torch.Tensor, head: torch.Tensor) -> None:
        """Text ids keep the HF rows; our specials start at the mean HF row (LLM-CXR style vocab extension)."""
        n = min(self.vocab.num_text, embedding.shape[0])
        if self.vocab.num_text > embedding.shape[0]:
            log.warning("text vocabulary (%d) is larger than the HF model's (%d)", self.vocab.num_text, n)
        with torch.no_grad():
            for ours, theirs in ((self.text_embed.weight, embedding), (self.text_head.weight, head)):
                ours[:n] = theirs[:n]
                ours[n:] = theirs.mean(0)

    # ----------------------------------------------------------------------------------------- inputs
    def embed(self, tokens: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, D) of tokens (B, T, K) with image_pos (B, T) (-1 off images)."""
        vocab = self.vocab
        if tokens.dim() != 3 or tokens.shape[-1] != vocab.num_codebooks:
            raise InputError(f"tokens: expected (B, T, K={vocab.num_codebooks}), got {tuple(tokens.shape)}")
        if image_pos.shape != tokens.shape[:2]:
            raise InputError(
                f"image_pos: expected shape {tuple(tokens.shape[:2])}, got {tuple(image_pos.shape)}"
            )
        first = tokens[..., 0]
        is_image = vocab.is_image(first).unsqueeze(-1)
        x_text = self.text_embed(first.clamp(0, vocab.num_non_image - 1))
        codes = (tokens - vocab.image_offset).clamp(0, vocab.num_image_ids - 1)
        pos = image_pos.clamp(min=0)
        grid_w = vocab.grid[1]
        # the K sub-code rows summed by embedding_bag: no (B, T, K, D) gather to hold, sum and back-propagate
        # (20 MB of a quickstart batch; its forward + backward in half the time, docs/BENCHMARKS.md)
        summed = F.embedding_bag(codes.reshape(-1, vocab.num_codebooks), self.image_embed.weight, mode="sum")
        x_image = (
            summed.view(*codes.shape[:2], -1) + self.row_embed(pos // grid_w) + self.col_embed(pos % grid_w)
        )
        return torch.where(is_image, x_image, x_text)

    @staticmethod
    def _positions_and_mask(attention_mask: torch.Tensor | None, b: int, t: int, device):
        """RoPE positions (B, T) and a bool mask (B, 1, T, T) or None (then plain causal attention)."""
        if attention_mask is None:
            return torch.arange(t, device=device).expand(b, t), None
        keep = attention_mask.bool()
        positions = (keep.long().cumsum(1) - 1).clamp(min=0)
        if bool((keep[:, 1:] <= keep[:, :-1]).all()):  # right padding: causal attention suffices
            return positions, None
        idx = torch.arange(t, device=device)
        causal = idx[None, :] <= idx[:, None]
        mask = (causal[None] & keep[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)[None]
        return positions, mask.unsqueeze(1)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        image_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache=None,
    ) -> LMOutput:
        """Run the backbone and, with labels, the text / image losses.

        Args:
            tokens: (B, T, K) global ids.
            image_pos: (B, T) index of each position in its image span, -1 elsewhere.
            attention_mask: (B, T) bool, False on padding (left or right); None = all valid.
            labels: (B, T, K) next-position targets (``labels[t]`` is what position t predicts),
                -100 where there is no loss.
            kv_cache: a cache from :class:`lm.generate.KVCache`; the new positions are appended to it.
        """
        b, t = tokens.shape[:2]
        if kv_cache is None and t > self.config.max_seq_len and self.config.hf_backbone is None:
            raise InputError(f"tokens: {t} positions, more than max_seq_len={self.config.max_seq_len}")
        x = self.embed(tokens, image_pos)
        if kv_cache is not None and attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=tokens.device)
        if isinstance(self.backbone, HFBackbone):
            if kv_cache is not None:
                positions, _ = kv_cache.begin(attention_mask)
                hidden = self.backbone(x, positions, kv_cache.hf_attention_mask(), kv_cache)
            else:
                positions, _ = self._positions_and_mask(attention_mask, b, t, tokens.device)
                hidden = self.backbone(x, positions, attention_mask)
        else:
            if kv_cache is not None:
                positions, mask = kv_cache.begin(attention_mask)
            else:
                positions, mask = self._positions_and_mask(attention_mask, b, t, tokens.device)
            hidden = self.backbone(x, positions, mask, mask is None, kv_cache)
        out = LMOutput(hidden=hidden)
        if labels is not None:
            self._losses(out, labels)
        return out

    def decode_step(
        self, rows: torch.Tensor, image_pos: torch.Tensor, valid: torch.Tensor, kv_cache
    ) -> torch.Tensor:
        """One generated position through the native backbone and its static cache -> hidden (B, D).

        rows (B, K) global ids, image_pos (B,), valid (B,) bool (False = a finished sequence). Tensor
        operations only, so ``torch.compile`` traces it once for every position (generation's
        ``compile=True``); the caller accounts for the position on the host (``kv_cache.advance()``).
        """
        x = self.embed(rows[:, None], image_pos[:, None])
        positions, mask = kv_cache.step_begin(valid)
        return self.backbone(x, positions, mask, False, kv_cache)[:, -1]

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (..., num_non_image) over text and special ids from hidden (..., D)."""
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            return F.linear(hidden.float(), self.text_head.weight.float())

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced fp32 logits (N, K, V) of the K sub-codes from hidden (N, D) and target codes (N, K)."""
        return self.depth.logits(self.depth.run(self.depth_inputs(hidden, codes)))

    def depth_inputs(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing depth inputs (N, K, D'): step 0 = hidden, step k = embedding of sub-code k-1,
        projected to the depth head's width D' and plus the step embeddings."""
        k, v = self.vocab.num_codebooks, self.vocab.codebook_size
        x = hidden.new_zeros(hidden.shape[0], k, hidden.shape[-1])
        x[:, 0] = hidden
        if k > 1:
            offsets = torch.arange(k - 1, device=codes.device) * v
            x[:, 1:] = self.image_embed(codes[:, : k - 1] + offsets)
        x = self.depth.proj(x)
        return x + self.depth.step_embed.to(x.dtype)

    def depth_decode(self, inputs: torch.Tensor, step: int, kv_cache) -> torch.Tensor:
        """One depth-head step for generation: fp32 logits (N, V) of sub-code ``step``.

        Args:
            inputs: (N, D) the backbone hidden state at step 0, else :meth:`subcode_embedding` of the
                code sampled at step - 1.
            step: 0..K-1; steps of one position run in order on the same cache.
            kv_cache: a :class:`lm.generate.DepthCache`, reused for every position.
        """
        x = self.depth.proj(inputs)
        x = (x + self.depth.step_embed[step].to(x.dtype))[:, None]
        kv_cache.step = step
        return self.depth.logits(self.depth.run(x, kv_cache)[:, 0], step)

    def subcode_embedding(self, codes: torch.Tensor, step: int) -> torch.Tensor:
        """Embedding (N, D) of codes (N,) in [0, V) of sub-codebook ``step`` (the shared image table)."""
        return self.image_embed(codes + step * self.vocab.codebook_size)

    @torch.no_grad()
    def init_image_tables(
        self, codebook: torch.Tensor, inputs: bool = True, heads: bool = True, seed: int = 0
    ) -> None:
        """Start the image sub-code tables from the image tokenizer's code vectors instead of noise.

        codebook (K, V, d): the tokenizer's ``quantizer.codebook``. Sub-codebook k's input embeddings
        become its code vectors in d columns of one random orthonormal basis of the model width, the
        columns of different k disjoint, so a position's summed embedding is a fixed rotation of its
        quantized latent; with ``heads`` each depth step's output matrix likewise holds its code vectors
        in a random d-dim basis of the head's width. Codes close in the tokenizer's latent thus start
        close for the LM, which otherwise learns each of the K*V codes' rows from its own occurrences.
        Row norms match the random initialisation's, so the loss starts where it would.
        """
        k, v = self.vocab.num_codebooks, self.vocab.codebook_size
        if codebook.dim() != 3 or tuple(codebook.shape[:2]) != (k, v):
            raise InputError(f"codebook: expected (K={k}, V={v}, d), got {tuple(codebook.shape)}")
        d = codebook.shape[-1]
        codes = codebook.detach().float().cpu()
        codes = codes - codes.mean(1, keepdim=True)  # centred per sub-codebook (FSQ / LFQ grids are not)
        codes = codes / codes.norm(dim=-1).mean(1, keepdim=True)[..., None].clamp(min=1e-6)
        gen = torch.Generator().manual_seed(seed)
        std = self.config.init_std

        def basis(width: int, columns: int, what: str) -> torch.Tensor:
            if columns > width:
                raise InputError(
                    f"codebook: {columns} code dimensions ({what}) do not fit the width {width} "
                    "as orthogonal columns"
                )
            q, _ = torch.linalg.qr(torch.randn(width, columns, generator=gen))
            return q

        if inputs:
            embed = self.image_embed.weight
            table = torch.einsum(
                "kvd,kdw->kvw", codes, basis(self.dim, k * d, "K*d, the inputs").T.reshape(k, d, self.dim)
            )
            embed.copy_((table * std * math.sqrt(self.dim)).reshape(k * v, self.dim).to(embed))
        if heads:
            head = self.depth.head
            width = head.shape[-1]
            rows = torch.stack([codes[i] @ basis(width, d, "d, the depth head").T for i in range(k)])
            # logits start at the random head's scale: y (RMS 1 per channel) against rows of norm std*sqrt(width)
            head.copy_((rows * std * math.sqrt(width)).to(head))

    # ----------------------------------------------------------------------------------------- losses
    def _losses(self, out: LMOutput, labels: torch.Tensor) -> None:
        vocab, hidden = self.vocab, out.hidden
        if labels.shape != (*hidden.shape[:2], vocab.num_codebooks):
            raise InputError(
                f"labels: expected shape {(*hidden.shape[:2], vocab.num_codebooks)}, got {tuple(labels.shape)}"
            )
        target = labels[..., 0]
        has = target != IGNORE
        if bool((has & ((target < 0) | (target >= vocab.size))).any()):
            raise InputError(f"labels: ids must be -100 or lie in [0, {vocab.size})")
        is_image = has & vocab.is_image(target)
        is_text = has & ~is_image

        text_logits = self.text_logits(hidden[is_text])  # (N_t, num_non_image)
        n_text = text_logits.shape[0]
        out.text_loss = F.cross_entropy(text_logits, target[is_text], reduction="sum") / max(n_text, 1)
        lse = torch.logsumexp(text_logits, dim=-1)
        out.z_loss = self.config.z_loss_weight * lse.pow(2).sum() / max(n_text, 1)

        n_image = int(is_image.sum())
        if n_image == 0:
            # No image target in this batch (e.g. only image→text records): a zero that still touches the
            # depth head, so DDP sees every parameter used.
            out.image_loss = sum(p.sum() for p in self.depth.parameters()) * 0.0
        else:
            codes = vocab.ids_to_codes(labels[is_image])  # (N_i, K), checks column k holds sub-code k
            image_logits = self.depth_logits(hidden[is_image], codes)  # (N_i, K, V)
            out.image_loss = F.cross_entropy(
                image_logits.reshape(-1, vocab.codebook_size), codes.reshape(-1), reduction="sum"
            ) / (n_image * vocab.num_codebooks)
        out.num_text_targets, out.num_image_targets = n_text, n_image

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; with ``exclude_embeddings`` the input tables and output heads are left out."""
        skip = set()
        if exclude_embeddings:
            skip = {
                id(p)
                for p in (
                    self.text_embed.weight,
                    self.image_embed.weight,
                    self.text_head.weight,
                    self.depth.head,
                )
            }
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)
