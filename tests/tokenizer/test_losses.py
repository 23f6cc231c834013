"""Tokenizer losses: formulas, LPIPS weight loading, adaptive GAN weight, warm-up ramp."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tokenizer.errors import InputError
from tokenizer.losses import (
    LossConfig,
    LPIPSLoss,
    ReconstructionLoss,
    _read_state_dict,
    adaptive_gan_weight,
    gan_ramp,
    hinge_d_loss,
    hinge_g_loss,
)


@pytest.fixture(scope="module")
def lpips_loss() -> LPIPSLoss:
    return LPIPSLoss()


def _pair(batch: int = 2, channels: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(batch, channels, size, size) * 2 - 1, torch.rand(batch, channels, size, size) * 2 - 1


def test_lpips_is_a_frozen_nonnegative_distance(lpips_loss):
    x, y = _pair()
    assert lpips_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = lpips_loss(x, y)
    assert d.item() > 0 and d.ndim == 0
    torch.testing.assert_close(d, lpips_loss(y, x))
    assert not any(p.requires_grad for p in lpips_loss.parameters())
    assert not lpips_loss.train().net.training
    # gradients reach the image being judged
    x = x.clone().requires_grad_()
    lpips_loss(x, y).backward()
    assert x.grad.abs().sum() > 0
    # one channel is repeated to three
    g1, g2 = _pair(channels=1)
    torch.testing.assert_close(
        lpips_loss(g1, g2), lpips_loss(g1.expand(-1, 3, -1, -1), g2.expand(-1, 3, -1, -1))
    )


def _vgg_features_state(lpips_loss: LPIPSLoss) -> dict[str, torch.Tensor]:
    """The LPIPS trunk written in torchvision's VGG16 key layout (``features.<i>.<param>``)."""
    state = {}
    for key, value in lpips_loss.net.net.state_dict().items():
        _, index, param = key.split(".")  # slice<s>.<i>.<param>
        state[f"features.{index}.{param}"] = value.clone() + 0.01  # differ from the random trunk
    return state


def test_lpips_loads_torchvision_vgg_weights(tmp_path, lpips_loss):
    state = _vgg_features_state(lpips_loss)
    path = tmp_path / "vgg16.safetensors"
    save_file(state, str(path))
    loaded = LPIPSLoss(path)
    trunk = loaded.net.net.state_dict()
    for key, value in state.items():
        _, index, param = key.split(".")
        slice_id = next(s for s, start in enumerate((4, 9, 16, 23, 30), start=1) if int(index) < start)
        assert torch.equal(trunk[f"slice{slice_id}.{index}.{param}"], value)
    # .pth files go through torch.load(weights_only=True)
    pth = tmp_path / "vgg16.pth"
    torch.save(state, pth)
    assert all(torch.equal(_read_state_dict(pth)[k], v) for k, v in state.items())
    torch.save({"model": state, "step": 3}, pth)
    with pytest.raises(InputError, match="flat state dict"):
        _read_state_dict(pth)


def test_lpips_loads_full_state_dict_and_rejects_incomplete_files(tmp_path, lpips_loss):
    full = {k: v.clone() * 0.5 for k, v in lpips_loss.net.state_dict().items()}
    path = tmp_path / "lpips.safetensors"
    save_file(full, str(path))
    loaded = LPIPSLoss(str(path))
    torch.testing.assert_close(loaded.net.lin0.model[1].weight, full["lin0.model.1.weight"])
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in full.items() if not k.startswith("lin3")}, str(partial))
    with pytest.raises(InputError, match="missing 1 tensors"):
        LPIPSLoss(partial)
    with pytest.raises(InputError, match="file not found"):
        LPIPSLoss(tmp_path / "nope.safetensors")


