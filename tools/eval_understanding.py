"""Image→text benchmark of a trained LM (DESIGN §7).

    uv run python -m tools.eval_understanding model=outputs/lm/model num_images=200 out=outputs/eval_understanding \\
        [vqa=false] [max_questions=N] [shard=DIR shard_split=val]

Describes held-out phantoms (seed ``data_seed`` = 1; training shards use seed 0) and scores the reports
against the reference captions (corpus BLEU-4, mean ROUGE-L) and, parsed back with ``parse_caption``,
against the truth (modality, count, exact findings); asks every closed question of each image (accuracy with
``answer_matches``, per question kind); and, when the image tokenizer has a text encoder, classifies modality
and finding-present zero-shot through its aligned embeddings. Writes ``metrics.json``, ``metrics.md`` (the
command at the top), ``reports.jsonl`` (per image: report, parse, answers) and ``reports.png`` (images with
their generated reports above and the references below) to ``out``. The measuring is
:func:`lm.evaluation.evaluate_understanding`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lm.report import ATTRIBUTE_COLUMNS, attribute_cells, pct, save_figure, write_outputs
from tools.progress import progress_bar
from tools.schemas import EvalUnderstandingRun, command_line, register

log = logging.getLogger(__name__)
register()

RUN_SUBDIR = ".eval"
"""Folder inside ``out`` for Hydra's logs and the resolved config."""


def _attribute_row(name: str, a: dict) -> str:
    return "| " + " | ".join([name, *attribute_cells(a), str(a["unreadable"])]) + " |"


def markdown_report(data: dict) -> str:
    """The Markdown page of a ``metrics.json`` dict (:func:`write_report`): command, tables, notes."""
    cap, vqa, zs = data["captioning"], data["vqa"], data["zero_shot"]
    bleu = cap["bleu"]
    lines = ["# Understanding benchmark (image → text)", "", "```", data["command"], "```", ""]
    lines += ["| n | BLEU-4 | ROUGE-L | BLEU 1/2/3/4-gram precision | brevity penalty | empty reports |"]
    lines += ["|---" * 6 + "|"]
    precisions = " / ".join(f"{p:.3f}" for p in bleu["precisions"])
    lines += [
        f"| {data['num_images']} | {cap['bleu4']:.4f} | {cap['rouge_l']:.4f} | {precisions} "
        f"| {bleu['brevity_penalty']:.3f} | {cap['empty_reports']} |"
    ]
    if cap["attributes"] is not None:
        lines += ["", "Report attributes (parse_caption of the report vs the truth):", ""]
        header = f"| modality | {ATTRIBUTE_COLUMNS} | unparseable |"
        lines += [header, "|---" * (header.count("|") - 1) + "|"]
        lines += [_attribute_row(m, a) for m, a in cap["per_modality"].items()]
        lines += [_attribute_row("**all**", cap["attributes"])]
    if vqa is not None:
        lines += ["", "Closed VQA:", "", "| question kind | n | accuracy |", "|---|---|---|"]
        lines += [f"| {kind} | {v['n']} | {pct(v['accuracy'])} |" for kind, v in vqa["per_kind"].items()]
        lines += [f"| **all** | {vqa['n']} | {pct(vqa['accuracy'])} |"]
    if zs is not None:
        lines += ["", "Zero-shot classification through the image tokenizer's aligned embeddings:", ""]
        lines += [
            "| task | classes | n | accuracy | balanced accuracy | majority baseline |",
            "|---" * 6 + "|",
        ]
        for task in ("modality", "finding_present"):
            t = zs[task]
            lines.append(
                f"| {task} | {', '.join(t['classes'])} | {t['n']} | {pct(t['accuracy'])} "
                f"| {pct(t['balanced_accuracy'])} | {pct(t['majority_baseline'])} |"
            )
    lines += ["", "Notes:", *_notes(data)]
    return "\n".join(lines) + "\n"


