"""The quickstart's last stage: measure the trained pipeline and write ``summary.md`` with its pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

SECTIONS = (
    ("reconstruction", "Reconstruction (held-out phantoms, tokenizer only)"),
    ("generation", "Prompt → image (held-out captions; analytic reader on the generated images)"),
    ("understanding", "Image → report and closed VQA (held-out phantoms)"),
)


def evaluate_and_report(
    model_dir: Path, variant, run_dir: Path, stages: Path, timings: dict[str, float]
) -> Path:
    """Run the three evaluations into ``run_dir/<section>/`` and write ``run_dir/summary.md``.

    ``timings``: seconds per earlier stage (a reused stage counts its reuse time), for the summary.
    """
    import time

    begin = time.perf_counter()
    import lm
    from lm.evaluation import evaluate_generation, evaluate_understanding
    from lm.held_out import GenerationEvalConfig, UnderstandingEvalConfig
    from tokenizer.data.phantoms import PhantomDataset
    from tokenizer.evaluation import LPIPSConfig, evaluate_reconstruction, write_report
    from tools.eval_generation import write_report as write_generation
    from tools.eval_understanding import write_report as write_understanding

    model = lm.load_model(model_dir)
    tok = model.image_tokenizer
    pre = tok.config.preprocess
    held_out = PhantomDataset(variant.num_eval * 4, seed=1, size=pre.image_size, channels=pre.channels)
    recon = evaluate_reconstruction(
        tok, held_out, batch_size=32, lpips=LPIPSConfig(enabled=False), kid_subsets=10
    )
    write_report(recon, run_dir / "reconstruction", "uv run python -m tools.quickstart (stage 5)")

    gen = evaluate_generation(
        model, GenerationEvalConfig(num_prompts=variant.num_eval, cfg_scales=[1.0, 3.0])
    )
    write_generation(gen, run_dir / "generation", "uv run python -m tools.quickstart (stage 5)")
    und = evaluate_understanding(model, UnderstandingEvalConfig(num_images=variant.num_eval))
    write_understanding(und, run_dir / "understanding", "uv run python -m tools.quickstart (stage 5)")
    return write_summary(run_dir, stages, variant, {**timings, "evaluation": time.perf_counter() - begin})


def write_summary(run_dir: Path, stages: Path, variant, timings: dict[str, float]) -> Path:
    """``summary.md``: each section's table and pictures, and where the trained models are."""
    per_stage = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in timings.items())
    lines = [
        "# MedTok-LM quickstart",
        "",
        f"Variant: tokenizer `{variant.tokenizer}` at {variant.image_size}², LM `{variant.lm}`; "
        f"{variant.num_train} training phantoms; {sum(timings.values()) / 60:.1f} min in all ({per_stage} min).",
        "The vision teacher and the text encoder were the built-in **random** networks: alignment here shows",
        "the mechanics, not pretrained semantics. Trained models:",
        f"`{stages / 'tokenizer_text' / 'tokenizer'}` (image tokenizer), `{stages / 'lm' / 'model'}` (LM).",
        "",
    ]
    for name, title in SECTIONS:
        folder = run_dir / name
        lines += [f"## {title}", ""]
        table = folder / "metrics.md"
        if table.is_file():
            lines += [table.read_text().strip(), ""]
        for png in sorted(folder.glob("*.png")):
            lines += [f"![{png.stem}]({name}/{png.name})", ""]
    summary = run_dir / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def summary_numbers(run_dir: Path) -> dict[str, list[float]]:
    """Every number in each section's ``metrics.json`` (for checks that they are present and finite)."""
    out: dict[str, list[float]] = {}
    for name, _ in SECTIONS:
        data = json.loads((run_dir / name / "metrics.json").read_text())
        out[name] = [float(v) for v in json_numbers(data)]
    return out


def json_numbers(obj):
    """Every number inside a JSON value (booleans are flags, not figures)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_numbers(v)


def all_finite(numbers: dict[str, list[float]]) -> bool:
    return all(numbers.values()) and all(math.isfinite(v) for vs in numbers.values() for v in vs)
