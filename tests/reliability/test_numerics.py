"""Numerics: bf16 / fp16 autocast never reaches the quantizer's distances or the LM's logits and softmax;
a step whose loss is NaN / Inf is skipped with a log line and changes no weight.

Autocast runs on the CPU here (bf16 always; fp16 where this torch supports it on the CPU). What runs in
low precision is observed, not assumed: a TorchFunctionMode records the dtype every matrix product, softmax
and argmax returns inside the quantizer and the LM heads, and the results are compared with the fp32 path.
The LM's skipped step: tests/lm/test_system.py::test_nonfinite_loss_skips_the_step; the tokenizer's is here.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import lm
from tokenizer.alignment import AlignmentConfig
from tokenizer.api import create_tokenizer
from tokenizer.config import QuantizerConfig, create_config
from tokenizer.data.datamodule import DataConfig, ImageDataModule
from tokenizer.guard import LossGuard
from tokenizer.losses import LossConfig
from tokenizer.quantizer import MultiCodebookQuantizer
from tokenizer.system import OptimConfig, TokenizerSystem, TokenizerTrainConfig

WATCHED = {"bmm", "einsum", "matmul", "linear", "mm", "cdist", "softmax", "log_softmax", "argmax",
           "cross_entropy", "logsumexp", "__matmul__", "conv2d"}  # fmt: skip


def _autocast_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            if torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16:
                dtypes.append(torch.float16)
    except (RuntimeError, AssertionError):
        pass
    return dtypes


AUTOCAST = _autocast_dtypes()


class _Record(TorchFunctionMode):
    """Records (function name, dtype of its tensor result) for the WATCHED functions."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if name in WATCHED and isinstance(out, torch.Tensor):
            self.calls.append((name, out.dtype))
        return out


def _recording(module: torch.nn.Module, record: _Record) -> list:
    """Record only while ``module`` runs (its forward is where the guarantee is claimed)."""

    def start(*_) -> None:
        record.__enter__()

    def stop(*_) -> None:
        record.__exit__(None, None, None)

    return [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]


# ------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("training", [False, True])
def test_quantizer_distances_run_in_fp32_under_autocast(dtype, training):
    tok = create_tokenizer("tiny").train(training)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    record = _Record()
    hooks = _recording(tok.quantizer, record)
    with torch.autocast("cpu", dtype=dtype):
        latent = tok.encode(x)
        out = tok.quantizer(latent)
    for hook in hooks:
        hook.remove()
    assert latent.dtype == dtype  # autocast was on around the quantizer
    products = [d for name, d in record.calls if name not in ("argmax",)]
    assert products and all(d == torch.float32 for d in products), record.calls
    assert out.quantized.dtype == torch.float32
    if not training:  # same latent, same codes as the fp32 path
        assert torch.equal(out.codes, tok.quantizer.codes(latent.float()))


def test_low_precision_distances_would_change_codes_and_the_quantizer_avoids_it():
    """Why it matters: near-equal code vectors that bf16 cannot tell apart. The quantizer's codes under
    autocast are the fp32 ones; a bf16 distance computation picks other codes."""
    cfg = QuantizerConfig(num_codebooks=1, codebook_size=16, codebook_dim=8, cosine=True)
    q = MultiCodebookQuantizer(cfg, 8).eval()
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    with torch.no_grad():
        q.impl._codebook.embed.copy_(F.normalize(base + 1e-3 * torch.randn(1, 16, 8, generator=g), dim=-1))
    z = (base + 1e-3 * torch.randn(64, 8, generator=g)).view(64, 8, 1, 1)
    fp32 = q.codes(z)
    codebook = q.impl.codebook.detach().view(1, 16, 8)
    x = F.normalize(z.view(1, 64, 8), dim=-1)
    bf16 = torch.bmm(x.bfloat16(), codebook.bfloat16().transpose(1, 2)).argmax(-1).view(64)
    assert (bf16 != fp32.view(64)).any()  # low precision would change codes here
    for dtype in AUTOCAST:
        with torch.autocast("cpu", dtype=dtype):
            assert torch.equal(q.codes(z.to(dtype)), q.codes(z.to(dtype).float()))
            assert torch.equal(q.codes(z), fp32)


# ------------------------------------------------------------------------------------------- LM heads
@pytest.fixture(scope="module")
def model():
    return lm.create_model("tiny", create_tokenizer("tiny").eval())


