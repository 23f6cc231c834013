"""Timing and peak-memory helpers of ``tools/benchmark.py`` (and its LM sections, ``tools/bench_lm.py``).

Wall time is the best of ``reps`` runs after a warm-up, CUDA work synchronised before the clock stops.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak RSS (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere the peak since start, ``getrusage``).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from pathlib import Path

import torch


class Clock:
    """Best-of-reps wall time on one device (CUDA work is synchronised before the clock stops)."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best(self, fns: dict[str, Callable[[], object]], warmup: bool = True, once=()) -> dict[str, float]:
        """Seconds per call of each function: a warm-up round, then ``reps`` rounds timed in turn.

        Functions named in ``once`` run in the first timed round only (for references that take many
        times longer than the rest, where one run is both stable enough and most of the budget).
        """
        times: dict[str, list[float]] = {name: [] for name in fns}
        for rnd in range(self.reps + 1):
            for name, fn in fns.items():
                if (rnd == 0 and not warmup) or (name in once and rnd > 1):
                    continue
                start = time.perf_counter()
                fn()
                self.sync()
                if rnd:
                    times[name].append(time.perf_counter() - start)
        return {name: min(values) for name, values in times.items()}


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since :func:`reset_peak`; CPU: the process's peak RSS (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS
