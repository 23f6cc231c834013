"""Text→image benchmark of a trained LM (DESIGN §7).

    uv run python -m tools.eval_generation model=outputs/lm/model num_prompts=200 cfg_scales=[1.0,3.0] \\
        out=outputs/eval_generation [features.kind=inception features.weights=PATH] [shard=DIR shard_split=val]

For each guidance scale, one image per held-out phantom caption (seed ``data_seed`` = 1; training shards use
seed 0), read back by the analytic reader (modality, count, exact findings), FID / KID / precision–recall
against the real held-out images, and the image–text alignment through the image tokenizer's aligned
embeddings when it has a text encoder. Writes ``metrics.json``, ``metrics.md`` (the command at the top),
``generations.jsonl`` (per prompt what the reader saw) and ``generation_grid.png`` (prompts as titles; real
images above the generated ones) to ``out``. The measuring is :func:`lm.evaluation.evaluate_generation`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lm.report import ATTRIBUTE_COLUMNS, attribute_cells, pct, save_figure, write_outputs
from tools.progress import progress_bar
from tools.schemas import EvalGenerationRun, command_line, register

log = logging.getLogger(__name__)
register()

RUN_SUBDIR = ".eval"
"""Folder inside ``out`` for Hydra's logs and the resolved config."""


def _interval(interval: list[float]) -> str:
    """Where guidance applied, in words (``cfg_interval``)."""
    start, end = interval
    return (
        "every image position"
        if (start, end) == (0.0, 1.0)
        else f"image positions p with {start:g} <= p / (h·w) < {end:g}"
    )


def _against(negative: str | None) -> str:
    """What guidance pushed away from (``negative_prompt``), in words."""
    return (
        "<bos><boi>" if negative is None else f'the negative prompt "{negative}" (laid out like each prompt)'
    )


def _num(value: float | None, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def markdown_report(data: dict) -> str:
    """The Markdown page of a ``metrics.json`` dict (:func:`write_report`): command, tables, notes."""
    ref, scales = data["reference"], data["scales"]
    header = f"| guidance | {ATTRIBUTE_COLUMNS} | FID | KID | precision | recall | alignment | s / image |"
    lines = ["# Generation benchmark (text → image)", "", "```", data["command"], "```", "", header]
    lines.append("|---" * (header.count("|") - 1) + "|")
    for name, m in scales.items():
        kid = "–" if m["kid"] is None else f"{m['kid']:.4g} ± {_num(m['kid_std'], '.2g')}"
        label = f"{name} (none)" if m["cfg_scale"] == 1.0 else name
        cells = [label, *attribute_cells(m["attributes"]), _num(m["fid"]), kid, pct(m["precision"])]
        cells += [pct(m["recall"]), _num(m["alignment"], ".4f"), _num(m["seconds_per_image"], ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (
        ("real images", "reader_real"),
        ("tokenizer reconstructions", "reader_reconstruction"),
    ):
        if ref[key] is not None:
            lines.append(f"| reader on {label} | " + " | ".join(attribute_cells(ref[key]) + ["–"] * 6) + " |")
    modalities = sorted({m for scale in scales.values() for m in scale["per_modality"]})
    if modalities:
        lines += ["", "Exact match (modality and every finding) per modality:", ""]
        lines += ["| modality | " + " | ".join(f"guidance {k}" for k in scales) + " |"]
        lines += ["|---" * (len(scales) + 1) + "|"]
        for modality in modalities:
            cells = [scale["per_modality"].get(modality) for scale in scales.values()]
            shown = [f"{pct(c['exact'])} (n={c['n']})" if c else "–" for c in cells]
            lines.append(f"| {modality} | " + " | ".join(shown) + " |")
    lines += ["", "Notes:", *_notes(data)]
    return "\n".join(lines) + "\n"


def _notes(data: dict) -> list[str]:
    s, ref = data["settings"], data["reference"]
    source = (
        f"{data['num_prompts']} held-out phantom captions (seed {s['data_seed']}, {s['image_size']}² × "
        f"{s['channels']} ch)"
        if s["items"] == "phantoms"
        else f"{data['num_prompts']} captioned rows of shard {s['shard']} (split {s['shard_split']})"
    )
    template = "the item's modality" if s["prompt_modality"] else '"medical"'
    alignment = "not measured: the image tokenizer has no text encoder"
    if s["aligned_text_encoder"]:
        alignment = (
            "mean cosine of embed_image(generated) and embed_text(caption) through the image tokenizer; "
            f"real pairs {_num(ref['alignment_real'], '.4f')}, shuffled pairs {_num(ref['alignment_shuffled'], '.4f')} (chance)"
        )
    sampling = s["sampling"]
    return [
        f'- Prompts: {source}, laid out as in training: `<bos>` + "Generate a {{modality}} image: {{caption}}" '
        f"({{modality}} = {template}) + `<boi>`; guidance against `<bos><boi>`.",
        "- Attributes: the analytic reader (`read_phantom`) on each generated image vs the prompt's truth: "
        "modality, number of findings, exact set of findings (region, size, intensity), all exact; finding F1 "
        "is micro-averaged over findings; region / size / intensity: of the prompted findings, those the image "
        "shows in their region, with the right size, with the right intensity; attribute mean: the mean of the "
        "modality, count, region, size and intensity rates. The reader rows are ceilings on the same items.",
        f"- FID / KID / precision–recall features: {s['features']}"
        f"{' — RANDOM weights: compare only runs with the same features, never published numbers' if s['features_random'] else ''}; "
        f"reference set: {s['fid_reference']}.",
        f"- FID is biased upwards below 2048 images{'' if s['fid_reliable'] else ' (compare only at equal n; KID is unbiased)'}.",
        f"- Alignment: {alignment}.",
        f"- Sampling: temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p {sampling['top_p']}, "
        f"guidance on {_interval(sampling['cfg_interval'])}, against "
        f"{_against(sampling['negative_prompt'])}; "
        f"seed {s['seed']} + batch index, batch size {s['batch_size']}; {s['device']}.",
    ]


def write_report(results, out_dir: str | Path, command: str) -> Path:
    """Write ``metrics.json``, ``metrics.md``, ``generations.jsonl`` and ``generation_grid.png``; returns ``out_dir``."""
    data = {"command": command, **results.to_dict()}
    out = write_outputs(out_dir, data, markdown_report(data), results.samples, "generations.jsonl")
    grid = results.grid
    rows = [("real", grid["real"])] + [(f"guidance {k}", grid[k]) for k in results.scales]
    save_figure(rows, grid["captions"], out / "generation_grid.png")
    return out


def evaluate(run: EvalGenerationRun, command: str | None = None) -> Path:
    """Run the benchmark described by ``run`` (a :class:`~lm.held_out.GenerationEvalConfig` itself); returns
    the report directory."""

    from lm.api import load_model
    from lm.evaluation import evaluate_generation
    from lm.held_out import held_out_items
    from tools.trainer import save_resolved_config

    out = Path(run.out)
    save_resolved_config(out / RUN_SUBDIR, dataclasses.asdict(run))
    model = load_model(run.model)
    total = len(held_out_items(model, run, run.num_prompts)) * len(run.cfg_scales)
    with progress_bar("eval_generation", total, run.progress_bar) as advance:
        results = evaluate_generation(model, run, device=run.device, progress=advance)
    results.settings["model"] = str(run.model)
    command = command or command_line("tools.eval_generation")
    write_report(results, out, command)
    print((out / "metrics.md").read_text())
    print(f"report written to {out}")
    return out


@hydra.main(config_path="../conf", config_name="eval_generation", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
