"""Train the image tokenizer: ``uv run python -m tools.train_tokenizer tokenizer=small data=phantoms stage=visual``.

Stages: ``visual`` (align to a frozen vision teacher), ``text`` (align to a frozen text encoder, starting from a
stage-1 checkpoint given as ``init_from=<run>/tokenizer``), ``recon`` (no alignment; the baseline). A run
directory that already holds ``checkpoints/last.ckpt`` resumes from it exactly. The trained tokenizer is
exported to ``<run_dir>/tokenizer`` (safetensors + config.json) for ``load_tokenizer``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tools.schemas import TrainTokenizerRun, register

log = logging.getLogger(__name__)
register()


def build_system(run: TrainTokenizerRun):
    """The LightningModule for this run, initialised from ``run.init_from`` when given."""
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.system import TokenizerSystem, TokenizerTrainConfig

    model_cfg = run.tokenizer
    if run.init_from:
        model_cfg = load_tokenizer(run.init_from).config
        log.info("stage %s starts from %s (new optimizer, alignment head reset)", run.stage, run.init_from)
    config = TokenizerTrainConfig(
        model=model_cfg,
        loss=run.loss,
        discriminator=run.discriminator,
        alignment=dataclasses.replace(run.alignment, stage=run.stage),
        optim=run.optim,
        max_steps=run.trainer.max_steps,
        ema_decay=run.ema_decay,
    )
    system = TokenizerSystem(config)
    if run.init_from:
        state = load_tokenizer(run.init_from).state_dict()
        state = {k: v for k, v in state.items() if not k.startswith(("align_head.", "text_encoder."))}
        missing, unexpected = system.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"init_from={run.init_from}: unexpected tensors {unexpected[:5]}")
    return system


def has_unused_parameters(run: TrainTokenizerRun) -> bool:
    """Whether some steps leave trainable parameters without a gradient, which DDP must be told.

    The discriminator gets none before the GAN starts (or ever, with ``loss.gan_weight=0``), the alignment
    head none in stage ``recon``.
    """
    return run.loss.gan_weight == 0 or run.loss.gan_start > 0 or run.stage == "recon"


def export(system, run: TrainTokenizerRun, run_dir: Path) -> Path:
    """Write the trained tokenizer, with the text encoder that stage ``text`` aligned it to."""
    from tokenizer.checkpoint import save_tokenizer

    model = system.export_model()
    text_encoder = run.alignment.text_encoder if run.stage == "text" else None
    model.config = dataclasses.replace(model.config, text_encoder=text_encoder)
    return save_tokenizer(model, run_dir / "tokenizer", extra={"stage": run.stage})


def train(run: TrainTokenizerRun) -> Path:
    """Train one stage; returns the exported tokenizer directory."""
    import lightning as L

    from tokenizer.data.datamodule import ImageDataModule
    from tools.trainer import build_trainer, last_checkpoint, save_resolved_config

    run_dir = Path(run.run_dir)
    L.seed_everything(run.seed, workers=True)
    save_resolved_config(run_dir, dataclasses.asdict(run))
    system = build_system(run)
    data = ImageDataModule(run.data, system.model.config.preprocess)
    trainer = build_trainer(run.trainer, run_dir, find_unused_parameters=has_unused_parameters(run))
    ckpt = last_checkpoint(run_dir) if run.resume else None
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt, weights_only=True)
    if not trainer.is_global_zero:
        return run_dir / "tokenizer"
    out = export(system, run, run_dir)
    print(f"tokenizer written to {out}")
    return out


@hydra.main(config_path="../conf", config_name="train_tokenizer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
