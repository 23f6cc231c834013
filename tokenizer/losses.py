"""Tokenizer training losses: reconstruction (L1 + L2 + LPIPS), hinge GAN, adaptive GAN weight.

Defaults follow MedITok: 0.2 L1 + 1.0 L2 + 1.0 LPIPS + 1.0 VQ + adaptive hinge GAN (VQGAN
gradient-norm ratio clamped to [0.015, 1e4], x 0.4, linear warm-up) + lambda contrastive
(0.1 against the vision teacher, 1.0 against the text encoder).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lpips
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.errors import InputError
from tokenizer.metrics import chroma_of

# torchvision VGG16 ``features`` index -> LPIPS slice holding it (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_VGG_SLICE_STARTS = (0, 4, 9, 16, 23, 30)
_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_PACKAGE_LIN_WEIGHTS = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


@dataclass
class LossConfig:
    """Weights and schedule of the tokenizer losses (MedITok values by default)."""

    l1_weight: float = 0.2
    """Weight of the mean absolute pixel error."""
    l2_weight: float = 1.0
    """Weight of the mean squared pixel error."""
    chroma_weight: float = 0.0
    """Weight of the colour error: mean |c(x_hat) - c(x)| with c(x) = x - its channel mean (3-channel images
    only). It penalises a tint on grayscale scans, which plain pixel losses leave in when colour modalities
    share the codes."""
    lpips_weight: float = 1.0
    """Weight of the LPIPS perceptual distance (0 skips building the VGG network)."""
    lpips_weights: str | None = None
    """Local LPIPS weights file (full LPIPS or torchvision VGG16 state dict); None = random VGG trunk."""
    vq_weight: float = 1.0
    """Weight of the quantizer loss (commitment; beta lives in the quantizer config)."""
    gan_weight: float = 0.4
    """Factor on the adaptive GAN weight (the 0.4 of VQGAN/MedITok)."""
    gan_start: int = 0
    """Optimizer step at which the GAN loss starts."""
    gan_ramp_steps: int = 1000
    """Steps over which the GAN loss ramps linearly from 0 to full weight after ``gan_start``."""
    adaptive_weight_min: float = 0.015
    """Lower clamp of the gradient-norm ratio."""
    adaptive_weight_max: float = 1e4
    """Upper clamp of the gradient-norm ratio."""

    def __post_init__(self) -> None:
        for name in (
            "l1_weight",
            "l2_weight",
            "chroma_weight",
            "lpips_weight",
            "vq_weight",
            "gan_weight",
        ):
            if getattr(self, name) < 0:
                raise InputError(f"LossConfig.{name}: expected >= 0, got {getattr(self, name)}")
        if self.gan_start < 0 or self.gan_ramp_steps < 0:
            raise InputError(
                f"LossConfig: gan_start and gan_ramp_steps must be >= 0, got {self.gan_start}, {self.gan_ramp_steps}"
            )
        if not 0 <= self.adaptive_weight_min <= self.adaptive_weight_max:
            raise InputError(
                "LossConfig: expected 0 <= adaptive_weight_min <= adaptive_weight_max, got "
                f"{self.adaptive_weight_min}, {self.adaptive_weight_max}"
            )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(f"LPIPS weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle naming any code is refused here, never run
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"LPIPS weights {path}: not a plain tensor file ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"LPIPS weights {path}: expected a flat state dict of tensors")
    return state


def _slice_of(index: int) -> int:
    return next(s for s in range(1, 6) if index < _VGG_SLICE_STARTS[s])


def _vgg_to_lpips_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``features.<i>.<param>`` -> LPIPS ``net.slice<s>.<i>.<param>``."""
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) == 3 and int(parts[1]) < _VGG_SLICE_STARTS[-1]:
            mapped[f"net.slice{_slice_of(int(parts[1]))}.{parts[1]}.{parts[2]}"] = value
    return mapped


def _lpips_state(weights: str | Path | None) -> dict[str, Tensor]:
    """The LPIPS-VGG tensors to load, checked for completeness before any network is built."""
    lin = torch.load(_PACKAGE_LIN_WEIGHTS, map_location="cpu", weights_only=True)
    if weights is None:
        return lin
    path = Path(weights)
    state = _read_state_dict(path)
    if any(key.startswith("features.") for key in state):
        state = {**_vgg_to_lpips_keys(state), **lin}
    required = {
        f"net.slice{_slice_of(i)}.{i}.{p}" for i in _VGG_CONV_INDICES for p in ("weight", "bias")
    } | set(lin)
    missing = sorted(required - set(state))
    if missing:
        raise InputError(f"LPIPS weights {path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    return state


class LPIPSLoss(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018) with a frozen VGG16 trunk.

    d(x, y) = sum_l mean_{h,w} sum_c w_l,c * (f_l(x) - f_l(y))_c^2, where f_l are the
    channel-unit-normalised VGG16 features at relu1_2 ... relu5_3 and w_l >= 0 the learned linear
    weights; the batch mean is returned. Inputs are (B, C, H, W) in [-1, 1]; C = 1 is repeated.

    Weights: ``weights`` is a local file (``.safetensors``, or ``.pth`` read with
    ``weights_only=True``) holding either a full LPIPS state dict (``net.*`` + ``lin*``) or a
    torchvision VGG16 state dict (``features.*``, combined with the linear weights shipped inside the
    ``lpips`` package). With ``weights=None`` the trunk is random (``pnet_rand=True``) and the linear
    weights are the shipped ones. Nothing is ever downloaded.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        state = _lpips_state(weights)
        with warnings.catch_warnings():  # torchvision's deprecated `pretrained=` argument inside lpips
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
        try:
            self.net.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise InputError(f"LPIPS weights {weights}: {error}") from error
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        self.net.eval()  # frozen: dropout off in the linear layers
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, C, H, W), (B, C, H, W) in [-1, 1] -> scalar mean distance."""
        if x.shape != y.shape or x.ndim != 4:
            raise InputError(
                f"LPIPS: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x, y).mean()


class ReconstructionLoss(nn.Module):
    """Pixel + perceptual reconstruction loss.

    L = w1 * mean|x_hat - x| + w2 * mean (x_hat - x)^2 + wc * mean|c(x_hat) - c(x)| + wp * LPIPS(x_hat, x),
    with c(x) = x - mean over channels (colour only, 3-channel images) and (w1, w2, wc, wp) = (0.2, 1.0, 0, 1.0)
    by default (``LossConfig``). Pixel terms are computed in fp32.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        self.lpips = LPIPSLoss(self.config.lpips_weights) if self.config.lpips_weight > 0 else None

    def forward(self, reconstruction: Tensor, target: Tensor) -> dict[str, Tensor]:
        """(B, C, H, W) reconstruction and target in [-1, 1] -> ``{"loss": total, "l1", "l2"[, "lpips"]}``.

        ``loss`` carries the graph; the named parts are detached, for logging.
        """
        if reconstruction.shape != target.shape:
            raise InputError(
                f"reconstruction loss: shapes differ, {tuple(reconstruction.shape)} vs {tuple(target.shape)}"
            )
        rec, tgt = reconstruction.float(), target.float()
        l1 = (rec - tgt).abs().mean()
        l2 = F.mse_loss(rec, tgt)
        total = self.config.l1_weight * l1 + self.config.l2_weight * l2
        parts = {"l1": l1.detach(), "l2": l2.detach()}
        if self.config.chroma_weight > 0 and rec.shape[1] == 3:
            chroma = (chroma_of(rec) - chroma_of(tgt)).abs().mean()
            total = total + self.config.chroma_weight * chroma
            parts["chroma"] = chroma.detach()
        if self.lpips is not None:
            perceptual = self.lpips(reconstruction, target)
            total = total + self.config.lpips_weight * perceptual
            parts["lpips"] = perceptual.detach()
        return {"loss": total, **parts}


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss: -mean D(x_hat)."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, config: LossConfig | None = None
) -> Tensor:
    """VQGAN adaptive weight: clamp(||dL_rec/dW|| / (||dL_g/dW|| + 1e-4), lo, hi) * s.

    W is the decoder's last layer weight; (lo, hi, s) = (``adaptive_weight_min``,
    ``adaptive_weight_max``, ``gan_weight``) of ``config``, by default (0.015, 1e4, 0.4). The result
    is a detached scalar (a weight, not a loss term).

    Args:
        rec_loss: scalar reconstruction loss with a graph through ``last_layer``.
        g_loss: scalar generator GAN loss with a graph through ``last_layer``.
        last_layer: the weight tensor both gradients are taken with respect to.
        config: the loss config holding clamp range and scale.
    """
    config = config or LossConfig()
    if not (rec_loss.requires_grad and g_loss.requires_grad):
        raise InputError(
            "adaptive_gan_weight: both losses must carry a graph through last_layer (training only)"
        )
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    ratio = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return ratio.clamp(config.adaptive_weight_min, config.adaptive_weight_max).detach() * config.gan_weight


def gan_ramp(step: int, start: int, ramp_steps: int) -> float:
    """GAN warm-up factor: 0 before ``start``, then min(1, (step - start) / ramp_steps); 1 if ramp_steps = 0."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start) / ramp_steps)
