"""Speed benchmark of the tokenizer, the quantizer, the LM and training, each figure beside its reference.

    uv run python tools/benchmark.py                    # CPU (and CUDA when present), tiny + small presets
    uv run python -m tools.benchmark --quick --out DIR  # tiny sizes, well under a minute (the test suite)
    uv run python tools/benchmark.py --device cuda --presets tiny small base large --peak-tflops 790

Writes ``benchmark.json`` and ``benchmark.md`` to ``--out`` (default ``outputs/benchmark/<date-time>``).

Sections per device:

- ``tokenizer``: ``encode_to_codes`` and ``decode_codes`` images/s per preset and batch size;
- ``quantizer``: :func:`tokenizer.quantizer.benchmark_lookup`, our look-up vs a bare normalised matmul +
  argmax and vs the library's eval forward (K=8, d=8 at V=1024 and 4096; 8 images of 16x16);
- ``lm_prefill`` / ``lm_decode`` (``tools/bench_lm.py``): the LM preset with the matching tokenizer's
  vocabulary (quick: ``tiny`` with the tiny tokenizer's K=2, V=16, 8x8; full: ``small`` with K=8, V=1024,
  16x16, 8192 text ids) against Hugging Face ``LlamaForCausalLM`` of the same width, depth, heads, kv
  heads and MLP width.
  Decoding is :func:`lm.generate.generate_image_codes` (top-k 100, with and without guidance at
  cfg 3.0) against two references: ``hf_positions`` generates h*w tokens (one per image position: the
  same sequence length) and ``hf_subcodes`` generates h*w*K tokens (the same image as flat sub-codes).
  With guidance HF decodes the doubled batch, as we do (it skips the logit mixing). ``hf_subcodes`` takes
  ~18x longer than ours on a CPU (8x the steps over an 8x longer sequence: 100 s at batch 8), so the full
  run skips it unless asked: ``--hf-subcodes bar`` times it once at batch 8 with guidance, ``all``
  everywhere, in every round.
- ``channels_last`` (only when named in ``--sections``): the training preset's tokenizer with model and input
  in the default and in the channels-last memory format, in turn: encode / decode images/s at batch 8 and
  training steps/s as in ``training``.
- ``training``: steps/s and samples/s of a forward + backward + optimizer step without Lightning. The
  tokenizer step is ``TokenizerSystem.generator_losses`` (model + 0.2 L1 + L2 + VQ; no LPIPS, no GAN,
  no alignment) + backward + grad clip + the system's AdamW; the LM step is ``LMSystem.losses`` on packed
  text->image records + backward + clip + AdamW. bf16 autocast on CUDA and on CPUs with native bf16.

Every row records the peak memory while it was measured: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS on the CPU (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere the
peak since start, ``getrusage``). Model FLOPs utilisation (CUDA only): 6 N tokens/s (training) or 2 N tokens/s (prefill) over
``--peak-tflops``, with N the LM's parameters without embeddings and output heads. Timings are the best
of ``--reps`` runs after a warm-up; compared functions are timed in turn, so background load hits both
alike. CPU inference runs in fp32 on ``--threads`` intra-op threads, 1 by default: on the shared 2-core
machine two threads fighting other work over the cores made this run more than 4x slower.
Decoding is also timed with ``compile=True`` (``--compile``; default only at batch 8 with guidance, the
bar's configuration): ``ours_compiled`` beside eager ``ours``, and ``compile_s``, the extra seconds of the
first, compiling call. Compilation uses the default inductor mode (no CUDA graphs).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as ``python tools/benchmark.py``: sys.path[0] is tools/, whose
    # tokenize.py would shadow the standard library's; the repository root goes there instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tools.bench_lm import bench_decode, bench_prefill, build_lm, lm_flops_params  # noqa: E402
from tools.bench_timing import Clock, autocast, peak_memory_mib, reset_peak  # noqa: E402
from tools.trainer import cpu_has_bf16  # noqa: E402

SECTIONS = ("tokenizer", "quantizer", "lm", "training", "channels_last")
"""What one run can measure; ``--sections`` picks some."""
DEFAULT_SECTIONS = SECTIONS[:4]
"""What a run measures unless told (``channels_last`` is a one-off comparison, asked for by name)."""


@dataclass(frozen=True)
class Plan:
    """What one run measures (``--quick`` shrinks every size)."""

    presets: tuple[str, ...]
    batches: tuple[int, ...] = (1, 8)
    lm_preset: str = "small"
    lm_vocab: tuple[int, int, int, int] = (8192, 8, 1024, 16)
    """(text ids, K, V, grid side) of the LM's vocabulary."""
    lookups: tuple[dict, ...] = (dict(codebook_size=1024), dict(codebook_size=4096))
    tokenizer_train: tuple[str, int] = ("small", 16)
    lm_train_batch: int = 8
    reps: int = 2
    hf_subcodes: str = "none"
    compile: str = "bar"
    """Where to also time ``compile=True`` decoding: "bar" (batch 8 with guidance), "all" or "none"."""


