"""Train the unified LM on code shards: ``uv run python -m tools.train_lm lm=small data.shard_dirs=[DIR]
tokenizer.checkpoint=DIR trainer.max_steps=3000``.

The image tokenizer's architecture (K, V, grid) comes from its checkpoint; the shards must match it. The text
tokenizer is ``text_tokenizer=DIR_OR_HUB_NAME`` or, by default, a byte-level BPE trained on the shards' text
(saved as ``<run_dir>/text_tokenizer`` and reused on resume). ``init_from=<run>/model`` starts from an
exported model (its weights, architecture and text tokenizer) with a new optimizer: fine-tuning. A run
directory that already holds ``checkpoints/last.ckpt`` resumes from it. The trained model is exported to
``<run_dir>/model`` for ``lm.load_model``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tools.schemas import IMAGE_INITS, TrainLMRun, register

log = logging.getLogger(__name__)
register()

TEXT_DIR = "text_tokenizer"
MODEL_DIR = "model"
WAIT_FOR_TEXT_TOKENIZER_S = 600.0


def _global_rank() -> int:
    """This process's rank before the trainer starts (torchrun / SLURM / Lightning's launcher env)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def build_text_tokenizer(run: TrainLMRun, shards: list, run_dir: Path):
    """``run.text_tokenizer`` when given; else the run's BPE: loaded from ``run_dir`` or trained by rank 0."""
    from lm.data import text_corpus
    from lm.text_tokenizer import TextTokenizer

    if run.text_tokenizer:
        return TextTokenizer.from_pretrained(run.text_tokenizer)
    saved = run_dir / TEXT_DIR
    if not saved.is_dir() and _global_rank() == 0:
        texts = [t for shard in shards for t in text_corpus(shard)]
        if not texts:
            raise ValueError("data.shard_dirs hold no captions or QA text to train the text tokenizer on")
        tokenizer = TextTokenizer.train_bpe(texts, vocab_size=run.text_vocab_size)
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{TEXT_DIR}."))
        tokenizer.save(tmp)
        os.replace(tmp, saved)  # atomic: other ranks never see half a tokenizer
        log.info("trained a BPE text tokenizer with %d ids on %d texts", tokenizer.vocab_size, len(texts))
    deadline = time.monotonic() + WAIT_FOR_TEXT_TOKENIZER_S
    while not saved.is_dir():  # other ranks wait for rank 0's tokenizer, so every rank uses the same ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"{saved}: rank 0 did not write the text tokenizer")
        time.sleep(1.0)
    return TextTokenizer.load(saved)


def check_shards(image_tokenizer_dir: str, shards: list) -> None:
    """Warn when a shard was written by a tokenizer whose stored config differs from the checkpoint's."""
    path = Path(image_tokenizer_dir) / "config.json"
    if not path.is_file():
        return
    expected = json.loads(path.read_text())
    for shard in shards:
        if shard.config != expected:
            differing = sorted(
                k for k in set(expected) | set(shard.config) if expected.get(k) != shard.config.get(k)
            )
            log.warning("%s: its tokenizer config differs from %s in %s", shard.directory, path, differing)


TRAINING_OPTIONS = ("dropout", "attn_backend", "grad_checkpointing", "z_loss_weight")
"""The ``lm`` fields a run sets on a model it starts from (``init_from``); the others are its architecture."""


def build_system(run: TrainLMRun, vocab, init=None, codebook=None):
    """The LightningModule: the LM of ``run.lm`` over ``vocab``, AdamW over ``trainer.max_steps``.

    With ``init`` (a loaded :class:`lm.api.UnifiedModel`): its architecture and weights, and ``run.lm``'s
    training options. Without: image tables as ``run.image_init`` says, from ``codebook`` (K, V, d), the
    image tokenizer's code vectors, unless ``random``."""
    from lm.system import LMSystem, LMTrainConfig

    model_config = run.lm
    if init is not None:
        options = {name: getattr(run.lm, name) for name in TRAINING_OPTIONS}
        model_config = dataclasses.replace(init.lm.config, **options)

    if model_config.hf_backbone is None and run.data.max_len > model_config.max_seq_len:
        source = f"init_from={run.init_from}'s " if init is not None else ""
        raise ValueError(
            f"data.max_len={run.data.max_len} exceeds {source}lm.max_seq_len={model_config.max_seq_len}"
        )
    if run.data.grounding != (run.optim.grounding_weight > 0):
        raise ValueError(
            f"data.grounding={run.data.grounding} with optim.grounding_weight={run.optim.grounding_weight}: "
            "the grounding targets need both (data.grounding=true and a weight > 0) or neither"
        )
    config = LMTrainConfig(
        model=model_config, vocab=vocab.to_dict(), optim=run.optim, max_steps=run.trainer.max_steps
    )
    tables = IMAGE_INITS[run.image_init]
    if init is not None and tables:
        raise ValueError(
            f"image_init={run.image_init} with init_from={run.init_from}: its image tables come with it"
        )
    if tables and codebook is None:
        raise ValueError(f"image_init={run.image_init} needs the image tokenizer's codebook")
    system = LMSystem(config)
    if init is not None:
        system.model.load_state_dict(init.lm.state_dict())
    elif tables:
        system.model.init_image_tables(
            codebook, inputs="inputs" in tables, heads="heads" in tables, seed=run.seed
        )
    return system


def export(trainer, system, text_tokenizer, image_tokenizer, run_dir: Path) -> Path:
    """Save the trained LM with both tokenizers to ``<run_dir>/model`` (rank 0; FSDP gathers first)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lm.api import UnifiedModel
    from lm.model import DecoderLM

    lm = system.model
    if isinstance(trainer.strategy, FSDPStrategy):
        state = trainer.strategy.lightning_module_state_dict()  # collective: every rank calls it
        if trainer.is_global_zero:
            lm = DecoderLM(system.config.model, system.vocab)
            lm.load_state_dict(
                {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            )
    out = run_dir / MODEL_DIR
    if trainer.is_global_zero:
        UnifiedModel(lm, text_tokenizer, image_tokenizer).save_pretrained(out)
    return out


def start_model(run: TrainLMRun, image_tokenizer):
    """The model of ``run.init_from`` (None without); InputError when its image tokenizer is not the run's."""
    import torch

    from lm.api import load_model
    from tokenizer.errors import InputError

    if not run.init_from:
        return None
    if run.text_tokenizer:
        raise InputError(f"text_tokenizer={run.text_tokenizer}: init_from={run.init_from} brings its own")
    model = load_model(run.init_from)
    ours, theirs = image_tokenizer.state_dict(), model.image_tokenizer.state_dict()
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    if model.image_tokenizer.config != image_tokenizer.config or not same:
        raise InputError(
            f"init_from={run.init_from}: its image tokenizer differs from tokenizer.checkpoint="
            f"{run.tokenizer.checkpoint} (the shards' codes would mean other images)"
        )
    log.info("starting from %s (its weights and text tokenizer; new optimizer)", run.init_from)
    return model


def train(run: TrainLMRun) -> Path:
    """Train (or resume) the LM; returns the exported model directory."""
    import lightning as L

    from lm.api import vocab_for
    from lm.data import LMDataModule, build_vocab
    from lm.model import Block
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.shards import CodeShard
    from tools.trainer import build_trainer, last_checkpoint, save_resolved_config

    if not run.tokenizer.checkpoint:
        raise ValueError(
            "tokenizer.checkpoint is required: the directory of the tokenizer that wrote the shards"
        )
    if not run.data.shard_dirs:
        raise ValueError(
            "data.shard_dirs is empty: pass the code shards, e.g. data.shard_dirs=[shards/phantoms]"
        )
    run_dir = Path(run.run_dir)
    L.seed_everything(run.seed, workers=True)
    save_resolved_config(run_dir, dataclasses.asdict(run))
    image_tokenizer = load_tokenizer(run.tokenizer.checkpoint)
    shards = [CodeShard(d) for d in run.data.shard_dirs]
    check_shards(run.tokenizer.checkpoint, shards)
    init = start_model(run, image_tokenizer)
    text_tokenizer = init.text_tokenizer if init is not None else build_text_tokenizer(run, shards, run_dir)
    vocab = vocab_for(text_tokenizer, image_tokenizer)
    build_vocab(text_tokenizer, shards, vocab)  # every shard must match the tokenizer checkpoint
    codebook = image_tokenizer.quantizer.codebook if IMAGE_INITS[run.image_init] else None
    system = build_system(run, vocab, init, codebook)
    data = LMDataModule(run.data, text_tokenizer, vocab)
    trainer = build_trainer(run.trainer, run_dir, block_types=(Block,))
    ckpt = last_checkpoint(run_dir) if run.resume else None
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt, weights_only=True)
    out = export(trainer, system, text_tokenizer, image_tokenizer, run_dir)
    if trainer.is_global_zero:
        print(f"LM written to {out} (step {trainer.global_step}, {system.skipped_steps} skipped steps)")
    return out


@hydra.main(config_path="../conf", config_name="train_lm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
