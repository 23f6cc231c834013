"""Reconstruction and generation metrics (DESIGN §7).

Images are float tensors (B, C, H, W) in [-1, 1], the tokenizer's range: pass ``data_range=2.0``
to :func:`psnr` / :func:`ssim` for them (``1.0`` for images in [0, 1]). FID / KID / precision–recall
work on features from a pluggable :class:`FeatureExtractor` ("inception", "dinov2", "clip",
"random"), each of which applies its own resize and normalisation to [-1, 1] inputs.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizer.alignment import TeacherConfig, build_vision_teacher
from tokenizer.distributed import world_size
from tokenizer.errors import InputError
from tokenizer.frozen import seeded

log = logging.getLogger(__name__)


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim not in (3, 4):
        raise InputError(
            f"{what}: expected two (B, C, H, W) or (C, H, W) images of one shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return (x[None], y[None]) if x.ndim == 3 else (x, y)


def chroma_of(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> each channel minus the mean over channels: zero everywhere for a grayscale image."""
    return images - images.mean(dim=1, keepdim=True)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10·log10(R² / MSE), in dB.

    Args:
        x, y: (B, C, H, W) or (C, H, W) images.
        data_range: R = max − min of the image range: 2.0 for [-1, 1], 1.0 for [0, 1].
    Returns: (B,) float64; ``inf`` for identical images.
    """
    x, y = _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004), averaged over channels.

    Gaussian window (11, σ 1.5), K1 0.01, K2 0.03, population covariances, statistics over
    positions where the window fits: equal to ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R, channel_axis=0)``.

    Args:
        x, y: (B, C, H, W) or (C, H, W) images, H and W ≥ ``window_size``.
        data_range: 2.0 for [-1, 1] images, 1.0 for [0, 1].
    Returns: (B,) float64.
    """
    x, y = _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < window_size:
        raise InputError(
            f"ssim: images must be at least {window_size} px on each side, got {tuple(x.shape[-2:])}"
        )
    b, c = x.shape[:2]
    g = _gaussian_window(window_size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # "valid": the border skimage crops away

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _rgb(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(f"{what}: expected (B, 1 or 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1)


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a plain-tensor PyTorch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle naming any code is refused here, never run
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{path}: not a plain tensor file ({type(err).__name__}: {first})") from None


class LPIPSMetric(nn.Module):
    """LPIPS distance (``lpips`` package, v0.1) between images in [-1, 1]; lower is more similar.

    The linear heads are the calibrated ones shipped inside the ``lpips`` package. The backbone
    (``net``: "alex", "vgg" or "squeeze") is random unless ``weights`` names a safetensors file with
    either the full LPIPS state dict or the torchvision backbone's ``features.*`` tensors; a random backbone
    is drawn from ``seed``, so its figures compare across runs (they are not comparable to real LPIPS).
    """

    def __init__(self, net: str = "alex", weights: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        import lpips

        if net not in ("alex", "vgg", "squeeze"):
            raise InputError(f"LPIPSMetric.net: expected 'alex', 'vgg' or 'squeeze', got {net!r}")
        with warnings.catch_warnings(), seeded(seed):  # lpips builds torchvision nets with pretrained=False
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False).eval()
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        self._load(torch.load(heads, map_location="cpu", weights_only=True), str(heads))
        if weights is not None:
            self._load(self._backbone_keys(_load_state_dict(weights)), str(weights))
        self.model.requires_grad_(False)
        self.description = f"LPIPS {net}, backbone {weights if weights else 'RANDOM'}"

    def _backbone_keys(self, state: dict) -> dict:
        """Map torchvision ``features.{i}.*`` keys onto LPIPS's ``net.slice{k}.{i}.*``; others pass."""
        where = {idx: sl for sl, mod in self.model.net.named_children() for idx, _ in mod.named_children()}
        out = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and parts[1] in where:
                key = ".".join(["net", where[parts[1]], *parts[1:]])
            out[key] = value
        return out

    def _load(self, state: dict, source: str) -> None:
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise InputError(f"{source}: tensors {result.unexpected_keys[:5]} do not belong to LPIPS")

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, C, H, W) in [-1, 1], C in {1, 3} → (B,) distances."""
        x, y = _check_pair(x, y, "lpips")
        return self.model(_rgb(x.float(), "lpips"), _rgb(y.float(), "lpips")).flatten()


# ---------------------------------------------------------------------------------------------- features
@dataclass
class FeatureExtractorConfig:
    """The network whose features FID / KID / precision–recall compare."""

    kind: str = "random"
    """"inception" (torch-fidelity InceptionV3, 2048-d), "dinov2" (timm), "clip" (open_clip) or "random"."""
    weights: str | None = None
    """inception: a local weights file (required); dinov2 / clip: as ``TeacherConfig.pretrained``."""
    name: str | None = None
    """dinov2 / clip model name; None = vit_small_patch14_dinov2.lvd142m / ViT-B-16."""
    image_size: int | None = None
    """dinov2 / clip input size; None = 224 for dinov2, the model's own for clip."""
    seed: int = 0
    """Seed of random weights (the "random" net, and dinov2 / clip without weights)."""

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_EXTRACTORS:
            raise InputError(
                f"FeatureExtractorConfig.kind: expected one of {tuple(FEATURE_EXTRACTORS)}, got {self.kind!r}"
            )
        if self.kind == "inception" and self.weights is None:
            raise InputError(
                "FeatureExtractorConfig.weights: 'inception' needs a local weights file "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
            )


class FeatureExtractor(nn.Module):
    """Frozen network: images (B, C, H, W) in [-1, 1], C in {1, 3} → (B, D) float32 features."""

    feature_dim: int
    description: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(_rgb(x, self.description)).float()


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's InceptionV3 (TF-FID compatible) 2048-d pool features, weights from a local file."""

    def __init__(self, cfg: FeatureExtractorConfig) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity unpickles its path without weights_only: hand it tensors we loaded safely
        buffer = io.BytesIO()
        torch.save(_load_state_dict(cfg.weights), buffer)
        buffer.seek(0)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer
        )
        self.feature_dim, self.description = 2048, f"inception-v3-compat ({cfg.weights})"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        as_uint8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # what the network expects
        return self.net(as_uint8)[0]


class TowerFeatures(FeatureExtractor):
    """Unnormalised global features of a timm (DINOv2) or open_clip (CLIP / BiomedCLIP) image tower."""

    def __init__(self, cfg: FeatureExtractorConfig) -> None:
        super().__init__()
        if cfg.kind == "dinov2":
            teacher = TeacherConfig(
                "timm",
                cfg.name or "vit_small_patch14_dinov2.lvd142m",
                cfg.weights,
                cfg.image_size or 224,
                seed=cfg.seed,
            )
        else:
            teacher = TeacherConfig(
                "open_clip", cfg.name or "ViT-B-16", cfg.weights, cfg.image_size, seed=cfg.seed
            )
        self.tower = build_vision_teacher(teacher)
        self.feature_dim, self.description = self.tower.embed_dim, f"{cfg.kind}: {self.tower.description}"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower.features(x)


class RandomFeatures(FeatureExtractor):
    """A small fixed-seed random conv net (tests): channel means and stds of three conv stages, 96-d."""

    def __init__(self, cfg: FeatureExtractorConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        shapes = [(16, 3), (32, 16), (48, 32)]
        self.weights = nn.ParameterList(
            [
                nn.Parameter(torch.randn(o, i, 3, 3, generator=g) / math.sqrt(9 * i), requires_grad=False)
                for o, i in shapes
            ]
        )
        self.feature_dim, self.description = 96, f"random conv net (seed {cfg.seed})"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x.float(), size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        for w in self.weights:
            h = F.gelu(F.conv2d(h, w, stride=2, padding=1))
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1)


FEATURE_EXTRACTORS = {
    "inception": InceptionFeatures,
    "dinov2": TowerFeatures,
    "clip": TowerFeatures,
    "random": RandomFeatures,
}


def build_feature_extractor(cfg: FeatureExtractorConfig) -> FeatureExtractor:
    """The frozen feature network named by ``cfg.kind``."""
    extractor = FEATURE_EXTRACTORS[cfg.kind](cfg).eval()
    log.info("FID features: %s (%d-d)", extractor.description, extractor.feature_dim)
    return extractor


# ------------------------------------------------------------------------------------------- FID / KID / PR
def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½, in float64.

    The trace term uses symmetric eigendecompositions (negative eigenvalues of round-off clipped to
    0), which stays real and stable where ``scipy.linalg.sqrtm(Σ1 Σ2)`` can turn complex.
    """
    mu1, mu2, s1, s2 = (
        torch.as_tensor(np.asarray(t), dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2)
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise InputError(
            f"frechet_distance: mismatched statistics {tuple(mu1.shape)}, {tuple(s1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    root = _sqrt_psd(s1)
    inner = root @ s2 @ root
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def _features_2d(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise InputError(f"{what}: expected (N, D) features, got shape {tuple(x.shape)}")
    return x.detach().double().cpu()


def kid(
    real, fake, num_subsets: int = 100, subset_size: int | None = None, seed: int = 2020
) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD² with the cubic kernel (x·y/D + 1)³, over random subsets.

    Subsets are drawn as torch-fidelity draws them (fake first, ``np.random.RandomState(seed)``), so
    the values equal ``torch_fidelity``'s ``kid_features_to_metric(fake, real)``.

    Args:
        real, fake: (N, D) features. subset_size: None = min(1000, N_real, N_fake).
    Returns: (mean, std) over the subsets.
    """
    real, fake = _features_2d(real, "kid real"), _features_2d(fake, "kid fake")
    n = subset_size or min(1000, len(real), len(fake))
    if n < 2 or n > min(len(real), len(fake)):
        raise InputError(f"kid: subset_size {n} must be in [2, min(N_real={len(real)}, N_fake={len(fake)})]")
    rng, dim, values = np.random.RandomState(seed), real.shape[1], []
    for _ in range(num_subsets):
        f = fake[torch.from_numpy(rng.choice(len(fake), n, replace=False))]
        r = real[torch.from_numpy(rng.choice(len(real), n, replace=False))]
        k_ff, k_rr, k_fr = ((a @ b.T / dim + 1) ** 3 for a, b in ((f, f), (r, r), (f, r)))
        within = (k_ff.sum() - k_ff.diagonal().sum() + k_rr.sum() - k_rr.diagonal().sum()) / (n * (n - 1))
        values.append(float(within - 2 * k_fr.sum() / (n * n)))
    return float(np.mean(values)), float(np.std(values))


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of fake samples inside the ball of some real sample (radius = distance to
    its k-th nearest real neighbour); recall: the same with real and fake swapped.
    """
    real, fake = _features_2d(real, "precision_recall real"), _features_2d(fake, "precision_recall fake")
    if min(len(real), len(fake)) <= k:
        raise InputError(
            f"precision_recall: need more than k={k} samples per side, got {len(real)} and {len(fake)}"
        )
    radius_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    radius_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    fake_to_real = torch.cdist(fake, real)
    precision = (fake_to_real <= radius_real[None]).any(1).double().mean()
    recall = (radius_fake[None] >= fake_to_real.T).any(1).double().mean()
    return float(precision), float(recall)


class _Moments:
    """Count, mean and centred scatter matrix of a stream of rows, float64 (Chan et al. merge)."""

    def __init__(self) -> None:
        self.n, self.mean, self.scatter = 0, None, None

    def add(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if self.n == 0:
            self.n, self.mean, self.scatter = n, mean.clone(), scatter.clone()
            return
        total = self.n + n
        delta = mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.n * n / total)
        self.mean += delta * (n / total)
        self.n = total

    def add_rows(self, x: torch.Tensor) -> None:
        mean = x.mean(0)
        centred = x - mean
        self.add(len(x), mean, centred.T @ centred)

    def covariance(self) -> torch.Tensor:
        return self.scatter / (self.n - 1)


class FIDAccumulator:
    """Streaming FID between real and fake feature sets (+ KID and precision–recall when kept).

    ``update(features, real=...)`` adds (B, D) features of either set; the mean and covariance are
    accumulated in float64 with a numerically stable merge, so any number of batches fits in
    O(D²) memory. ``keep_features=True`` also keeps the rows for :meth:`kid` / :meth:`precision_recall`.
    Under torch.distributed, call :meth:`sync` once on every rank before computing.
    """

    def __init__(self, keep_features: bool = False) -> None:
        self.keep_features = keep_features
        self.reset()

    def reset(self) -> None:
        self._moments = {True: _Moments(), False: _Moments()}
        self._rows: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def num_samples(self, real: bool) -> int:
        return self._moments[real].n

    def update(self, features: torch.Tensor, *, real: bool) -> None:
        """Add (B, D) features of real (``real=True``) or generated / reconstructed images."""
        x = _features_2d(features, "FIDAccumulator.update")
        widths = {m.mean.numel() for m in self._moments.values() if m.n}
        if widths and widths != {x.shape[1]}:
            raise InputError(
                f"FIDAccumulator.update: features of width {x.shape[1]}, earlier ones {widths.pop()}"
            )
        self._moments[real].add_rows(x)
        if self.keep_features:
            self._rows[real].append(x.float())

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), covariance (D, D)) of one set, float64, covariance normalised by N − 1."""
        m = self._moments[real]
        if m.n < 2:
            raise InputError(f"FID: need at least 2 {'real' if real else 'fake'} samples, got {m.n}")
        return m.mean.numpy(), m.covariance().numpy()

    def compute(self) -> float:
        """FID between everything added so far."""
        return frechet_distance(*self.statistics(True), *self.statistics(False))

    def _kept(self, real: bool) -> torch.Tensor:
        if not self.keep_features:
            raise InputError("FIDAccumulator: KID and precision/recall need keep_features=True")
        return torch.cat(self._rows[real])

    def kid(self, **kwargs) -> tuple[float, float]:
        """:func:`kid` on the kept features."""
        return kid(self._kept(True), self._kept(False), **kwargs)

    def precision_recall(self, k: int = 3) -> tuple[float, float]:
        """:func:`precision_recall` on the kept features."""
        return precision_recall(self._kept(True), self._kept(False), k)

    def sync(self) -> None:
        """Merge the statistics (and kept features) of all ranks: once, on every rank, before computing."""
        if world_size() == 1:
            return
        for real, mine in self._moments.items():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (mine.n, mine.mean, mine.scatter, self._rows[real]))
            merged, rows = _Moments(), []
            for n, mean, scatter, kept in parts:
                if n:
                    merged.add(n, mean, scatter)
                rows.extend(kept)
            self._moments[real], self._rows[real] = merged, rows