QUICK = Plan(
    presets=("tiny",),
    lm_preset="tiny",
    lm_vocab=(256, 2, 16, 8),
    lookups=(dict(batch=2, grid=8, num_codebooks=2, codebook_size=64, codebook_dim=4),),
    tokenizer_train=("tiny", 4),
    lm_train_batch=2,
    reps=2,
    hf_subcodes="all",
    compile="none",
)


# ----------------------------------------------------------------------------------------------- tokenizer
def bench_tokenizer(plan: Plan, clock: Clock) -> list[dict]:
    """encode_to_codes / decode_codes images/s per preset and batch size."""
    from tokenizer.api import create_tokenizer

    rows = []
    for preset in plan.presets:
        model = create_tokenizer(preset).to(clock.device).eval()
        rows += [_tokenizer_row(model, preset, batch, clock) for batch in plan.batches]
    return rows


@torch.no_grad()
def _tokenizer_row(
    model, preset: str, batch: int, clock: Clock, memory_format=torch.contiguous_format
) -> dict:
    size, channels = model.config.preprocess.image_size, model.config.preprocess.channels
    reset_peak(clock.device)
    x = (torch.rand(batch, channels, size, size, device=clock.device) * 2 - 1).contiguous(
        memory_format=memory_format
    )
    codes = model.encode_to_codes(x)
    t = clock.best({"encode": lambda: model.encode_to_codes(x), "decode": lambda: model.decode_codes(codes)})
    return {
        "preset": preset, "batch": batch, "image_size": size,
        "encode_images_per_s": batch / t["encode"], "decode_images_per_s": batch / t["decode"],
        "peak_memory_mib": peak_memory_mib(clock.device),
    }  # fmt: skip


def bench_quantizer(plan: Plan, clock: Clock) -> list[dict]:
    """Our inference look-up vs a bare normalised matmul + argmax vs the library's eval forward."""
    from tokenizer.quantizer import benchmark_lookup

    rows = []
    for shape in plan.lookups:
        reset_peak(clock.device)
        result = benchmark_lookup(**shape, repeats=max(5, 3 * clock.reps), device=clock.device)
        rows.append({**result, "peak_memory_mib": peak_memory_mib(clock.device)})
    return rows


# ----------------------------------------------------------------------------------------------- training
def lm_batch(vocab, batch: int):
    """``batch`` packed text->image records: <bos> 20 text ids <boi> image <eoi> <eos>, loss on the image."""
    from lm.data import text_to_image_record
    from lm.sequence import build_sequence, pack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(vocab.codebook_size, (vocab.num_codebooks, *vocab.grid), generator=g)
    record = text_to_image_record("a prompt", "shard:0")
    seq = build_sequence(record, vocab, lambda text: list(range(3, 23)), lambda ref: codes)
    return pack([seq] * batch, seq.tokens.shape[0], vocab.pad)


def time_steps(step: Callable[[], object], clock: Clock, steps: int = 2) -> float:
    """Seconds per optimizer step: a warm-up run, then the best of ``reps`` runs of ``steps`` steps."""

    def run():
        for _ in range(steps):
            step()

    return clock.best({"run": run})["run"] / steps


def bench_training(plan: Plan, lm_model, clock: Clock, bf16: bool, peak_tflops: float) -> list[dict]:
    """Tokenizer and LM training steps/s and samples/s (see the module docstring)."""
    row = lm_training(plan, lm_model, clock, bf16)
    if clock.device.type == "cuda":
        row["mfu"] = 6 * lm_flops_params(lm_model) * row["tokens_per_s"] / (peak_tflops * 1e12)
    return [tokenizer_training(plan, clock, bf16), row]


