import logging
import math

import lightning as L
import numpy as np
import pytest
import torch

from lm.config import lm_config
from lm.data import LMDataConfig, LMDataModule, text_corpus
from lm.grounding import COLUMN_KIND, NUM_CLASSES, NUM_TARGETS, answer_starts, named_region
from lm.sequence import IGNORE_INDEX
from lm.system import (
    DEFAULT_KIND_WEIGHTS,
    LMOptimConfig,
    LMSystem,
    LMTrainConfig,
    cosine_schedule,
    param_groups,
)
from lm.text_tokenizer import TextTokenizer
from lm.vocab import Vocab
from tokenizer.api import create_tokenizer
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.data.phantom_text import phantom_questions
from tokenizer.data.phantom_vocab import MODALITIES
from tokenizer.data.phantoms import PhantomDataset
from tokenizer.shards import CodeShard, ShardWriter
from tools.trainer import TrainerConfig, build_trainer

NUM_IMAGES = 16


def write_phantom_shard(directory, tokenizer, num_images: int = NUM_IMAGES):
    """A finalized code shard of tiny phantoms with captions and VQA, encoded by ``tokenizer``."""
    size = tokenizer.config.preprocess.image_size
    data = PhantomDataset(num_images, seed=0, size=size, channels=tokenizer.config.preprocess.channels)
    with torch.no_grad():
        codes = tokenizer.encode_to_codes(torch.stack([data[i]["image"] for i in range(num_images)]))
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        item = data[i]
        qa = [{"question": q, "answer": a} for q, a in phantom_questions(data.phantom(i), rng)[:3]]
        records.append(
            {
                "source": item["source"],
                "modality": item["modality"],
                "caption": item["caption"],
                "attributes": data.phantom(i).attributes(),
                "qa": qa,
            }
        )
    q = tokenizer.config.quantizer
    with ShardWriter(
        directory, num_rows=num_images, K=q.num_codebooks, V=q.codebook_size, grid=tokenizer.grid,
        tokenizer_config={"format": "test"},
    ) as writer:  # fmt: skip
        writer.write(range(num_images), codes, records)
        writer.finalize()
    return CodeShard(directory)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmsystem")
    tokenizer = load_tokenizer(save_tokenizer(create_tokenizer("tiny").eval(), root / "tok"))
    shard = write_phantom_shard(root / "phantoms", tokenizer)
    text = TextTokenizer.train_bpe(text_corpus(shard), vocab_size=400)
    q = tokenizer.config.quantizer
    vocab = Vocab(text.vocab_size, q.num_codebooks, q.codebook_size, tokenizer.grid)
    data_cfg = LMDataConfig(shard_dirs=[str(root / "phantoms")], max_len=256, batch_size=8)
    return {"root": root, "text": text, "vocab": vocab, "data": data_cfg}


def train_config(env, max_steps: int, **model) -> LMTrainConfig:
    optim = LMOptimConfig(lr=3e-3, warmup_steps=3, weight_decay=0.01)
    return LMTrainConfig(
        model=lm_config("tiny", **model), vocab=env["vocab"].to_dict(), optim=optim, max_steps=max_steps
    )


class Recorder(L.Callback):
    """Global step and loss of every training batch."""

    def __init__(self, snapshot: bool = False):
        self.steps, self.losses, self.weights, self.snapshot = [], [], [], snapshot

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs:  # {} for a skipped step
            self.losses.append(float(outputs["loss"]))
        self.steps.append(trainer.global_step)
        if self.snapshot:
            self.weights.append(torch.cat([p.detach().flatten().clone() for p in module.parameters()]))


def fit(env, system, run_dir, max_steps: int, ckpt=None, precision="32-true", every=10, snapshot=False):
    cfg = TrainerConfig(
        accelerator="cpu", devices=1, precision=precision, max_steps=max_steps, val_every_n_steps=0,
        checkpoint_every_n_steps=every, progress_bar=False, log_every_n_steps=5,
    )  # fmt: skip
    recorder = Recorder(snapshot)
    trainer = build_trainer(cfg, run_dir, callbacks=[recorder])
    trainer.fit(system, datamodule=LMDataModule(env["data"], env["text"], env["vocab"]), ckpt_path=ckpt,
                weights_only=True)  # fmt: skip
    return recorder


