"""Channels-last against the default memory format for the `small` tokenizer (CPU, one thread).

    uv run python -m tools.bench_channels_last

Times ``encode_to_codes`` / ``decode_codes`` at batch 8 (fp32) and one recon-stage training step at batch 16
(``TokenizerSystem.generator_losses`` under bf16 autocast + backward + AdamW), best of 3 after a warm-up,
with the model and its input in each format. The result decides whether the trainers switch formats
(docs/BENCHMARKS.md): they do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    out = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


def measure(memory_format: torch.memory_format) -> dict[str, float]:
    from tokenizer.alignment import AlignmentConfig
    from tokenizer.api import create_tokenizer
    from tokenizer.config import create_config
    from tokenizer.losses import LossConfig
    from tokenizer.system import TokenizerSystem, TokenizerTrainConfig

    torch.manual_seed(0)
    model = create_tokenizer("small").eval().to(memory_format=memory_format)
    x = (torch.rand(8, 3, 128, 128) * 2 - 1).contiguous(memory_format=memory_format)
    with torch.no_grad():
        codes = model.encode_to_codes(x)
        encode = best_seconds(lambda: model.encode_to_codes(x))
        decode = best_seconds(lambda: model.decode_codes(codes))
    config = TokenizerTrainConfig(
        model=create_config("small"), loss=LossConfig(lpips_weight=0.0, gan_weight=0.0),
        alignment=AlignmentConfig(stage="recon"),
    )  # fmt: skip
    system = TokenizerSystem(config).train().to(memory_format=memory_format)
    (opt, _), _ = system.configure_optimizers()
    batch = (torch.rand(16, 3, 128, 128) * 2 - 1).contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = system.generator_losses(batch, None, 0)[0]["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {
        "encode_images_per_s": 8 / encode,
        "decode_images_per_s": 8 / decode,
        "train_steps_per_s": 1 / best_seconds(step),
    }


def main() -> None:
    torch.set_num_threads(1)
    default, channels_last = measure(torch.contiguous_format), measure(torch.channels_last)
    for name, value in default.items():
        print(
            f"{name}: default {value:.2f}, channels_last {channels_last[name]:.2f} ({channels_last[name] / value:.2f}x)"
        )


if __name__ == "__main__":
    main()