def _notes(data: dict) -> list[str]:
    s, zs = data["settings"], data["zero_shot"]
    source = (
        f"{data['num_images']} held-out phantoms (seed {s['data_seed']}, {s['image_size']}² × {s['channels']} ch)"
        if s["items"] == "phantoms"
        else f"{data['num_images']} captioned rows of shard {s['shard']} (split {s['shard_split']})"
    )
    if zs is not None:
        zero_shot = (
            f"class embedding = mean embed_text of {zs['prompts_per_class']} captions drawn from the phantom "
            "caption generator per class; image embedding from the image's codes; nearest class by cosine"
        )
    elif s["aligned_text_encoder"]:
        zero_shot = "off (zero_shot=false) or no item with a phantom truth"
    else:
        zero_shot = "not measured: the image tokenizer has no text encoder"
    return [
        f"- Images: {source}, entered as the tokenizer's codes; prompt `<bos><boi> image <eoi>` + "
        '"Describe the image." (or the question) + newline, as in training.',
        f"- Decoding: temperature {s['temperature']} (0 = greedy), at most {s['max_new_tokens']} tokens per "
        f"report and {s['vqa_max_new_tokens']} per answer; seed {s['seed']} + batch index; {s['device']}.",
        "- BLEU-4: corpus BLEU (clipped 1–4-gram precisions, brevity penalty) on lower-cased words and "
        "punctuation marks, one reference per image; ROUGE-L: mean LCS F1 on lower-cased words.",
        "- Attributes: a report that names neither a modality nor a complete finding is unparseable and wrong "
        "on every attribute; finding F1 is micro-averaged over findings; region / size / intensity: of the true "
        "findings, those whose region the report names, with the right size, with the right intensity; "
        "attribute mean: the mean of the modality, count, region, size and intensity rates.",
        "- VQA: `answer_matches` (synonyms, case and punctuation ignored); an off-vocabulary answer is wrong. "
        + (
            "Describe-then-answer: the LM first writes a one-line report of the image (greedy, "
            '"Describe the image, then answer the questions."), and each question follows that report '
            "(`vqa_report` in reports.jsonl)."
            if s.get("report_first")
            else "Each question right after the image."
        ),
        f"- Zero-shot: {zero_shot}.",
    ]


def write_report(results, out_dir: str | Path, command: str) -> Path:
    """Write ``metrics.json``, ``metrics.md``, ``reports.jsonl`` and ``reports.png``; returns ``out_dir``."""
    data = {"command": command, **results.to_dict()}
    out = write_outputs(out_dir, data, markdown_report(data), results.samples, "reports.jsonl")
    grid = results.grid
    titles = [f"generated: {r}" for r in grid["reports"]]
    footers = [f"reference: {c}" for c in grid["captions"]]
    save_figure([("image", grid["images"])], titles, out / "reports.png", footers=footers)
    return out


def evaluate(run: EvalUnderstandingRun, command: str | None = None) -> Path:
    """Run the benchmark described by ``run`` (an :class:`~lm.held_out.UnderstandingEvalConfig` itself);
    returns the report directory."""

    from lm.api import load_model
    from lm.evaluation import evaluate_understanding
    from lm.held_out import held_out_items
    from tools.trainer import save_resolved_config

    out = Path(run.out)
    save_resolved_config(out / RUN_SUBDIR, dataclasses.asdict(run))
    model = load_model(run.model)
    total = len(held_out_items(model, run, run.num_images))
    with progress_bar("eval_understanding", total, run.progress_bar) as advance:
        results = evaluate_understanding(model, run, device=run.device, progress=advance)
    results.settings["model"] = str(run.model)
    command = command or command_line("tools.eval_understanding")
    write_report(results, out, command)
    print((out / "metrics.md").read_text())
    print(f"report written to {out}")
    return out


@hydra.main(config_path="../conf", config_name="eval_understanding", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
