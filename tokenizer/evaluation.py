"""Reconstruction benchmark (DESIGN §7): run a tokenizer over a dataset, accumulate metrics per modality.

The library behind ``tools/eval_recon.py``; the quickstart and the benchmarks call it without Hydra::

    results = evaluate_reconstruction(tokenizer, dataset, batch_size=32)
    write_report(results, "out/eval", command="...")

Conventions (also written into every report):

* Reconstruction = ``decode_codes(encode_to_codes(x))``, clamped to [-1, 1]. On CUDA the encoder and decoder
  run under bf16 autocast (the code look-up is always fp32); every metric is computed in fp32 / fp64.
* PSNR and SSIM are computed on images mapped to [0, 1] with ``data_range = 1``. PSNR is the same as on
  [-1, 1] with range 2; SSIM is not (its luminance term is not shift-invariant), and [0, 1] is the usual
  convention (skimage on float images, most tokenizer papers). Both are means over images of per-image values.
* LPIPS (``lpips`` package, v0.1 heads) on the [-1, 1] images; its backbone is random unless weights are given.
* rFID: Fréchet distance between feature statistics of the originals and of their reconstructions, with the
  configured :class:`~tokenizer.metrics.FeatureExtractor`. FID is biased upwards for small n (noticeably below
  about 2048 images), so KID (unbiased, polynomial kernel) is reported beside it; compare rFID only at equal n.
* Codebook usage (fraction of the V entries used) and perplexity per sub-codebook, from every code of a group.
* Phantoms (a :class:`~tokenizer.data.phantoms.PhantomDataset`): the analytic reader's exact-match accuracy
  (modality and every finding right) on the originals and on the reconstructions, against the ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from tokenizer.data.datasets import BadRowTracker, collate_samples
from tokenizer.data.phantom_reader import read_phantom
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError
from tokenizer.metrics import (
    FeatureExtractor,
    FeatureExtractorConfig,
    FIDAccumulator,
    LPIPSMetric,
    build_feature_extractor,
    chroma_of,
    codebook_counts,
    codebook_stats_from_counts,
    psnr,
    ssim,
)
from tokenizer.model import ImageTokenizer

log = logging.getLogger(__name__)

RELIABLE_FID_IMAGES = 2048
"""Below this many images per group, rFID is flagged as biased in the report."""
UNKNOWN_MODALITY = "unknown"
"""Group name of images whose dataset names no modality."""
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class LPIPSConfig:
    """The LPIPS metric of a reconstruction benchmark."""

    enabled: bool = True
    """Compute LPIPS (off: the column is empty)."""
    net: str = "alex"
    """Backbone: "alex", "vgg" or "squeeze"."""
    weights: str | None = None
    """Safetensors / plain-tensor file with the backbone (or full LPIPS) weights; None = random backbone."""

    def __post_init__(self) -> None:
        if self.net not in ("alex", "vgg", "squeeze"):
            raise InputError(f"LPIPSConfig.net: expected 'alex', 'vgg' or 'squeeze', got {self.net!r}")


@dataclass
class GroupMetrics:
    """Metrics of one group of images (a modality, or all of them); None where not computable."""

    n: int
    """Images in the group."""
    psnr: float
    """Mean per-image PSNR in dB ([0, 1] images, data range 1)."""
    psnr_std: float
    ssim: float
    """Mean per-image SSIM ([0, 1] images, data range 1, Gaussian 11×11 window, σ 1.5)."""
    ssim_std: float
    lpips: float | None
    """Mean per-image LPIPS distance (lower is better)."""
    rfid: float | None
    """FID between originals and reconstructions (needs n ≥ 2; biased for small n)."""
    kid: float | None
    """Unbiased KID (mean over subsets of min(1000, n) images)."""
    kid_std: float | None
    codebook_usage: list[float]
    """(K,) fraction of each sub-codebook's entries used by the group's codes."""
    codebook_perplexity: list[float]
    """(K,) perplexity of each sub-codebook's code histogram (V when uniform)."""
    reader_accuracy_original: float | None = None
    """Phantoms: fraction of originals the analytic reader reads exactly right."""
    reader_accuracy_reconstruction: float | None = None
    """Phantoms: the same on the reconstructions."""
    reader_agreement: float | None = None
    """Phantoms: fraction of images whose reconstruction reads exactly like the original."""
    gray_tint: float | None = None
    """Grayscale originals stored in 3 equal channels: mean |channel - mean of channels| of the reconstruction,
    [0, 1] units (0 = no colour cast); None when the group has no such image."""


