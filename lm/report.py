"""Report files of the LM benchmarks: ``metrics.json`` / ``metrics.md`` / per-item JSONL and PNG figure grids.

Used by the ``write_report`` of ``tools/eval_generation.py`` and ``tools/eval_understanding.py``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

ATTRIBUTE_COLUMNS = (
    "n | modality | count | findings | exact | finding F1 | region / size / intensity | attribute mean"
)
"""Header cells of :func:`attribute_cells` (8 columns)."""


def pct(value: float | None) -> str:
    """A rate as a percentage with one decimal; "–" for None."""
    return "–" if value is None else f"{value:.1%}"


def attribute_cells(a: dict | None) -> list[str]:
    """The 8 table cells of an ``AttributeScores`` dict (all "–" for None), in :data:`ATTRIBUTE_COLUMNS` order."""
    if a is None:
        return ["–"] * 8
    rates = [pct(a[k]) for k in ("modality", "count", "findings", "exact", "finding_f1")]
    per_finding = " / ".join(pct(a[k]) for k in ("region", "size", "intensity"))
    return [str(a["n"]), *rates, per_finding, pct(a["attribute_mean"])]


def save_figure(
    rows: list[tuple[str, torch.Tensor]],
    titles: list[str],
    path: str | Path,
    *,
    footers: list[str] | None = None,
    wrap: int = 34,
) -> Path:
    """A PNG grid drawn with matplotlib: one row per ``(label, images (n, C, H, W) in [-1, 1])``, a title
    above each column (e.g. the prompt) and optionally a footer below the last row (e.g. the reference)."""
    from matplotlib.figure import Figure

    def printable(text: str) -> str:  # generated text may hold control bytes no font has glyphs for
        return "".join(c if c.isprintable() else "\ufffd" for c in text)

    titles, footers = [printable(t) for t in titles], footers and [printable(t) for t in footers]
    n = len(titles)
    title_lines = max(len(textwrap.wrap(t, wrap)) or 1 for t in titles)
    footer_lines = max((len(textwrap.wrap(t, wrap)) for t in footers), default=0) if footers else 0
    height = 1.9 * len(rows) + 0.11 * (title_lines + footer_lines) + 0.3
    fig = Figure(figsize=(2.1 * n, height), dpi=110, layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = ((images[j].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            gray = image.shape[-1] == 1
            ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(textwrap.fill(titles[j], wrap), fontsize=5.5, loc="left")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if footers and i == len(rows) - 1:
                ax.set_xlabel(textwrap.fill(footers[j], wrap), fontsize=5.5, loc="left")
    path = Path(path)
    fig.savefig(path)
    return path


def write_outputs(
    out_dir: str | Path, data: dict, markdown: str, samples: list[dict], samples_name: str
) -> Path:
    """Write ``metrics.json``, ``metrics.md`` and the per-item ``samples_name`` (JSONL) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / "metrics.md").write_text(markdown)
    with open(out / samples_name, "w") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    return out