def test_reconstruction_loss_formula():
    x, y = _pair()
    cfg = LossConfig(l1_weight=0.2, l2_weight=1.0, lpips_weight=0.0)
    out = ReconstructionLoss(cfg)(x, y)
    expected = 0.2 * (x - y).abs().mean() + (x - y).square().mean()
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["l1"], (x - y).abs().mean())
    assert "lpips" not in out
    with pytest.raises(InputError, match="shapes differ"):
        ReconstructionLoss(cfg)(x, y[:1])


def test_chroma_loss_penalises_a_tint_on_grayscale_but_not_a_gray_shift():
    gray = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8) * 2 - 1
    cfg = LossConfig(l1_weight=0.0, l2_weight=0.0, chroma_weight=1.0, lpips_weight=0.0)
    tint = gray + torch.tensor([0.3, 0.0, 0.0]).view(1, 3, 1, 1)
    out = ReconstructionLoss(cfg)(tint, gray)
    torch.testing.assert_close(out["chroma"], torch.tensor((0.2 + 0.1 + 0.1) / 3))  # 0.3 - 0.1, -0.1, -0.1
    torch.testing.assert_close(ReconstructionLoss(cfg)(gray + 0.3, gray)["loss"], torch.tensor(0.0))
    assert "chroma" not in ReconstructionLoss(cfg)(gray[:, :1], gray[:, :1])  # one channel: no colour term


def test_reconstruction_loss_adds_lpips():
    x, y = _pair()
    loss = ReconstructionLoss(LossConfig(l1_weight=0.0, l2_weight=0.0, lpips_weight=2.0))
    out = loss(x, y)
    torch.testing.assert_close(out["loss"], 2.0 * loss.lpips(x, y))
    assert set(out) == {"loss", "l1", "l2", "lpips"}
    assert not out["lpips"].requires_grad


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 3.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 4] -> mean 5/3
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 5 / 3)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(-1 / 3))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0


def test_adaptive_gan_weight_is_the_clamped_gradient_norm_ratio():
    layer = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    rec = layer(x).square().mean()
    g = -layer(x).mean()
    rec_norm = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(g, layer.weight, retain_graph=True)[0].norm()
    weight = adaptive_gan_weight(rec, g, layer.weight)
    expected = (rec_norm / (g_norm + 1e-4)).clamp(0.015, 1e4) * 0.4
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    # clamped below: a generator gradient far larger than the reconstruction one
    low = adaptive_gan_weight(rec * 1e-9, g, layer.weight, LossConfig(gan_weight=1.0))
    torch.testing.assert_close(low, torch.tensor(0.015))
    high = adaptive_gan_weight(
        rec, g * 1e-12, layer.weight, LossConfig(gan_weight=1.0, adaptive_weight_max=50.0)
    )
    torch.testing.assert_close(high, torch.tensor(50.0))
    with pytest.raises(InputError, match="graph"):
        adaptive_gan_weight(rec.detach(), g, layer.weight)


def test_gan_ramp():
    assert gan_ramp(5, start=10, ramp_steps=100) == 0.0
    assert gan_ramp(10, start=10, ramp_steps=100) == 0.0
    assert gan_ramp(60, start=10, ramp_steps=100) == pytest.approx(0.5)
    assert gan_ramp(500, start=10, ramp_steps=100) == 1.0
    assert gan_ramp(10, start=10, ramp_steps=0) == 1.0


def test_loss_config_defaults_and_validation():
    cfg = LossConfig()
    assert (cfg.l1_weight, cfg.l2_weight, cfg.lpips_weight, cfg.vq_weight) == (0.2, 1.0, 1.0, 1.0)
    assert (cfg.gan_weight, cfg.adaptive_weight_min, cfg.adaptive_weight_max) == (0.4, 0.015, 1e4)
    with pytest.raises(InputError, match="l1_weight"):
        LossConfig(l1_weight=-1)
    with pytest.raises(InputError, match="adaptive_weight_min"):
        LossConfig(adaptive_weight_min=2.0, adaptive_weight_max=1.0)