@dataclass
class ReconResults:
    """What :func:`evaluate_reconstruction` measured."""

    overall: GroupMetrics
    per_modality: dict[str, GroupMetrics]
    """Modality name -> metrics, sorted by name."""
    num_bad: int
    """Rows that were skipped (unreadable files, bad manifest lines)."""
    bad_examples: list[str]
    """Reasons of the first few skipped rows."""
    settings: dict[str, Any]
    """How the numbers were made: conventions, networks and whether their weights are random, device."""
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    """Modality -> (originals, reconstructions), each (n ≤ num_grid, C, H, W) float in [-1, 1] on CPU."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no image tensors); non-finite numbers become None."""
        return finite_json(
            {
                "settings": self.settings,
                "num_images": self.overall.n,
                "num_bad": self.num_bad,
                "bad_examples": self.bad_examples,
                "overall": dataclasses.asdict(self.overall),
                "per_modality": {k: dataclasses.asdict(v) for k, v in self.per_modality.items()},
            }
        )


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by None, recursively: valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


class _Group:
    """Running per-image values, features and code histogram of one group."""

    def __init__(self, num_codebooks: int, codebook_size: int) -> None:
        self.psnr: list[torch.Tensor] = []
        self.ssim: list[torch.Tensor] = []
        self.lpips: list[torch.Tensor] = []
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []
        self.reader: list[tuple[bool, bool, bool]] = []
        self.tint: list[torch.Tensor] = []
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long)

    @classmethod
    def merged(cls, groups: list[_Group]) -> _Group:
        out = cls(*groups[0].counts.shape)
        for g in groups:
            for name in ("psnr", "ssim", "lpips", "real", "fake", "reader", "tint"):
                getattr(out, name).extend(getattr(g, name))
            out.counts += g.counts
        return out

    def finish(self, kid_subsets: int) -> GroupMetrics:
        p, s = torch.cat(self.psnr), torch.cat(self.ssim)
        n = len(p)
        rfid = kid_mean = kid_std = None
        if self.real and n >= 2:
            fid = FIDAccumulator(keep_features=True)
            fid.update(torch.cat(self.real), real=True)
            fid.update(torch.cat(self.fake), real=False)
            rfid = fid.compute()
            kid_mean, kid_std = fid.kid(num_subsets=kid_subsets, subset_size=min(1000, n))
        stats = codebook_stats_from_counts(self.counts)
        reader = np.array(self.reader, dtype=np.float64).reshape(-1, 3)
        accuracy = reader.mean(0).tolist() if len(reader) else [None] * 3
        tint = torch.cat(self.tint) if self.tint else torch.zeros(0)
        tint = tint[tint.isfinite()]
        return GroupMetrics(
            n=n,
            psnr=float(p.mean()),
            psnr_std=float(p.std(unbiased=False)),
            ssim=float(s.mean()),
            ssim_std=float(s.std(unbiased=False)),
            lpips=float(torch.cat(self.lpips).mean()) if self.lpips else None,
            rfid=rfid,
            kid=kid_mean,
            kid_std=kid_std,
            codebook_usage=stats.usage.tolist(),
            codebook_perplexity=stats.perplexity.tolist(),
            reader_accuracy_original=accuracy[0],
            reader_accuracy_reconstruction=accuracy[1],
            reader_agreement=accuracy[2],
            gray_tint=float(tint.mean()) if len(tint) else None,
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / "auto" -> CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _limited(dataset: Dataset, max_images: int | None) -> Dataset:
    if max_images is None or isinstance(dataset, IterableDataset) or max_images >= len(dataset):
        return dataset
    return Subset(dataset, range(max_images))


def _reconstruct(tokenizer: ImageTokenizer, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) in [-1, 1] -> (codes (B, K, h, w), reconstruction (B, C, H, W) fp32 in [-1, 1])."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        codes = tokenizer.encode_to_codes(x)  # the look-up itself always runs in fp32
        rec = tokenizer.decode_codes(codes)
    return codes, rec.float().clamp(-1, 1)


class _Evaluation:
    """The running state of one benchmark: networks, per-modality groups, grids, bad-row count."""

    def __init__(self, tokenizer, feature_net, lpips_net, truth, bf16, num_grid, tracker) -> None:
        self.tokenizer, self.feature_net, self.lpips_net = tokenizer, feature_net, lpips_net
        self.truth, self.bf16, self.num_grid, self.tracker = truth, bf16, num_grid, tracker
        self.groups: dict[str, _Group] = {}
        self.grids: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add(self, x: torch.Tensor, modalities: list[str], indices: list[int]) -> None:
        """Reconstruct and measure one batch x (B, C, H, W) in [-1, 1] of the given modalities."""
        codes, rec = _reconstruct(self.tokenizer, x, self.bf16)
        x01, r01 = (x + 1) / 2, (rec + 1) / 2
        per_image = {"psnr": psnr(r01, x01, 1.0).cpu(), "ssim": ssim(r01, x01, 1.0).cpu()}
        if self.lpips_net is not None:
            per_image["lpips"] = self.lpips_net(rec, x).float().cpu()
        per_image["real"], per_image["fake"] = self.feature_net(x).cpu(), self.feature_net(rec).cpu()
        if x.shape[1] == 3:
            gray = (x.amax(1) - x.amin(1)).flatten(1).amax(1) < 1e-3
            tint = chroma_of(r01.float()).abs().mean(dim=(1, 2, 3))
            per_image["tint"] = torch.where(gray, tint, torch.nan).cpu()
        reads = _reader_hits(x01.cpu(), r01.cpu(), indices, self.truth) if self.truth else None
        q = self.tokenizer.config.quantizer
        for name in dict.fromkeys(modalities):
            rows = [i for i, m in enumerate(modalities) if m == name]
            where = torch.tensor(rows)
            group = self.groups.setdefault(name, _Group(q.num_codebooks, q.codebook_size))
            for key, values in per_image.items():
                getattr(group, key).append(values[where])
            group.counts += codebook_counts(codes[where.to(codes.device)], q.codebook_size).cpu()
            if reads is not None:
                group.reader.extend(reads[i] for i in rows)
            originals, reconstructions = self.grids.setdefault(name, ([], []))
            room = self.num_grid - sum(len(t) for t in originals)
            if room > 0:
                originals.append(x[where[:room].to(x.device)].cpu())
                reconstructions.append(rec[where[:room].to(x.device)].cpu())

    def results(self, kid_subsets: int, seconds: float, device: torch.device) -> ReconResults:
        if not self.groups:
            raise InputError(f"evaluate_reconstruction: no usable image ({self.tracker.summary()})")
        names = sorted(self.groups)
        overall = _Group.merged([self.groups[n] for n in names]).finish(kid_subsets)
        log.info("evaluated %d images in %.1f s; %s", overall.n, seconds, self.tracker.summary())
        cfg, q = self.tokenizer.config, self.tokenizer.config.quantizer
        lpips_text = self.lpips_net.description if self.lpips_net is not None else None
        settings = {
            "tokenizer": {
                "architecture": cfg.architecture,
                "image_size": cfg.preprocess.image_size,
                "channels": cfg.preprocess.channels,
                "quantizer": q.kind,
                "num_codebooks": q.num_codebooks,
                "codebook_size": q.codebook_size,
                "codebook_dim": q.codebook_dim,
                "grid": list(self.tokenizer.grid),
            },
            "psnr_ssim": "reconstructions clamped to [-1, 1]; images mapped to [0, 1], data_range=1",
            "features": self.feature_net.description,
            "features_random": "random" in self.feature_net.description.lower(),
            "lpips": lpips_text,
            "lpips_random": None if lpips_text is None else "random" in lpips_text.lower(),
            "fid_reliable": overall.n >= RELIABLE_FID_IMAGES,
            "device": str(device),
            "autocast": "bf16 (encoder / decoder only)" if self.bf16 else "fp32",
            "seconds": round(seconds, 2),
            "images_per_second": round(overall.n / seconds, 2) if seconds > 0 else None,
        }
        return ReconResults(
            overall=overall,
            per_modality={name: self.groups[name].finish(kid_subsets) for name in names},
            num_bad=self.tracker.num_bad,
            bad_examples=[f"{src or idx}: {why}" for idx, src, why in self.tracker.examples],
            settings=settings,
            grids={m: (torch.cat(o), torch.cat(r)) for m, (o, r) in sorted(self.grids.items())},
        )


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: ImageTokenizer,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    features: FeatureExtractorConfig | FeatureExtractor | None = None,
    lpips: LPIPSConfig | LPIPSMetric | None = None,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    num_workers: int = 0,
    num_grid: int = 8,
    kid_subsets: int = 100,
    max_bad_fraction: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> ReconResults:
    """Reconstruct every image of ``dataset`` and measure it (see the module docstring for conventions).

    Args:
        tokenizer: the model; moved to ``device`` and put in eval mode for the run (its mode is restored).
        dataset: items ``{"image": (C, H, W) in [-1, 1], "modality", "index", ...}`` or ``BadSample``
            (the datasets of :func:`tokenizer.data.datamodule.build_dataset`); read in order, unshuffled.
        batch_size: images per forward pass.
        features: FID feature network (config or built); None = the "random" network (weights random).
        lpips: LPIPS metric (config or built); None = LPIPS with a random AlexNet backbone;
            ``LPIPSConfig(enabled=False)`` skips it.
        max_images: evaluate the first ``max_images`` images only.
        device: "cuda", "cpu", ...; None / "auto" = CUDA when present.
        precision: "auto" (bf16 around the encoder / decoder on CUDA, else fp32), "bf16" or "fp32".
        num_workers: DataLoader worker processes.
        num_grid: images per modality kept in ``ReconResults.grids``.
        kid_subsets: random subsets averaged by KID.
        max_bad_fraction: fail when more than this fraction of rows is unusable (1.0 = never).
        progress: called after every batch with the number of rows it consumed (good and bad).

    Raises:
        InputError: no usable image, or too many bad rows.
    """
    if max_images is not None and max_images < 1 or batch_size < 1:
        raise InputError(f"need batch_size >= 1 and max_images >= 1 or None, got {batch_size}, {max_images}")
    device = resolve_device(device)
    bf16 = _use_bf16(precision, device)
    lpips_net = _build_lpips(lpips)
    tracker = BadRowTracker(max_bad_fraction)
    tracker.update(0, [*getattr(dataset, "bad_rows", []), *getattr(dataset, "skipped", [])])
    phantoms = isinstance(dataset, PhantomDataset) and dataset.size >= 32  # the reader needs >= 32 px
    truth = dataset.phantom if phantoms else None
    run = _Evaluation(
        tokenizer,
        build_features(features).to(device),
        lpips_net.to(device) if lpips_net is not None else None,
        truth,
        bf16,
        num_grid,
        tracker,
    )
    pre = tokenizer.config.preprocess
    shape = (pre.channels, pre.image_size, pre.image_size)
    loader = DataLoader(
        _limited(dataset, max_images),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_samples, image_shape=shape),
    )
    was_training, seen, start = tokenizer.training, 0, time.perf_counter()
    tokenizer.to(device).eval()
    try:
        for batch in loader:
            if max_images is not None and seen >= max_images:
                break
            keep = len(batch["index"]) if max_images is None else min(len(batch["index"]), max_images - seen)
            seen += keep
            tracker.update(keep, batch["bad"])
            if keep:
                x = batch["image"][:keep].to(device).float()
                run.add(
                    x,
                    [m or UNKNOWN_MODALITY for m in batch["modality"][:keep]],
                    batch["index"][:keep].tolist(),
                )
            if progress is not None:
                progress(keep + len(batch["bad"]))
    finally:
        tokenizer.train(was_training)
    return run.results(kid_subsets, time.perf_counter() - start, device)


