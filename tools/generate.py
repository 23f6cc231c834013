"""Generate images from prompts, or describe an image, with a trained LM.

    uv run python -m tools.generate --model outputs/lm/model --prompt "Chest CT with one small nodule" \\
        --num 4 --cfg-scale 3 --seed 0 --out generated/
    uv run python -m tools.generate --model outputs/lm/model --describe scan.png [--question "How many?"] \\
        [--report-first]

Image mode writes ``<out>/p{prompt:02d}_{n:02d}.png`` (grayscale for one channel, RGB for three) and
``<out>/prompts.json`` (the model, every setting and, per PNG, its prompt and seed). Describe mode prints
the report (or the answer) on stdout; with ``--report-first`` the model writes a one-line report before it
answers (for an LM trained with ``data.vqa_report_first``). ``--negative-prompt`` is a description that
guidance pushes away from instead of the unconditional ``<bos><boi>``; ``--cfg-interval 0.125 1`` leaves the
first eighth of the raster unguided (on phantoms that keeps the prompted modality). ``--modality`` fills the prompt
template's modality in image mode and chooses the intensity rule of the input in describe mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def to_pil(image: torch.Tensor):
    """(C, H, W) in [-1, 1] -> an 8-bit PIL image (mode L for C = 1, RGB for C = 3)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (1|3, H, W), got shape {tuple(image.shape)}")
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    array = np.ascontiguousarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    return Image.fromarray(array)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (UnifiedModel.save_pretrained)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="text→image prompt; repeat for several")
    mode.add_argument("--describe", metavar="IMAGE", help="image file to describe")
    parser.add_argument("--out", help="output directory for PNGs and prompts.json (image mode)")
    parser.add_argument("--num", type=int, default=4, help="images per prompt")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 disables it")
    parser.add_argument(
        "--cfg-interval",
        nargs=2,
        type=float,
        default=(0.0, 1.0),
        metavar=("START", "END"),
        help="guide only image positions p with START <= p / (h*w) < END (e.g. 0.125 1: the first rows unguided)",
    )
    parser.add_argument(
        "--negative-prompt", help="image mode: what guidance pushes away from (default: <bos><boi>)"
    )
    parser.add_argument("--temperature", type=float, default=None, help="default 0.7 (images) / 0 (text)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="prompt p uses seed + p")
    parser.add_argument("--modality", help="e.g. ct, mr, xray (see the module docstring)")
    parser.add_argument("--question", help="describe mode: a question instead of the report instruction")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="describe mode: text budget")
    parser.add_argument(
        "--report-first", action="store_true", help="describe mode: write a report, then answer the question"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="image mode: torch.compile the decode steps (pays off for many images)",
    )
    args = parser.parse_args(argv)
    if args.prompt and not args.out:
        parser.error("--out is required with --prompt")
    if args.num < 1:
        parser.error("--num must be >= 1")
    return args


def write_images(model, args: argparse.Namespace) -> Path:
    """Generate ``--num`` images per prompt; write PNGs and prompts.json; returns the output directory."""
    from lm.api import generate_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temperature = 0.7 if args.temperature is None else args.temperature
    records = []
    for p, prompt in enumerate(args.prompt):
        seed = args.seed + p
        images, _ = generate_image(
            model, [prompt] * args.num, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
            temperature=temperature,
            top_k=args.top_k, top_p=args.top_p, seed=seed, modality=args.modality, compile=args.compile,
            negative_prompt=args.negative_prompt,
        )  # fmt: skip
        for n, image in enumerate(images):
            name = f"p{p:02d}_{n:02d}.png"
            to_pil(image).save(out / name)
            records.append({"file": name, "prompt": prompt, "index": n, "seed": seed})
    settings = {
        "model": str(args.model),
        "cfg_scale": args.cfg_scale,
        "cfg_interval": list(args.cfg_interval),
        "negative_prompt": args.negative_prompt,
        "temperature": temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "modality": args.modality,
        "images": records,
    }
    (out / "prompts.json").write_text(json.dumps(settings, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm.api import describe_image, load_model
    from tokenizer.errors import InputError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(args.model, device=device)
        if args.describe:
            text = describe_image(
                model, Path(args.describe), args.question, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                modality=args.modality, report_first=args.report_first,
            )  # fmt: skip
            print(text)
            return 0
        out = write_images(model, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(args.prompt) * args.num} images written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