def test_schedule_and_param_groups():
    assert cosine_schedule(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert cosine_schedule(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(500, 10, 100, 0.1) == pytest.approx(0.1)
    vocab = Vocab(300, 2, 16, (2, 2))
    system = LMSystem(LMTrainConfig(model=lm_config("tiny"), vocab=vocab.to_dict()))
    decay, other = param_groups(system.model, 0.1)
    names = {id(p): n for n, p in system.model.named_parameters()}
    assert all("embed" not in names[id(p)] and p.ndim >= 2 for p in decay["params"])
    assert {"text_embed.weight", "image_embed.weight", "depth.step_embed"} <= {
        names[id(p)] for p in other["params"]
    }
    assert any(names[id(p)].endswith("norm.weight") for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(system.model.parameters()))


def test_config_validation_and_plain_dict_round_trip():
    for bad in ({"lr": 0}, {"betas": (0.9, 1.0)}, {"min_lr_ratio": 2}, {"grad_clip": -1},
                {"text_weight": 0, "image_weight": 0}, {"warmup_steps": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            LMOptimConfig(**bad)
    with pytest.raises(ValueError, match="vocab"):
        LMTrainConfig(model=lm_config("tiny"))
    config = LMTrainConfig(model=lm_config("tiny"), vocab=Vocab(300, 2, 16, (2, 2)).to_dict(), max_steps=7)
    plain = config.to_dict()
    assert LMTrainConfig.from_dict(plain) == config

    def only_plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and only_plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(only_plain(v) for v in x)
        return x is None or isinstance(x, str | int | float | bool)

    assert only_plain(plain)


def test_training_decreases_loss_resumes_and_reloads(env, tmp_path):
    torch.manual_seed(0)
    system = LMSystem(train_config(env, max_steps=40))
    first = fit(env, system, tmp_path, max_steps=30)
    assert system.global_step == 30 and first.steps[-1] == 30
    losses = first.losses
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    # load_from_checkpoint needs no Hydra: the hyperparameters are plain data
    loaded = LMSystem.load_from_checkpoint(ckpt, weights_only=True)
    for (name, a), b in zip(system.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config == system.config

    # resume: a fresh system continues at step 30 with the schedule where it was
    resumed = LMSystem(train_config(env, max_steps=40))
    second = fit(env, resumed, tmp_path, max_steps=34, ckpt=str(ckpt))
    assert second.steps == [31, 32, 33, 34]
    lr = resumed.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * cosine_schedule(34, 3, 40, 0.1))
    assert np.mean(second.losses) < np.mean(losses[:5])


def test_nonfinite_loss_skips_the_step(env, tmp_path, caplog):
    system = LMSystem(train_config(env, max_steps=4))
    calls = {"n": 0}
    original = system.losses

    def poisoned(batch):
        out = original(batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out[0]["loss"] = out[0]["loss"] * float("nan")
        return out

    system.losses = poisoned
    with caplog.at_level(logging.WARNING, logger="lm.system"):
        recorder = fit(env, system, tmp_path, max_steps=4, snapshot=True)
    assert system.skipped_steps == 1 and "step 1: non-finite, losses" in caplog.text
    assert len(recorder.losses) == 3  # the poisoned batch returned no loss
    before, skipped, after = recorder.weights[:3]
    assert torch.equal(before, skipped) and not torch.equal(skipped, after)  # no backward, no update
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_bf16_autocast_and_grad_checkpointing(env, tmp_path):
    system = LMSystem(train_config(env, max_steps=2, grad_checkpointing=True))
    recorder = fit(env, system, tmp_path, max_steps=2, precision="bf16-mixed")
    assert recorder.steps == [1, 2] and all(math.isfinite(v) for v in recorder.losses)
    assert all(p.dtype == torch.float32 for p in system.parameters())

    # activation checkpointing changes memory, not the gradients
    dm = LMDataModule(env["data"], env["text"], env["vocab"])
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        s = LMSystem(train_config(env, max_steps=2, grad_checkpointing=flag)).train()
        s.losses(batch)[0]["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_fused_adamw_and_our_clipping_under_mixed_precision(env, tmp_path):
    """Lightning refuses to clip for a fused optimizer under any mixed precision; the system clips itself."""
    system = LMSystem(train_config(env, max_steps=1))
    fit(env, system, tmp_path, max_steps=1, precision="bf16-mixed")
    assert system.trainer.optimizers[0].defaults["fused"] is True

    system.train()
    dm = LMDataModule(env["data"], env["text"], env["vocab"])
    dm.setup()
    (system.losses(next(iter(dm.train_dataloader())))[0]["loss"] * 1e4).backward()

    def norm() -> torch.Tensor:
        return torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in system.parameters() if p.grad is not None])
        )

    assert norm() > 10 * system.config.optim.grad_clip
    system.configure_gradient_clipping(system.trainer.optimizers[0])
    assert norm() == pytest.approx(system.config.optim.grad_clip, rel=1e-4)


def test_a_batch_without_image_targets_trains(env):
    vocab = env["vocab"]
    system = LMSystem(train_config(env, max_steps=2))
    tokens = vocab.text_rows([vocab.bos, 5, 6, 7, vocab.eos])[None]
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]  # an image->text batch: only text targets
    from lm.sequence import Batch

    batch = Batch(tokens, labels, torch.full((1, 5), -1), torch.ones(1, 5, dtype=torch.bool))
    losses, targets = system.losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["image_loss"] == 0
    assert targets == {"text_loss": 4, "image_loss": 0, "z_loss": 4}  # the 0 is not logged as a loss


def test_val_losses_are_means_over_targets(env):
    from lm.sequence import Batch

    vocab = env["vocab"]
    system = LMSystem(train_config(env, max_steps=1))
    dm = LMDataModule(env["data"], env["text"], env["vocab"])
    dm.setup()
    with_images = next(b for b in dm.train_dataloader() if vocab.is_image(b.labels[..., 0]).any())
    tokens = vocab.text_rows([vocab.bos, 5, 6, 7, vocab.eos])[None]
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    text_only = Batch(tokens, labels, torch.full((1, 5), -1), torch.ones(1, 5, dtype=torch.bool))
    system.eval()
    with torch.no_grad():
        (a, na), (b, nb) = system.losses(with_images), system.losses(text_only)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader([with_images, text_only], batch_size=None)
    got = trainer.validate(system, dataloaders=loader, verbose=False)[0]
    assert got["val/image_loss"] == pytest.approx(float(a["image_loss"]), rel=1e-5)  # not halved by the 0
    text = (a["text_loss"] * na["text_loss"] + b["text_loss"] * nb["text_loss"]) / (
        na["text_loss"] + nb["text_loss"]
    )
    assert got["val/text_loss"] == pytest.approx(float(text), rel=1e-5)


# ------------------------------------------------------------------ grounding targets (lm.grounding)
EQUAL = {"place": 1.0, "summary": 1.0, "answer": 1.0, "modality": 1.0}


def _batches(env, **cfg):
    data = LMDataConfig(**{**vars(env["data"]), **cfg})
    dm = LMDataModule(data, env["text"], env["vocab"])
    dm.setup()
    return list(dm.train_dataloader())


def test_targets_by_record_kind(env):
    vocab = env["vocab"]
    assert all(b.grounding is None for b in _batches(env))  # off by default
    kinds = set()
    for b in _batches(env, grounding=True, image_first=0.5, cond_dropout=0.3):
        assert b.grounding is not None and b.grounding.shape == (*b.image_pos.shape, NUM_TARGETS)
        for row in range(len(b)):
            g, real = b.grounding[row], b.attention_mask[row]
            eoi = (b.tokens[row, :, 0] == vocab.eoi) & real
            assert int(eoi.sum()) == 1
            assert (g[eoi, 1:5] != IGNORE_INDEX).all() and (g[~eoi, 1:5] == IGNORE_INDEX).all()
            assert g[g != IGNORE_INDEX].max() < NUM_CLASSES
            # the answer target: where an answer to a question naming a region is predicted, its class
            starts = answer_starts(b.labels[row, :, 0])
            vqa = not vocab.is_image(b.labels[row, :, 0]).any() and b.tokens[row, 1, 0] == vocab.boi
            for t in (g[:, 5] != IGNORE_INDEX).nonzero().flatten().tolist():
                assert vqa and t in starts
                since = max([s for s in starts if s < t], default=int(eoi.nonzero()))
                asked = env["text"].decode(b.tokens[row, since + 1 : t + 1, 0].tolist())
                assert g[t, 5] == g[eoi, 1 + named_region(asked)].item()
                kinds.add("answer")
            place = g[:, 0] != IGNORE_INDEX
            image_target = vocab.is_image(b.labels[row, :, 0])
            if b.tokens[row, 1, 0] != vocab.boi and image_target.any():  # text -> image with a prompt
                assert torch.equal(place, image_target)
                # and the prompt's modality at the same positions (the prompt names it)
                assert torch.equal(g[:, 6] != IGNORE_INDEX, place) and len(set(g[place, 6].tolist())) == 1
                named = env["text"].decode(b.tokens[row, 1 : int(place.nonzero()[0]), 0].tolist()).lower()
                assert f" {MODALITIES[int(g[place, 6][0])]} " in named  # "Generate a {modality} image: …"
                kinds.add("prompted")
            else:  # image -> text, VQA, unconditional text -> image
                assert not place.any() and (g[:, 6] == IGNORE_INDEX).all()
                kinds.add("other")
    assert {"prompted", "other", "answer"} <= kinds


def test_grounding_loss_trains_and_stays_out_of_the_model(env):
    batch = next(b for b in _batches(env, grounding=True, image_first=0.0) if b.grounding is not None)
    cfg = train_config(env, max_steps=20)
    cfg = LMTrainConfig(
        cfg.model,
        cfg.vocab,
        LMOptimConfig(lr=3e-3, warmup_steps=0, grounding_weight=0.5, grounding_kind_weights=EQUAL),
        20,
    )
    torch.manual_seed(0)
    system = LMSystem(cfg)
    opt = system.configure_optimizers()["optimizer"]
    assert any(p is system.grounding_head.weight for g in opt.param_groups for p in g["params"])
    first, targets = system.losses(batch)
    assert targets["grounding_loss"] == int((batch.grounding != IGNORE_INDEX).sum())
    kinds = len({COLUMN_KIND[c] for c in (batch.grounding != IGNORE_INDEX).nonzero()[:, 2].tolist()})
    assert kinds >= 2  # chance at init for each kind present
    assert float(first["grounding_loss"]) == pytest.approx(kinds * np.log(NUM_CLASSES), abs=0.3)
    plain = first["text_loss"] + first["image_loss"] + first["z_loss"]
    assert float(first["loss"].detach()) == pytest.approx(
        float(plain + 0.5 * first["grounding_loss"]), rel=1e-5
    )
    for _ in range(40):
        opt.zero_grad()
        system.losses(batch)[0]["loss"].backward()
        opt.step()
    assert float(system.losses(batch)[0]["grounding_loss"]) < 0.5 * float(first["grounding_loss"])
    assert not any("grounding" in k for k in system.model.state_dict())  # the saved model has no head
    # each kind weighs the same however many targets it has: 30 place targets, 1 answer target
    hidden = torch.randn(1, 31, system.model.config.dim)
    target = torch.full((1, 31, NUM_TARGETS), IGNORE_INDEX)
    target[0, :30, 0], target[0, 30, 5] = 2, 4
    with torch.no_grad():
        logits = system.grounding_head(hidden).view(1, 31, NUM_TARGETS, NUM_CLASSES)
        place = torch.nn.functional.cross_entropy(logits[0, :30, 0], target[0, :30, 0])
        answer = torch.nn.functional.cross_entropy(logits[0, 30:, 5], target[0, 30:, 5])
        got, n = system.grounding_loss([hidden] * 4, target)
    assert n == 31 and float(got) == pytest.approx(float(place + answer), rel=1e-5)
    no_targets = type(batch)(batch.tokens, batch.labels, batch.image_pos, batch.attention_mask)
    zero, n = system.grounding_loss([system(no_targets).hidden] * 4, no_targets.grounding)
    assert n == 0 and float(zero.detach()) == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="grounding_weight"):
        LMOptimConfig(grounding_weight=-1.0)


def test_grounding_head_on_an_inner_block(env):
    batch = next(b for b in _batches(env, grounding=True, image_first=0.0) if b.grounding is not None)
    cfg = train_config(env, max_steps=2)
    assert (batch.grounding[..., 5] != IGNORE_INDEX).any()  # answer targets in the batch
    # place and summary from block 1, answers from block 2
    inner = LMOptimConfig(
        grounding_weight=1.0, grounding_layer=1, grounding_answer_layer=2, grounding_kind_weights=EQUAL
    )
    system = LMSystem(LMTrainConfig(cfg.model, cfg.vocab, inner, 2))
    assert system.grounding_layers() == (1, 1, 2, 1)
    captured = {}
    for i in (0, 1):
        system.model.backbone.blocks[i].register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(i, torch.nn.functional.rms_norm(out, out.shape[-1:]))
        )
    losses, _ = system.losses(batch)
    expected, _ = system.grounding_loss([captured[0], captured[0], captured[1], captured[0]], batch.grounding)
    assert float(losses["grounding_loss"]) == pytest.approx(float(expected.detach()), rel=1e-6)
    one_block, _ = system.grounding_loss([captured[0]] * 4, batch.grounding)
    assert float(one_block) != pytest.approx(float(expected.detach()), rel=1e-6)
    losses["loss"].backward()
    assert system.model.backbone.blocks[0].attn.wqkv.weight.grad is not None
    assert not system._grounding_inputs  # not kept past the step
    default = LMSystem(
        LMTrainConfig(cfg.model, cfg.vocab, LMOptimConfig(grounding_weight=1.0, grounding_layer=2), 2)
    )
    assert default.grounding_layers() == (2, 2, 2, 2)
    for name in ("grounding_layer", "grounding_answer_layer"):
        with pytest.raises(ValueError, match=f"{name}=9"):
            LMSystem(LMTrainConfig(cfg.model, cfg.vocab, LMOptimConfig(grounding_weight=1.0, **{name: 9}), 2))
        with pytest.raises(ValueError, match=name):
            LMOptimConfig(**{name: -1})


def test_grounding_kind_weights(env):
    cfg = train_config(env, max_steps=2)
    optim = LMOptimConfig(grounding_weight=1.0, grounding_kind_weights={"summary": 0.0, "answer": 0.25})
    system = LMSystem(LMTrainConfig(cfg.model, cfg.vocab, optim, 2))
    hidden = torch.randn(1, 3, system.model.config.dim)
    target = torch.full((1, 3, NUM_TARGETS), IGNORE_INDEX)
    target[0, 0, 0], target[0, 1, 1], target[0, 2, 5] = 2, 1, 4  # place, summary, answer
    with torch.no_grad():
        logits = system.grounding_head(hidden).view(3, NUM_TARGETS, NUM_CLASSES)
        place = torch.nn.functional.cross_entropy(logits[0:1, 0], target[0, 0:1, 0])
        answer = torch.nn.functional.cross_entropy(logits[2:3, 5], target[0, 2:3, 5])
        got, n = system.grounding_loss([hidden] * 4, target)
    assert n == 2 and float(got) == pytest.approx(float(place + 0.25 * answer), rel=1e-5)  # summary: 0
    # a kind of weight 0 costs nothing: answers by default, so their block gets no hook
    optim = LMOptimConfig(grounding_weight=1.0, grounding_layer=1, grounding_answer_layer=2)
    blocks = LMSystem(LMTrainConfig(cfg.model, cfg.vocab, optim, 2)).model.backbone.blocks
    assert len(blocks[0]._forward_hooks) == 1 and not blocks[1]._forward_hooks
    weights = {**DEFAULT_KIND_WEIGHTS, "summary": 0.0, "answer": 0.25}  # the others kept
    assert LMTrainConfig.from_dict(system.config.to_dict()).optim.grounding_kind_weights == weights
    for bad in ({"region": 1.0}, {"answer": -1.0}, {"place": float("nan")}):
        with pytest.raises(ValueError, match="grounding_kind_weights"):
            LMOptimConfig(grounding_kind_weights=bad)