def build_features(features: FeatureExtractorConfig | FeatureExtractor | None) -> FeatureExtractor:
    """A built feature network as it is, or one built from its config (None: the random one), in eval mode."""
    if isinstance(features, FeatureExtractor):
        return features.eval()
    return build_feature_extractor(features or FeatureExtractorConfig())


def _build_lpips(lpips: LPIPSConfig | LPIPSMetric | None) -> LPIPSMetric | None:
    if isinstance(lpips, LPIPSMetric):
        return lpips.eval()
    cfg = lpips or LPIPSConfig()
    return LPIPSMetric(cfg.net, cfg.weights).eval() if cfg.enabled else None


def _reader_hits(
    x01: torch.Tensor, r01: torch.Tensor, indices: list[int], truth: Callable
) -> list[tuple[bool, bool, bool]]:
    """Per image: (original read right, reconstruction read right, both read the same)."""
    hits = []
    for original, reconstruction, index in zip(x01, r01, indices, strict=True):
        phantom = truth(index)
        expected = (phantom.modality, phantom.findings)
        read_original, read_reconstruction = (
            read_phantom(original.numpy()),
            read_phantom(reconstruction.numpy()),
        )
        hits.append(
            (read_original == expected, read_reconstruction == expected, read_original == read_reconstruction)
        )
    return hits


