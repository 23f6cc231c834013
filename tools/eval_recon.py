"""Reconstruction benchmark of a trained tokenizer (DESIGN §7).

    uv run python -m tools.eval_recon tokenizer.checkpoint=outputs/tokenizer_visual/tokenizer \\
        data=phantoms data.seed=1 data.num_val=500 out=outputs/eval_recon \\
        [features.kind=inception features.weights=PATH] [lpips.weights=PATH] [max_images=N]
    uv run python -m tools.eval_recon tokenizer.checkpoint=DIR data=manifest data.path=realmini/manifest.jsonl \\
        data.val_split=test out=outputs/eval_realmini

Evaluates the ``val`` role of ``data`` (phantoms: ``num_val`` images of seed ``data.seed + 1``; manifests: the
rows of ``data.val_split``; folders / volumes / streams: ``data.val_path``, else ``data.path``) and writes
``metrics.json``, ``metrics.md``, ``recon_<modality>.png`` and ``error_<modality>.png`` to ``out``. The
measuring is :func:`tokenizer.evaluation.evaluate_reconstruction`; the resolved config goes to
``<out>/.eval/config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tools.progress import progress_bar
from tools.schemas import EvalReconRun, command_line, register

log = logging.getLogger(__name__)
register()

RUN_SUBDIR = ".eval"
"""Folder inside ``out`` for Hydra's logs and the resolved config."""


def select_dataset(run: EvalReconRun, preprocess):
    """The evaluation dataset: the ``val`` role, or for file kinds without ``val_path`` the ``path``."""
    from tokenizer.data.datamodule import build_dataset

    dataset = build_dataset(run.data, preprocess, "val")
    if dataset is None and run.data.kind in ("folder", "volume", "stream"):
        log.info("data.val_path is not set: evaluating data.path=%s", run.data.path)
        dataset = build_dataset(run.data, preprocess, "predict")
    if dataset is None:
        raise ValueError(
            "nothing to evaluate: set data.num_val > 0 (phantoms) or data.val_split (manifest) "
            f"(data.kind={run.data.kind!r})"
        )
    return dataset


def evaluate(run: EvalReconRun, command: str | None = None) -> Path:
    """Run the benchmark described by ``run``; returns the report directory."""

    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.evaluation import evaluate_reconstruction, markdown_report, write_report
    from tools.trainer import save_resolved_config

    if not run.tokenizer.checkpoint:
        raise ValueError("tokenizer.checkpoint is required: the directory of a trained tokenizer")
    out = Path(run.out)
    save_resolved_config(out / RUN_SUBDIR, dataclasses.asdict(run))
    tokenizer = load_tokenizer(run.tokenizer.checkpoint)
    dataset = select_dataset(run, tokenizer.config.preprocess)
    total = len(dataset) if run.max_images is None else min(len(dataset), run.max_images)
    with progress_bar("eval_recon", total, run.progress_bar) as advance:
        results = evaluate_reconstruction(
            tokenizer,
            dataset,
            batch_size=run.data.batch_size,
            features=run.features,
            lpips=run.lpips,
            max_images=run.max_images,
            device=run.device,
            precision=run.precision,
            num_workers=run.data.num_workers,
            num_grid=run.num_grid,
            kid_subsets=run.kid_subsets,
            max_bad_fraction=run.data.max_bad_fraction,
            progress=advance,
        )
    results.settings["checkpoint"] = str(run.tokenizer.checkpoint)
    results.settings["data"] = dataclasses.asdict(run.data)
    command = command or command_line("tools.eval_recon")
    write_report(results, out, command)
    print(markdown_report(results, command))
    print(f"report written to {out}")
    return out


@hydra.main(config_path="../conf", config_name="eval_recon", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
