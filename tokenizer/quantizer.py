"""Multi-codebook quantizer: K independent sub-codebooks over a K*d latent.

The codebooks and their training rules come from ``vector_quantize_pytorch``: ``VectorQuantize``
with one separate codebook per head (cosine look-up, EMA update, dead-code restart, k-means init,
rotation trick), or ``FSQ`` / ``LFQ``. For the EMA-trained VQ the per-step work runs here, on the
library's own codebook state and update methods, but with gathers and ``index_add_`` instead of the
library's (K, N, V) one-hot matmuls, which dominate a CPU training step (about 10x slower at
K=8, V=1024, N=4096). ``tests/tokenizer/test_quantizer.py`` checks both give the same step.
Inference (``codes`` / ``embed``): per-head l2 normalisation, one batched matmul against the K
codebooks, argmax; and a single gather back. All of it runs in fp32 with autocast disabled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

from tokenizer.config import QuantizerConfig
from tokenizer.distributed import world_size
from tokenizer.errors import InputError

logger = logging.getLogger(__name__)

# Rows of the (K, rows, V) similarity block computed at once by the inference path: bounds memory
# for large batches (the library computes all rows at once).
_LOOKUP_BLOCK_ELEMENTS = 1 << 24


@dataclass
class QuantizerOutput:
    """What the quantizer returns for a latent of shape (B, K*d, h, w)."""

    quantized: Tensor
    """(B, K*d, h, w) fp32: the selected code vectors (straight-through gradients in training)."""
    codes: Tensor
    """(B, K, h, w) long: index of the selected entry in each sub-codebook."""
    loss: Tensor
    """Scalar: commitment loss * beta (VQ), entropy/commitment aux loss (LFQ), 0 (FSQ)."""
    perplexity: Tensor
    """(K,): exp(entropy) of each sub-codebook's code histogram over the batch."""
    usage: Tensor
    """(K,): fraction of each sub-codebook's entries used at least once in the batch."""


def _build_vq(cfg: QuantizerConfig, dim: int) -> nn.Module:
    return VectorQuantize(
        dim=dim,
        codebook_size=cfg.codebook_size,
        codebook_dim=cfg.codebook_dim,
        heads=cfg.num_codebooks,
        separate_codebook_per_head=True,
        use_cosine_sim=cfg.cosine,
        commitment_weight=cfg.beta,
        kmeans_init=cfg.kmeans_init,
        kmeans_iters=cfg.kmeans_iters,
        threshold_ema_dead_code=cfg.dead_code_threshold,
        rotation_trick=cfg.rotation_trick,
        straight_through=False,
        decay=cfg.ema_decay,
        learnable_codebook=cfg.learnable_codebook,
        ema_update=not cfg.learnable_codebook,
        sync_codebook=cfg.sync_codebook,
        accept_image_fmap=True,
    )


def _build_fsq(cfg: QuantizerConfig, dim: int) -> nn.Module:
    return FSQ(
        levels=list(cfg.fsq_levels),
        dim=dim,
        num_codebooks=cfg.num_codebooks,
        keep_num_codebooks_dim=True,
    )


def _build_lfq(cfg: QuantizerConfig, dim: int) -> nn.Module:
    return LFQ(
        dim=dim,
        codebook_size=cfg.codebook_size,
        num_codebooks=cfg.num_codebooks,
        keep_num_codebooks_dim=True,
        entropy_loss_weight=cfg.lfq_entropy_weight,
        commitment_loss_weight=cfg.beta,
    )


QUANTIZERS: dict[str, Callable[[QuantizerConfig, int], nn.Module]] = {
    "vq": _build_vq,
    "fsq": _build_fsq,
    "lfq": _build_lfq,
}
"""Library quantizer per ``QuantizerConfig.kind``."""


