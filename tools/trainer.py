"""The one place that turns a :class:`TrainerConfig` into a Lightning ``Trainer`` for every entry point."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")


@dataclass
class TrainerConfig:
    """Lightning trainer settings; presets in ``conf/trainer/`` (cpu, gpu, ddp, fsdp)."""

    accelerator: str = "auto"
    """"cpu", "gpu" or "auto" (CUDA when present)."""
    devices: Any = "auto"
    """Devices per node: an int, a list of ids, or "auto"."""
    num_nodes: int = 1
    """Machines in the job (SLURM / torchrun set the ranks)."""
    strategy: str = "auto"
    """"auto", "ddp", "ddp_spawn" or "fsdp" (FSDP wraps the transformer blocks)."""
    precision: str = "auto"
    """"auto" (bf16-mixed on a GPU with bf16, bf16-mixed on a CPU with avx512_bf16, else 32), or a Lightning precision."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    log_every_n_steps: int = 10
    """How often scalars are logged."""
    val_every_n_steps: int = 500
    """Validation (and image grids) every this many steps; 0 disables validation."""
    checkpoint_every_n_steps: int = 200
    """A resumable ``last.ckpt`` every this many steps (written atomically)."""
    deterministic: bool = False
    """torch deterministic algorithms (bitwise-reproducible CPU runs, slower on GPU)."""
    progress_bar: bool = True
    """Rich progress bar with ETA."""
    fsdp_activation_checkpointing: bool = True
    """With strategy=fsdp, checkpoint activations of each wrapped block."""
    extra: dict = field(default_factory=dict)
    """Extra keyword arguments passed to ``lightning.Trainer`` as they are."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.num_nodes < 1:
            raise ValueError(f"trainer.num_nodes must be >= 1, got {self.num_nodes}")


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix work natively (avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: TrainerConfig) -> str:
    """The Lightning precision string for ``cfg.precision == "auto"``."""
    if cfg.precision != "auto":
        return cfg.precision
    import torch

    if cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def build_strategy(
    cfg: TrainerConfig, block_types: tuple[type, ...] = (), find_unused_parameters: bool = False
) -> Any:
    """A Lightning strategy; FSDP wraps ``block_types`` and checkpoints their activations.

    ``find_unused_parameters``: DDP tolerates parameters that a step leaves without a gradient (the
    tokenizer's discriminator before the GAN starts, its alignment head in stage ``recon``).
    """
    if cfg.strategy in ("ddp", "ddp_spawn") and find_unused_parameters:
        return f"{cfg.strategy}_find_unused_parameters_true"
    if cfg.strategy != "fsdp":
        return cfg.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    kwargs: dict[str, Any] = {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}
    if block_types:
        kwargs["auto_wrap_policy"] = set(block_types)
        if cfg.fsdp_activation_checkpointing:
            kwargs["activation_checkpointing_policy"] = set(block_types)
    return FSDPStrategy(**kwargs)


def build_trainer(
    cfg: TrainerConfig,
    run_dir: Path,
    *,
    callbacks: list | None = None,
    block_types=(),
    find_unused_parameters: bool = False,
) -> Any:
    """A ``lightning.Trainer`` writing logs and checkpoints under ``run_dir`` (see :func:`build_strategy`)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from tools.resume import AtomicCheckpointIO, RandomState

    # The tokenizer's manual-optimization system checkpoints the state after its step on purpose (resume is
    # exact, see tests/tools/test_train_tokenizer.py); Lightning would print a 15-line example against that
    # at every run.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # exact resume: the random generators travel with the checkpoint
    callbacks = [*(callbacks or []), RandomState()]
    callbacks.append(
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_on_train_epoch_end=False,
        )
    )
    if cfg.progress_bar:

        class StepLimitedBar(RichProgressBar):
            # Lightning titles a run limited by max_steps (max_epochs -1) "Epoch 0/-2"
            def _get_train_description(self, current_epoch: int) -> str:
                if self.trainer.max_epochs == -1 and self.trainer.max_steps > 0:
                    return f"Epoch {current_epoch} (run ends at step {self.trainer.max_steps})"
                return super()._get_train_description(current_epoch)

        callbacks.append(StepLimitedBar(leave=True))
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg, block_types, find_unused_parameters),
        precision=resolve_precision(cfg),
        max_steps=cfg.max_steps,
        log_every_n_steps=cfg.log_every_n_steps,
        val_check_interval=cfg.val_every_n_steps or None,
        limit_val_batches=None if cfg.val_every_n_steps else 0,
        check_val_every_n_epoch=None,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.progress_bar,
        default_root_dir=str(run_dir),
        logger=CSVLogger(str(run_dir), name="logs"),  # logs/version_N: a resumed run keeps earlier logs
        callbacks=callbacks,
        **({"plugins": [AtomicCheckpointIO()]} | cfg.extra),  # a kill never leaves half a last.ckpt
    )


def last_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoints/last.ckpt`` when a previous run of this directory left one.

    Temporary files of a save that a kill interrupted are deleted (the run being resumed is the only writer).
    """
    from tokenizer.atomic import remove_stale_temps

    for tmp in remove_stale_temps(run_dir / "checkpoints"):
        log.info("removed %s, left by an interrupted checkpoint save", tmp)
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def save_resolved_config(run_dir: Path, config: dict) -> None:
    """Save the fully resolved run config beside the run's outputs.

    Every rank of a multi-process run may call this at once: each writes its own temporary file (a shared name
    let one rank rename the file away under another), and the identical copies replace each other atomically.
    """
    from tokenizer.atomic import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str))
