"""Encode a dataset into a code shard (DESIGN §6) with a trained image tokenizer.

    uv run python -m tools.encode_dataset tokenizer.checkpoint=outputs/tokenizer_visual/tokenizer \\
        data=phantoms out=shards/phantoms trainer=cpu
    uv run python -m tools.encode_dataset tokenizer.checkpoint=DIR data=manifest data.path=train.jsonl \\
        out=shards/train trainer=ddp trainer.num_nodes=2

Runs Lightning ``predict`` (one CPU, several GPUs or several nodes, unchanged). Rerunning the same command
on a directory left by an interrupted run encodes only the missing rows. Bad rows are skipped, marked in the
index and counted; the run fails past ``data.max_bad_fraction``. Logs and the resolved config go to
``<out>/.encode``. The machinery is in :mod:`tokenizer.encode`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tools.schemas import EncodeRun, register

log = logging.getLogger(__name__)
register()

RUN_SUBDIR = ".encode"
"""Folder inside the shard for Hydra and Lightning logs and the resolved config."""


def build_writer(run: EncodeRun, tokenizer, dataset):
    """The prediction writer that fills ``run.out`` with the codes of ``dataset``."""
    from tokenizer.encode import ShardPredictionWriter, checkpoint_config

    q = tokenizer.config.quantizer
    return ShardPredictionWriter(
        run.out,
        dataset,
        tokenizer_config=checkpoint_config(run.tokenizer.checkpoint, tokenizer),
        num_codebooks=q.num_codebooks,
        codebook_size=q.codebook_size,
        grid=tokenizer.grid,
        max_bad_fraction=run.data.max_bad_fraction,
        min_rows_before_failing=run.data.min_rows_before_failing,
        split=run.split,
    )


def encode(run: EncodeRun) -> Path:
    """Encode ``run.data`` into the shard ``run.out``; returns the shard directory."""
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.data.datamodule import build_dataset
    from tokenizer.encode import EncodeDataModule, EncodeSystem
    from tools.trainer import build_trainer, save_resolved_config

    if not run.tokenizer.checkpoint:
        raise ValueError("tokenizer.checkpoint is required: the directory of a trained tokenizer")
    start = time.perf_counter()
    out = Path(run.out)
    save_resolved_config(out / RUN_SUBDIR, dataclasses.asdict(run))
    tokenizer = load_tokenizer(run.tokenizer.checkpoint)
    preprocess = tokenizer.config.preprocess
    dataset = build_dataset(run.data, preprocess, "predict")
    writer = build_writer(run, tokenizer, dataset)
    data = EncodeDataModule(
        dataset,
        writer,
        (preprocess.channels, preprocess.image_size, preprocess.image_size),
        batch_size=run.data.batch_size,
        num_workers=run.data.num_workers,
    )
    trainer = build_trainer(run.trainer, out / RUN_SUBDIR, callbacks=[writer])
    trainer.predict(EncodeSystem(tokenizer), datamodule=data, return_predictions=False)
    if writer.finalized:  # rank 0 (in the main process unless the strategy spawned workers)
        rows = len(dataset)
        print(
            f"code shard {out}: {rows} rows of {writer.shape} codes, {writer.num_bad} bad rows marked in the "
            f"index; {writer.num_written} rows encoded by this process in {time.perf_counter() - start:.1f} s"
        )
    return out


@hydra.main(config_path="../conf", config_name="encode_dataset", version_base="1.3")
def main(cfg: DictConfig) -> None:
    encode(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