@pytest.mark.parametrize("dtype", AUTOCAST)
def test_lm_logits_and_losses_are_fp32_under_autocast(model, dtype):
    net, vocab = model.lm, model.vocab
    b, t = 2, 16
    g = torch.Generator().manual_seed(0)
    tokens = vocab.text_rows(torch.randint(0, vocab.num_text, (b * t,), generator=g)).view(b, t, -1)
    image = vocab.codes_to_ids(
        torch.randint(0, vocab.codebook_size, (b, 4, vocab.num_codebooks), generator=g)
    )
    tokens[:, 4:8] = image
    image_pos = torch.full((b, t), -1)
    image_pos[:, 4:8] = torch.arange(4)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    record = _Record()
    with torch.autocast("cpu", dtype=dtype), record:
        out = net(tokens, image_pos, labels=labels)
        text = net.text_logits(out.hidden)
        is_image = vocab.is_image(labels[..., 0])
        depth = net.depth_logits(out.hidden[is_image], vocab.ids_to_codes(labels[is_image]))
    assert (("linear", dtype)) in record.calls  # the blocks did run in low precision
    losses = [
        d for name, d in record.calls if name in ("cross_entropy", "logsumexp", "log_softmax", "softmax")
    ]
    assert losses and all(d == torch.float32 for d in losses), record.calls
    assert text.dtype == depth.dtype == torch.float32
    assert out.text_loss.dtype == out.image_loss.dtype == out.z_loss.dtype == torch.float32
    expected = F.linear(out.hidden.float(), net.text_head.weight.float())
    assert torch.equal(text, expected)  # exactly the fp32 product of the (bf16) hidden states


@pytest.mark.parametrize("dtype", AUTOCAST)
def test_generation_samples_from_fp32_softmax_under_autocast(model, dtype):
    record = _Record()
    with torch.autocast("cpu", dtype=dtype), record:
        _, codes = lm.generate_image(model, "one small lesion", seed=3, cfg_scale=2.0, top_k=5)
        text = lm.describe_image(model, codes[0], max_new_tokens=4, temperature=1.0, seed=3)
    softmax = [d for name, d in record.calls if name in ("softmax", "log_softmax")]
    assert softmax and all(d == torch.float32 for d in softmax), softmax
    assert isinstance(text, str) and codes.shape[0] == 1


# ------------------------------------------------------------------------------------------- skipped steps
class _Snapshots(L.Callback):
    """Model, discriminator and optimizer state before and after each training batch."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    @staticmethod
    def _flat(pl_module) -> torch.Tensor:
        params = [p.detach().flatten() for p in pl_module.parameters()]
        buffers = [b.detach().float().flatten() for b in pl_module.model.buffers()]
        return torch.cat(params + buffers).clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._flat(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._flat(pl_module))


@pytest.mark.parametrize(("poison", "why"), [("nan", "non-finite"), ("inf", "non-finite"), ("1e4", "spike")])
def test_tokenizer_skips_a_nonfinite_or_spiking_step_with_a_log_line(tmp_path, caplog, poison, why):
    config = TokenizerTrainConfig(
        model=create_config("tiny"),
        loss=LossConfig(lpips_weight=0.0, gan_start=0, gan_ramp_steps=0),  # the discriminator steps too
        alignment=AlignmentConfig(stage="recon"),
        optim=OptimConfig(warmup_steps=1),
        max_steps=3,
    )
    system = TokenizerSystem(config)
    system.loss_guard = LossGuard(10.0, warmup=1)  # judge spikes from the second step on
    original, calls = system.generator_losses, {"n": 0}

    def poisoned(x, captions, step):
        losses, out = original(x, captions, step)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["loss"] = losses["loss"] * float(poison)
        return losses, out

    system.generator_losses = poisoned
    data = ImageDataModule(DataConfig(kind="phantoms", num_train=8, num_val=0, batch_size=4, num_workers=0),
                           system.model.config.preprocess)  # fmt: skip
    snapshots = _Snapshots()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                        limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tokenizer.system"):
        trainer.fit(system, datamodule=data)
    assert system.skipped_steps == 1 and f"step 1: {why}" in caplog.text
    detail = "x running mean" if why == "spike" else f"losses {{'loss': {float(poison)}"
    assert detail in caplog.text
    assert trainer.global_step == 2  # the skipped batch made no optimizer step: 3 batches for 2 steps
    first, skipped, last = zip(snapshots.before, snapshots.after, strict=True)
    assert not torch.equal(*first) and torch.equal(*skipped) and not torch.equal(*last)
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_loss_guard_judges_against_the_running_mean_of_accepted_losses():
    guard = LossGuard(4.0, warmup=3, decay=0.5)
    for value in (2.0, 2.0, 2.0):
        assert guard.verdict(torch.tensor(value)) is None
        guard.accept(torch.tensor(value))
    assert float(guard.mean) == 2.0 and int(guard.accepted) == 3
    assert guard.verdict(torch.tensor(7.9)) is None and "spike" in guard.verdict(torch.tensor(8.1))
    assert guard.verdict(torch.tensor(float("nan"))) == "non-finite"
    guard.accept(torch.tensor(6.0))
    assert float(guard.mean) == 4.0  # 0.5 * 2 + 0.5 * 6
    off = LossGuard(0.0, warmup=0)
    assert off.verdict(torch.tensor(1e30)) is None and off.verdict(torch.tensor(float("inf"))) == "non-finite"
    assert set(dict(guard.named_buffers())) == {"mean", "accepted"}  # checkpointed with the system
    with pytest.raises(ValueError, match="spike_factor"):
        LossGuard(0.5)
