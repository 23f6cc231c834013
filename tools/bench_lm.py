"""The LM sections of ``tools/benchmark.py``: prefill and decode timings against Hugging Face Llama.

Our ``DecoderLM`` against a random ``LlamaForCausalLM`` of the same width, depth, heads, kv heads, MLP
width and vocabulary; the benchmark's module docstring says what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tools.bench_timing import Clock, autocast, peak_memory_mib, reset_peak

if TYPE_CHECKING:
    from tools.benchmark import Plan

DECODE_PROMPT_LEN = 21
"""<bos> + 20 text ids: the prompt of every decode timing."""


def build_lm(plan: Plan, device: torch.device):
    """Our LM of the plan's preset and vocabulary, and the Hugging Face Llama of the same shape."""
    from lm.config import lm_config
    from lm.model import DecoderLM
    from lm.vocab import Vocab

    num_text, k, v, side = plan.lm_vocab
    vocab = Vocab(num_text=num_text, num_codebooks=k, codebook_size=v, grid=(side, side))
    torch.manual_seed(0)
    model = DecoderLM(lm_config(plan.lm_preset), vocab).to(device).eval()
    return model, hf_reference(model).to(device)


def hf_reference(model):
    """``LlamaForCausalLM`` with our width, depth, heads, kv heads, MLP width and vocabulary size (random)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c, vocab = model.config, model.vocab
    longest = DECODE_PROMPT_LEN + vocab.image_length * vocab.num_codebooks + 8
    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=c.dim, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, max_position_embeddings=max(c.max_seq_len, longest),
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def lm_flops_params(model) -> int:
    """N of the 6 N / 2 N FLOPs-per-token rule: parameters without embeddings and output heads."""
    return model.num_parameters(exclude_embeddings=True)


@torch.no_grad()
def bench_prefill(model, hf, batch: int, clock: Clock, bf16: bool, peak_tflops: float) -> dict:
    """Prefill of an image->text prompt (<bos><boi> image <eoi> + 20 text ids) into a fresh KV cache."""
    from lm.generate import KVCache

    vocab, device = model.vocab, clock.device
    codes = torch.randint(vocab.codebook_size, (vocab.num_codebooks, *vocab.grid))
    rows = torch.cat(
        [
            vocab.text_rows([vocab.bos, vocab.boi]),
            vocab.image_rows(codes),
            vocab.text_rows([vocab.eoi, *range(20)]),
        ]
    )
    t = rows.shape[0]
    tokens = rows.expand(batch, t, -1).to(device)
    image_pos = torch.full((t,), -1)
    image_pos[2 : 2 + vocab.image_length] = torch.arange(vocab.image_length)
    image_pos = image_pos.expand(batch, t).to(device)
    mask = torch.ones(batch, t, dtype=torch.bool, device=device)
    ids = tokens[..., 0].clone()

    def ours():
        model(tokens, image_pos, mask, kv_cache=KVCache.for_model(model, batch, t))

    with autocast(device, bf16):
        reset_peak(device)
        s = clock.best({"ours": ours, "hf": lambda: hf(ids, use_cache=True)})
    row = {
        "batch": batch, "positions": t, "ours_tokens_per_s": batch * t / s["ours"],
        "hf_tokens_per_s": batch * t / s["hf"], "speedup_vs_hf": s["hf"] / s["ours"],
        "peak_memory_mib": peak_memory_mib(device),
    }  # fmt: skip
    if device.type == "cuda":
        row["mfu"] = 2 * lm_flops_params(model) * row["ours_tokens_per_s"] / (peak_tflops * 1e12)
    return row


def time_decode(
    model,
    hf,
    batch: int,
    cfg_scale: float,
    clock: Clock,
    references=("hf_positions", "hf_subcodes"),
    *,
    warmup: bool = True,
    once=(),
    compiled: bool = False,
) -> dict[str, float]:
    """Seconds of one image generation per call at ``batch``: ``ours`` and each of ``references``.

    Ours: :func:`lm.generate.generate_image_codes` (image top-k 100); with ``compiled`` also
    ``ours_compiled`` (``compile=True``) and ``compile_s``, the extra time of its first (compiling) call.
    ``hf_positions``:
    ``LlamaForCausalLM.generate`` of h*w tokens; ``hf_subcodes``: of h*w*K tokens; both sampled with
    top-k 100 after the same 21-token prompt, for the doubled (cond + uncond) batch when guided.
    ``once``: references timed in one round only (see :meth:`Clock.best`).
    """
    from lm.generate import SamplingConfig, generate_image_codes

    vocab, device = model.vocab, clock.device
    prompt = vocab.text_rows([vocab.bos, *range(DECODE_PROMPT_LEN - 1)])
    sampling = SamplingConfig(cfg_scale=cfg_scale, image_top_k=100)
    rows = batch * (2 if cfg_scale != 1.0 else 1)
    ids = torch.arange(DECODE_PROMPT_LEN, device=device).repeat(rows, 1)
    attention = torch.ones_like(ids)
    lengths = {"hf_positions": vocab.image_length, "hf_subcodes": vocab.image_length * vocab.num_codebooks}

    def hf_generate(n: int) -> Callable[[], object]:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=100, pad_token_id=0)
        return lambda: hf.generate(ids, attention_mask=attention, **kw)

    def ours(compile: bool) -> Callable[[], object]:
        return lambda: generate_image_codes(model, [prompt] * batch, sampling, seed=0, compile=compile)

    fns = {"ours": ours(False)}
    fns.update({name: hf_generate(lengths[name]) for name in references})
    if warmup:  # lazy initialisation: one run of ours, a few tokens of HF
        fns["ours"]()
        hf_generate(4)()
    compile_s = None
    if compiled:
        fns["ours_compiled"] = ours(True)
        start = time.perf_counter()
        fns["ours_compiled"]()
        compile_s = time.perf_counter() - start
    s = clock.best(fns, warmup=False, once=once)
    if compiled:
        s["compile_s"] = compile_s - s["ours_compiled"]
    return s


@torch.no_grad()
def decode_ms_per_position(model, batch: int, reps: int = 3, cfg_scale: float = 3.0) -> tuple[float, float]:
    """Best-of-reps ms per image position of guided generation: (ours, HF generating h*w*K flat sub-codes).

    The HF model has our width, depth, heads, kv heads and MLP over the whole vocabulary (random weights).
    """
    device = next(model.parameters()).device
    hf = hf_reference(model).to(device)
    s = time_decode(model, hf, batch, cfg_scale, Clock(device, reps), references=("hf_subcodes",))
    hw = model.vocab.image_length
    return s["ours"] * 1e3 / hw, s["hf_subcodes"] * 1e3 / hw


@torch.no_grad()
def bench_decode(plan: Plan, model, hf, clock: Clock, bf16: bool) -> list[dict]:
    """ms per image position and images/s, with and without guidance, at each batch size."""
    hw, out = model.vocab.image_length, []
    once = () if plan.hf_subcodes == "all" else ("hf_subcodes",)
    for batch in plan.batches:
        for cfg in (1.0, 3.0):
            bar = batch == 8 and cfg != 1.0
            subcodes = plan.hf_subcodes == "all" or (plan.hf_subcodes == "bar" and bar)
            compiled = plan.compile == "all" or (plan.compile == "bar" and bar)
            references = ("hf_positions", "hf_subcodes") if subcodes else ("hf_positions",)
            reset_peak(clock.device)
            with autocast(clock.device, bf16):
                s = time_decode(
                    model, hf, batch, cfg, clock, references, warmup=not out, once=once, compiled=compiled
                )
            best = s.get("ours_compiled", s["ours"])
            row = {"batch": batch, "cfg_scale": cfg, "images_per_s": batch / best}
            for name in ("ours", "ours_compiled", "hf_positions", "hf_subcodes"):
                row[f"{name}_ms_per_position"] = s[name] * 1e3 / hw if name in s else None
            row["compile_s"] = s.get("compile_s")
            for name in ("hf_positions", "hf_subcodes"):
                row[f"speedup_vs_{name}"] = s[name] / s["ours"] if name in s else None
                row[f"compiled_speedup_vs_{name}"] = (
                    s[name] / s["ours_compiled"] if compiled and name in s else None
                )
            out.append({**row, "peak_memory_mib": peak_memory_mib(clock.device)})
            times = ", ".join(f"{k} {v * 1e3 / hw:.2f}" for k, v in s.items() if k != "compile_s")
            print(f"  decode batch {batch} cfg {cfg}: ms per position {times}", flush=True)
    return out