# ------------------------------------------------------------------------------------------------ report
def _safe_name(modality: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", modality) or UNKNOWN_MODALITY


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _row(name: str, m: GroupMetrics, codebook_size: int) -> str:
    kid = "–" if m.kid is None else f"{m.kid:.4g} ± {_fmt(m.kid_std, '.2g')}"
    usage, perplexity = np.array(m.codebook_usage), np.array(m.codebook_perplexity)
    reader = "–"
    if m.reader_accuracy_original is not None:
        reader = f"{m.reader_accuracy_original:.1%} → {m.reader_accuracy_reconstruction:.1%}"
    cells = [
        name,
        str(m.n),
        f"{_fmt(m.psnr, '.2f')} ± {_fmt(m.psnr_std, '.2f')}",
        f"{_fmt(m.ssim, '.4f')} ± {_fmt(m.ssim_std, '.3f')}",
        _fmt(m.lpips, ".4f"),
        _fmt(m.rfid, ".4g"),
        kid,
        f"{usage.mean():.1%} / {usage.min():.1%}",
        f"{perplexity.mean():.1f} / {codebook_size}",
        reader,
        _fmt(m.gray_tint, ".4f"),
    ]
    return "| " + " | ".join(cells) + " |"


_HEADER = (
    "| modality | n | PSNR (dB) | SSIM | LPIPS | rFID | KID | codebook usage (mean / min) "
    "| perplexity (mean / V) | reader exact match (orig → recon) | gray tint |"
)


def markdown_report(results: ReconResults, command: str) -> str:
    """The Markdown page of :func:`write_report`: command, table (one row per modality + overall), notes."""
    s, overall = results.settings, results.overall
    t = s["tokenizer"]
    lines = ["# Reconstruction benchmark", "", "```", command, "```", "", _HEADER, "|---" * 11 + "|"]
    lines += [_row(name, m, t["codebook_size"]) for name, m in results.per_modality.items()]
    lines += [_row("**overall**", overall, t["codebook_size"]), "", "Per sub-codebook (overall):", ""]
    lines += ["| k | usage | perplexity |", "|---|---|---|"]
    pairs = zip(overall.codebook_usage, overall.codebook_perplexity, strict=True)
    lines += [f"| {k} | {u:.1%} | {p:.1f} |" for k, (u, p) in enumerate(pairs)]
    bias = (
        "" if s["fid_reliable"] else f" (here n = {overall.n}: compare rFID only at equal n; KID is unbiased)"
    )
    skipped = f" (e.g. {'; '.join(results.bad_examples[:3])})" if results.bad_examples else ""
    lines += [
        "",
        "Notes:",
        f"- Tokenizer: {t['architecture']}, {t['image_size']}² × {t['channels']} ch, {t['quantizer']} "
        f"K={t['num_codebooks']} × V={t['codebook_size']} × d={t['codebook_dim']}, grid {t['grid']}.",
        f"- PSNR / SSIM: {s['psnr_ssim']}; mean ± std over images. SSIM: Gaussian 11×11 window, σ 1.5.",
        f"- LPIPS: {s['lpips'] or 'not computed'}.",
        f"- rFID / KID features: {s['features']}{' — RANDOM weights' if s['features_random'] else ''}.",
        f"- rFID is biased upwards below {RELIABLE_FID_IMAGES} images per group{bias}.",
        "- KID: mean ± std over random subsets of min(1000, n) images (n ≤ 1000: every subset is all images).",
        "- Reader (phantoms only): the analytic reader's exact match of modality and all findings with the truth.",
        "- Gray tint: on grayscale originals, mean |channel − mean of channels| of the reconstruction ([0, 1]; 0 = none).",
        f"- Rows skipped: {results.num_bad}{skipped}.",
        f"- {s['device']}, {s['autocast']}, {s['seconds']} s ({s['images_per_second']} images/s).",
        "",
    ]
    return "\n".join(lines)


def _error_map(x: torch.Tensor, rec: torch.Tensor, vmax: float) -> torch.Tensor:
    """Mean absolute error over channels in [0, 1] units, coloured (inferno) on [0, vmax] -> (n, 3, H, W)."""
    from matplotlib import colormaps

    err = ((rec - x).abs() / 2).mean(1).clamp(0, vmax) / vmax
    rgb = colormaps["inferno"](err.numpy())[..., :3]
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def _upscale(images: torch.Tensor, min_side: int = 128) -> torch.Tensor:
    """Nearest-neighbour enlargement of small images for viewing (whole factors only)."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else images


def write_report(
    results: ReconResults, out_dir: str | Path, command: str, *, error_vmax: float = 0.1
) -> Path:
    """Write ``metrics.json``, ``metrics.md``, ``recon_<modality>.png`` (originals over reconstructions)
    and ``error_<modality>.png`` (absolute error, inferno colour map on [0, ``error_vmax``] in [0, 1] units).

    Returns: ``out_dir``.
    """
    from torchvision.utils import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": command, **results.to_dict()}
    data["settings"]["error_map_scale"] = f"inferno, 0 to {error_vmax} (abs error, [0, 1] units)"
    (out / "metrics.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    text = markdown_report(results, command)
    text += "Grids: `recon_<modality>.png` (originals over reconstructions), `error_<modality>.png` "
    text += f"(|error| in [0, 1] units, inferno colour map, 0 black to ≥ {error_vmax} yellow).\n"
    (out / "metrics.md").write_text(text)
    for modality, (x, rec) in results.grids.items():
        name = _safe_name(modality)
        pair = torch.cat([x, rec]).add(1).div(2).clamp(0, 1)
        save_image(_upscale(pair), out / f"recon_{name}.png", nrow=len(x), padding=2, pad_value=1.0)
        errors = _error_map(x, rec, error_vmax)
        save_image(_upscale(errors), out / f"error_{name}.png", nrow=len(x), padding=2, pad_value=1.0)
    return out