@torch.no_grad()
def codebook_stats(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per sub-codebook perplexity and usage of a batch of codes.

    Args:
        codes: (B, K, h, w) integer codes.
        codebook_size: V.

    Returns:
        perplexity (K,) = exp(-sum p log p) of the code histogram, usage (K,) = fraction of the V
        entries hit at least once.
    """
    num_codebooks = codes.shape[1]
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    flat = codes.transpose(0, 1).reshape(num_codebooks, -1) + offsets[:, None]
    counts = torch.bincount(flat.reshape(-1), minlength=num_codebooks * codebook_size)
    counts = counts.view(num_codebooks, codebook_size).float()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return entropy.exp(), (counts > 0).float().mean(-1)


class MultiCodebookQuantizer(nn.Module):
    """K independent sub-codebooks of V entries of width d over a (B, K*d, h, w) latent.

    Training mode runs the library quantizer (codebook updates, straight-through or rotation-trick
    gradients, commitment loss). Eval mode runs :meth:`codes` + :meth:`embed`, so that
    ``embed(codes(z))`` equals ``forward(z).quantized`` bit for bit; its loss is the commitment
    term (VQ) for validation logging.
    """

    def __init__(self, config: QuantizerConfig, dim: int | None = None) -> None:
        super().__init__()
        dim = config.latent_dim if dim is None else dim
        if dim != config.latent_dim:
            raise InputError(
                f"MultiCodebookQuantizer: dim must equal num_codebooks * codebook_dim = {config.latent_dim}, got {dim}"
            )
        self.config = config
        self.num_codebooks = config.num_codebooks
        self.codebook_size = config.codebook_size
        self.codebook_dim = config.codebook_dim
        self.dim = dim
        self.impl = QUANTIZERS[config.kind](config, dim)
        offsets = torch.arange(config.num_codebooks) * config.codebook_size
        self.register_buffer("code_offsets", offsets.view(1, -1, 1, 1), persistent=False)
        if config.kind == "lfq":
            bits = 2 ** torch.arange(config.codebook_dim - 1, -1, -1)
            self.register_buffer("lfq_bits", bits.view(1, 1, -1, 1, 1), persistent=False)

    @property
    def codebook(self) -> Tensor:
        """(K, V, d) fp32 code vectors (l2-normalised for cosine VQ); FSQ/LFQ: the implicit codes."""
        if self.config.kind == "vq":
            return self.impl.codebook
        all_codes = torch.arange(self.codebook_size, device=self.code_offsets.device)
        indices = all_codes.view(1, 1, -1, 1).expand(1, 1, self.codebook_size, self.num_codebooks)
        table = self.impl.indices_to_codes(indices)  # (1, K*d, 1, V)
        return table.view(self.num_codebooks, self.codebook_dim, self.codebook_size).transpose(1, 2).float()

    def _check_latent(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim or not z.is_floating_point():
            raise InputError(
                f"quantizer input: expected a float tensor (B, {self.dim}, h, w), got {tuple(z.shape)} {z.dtype}"
            )

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize a latent.

        Args:
            z: (B, K*d, h, w) latent, any float dtype (computed in fp32).
        """
        self._check_latent(z)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if not self.training:
                codes = self.codes(z)
                quantized = self.embed(codes)
                loss = self._eval_loss(z, quantized)
            elif self.config.kind == "vq" and not (
                self.config.learnable_codebook or self.config.library_train_step
            ):
                quantized, codes, loss = self._vq_train_forward(z)
            else:
                quantized, codes, loss = self._library_forward(z)
        perplexity, usage = codebook_stats(codes, self.codebook_size)
        return QuantizerOutput(quantized, codes, loss, perplexity, usage)

    def _library_forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.config.kind == "fsq":
            quantized, indices = self.impl(z)
            loss = z.new_zeros(())
        else:
            quantized, indices, loss = self.impl(z)
        if indices.ndim == 3:  # the VQ library drops the head axis when K == 1
            indices = indices.unsqueeze(-1)
        return quantized, indices.permute(0, 3, 1, 2).long(), loss

    def _vq_train_forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One EMA-VQ training step, equal to ``VectorQuantize.forward`` in training mode."""
        batch, _, height, width = z.shape
        num_k, dim = self.num_codebooks, self.codebook_dim
        state = self.impl._codebook  # the library's codebook: buffers, k-means init, EMA, restarts
        x = z.reshape(batch, num_k, dim, height * width).permute(1, 0, 3, 2).reshape(num_k, -1, dim)
        if self.config.cosine:
            x = F.normalize(x, dim=-1, eps=1e-6)
        state.init_embed_(x.detach())
        flat_codes = self._lookup(x.detach(), state.embed.detach())  # (K, N)
        table = state.embed.detach().reshape(num_k * self.codebook_size, dim)
        index = flat_codes + self.code_offsets.view(-1, 1)
        quantized = F.embedding(index, table)  # (K, N, d)
        self._ema_update(state, x.detach(), index)
        loss = F.mse_loss(quantized, x) * self.config.beta
        if x.requires_grad:
            quantized = (
                rotate_to(x, quantized) if self.config.rotation_trick else x + (quantized - x).detach()
            )
        quantized = quantized.view(num_k, batch, height * width, dim).permute(1, 0, 3, 2)
        codes = flat_codes.view(num_k, batch, height, width).transpose(0, 1)
        return quantized.reshape(batch, num_k * dim, height, width), codes, loss

    def _ema_update(self, state: nn.Module, x: Tensor, index: Tensor) -> None:
        """EMA of code counts and code sums from (K, N, d) features and (K, N) flat indices."""
        total = self.num_codebooks * self.codebook_size
        counts = torch.bincount(index.reshape(-1), minlength=total).to(x.dtype)
        sums = x.new_zeros(total, self.codebook_dim).index_add_(
            0, index.reshape(-1), x.reshape(-1, self.codebook_dim)
        )
        counts = counts.view(self.num_codebooks, self.codebook_size)
        sums = sums.view(self.num_codebooks, self.codebook_size, self.codebook_dim)
        if self._sync_codebook():  # sums over ranks: every rank applies the global batch's update
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        state.cluster_size.data.lerp_(counts, 1.0 - state.decay)
        state.embed_avg.data.lerp_(sums, 1.0 - state.decay)
        state.update_ema()
        state.expire_codes_(x)

    def _sync_codebook(self) -> bool:
        """Whether this step sums codebook statistics over ranks (``QuantizerConfig.sync_codebook``).

        Decided per step: Lightning starts the process group after the model is built, so the library's
        choice at build time (``sync_codebook=None``) would never synchronise.
        """
        if world_size() == 1:
            return False
        return self.config.sync_codebook is not False

    def _eval_loss(self, z: Tensor, quantized: Tensor) -> Tensor:
        if self.config.kind != "vq":
            return z.new_zeros(())
        if self.config.cosine:
            z = F.normalize(z.unflatten(1, (self.num_codebooks, self.codebook_dim)), dim=2, eps=1e-6).flatten(
                1, 2
            )
        return F.mse_loss(quantized, z) * self.config.beta

    @torch.no_grad()
    def codes(self, z: Tensor) -> Tensor:
        """Inference look-up: (B, K*d, h, w) latent -> (B, K, h, w) long codes, fp32, no autocast."""
        self._check_latent(z)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            kind = self.config.kind
            if kind == "vq":
                return self._vq_codes(z)
            batch, _, height, width = z.shape
            if kind == "lfq":  # sign bits, most significant first, as the library packs them
                positive = (z.view(batch, self.num_codebooks, self.codebook_dim, height, width) > 0).long()
                return (positive * self.lfq_bits).sum(2)
            _, indices = self.impl(z)
            return indices.permute(0, 3, 1, 2).long()

    def _vq_codes(self, z: Tensor) -> Tensor:
        batch, _, height, width = z.shape
        num_k, dim = self.num_codebooks, self.codebook_dim
        # (B, K*d, h, w) -> (K, B*h*w, d), rows ordered like the library's
        x = z.reshape(batch, num_k, dim, height * width).permute(1, 0, 3, 2).reshape(num_k, -1, dim)
        if self.config.cosine:
            x = F.normalize(x, dim=-1, eps=1e-6)
        codes = self._lookup(x, self.impl.codebook.detach().float())
        return codes.view(num_k, batch, height, width).transpose(0, 1).contiguous()

    def _lookup(self, x: Tensor, codebook: Tensor) -> Tensor:
        """(K, N, d) features (already normalised for cosine), (K, V, d) codebook -> (K, N) best codes."""
        num_k, rows, _ = x.shape
        block = max(1, _LOOKUP_BLOCK_ELEMENTS // (num_k * self.codebook_size))
        if self.config.cosine:
            codebook_t = codebook.transpose(1, 2)
        codes = torch.empty(num_k, rows, dtype=torch.long, device=x.device)
        for start in range(0, rows, block):  # bounded memory for large batches
            part = x[:, start : start + block]
            scores = (
                torch.bmm(part, codebook_t) if self.config.cosine else -_euclidean_distance(part, codebook)
            )
            codes[:, start : start + block] = scores.argmax(-1)
        return codes

    def embed(self, codes: Tensor) -> Tensor:
        """Code vectors of a code grid: (B, K, h, w) long -> (B, K*d, h, w) fp32."""
        if codes.ndim != 4 or codes.shape[1] != self.num_codebooks or codes.is_floating_point():
            raise InputError(
                f"codes: expected an integer tensor (B, {self.num_codebooks}, h, w), got {tuple(codes.shape)} {codes.dtype}"
            )
        codes = codes.long()
        if self.config.kind != "vq":
            return self.impl.indices_to_codes(codes.permute(0, 2, 3, 1)).float()
        batch, num_k, height, width = codes.shape
        table = self.impl.codebook.reshape(num_k * self.codebook_size, self.codebook_dim)
        vectors = F.embedding(codes + self.code_offsets, table)  # (B, K, h, w, d)
        return vectors.permute(0, 1, 4, 2, 3).reshape(batch, num_k * self.codebook_dim, height, width)


def _euclidean_distance(x: Tensor, codebook: Tensor) -> Tensor:
    """(K, n, d), (K, V, d) -> (K, n, V) distances, computed exactly as vector_quantize_pytorch does."""
    x2 = (x**2).sum(-1)
    c2 = (codebook**2).sum(-1)
    xc = torch.einsum("bid,bjd->bij", x, codebook) * -2
    return (x2[:, :, None] + c2[:, None, :] + xc).clamp(min=1e-8).sqrt()


def _interleaved_ms(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Best time of each function in ms, timed in turn so that background load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {f"{name}_ms": min(values[1:]) for name, values in times.items()}


@torch.no_grad()
def benchmark_lookup(
    batch: int = 8,
    grid: int = 16,
    num_codebooks: int = 8,
    codebook_size: int = 4096,
    codebook_dim: int = 8,
    repeats: int = 10,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Time the inference look-up against a bare baseline and the library's eval forward.

    Baseline: ``(normalize(z) @ normalize(C).T).argmax(-1)`` on a latent already laid out as
    (K, B*h*w, d). Ours: :meth:`MultiCodebookQuantizer.codes` from the (B, K*d, h, w) latent.
    Library: ``VectorQuantize.forward`` in eval mode. Times are the best of ``repeats`` runs in
    milliseconds, the three timed in turn (robust to load from other processes).
    """
    device = torch.device(device)
    cfg = QuantizerConfig(num_codebooks=num_codebooks, codebook_size=codebook_size, codebook_dim=codebook_dim)
    quantizer = MultiCodebookQuantizer(cfg).to(device).eval()
    z = torch.randn(batch, cfg.latent_dim, grid, grid, device=device)
    z_rows = (
        z.reshape(batch, num_codebooks, codebook_dim, -1)
        .permute(1, 0, 3, 2)
        .reshape(num_codebooks, -1, codebook_dim)
    )
    z_rows = z_rows.contiguous()
    codebook = quantizer.codebook.detach().clone()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def baseline() -> Tensor:
        return (F.normalize(z_rows, dim=-1) @ F.normalize(codebook, dim=-1).transpose(1, 2)).argmax(-1)

    fns = {"baseline": baseline, "fast": lambda: quantizer.codes(z), "library": lambda: quantizer.impl(z)}
    results = _interleaved_ms(fns, repeats, sync)
    results["fast_over_baseline"] = results["fast_ms"] / results["baseline_ms"]
    results["library_over_baseline"] = results["library_ms"] / results["baseline_ms"]
    results.update(batch=batch, grid=grid, num_codebooks=num_codebooks, codebook_size=codebook_size)
    logger.info("quantizer look-up benchmark: %s", results)
    return results
