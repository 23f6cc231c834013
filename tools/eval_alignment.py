"""What a tokenizer's tokens know about phantom modality and findings (issue: stage ``text`` vs ``recon``).

    uv run python -m tools.eval_alignment tokenizer.checkpoint=outputs/tokenizer_text/tokenizer \\
        data.num_train=1000 data.num_val=500 out=outputs/eval_alignment

Scores ``data.num_val`` held-out phantoms (seed ``data.seed + 1``) on two tasks, modality (5 classes) and
finding present / absent, two ways (:mod:`tokenizer.probe`):

* **zero-shot** through ``embed_image`` / ``embed_text`` against caption ensembles, when the tokenizer has a
  text encoder (stage ``text``);
* **linear probe** (logistic regression) on the mean-pooled quantized latent, fitted on ``data.num_train``
  phantoms of seed ``data.seed``; works for every tokenizer, so a ``recon`` baseline is comparable.

Writes ``metrics.json`` and ``metrics.md`` to ``out``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tools.progress import progress_bar
from tools.schemas import EvalAlignmentRun, command_line, register

log = logging.getLogger(__name__)
register()


def _features(tokenizer, dataset, batch_size: int, device, advance) -> tuple[Any, Any, list]:
    """Pooled latents, aligned embeddings (None without an align head) and truths of every phantom."""
    import torch

    from tokenizer.probe import pooled_latent

    pooled, embedded, truths = [], [], []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        pairs = [(dataset[i]["image"], dataset.phantom(i)) for i in indices]  # each phantom generated once
        images = torch.stack([image for image, _ in pairs]).to(device)
        pooled.append(pooled_latent(tokenizer, images).cpu())
        if tokenizer.align_head is not None:
            embedded.append(tokenizer.embed_image(images).float().cpu())
        truths += [(p.modality, p.findings) for _, p in pairs]
        advance(len(indices))
    return torch.cat(pooled), torch.cat(embedded) if embedded else None, truths


def _describe(encoder) -> str:
    weights = f"weights {encoder.pretrained}" if encoder.pretrained else "random weights"
    return f"{encoder.kind} {encoder.name or '(built in)'}, {weights}"


def _row(name: str, method: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return f"| {name} | {method} | not measured | | |"
    return (
        f"| {name} | {method} | {result['accuracy']:.1%} | {result['balanced_accuracy']:.1%} "
        f"| {result['majority_baseline']:.1%} |"
    )


def markdown_report(metrics: dict[str, Any], command: str) -> str:
    """The Markdown table of both tasks, zero-shot and linear probe."""
    zs, probe = metrics["zero_shot"], metrics["linear_probe"]
    lines = [
        "# Alignment benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Tokenizer: `{metrics['checkpoint']}` (text encoder: {metrics['text_encoder'] or 'none'}); "
        f"{metrics['test_images']} held-out phantoms; probe fitted on {probe['train_images']} phantoms "
        f"({probe['features']} pooled latent features).",
        "",
        "| task | method | accuracy | balanced accuracy | majority baseline |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in ("modality", "finding_present"):
        lines.append(_row(task, "zero-shot", zs[task] if zs else None))
        lines.append(_row(task, "linear probe", probe[task]))
    if zs is None:
        lines += ["", "Zero-shot needs a text encoder (a tokenizer trained with stage `text`)."]
    return "\n".join(lines) + "\n"


def evaluate(run: EvalAlignmentRun, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``run``; returns the metrics written to ``<out>/metrics.json``."""
    import torch

    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.data.datamodule import build_dataset
    from tokenizer.data.phantom_vocab import MODALITIES
    from tokenizer.evaluation import finite_json, resolve_device
    from tokenizer.probe import probe_tasks, zero_shot

    if not run.tokenizer.checkpoint:
        raise ValueError("tokenizer.checkpoint is required: the directory of a trained tokenizer")
    if run.data.kind != "phantoms":
        raise ValueError(f"data.kind: the alignment benchmark needs phantom truth, got {run.data.kind!r}")
    device = resolve_device(run.device)
    tokenizer = load_tokenizer(run.tokenizer.checkpoint).to(device).eval()
    preprocess = tokenizer.config.preprocess
    train, test = build_dataset(run.data, preprocess, "train"), build_dataset(run.data, preprocess, "val")
    if test is None:
        raise ValueError("data.num_val must be >= 1: the held-out phantoms to score")
    with torch.no_grad(), progress_bar("eval_alignment", len(train) + len(test), run.progress_bar) as advance:
        train_x, _, train_truths = _features(tokenizer, train, run.data.batch_size, device, advance)
        test_x, test_emb, test_truths = _features(tokenizer, test, run.data.batch_size, device, advance)
        classes = list(run.data.modalities or MODALITIES)
        has_text = tokenizer.text_encoder is not None and test_emb is not None
        zs = (
            zero_shot(tokenizer.embed_text, test_emb, test_truths, classes, run.prompts) if has_text else None
        )
    probe = probe_tasks(train_x, train_truths, test_x, test_truths, classes)
    metrics = finite_json(
        {
            "checkpoint": str(run.tokenizer.checkpoint),
            "text_encoder": _describe(tokenizer.config.text_encoder) if has_text else None,
            "test_images": len(test),
            "zero_shot": zs,
            "linear_probe": probe,
        }
    )
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or command_line("tools.eval_alignment")
    (out / "metrics.json").write_text(json.dumps(metrics | {"command": command}, indent=2) + "\n")
    report = markdown_report(metrics, command)
    (out / "metrics.md").write_text(report)
    print(report)
    print(f"report written to {out}")
    return metrics


@hydra.main(config_path="../conf", config_name="eval_alignment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