# ---------------------------------------------------------------------------------------------- codebooks
class CodebookStats(NamedTuple):
    """Per sub-codebook statistics of a set of codes."""

    usage: torch.Tensor
    """(K,) fraction of the V entries used at least once."""
    perplexity: torch.Tensor
    """(K,) exp of the entropy of the code histogram (V when uniform, 1 when one code)."""
    counts: torch.Tensor
    """(K, V) code histogram."""


def codebook_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes (N, K, ...) integer in [0, V) → (K, V) int64 histogram per sub-codebook."""
    if codes.ndim < 2 or codes.dtype.is_floating_point:
        raise InputError(
            f"codebook stats: expected integer codes (N, K, ...), got {codes.dtype} {tuple(codes.shape)}"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise InputError(
            f"codebook stats: codes must lie in [0, {codebook_size}), got "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    per_k = codes.transpose(0, 1).reshape(codes.shape[1], -1).long()
    offsets = torch.arange(codes.shape[1], device=codes.device)[:, None] * codebook_size
    flat = torch.bincount((per_k + offsets).flatten(), minlength=codes.shape[1] * codebook_size)
    return flat.view(codes.shape[1], codebook_size)


def codebook_stats_from_counts(counts: torch.Tensor) -> CodebookStats:
    """Usage and perplexity from a (K, V) histogram (e.g. summed over batches)."""
    counts = counts.double()
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    return CodebookStats((counts > 0).double().mean(1), entropy.exp(), counts.long())


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> CodebookStats:
    """Usage fraction and perplexity per sub-codebook of codes (N, K, ...) with V = ``codebook_size``."""
    return codebook_stats_from_counts(codebook_counts(codes, codebook_size))