def tokenizer_training(plan: Plan, clock: Clock, bf16: bool, memory_format=torch.contiguous_format) -> dict:
    """``TokenizerSystem.generator_losses`` (recon stage, no LPIPS / GAN) + backward + clip + AdamW."""
    from tokenizer.alignment import AlignmentConfig
    from tokenizer.config import create_config
    from tokenizer.losses import LossConfig
    from tokenizer.system import TokenizerSystem, TokenizerTrainConfig

    device, (preset, batch) = clock.device, plan.tokenizer_train
    config = TokenizerTrainConfig(
        model=create_config(preset), loss=LossConfig(lpips_weight=0.0, gan_weight=0.0),
        alignment=AlignmentConfig(stage="recon"),
    )  # fmt: skip
    system = TokenizerSystem(config).to(device, memory_format=memory_format).train()
    (opt, _), _ = system.configure_optimizers()
    size = system.model.config.preprocess.image_size
    x = torch.rand(batch, system.model.config.preprocess.channels, size, size, device=device) * 2 - 1
    x = x.contiguous(memory_format=memory_format)

    def step():
        with autocast(device, bf16):
            loss = system.generator_losses(x, None, 0)[0]["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(system.model.parameters(), config.optim.grad_clip)
        opt.step()

    reset_peak(device)
    return _train_row("tokenizer", preset, batch, time_steps(step, clock), size * size, device)


def bench_channels_last(plan: Plan, clock: Clock, bf16: bool) -> list[dict]:
    """The training preset's tokenizer in the default and the channels-last memory format, in turn:
    inference at batch 8 (fp32) and a training step (as ``training``), model and input in that format."""
    from tokenizer.api import create_tokenizer

    rows = []
    preset = plan.tokenizer_train[0]
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = create_tokenizer(preset).to(clock.device, memory_format=fmt).eval()
        row = _tokenizer_row(model, preset, 8, clock, fmt)
        train = tokenizer_training(plan, clock, bf16, fmt)
        rows.append(
            {"memory_format": name, **row, "train_steps_per_s": train["steps_per_s"],
             "peak_memory_mib": max(row["peak_memory_mib"], train["peak_memory_mib"])}
        )  # fmt: skip
    return rows


def lm_training(plan: Plan, lm_model, clock: Clock, bf16: bool) -> dict:
    """``LMSystem.losses`` on packed text->image records + backward + clip + AdamW."""
    from lm.system import LMSystem, LMTrainConfig

    device, vocab, batch = clock.device, lm_model.vocab, plan.lm_train_batch
    system = LMSystem(LMTrainConfig(model=lm_model.config, vocab=vocab.to_dict())).to(device).train()
    opt = system.configure_optimizers()["optimizer"]
    data = lm_batch(vocab, batch).to(device)

    def step():
        with autocast(device, bf16):
            loss = system.losses(data)[0]["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(system.parameters(), system.config.optim.grad_clip)
        opt.step()

    reset_peak(device)
    return _train_row("lm", plan.lm_preset, batch, time_steps(step, clock), data.tokens.shape[1], device)


def _train_row(name: str, preset: str, batch: int, seconds: float, tokens: int, device) -> dict:
    """``tokens``: pixels per image (tokenizer) or positions per sequence (LM)."""
    return {
        "model": name, "preset": preset, "batch": batch, "steps_per_s": 1 / seconds,
        "samples_per_s": batch / seconds, "tokens_per_s": batch * tokens / seconds,
        "peak_memory_mib": peak_memory_mib(device),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- run
def run_device(plan: Plan, device: torch.device, peak_tflops: float, sections=DEFAULT_SECTIONS) -> dict:
    """The chosen sections of :data:`SECTIONS` on one device."""
    clock = Clock(device, plan.reps)
    bf16 = device.type == "cuda" or cpu_has_bf16()
    infer_bf16 = device.type == "cuda"  # CPU inference stays fp32 (small bf16 matmuls are slower there)
    result = {"training_bf16": bf16, "inference_bf16": infer_bf16}
    for name, fn in (("tokenizer", bench_tokenizer), ("quantizer", bench_quantizer)):
        if name in sections:
            print(f"[{device}] {name} ...", flush=True)
            result[name] = fn(plan, clock)
    if "channels_last" in sections:
        print(f"[{device}] channels_last ...", flush=True)
        result["channels_last"] = bench_channels_last(plan, clock, bf16)
    if "lm" not in sections and "training" not in sections:
        return result
    model, hf = build_lm(plan, device)
    if "lm" in sections:
        print(f"[{device}] lm ...", flush=True)
        result["lm_prefill"] = [
            bench_prefill(model, hf, b, clock, infer_bf16, peak_tflops) for b in plan.batches
        ]
        result["lm_decode"] = bench_decode(plan, model, hf, clock, infer_bf16)
    if "training" in sections:
        print(f"[{device}] training ...", flush=True)
        result["training"] = bench_training(plan, model, clock, bf16, peak_tflops)
    return result


def bars(results: dict) -> list[dict]:
    """The issue's acceptance ratios as measured in this run (they are set for the full run's sizes)."""
    out = []
    for device, r in results.items():
        if "quantizer" in r:
            worst = max(q["fast_over_baseline"] for q in r["quantizer"])
            out.append(
                {"device": device, "bar": "quantizer look-up / bare matmul+argmax <= 1.5", "value": worst}
            )
        for row in r.get("lm_decode", []):
            for ref in ("hf_positions", "hf_subcodes"):
                for kind in ("", "compiled_"):
                    value = row.get(f"{kind}speedup_vs_{ref}")
                    if row["batch"] == 8 and row["cfg_scale"] != 1.0 and value is not None:
                        bar = f"{'compiled ' if kind else ''}decode speed-up vs {ref}, batch 8 + guidance >= 1.5"
                        out.append({"device": device, "bar": bar, "value": value})
    for b in out:
        b["met"] = b["value"] <= 1.5 if b["bar"].startswith("quantizer") else b["value"] >= 1.5
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _table(title: str, rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    head = ["", f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return head + ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]


def markdown(report: dict) -> str:
    """The run's settings, one table per device and section, then the bars."""
    meta = report["meta"]
    lines = [f"# Benchmark {meta['date']}", "", f"`{meta['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("date", "command")]
    for device, sections in report["results"].items():
        lines += [
            f"- {device}: " + ", ".join(f"{k} {v}" for k, v in sections.items() if not isinstance(v, list))
        ]
    for device, sections in report["results"].items():
        for name, rows in sections.items():
            lines += _table(f"{device}: {name}", rows) if isinstance(rows, list) and rows else []
    if report["bars"]:
        lines += _table("Bars (set for the full run's sizes)", report["bars"])
    return "\n".join(lines) + "\n"


def metadata(args: argparse.Namespace, plan: Plan, argv: list[str]) -> dict:
    import transformers

    meta = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python tools/benchmark.py", *argv]),
        "quick": args.quick, "reps": plan.reps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_bf16": cpu_has_bf16(),
    }  # fmt: skip
    if torch.cuda.is_available():
        meta["cuda_device"] = torch.cuda.get_device_name()
    from lm.config import lm_config

    meta["lm_config"] = lm_config(plan.lm_preset).to_dict()
    return meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA when present"
    )
    p.add_argument(
        "--presets", nargs="+", choices=("tiny", "small", "base", "large"), help="tokenizer presets"
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=DEFAULT_SECTIONS,
        help="what to measure (default all but channels_last)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes only (the test suite's run)")
    p.add_argument("--reps", type=int, help="best of this many timed runs (default 2)")
    p.add_argument(
        "--hf-subcodes",
        choices=("bar", "all", "none"),
        help="where to time the h*w*K-token HF reference (default none)",
    )
    p.add_argument(
        "--compile", choices=("bar", "all", "none"), help="where to time compiled decoding (default bar)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="device peak for MFU (H200 bf16: 790)")
    p.add_argument("--out", type=Path, help="output folder (default outputs/benchmark/<date-time>)")
    args = p.parse_args(argv)
    if (args.reps is not None and args.reps < 1) or args.threads < 1:
        p.error("--reps and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan(presets=("tiny", "small"))
    overrides = {
        "presets": tuple(args.presets or ()), "reps": args.reps, "hf_subcodes": args.hf_subcodes,
        "compile": args.compile,
    }  # fmt: skip
    plan = replace(plan, **{k: v for k, v in overrides.items() if v})
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    out = args.out or Path("outputs/benchmark") / datetime.now().strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    results = {d: run_device(plan, torch.device(d), args.peak_tflops, args.sections) for d in devices}
    report = {"meta": metadata(args, plan, argv), "results": results}
    report["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    report["bars"] = bars(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {out}/benchmark.json and benchmark.md ({report['meta']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
