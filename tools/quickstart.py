"""The main job: the whole pipeline on built-in phantom data, on a CPU, in minutes.

    uv run python -m tools.quickstart            # 6-10 min on 2 CPU cores (docs/BENCHMARKS.md); CUDA when present
    uv run python -m tools.quickstart --fast     # half-minute smoke run (tiny models)

Stages: phantoms → tokenizer stage ``visual`` → stage ``text`` → code shards → LM → evaluation. Stage
outputs go to ``outputs/quickstart-<variant>/`` and are reused by the next run (``--fresh`` retrains);
each run writes its report to ``outputs/<date-time>/summary.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the quickstart never touches the network

from tools.schemas import compose  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """Sizes and step counts of one quickstart variant."""

    tokenizer: str
    lm: str
    image_size: int
    num_train: int
    num_eval: int
    visual_steps: int
    text_steps: int
    lm_steps: int
    batch_size: int
    lm_batch_size: int


VARIANTS = {
    # 64² keeps the LM's image 8x8 positions (sequences of ~100), which is what fits 10 CPU minutes
    "full": Variant("small", "small", 64, 2048, 64, 600, 200, 560, 16, 16),
    "fast": Variant("tiny", "tiny", 32, 256, 16, 30, 20, 40, 16, 8),
}


def say(message: str) -> None:
    print(f"\n\033[1m== {message}\033[0m", flush=True)


def done(path: Path) -> bool:
    return (path / "config.json").is_file()


def train_tokenizer(v: Variant, stages: Path, device: str) -> Path:
    from tools.train_tokenizer import train

    common = [
        f"tokenizer={v.tokenizer}",
        "data=phantoms",
        f"data.num_train={v.num_train}",
        f"data.batch_size={v.batch_size}",
        f"trainer={device}",
        "trainer.val_every_n_steps=0",
        "trainer.log_every_n_steps=10",
        "loss.lpips_weight=0",  # LPIPS-VGG costs 10x a CPU step; on a GPU, drop this override
        "loss.gan_weight=0",
        "optim.warmup_steps=50",
        "optim.lr=1e-3",  # 2x the MedITok default: better in short runs (docs/BENCHMARKS.md)
        f"tokenizer.preprocess.image_size={v.image_size}",
    ]
    visual, text = stages / "tokenizer_visual", stages / "tokenizer_text"
    if not done(visual / "tokenizer"):
        say(
            f"1/5 tokenizer stage 'visual' ({v.visual_steps} steps) — teacher: built-in RANDOM vision network"
        )
        train(
            compose(
                "train_tokenizer",
                [*common, "stage=visual", f"trainer.max_steps={v.visual_steps}", f"run_dir={visual}"],
            )
        )
    else:
        say(f"1/5 tokenizer stage 'visual': reusing {visual}")
    if not done(text / "tokenizer"):
        say(f"2/5 tokenizer stage 'text' ({v.text_steps} steps) — text encoder: built-in RANDOM bag-of-words")
        overrides = [
            *common,
            "stage=text",
            f"init_from={visual / 'tokenizer'}",
            f"trainer.max_steps={v.text_steps}",
        ]
        train(compose("train_tokenizer", [*overrides, f"run_dir={text}"]))
    else:
        say(f"2/5 tokenizer stage 'text': reusing {text}")
    return text / "tokenizer"


def encode(v: Variant, tokenizer: Path, stages: Path, device: str) -> list[Path]:
    from tools.encode_dataset import encode as encode_run

    shards = []
    for name, seed, num in (("train", 0, v.num_train), ("val", 1, v.num_eval)):
        out = stages / f"shard_{name}"
        shards.append(out)
        if (out / "index.jsonl").is_file():
            say(f"3/5 code shard '{name}': reusing {out}")
            continue
        say(f"3/5 encoding {num} {name} phantoms into {out}")
        overrides = [
            f"tokenizer.checkpoint={tokenizer}",
            "data=phantoms",
            f"data.num_train={num}",
            f"data.seed={seed}",
            f"split={name}",
            f"out={out}",
            f"trainer={device}",
        ]
        encode_run(compose("encode_dataset", overrides))
    return shards


def train_lm(v: Variant, tokenizer: Path, shards: list[Path], stages: Path, device: str) -> Path:
    from lm.config import lm_config
    from tools.train_lm import train

    run_dir = stages / "lm"
    if done(run_dir / "model"):
        say(f"4/5 LM: reusing {run_dir / 'model'}")
        return run_dir / "model"
    say(f"4/5 LM '{v.lm}' on both directions (image→report, prompt→image) + VQA ({v.lm_steps} steps)")
    overrides = [
        f"lm={v.lm}",
        f"tokenizer.checkpoint={tokenizer}",
        f"data.shard_dirs=[{','.join(str(s) for s in shards)}]",
        f"data.batch_size={v.lm_batch_size}",
        # ~9 VQA pairs per phantom in records of 3 turns (as long as a caption record, so no padding waste),
        # half of them after the caption as a report; three quarters of the caption pairs prompt → image
        # (the recipe of lm33 in docs/BENCHMARKS.md: reports 93.8 % exact at 128²).
        "data.mix={caption:3.0,vqa:0.5,records:0.0}",
        "data.vqa_turns=3",
        "data.image_first=0.25",
        "data.vqa_report_first=0.5",
        # half the reports' and VQA's images learnt too, as unconditional ones: 16 % longer steps,
        # and the prompted findings drawn in place more often at guidance 3 (most of what learning all of them
        # gains, at a little over half its cost: understanding_image_loss in BENCHMARKS)
        "data.understanding_image_loss=0.5",
        # what each quadrant holds as an auxiliary target (lm/grounding.py), on the middle block: it lets
        # prompts place findings and questions find the region they name (lm37 in docs/BENCHMARKS.md)
        "data.grounding=true",
        "optim.grounding_weight=0.5",
        f"optim.grounding_layer={lm_config(v.lm).n_layers // 2}",
        # and the prompt's modality at every image position: the drawn images keep it (lm50 there)
        "optim.grounding_kind_weights={modality:0.5}",
        # a short run wants a high peak: lr 2e-3 after 50 warm-up steps halves the image loss of the default
        # (3e-4 after 200) and draws more prompted findings (the quickstart LM sweep in docs/BENCHMARKS.md)
        "optim.lr=2e-3",
        "optim.warmup_steps=50",
        f"trainer={device}",
        f"trainer.max_steps={v.lm_steps}",
        "trainer.val_every_n_steps=0",
        f"run_dir={run_dir}",
    ]
    return train(compose("train_lm", overrides))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="tiny models, ~3 minutes (CI smoke run)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing it")
    parser.add_argument("--outputs", default="outputs", help="folder for stage outputs and run reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from tools.quickstart_report import evaluate_and_report

    variant_name = "fast" if args.fast else "full"
    v = VARIANTS[variant_name]
    outputs = Path(args.outputs)
    stages = outputs / f"quickstart-{variant_name}"
    if args.fresh and stages.exists():
        shutil.rmtree(stages)
    run_dir = outputs / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    say(f"MedTok-LM quickstart ({variant_name}) on {device.upper()}; stages in {stages}, report in {run_dir}")

    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        begin = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - begin
        return result

    tokenizer = timed("tokenizer (stages visual + text)", train_tokenizer, v, stages, device)
    shards = timed("encoding to code shards", encode, v, tokenizer, stages, device)
    model = timed("LM", train_lm, v, tokenizer, shards, stages, device)
    say("5/5 evaluation: reconstruction, prompt → image, image → report, VQA")
    summary = timed("evaluation", evaluate_and_report, model, v, run_dir, stages, timings)
    for name, seconds in timings.items():
        print(f"   {name}: {seconds / 60:.1f} min")
    say(f"done in {(time.perf_counter() - start) / 60:.1f} min — open {summary}")
    return summary


if __name__ == "__main__":
    main()
