"""Hydra structured-config schemas, registered in one place.

Every YAML under ``conf/`` names its schema in ``defaults`` (``/schema/...``), so a misspelt key fails when
the config is composed. Model size presets are registered straight from the Python preset registries
(``/schema/tokenizer/small``, ``/schema/lm/small``), so no YAML restates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lm.config import PRESETS as LM_PRESETS
from lm.config import LMConfig
from lm.data import LMDataConfig
from lm.held_out import GenerationEvalConfig, UnderstandingEvalConfig
from lm.system import LMOptimConfig
from tokenizer.alignment import AlignmentConfig
from tokenizer.config import PRESETS as TOKENIZER_PRESETS
from tokenizer.config import TokenizerConfig
from tokenizer.data.datamodule import DataConfig
from tokenizer.discriminator import DiscriminatorConfig
from tokenizer.encode import TokenizerRef
from tokenizer.evaluation import LPIPSConfig
from tokenizer.losses import LossConfig
from tokenizer.metrics import FeatureExtractorConfig
from tokenizer.probe import ZERO_SHOT_PROMPTS
from tokenizer.system import OptimConfig
from tools.trainer import TrainerConfig


@dataclass
class TrainTokenizerRun:
    """``tools/train_tokenizer.py``: one stage of tokenizer training."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: str = "visual"
    """"visual" (vision teacher), "text" (text encoder; needs init_from) or "recon" (no alignment)."""
    init_from: str | None = None
    """Tokenizer checkpoint directory this stage starts from (stage 1's ``<run_dir>/tokenizer``)."""
    ema_decay: float | None = None
    """EMA of the tokenizer weights (e.g. 0.999), exported instead of the raw weights."""
    run_dir: str = "outputs/tokenizer"
    """Where logs, checkpoints, image grids and the exported tokenizer go; an existing run resumes."""
    resume: bool = True
    """Resume from ``<run_dir>/checkpoints/last.ckpt`` when present."""
    seed: int = 0
    """Seed for weights, data order and augmentation."""

    def __post_init__(self) -> None:
        if self.stage not in ("visual", "text", "recon"):
            raise ValueError(f"stage must be 'visual', 'text' or 'recon', got {self.stage!r}")


@dataclass
class EncodeRun:
    """``tools/encode_dataset.py``: a dataset encoded to a code shard by a trained tokenizer (DESIGN §6)."""

    tokenizer: TokenizerRef = field(default_factory=lambda: TokenizerRef(checkpoint=MISSING))
    """The trained tokenizer (``tokenizer.checkpoint=DIR``, required); its architecture comes from the checkpoint."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to encode: every row of the ``predict`` role (phantoms: ``num_train`` images of ``seed``;
    manifest: the rows of ``predict_split``, or all); batch size, workers and the bad-row limit."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, nodes and strategy; ``precision`` defaults to fp32 so codes equal ``tokenize_image``'s."""
    out: str = MISSING
    """The shard directory (required); a directory holding an interrupted run of the same job resumes."""
    split: str | None = None
    """Split written to rows whose data names none (phantoms, folders, volumes); None reads as train."""


IMAGE_INITS: dict[str, tuple[str, ...]] = {
    "random": (),
    "codebook": ("inputs", "heads"),
    "codebook_inputs": ("inputs",),
    "codebook_heads": ("heads",),
}
"""``image_init`` values and the image tables each starts from the tokenizer's code vectors."""


@dataclass
class TrainLMRun:
    """``tools/train_lm.py``: train the unified LM on code shards (and record files) of one image tokenizer."""

    lm: LMConfig = field(default_factory=LMConfig)
    """The LM architecture (``lm=tiny|small|base|large`` + field overrides)."""
    data: LMDataConfig = field(default_factory=LMDataConfig)
    """Shards, record files, task mix, batch size (``data.shard_dirs=[DIR]``)."""
    tokenizer: TokenizerRef = field(default_factory=lambda: TokenizerRef(checkpoint=MISSING))
    """The image tokenizer the shards were encoded with (``tokenizer.checkpoint=DIR``, required)."""
    text_tokenizer: str | None = None
    """A Hugging Face tokenizer (local directory or hub name); None trains a byte-level BPE on the shards' text."""
    text_vocab_size: int = 8192
    """Upper bound on the trained BPE's vocabulary (a small corpus yields fewer merges)."""
    init_from: str | None = None
    """An exported model directory (``<run>/model``) to start from, with a new optimizer and schedule (fine-tuning,
    e.g. on instructions after pre-training): its weights, architecture and text tokenizer; ``lm`` sets only the
    training options (dropout, attention backend, gradient checkpointing, z-loss)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, precision, steps (also the length of the LR schedule), checkpointing."""
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    """AdamW, warm-up + cosine, loss weights, non-finite step skipping."""
    run_dir: str = "outputs/lm"
    """Logs, checkpoints, the text tokenizer and the exported model (``<run_dir>/model``); an existing run resumes."""
    resume: bool = True
    """Resume from ``<run_dir>/checkpoints/last.ckpt`` when present."""
    seed: int = 0
    """Seed for the weights (the data order has its own ``data.seed``)."""
    image_init: str = "random"
    """How a new LM's image sub-code tables start: ``random``; ``codebook`` (input embeddings and depth-head
    output matrices from the image tokenizer's code vectors, :meth:`lm.model.DecoderLM.init_image_tables`);
    ``codebook_inputs`` / ``codebook_heads`` (only one of the two). Only ``random`` with ``init_from``."""

    def __post_init__(self) -> None:
        if self.image_init not in IMAGE_INITS:
            raise ValueError(f"image_init: expected one of {tuple(IMAGE_INITS)}, got {self.image_init!r}")
        if self.text_vocab_size < 256:
            raise ValueError(
                f"text_vocab_size must be >= 256 (the byte alphabet), got {self.text_vocab_size}"
            )


@dataclass
class EvalReconRun:
    """``tools/eval_recon.py``: the reconstruction benchmark of a trained tokenizer (DESIGN §7)."""

    tokenizer: TokenizerRef = field(default_factory=lambda: TokenizerRef(checkpoint=MISSING))
    """The trained tokenizer (``tokenizer.checkpoint=DIR``, required); its preprocessing comes from the checkpoint."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to evaluate: the ``val`` role (phantoms: ``num_val`` images of seed ``seed + 1``; manifest: rows of
    ``val_split``; folder / volume / stream: ``val_path``, else ``path``); batch size, workers, bad-row limit."""
    features: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    """rFID / KID feature network (``features.kind=inception features.weights=PATH``); "random" by default."""
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    """LPIPS backbone (``lpips.weights=PATH``); random backbone unless weights are given."""
    out: str = MISSING
    """Report directory (required): metrics.json, metrics.md, recon_<modality>.png, error_<modality>.png."""
    max_images: int | None = None
    """Evaluate only the first N images (None: all)."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ..."""
    precision: str = "auto"
    """"auto" (bf16 around encoder / decoder on CUDA, else fp32), "bf16" or "fp32"; metrics are always fp32."""
    num_grid: int = 8
    """Images per modality in the PNG grids."""
    kid_subsets: int = 100
    """Random subsets averaged by KID."""
    progress_bar: bool = True
    """Rich progress bar with ETA."""

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or null, got {self.max_images}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 1 <= self.num_grid <= 64 or self.kid_subsets < 1:
            raise ValueError(
                f"need 1 <= num_grid <= 64 and kid_subsets >= 1, got {self.num_grid}, {self.kid_subsets}"
            )


@dataclass
class EvalAlignmentRun:
    """``tools/eval_alignment.py``: what a tokenizer's tokens know about phantom modality and findings."""

    tokenizer: TokenizerRef = field(default_factory=lambda: TokenizerRef(checkpoint=MISSING))
    """The trained tokenizer (``tokenizer.checkpoint=DIR``, required)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="phantoms", num_train=1000, num_val=500))
    """Phantoms only (the tasks need their truth): the probe trains on ``num_train`` images of ``seed`` and
    everything is scored on ``num_val`` held-out images of ``seed + 1``."""
    out: str = MISSING
    """Report directory (required): metrics.json and metrics.md."""
    prompts: int = ZERO_SHOT_PROMPTS
    """Zero-shot: captions averaged into each class embedding."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""
    progress_bar: bool = True
    """Rich progress bar with ETA."""

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")


@dataclass
class EvalGenerationRun(GenerationEvalConfig):
    """``tools/eval_generation.py``: the text→image benchmark of a trained LM (DESIGN §7).

    Every field of :class:`~lm.held_out.GenerationEvalConfig` (``num_prompts``, ``cfg_scales``, ``features``,
    ...) is a top-level key, plus the ones below."""

    model: str = MISSING
    """The saved LM directory (``UnifiedModel.save_pretrained``; ``<run_dir>/model`` of tools/train_lm.py)."""
    out: str = MISSING
    """Report directory (required): metrics.json, metrics.md, generations.jsonl, generation_grid.png."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ..."""
    progress_bar: bool = True
    """Rich progress bar with ETA."""


@dataclass
class EvalUnderstandingRun(UnderstandingEvalConfig):
    """``tools/eval_understanding.py``: the image→text benchmark of a trained LM (DESIGN §7).

    Every field of :class:`~lm.held_out.UnderstandingEvalConfig` (``num_images``, ``vqa``, ...) is a
    top-level key, plus the ones below."""

    model: str = MISSING
    """The saved LM directory (``UnifiedModel.save_pretrained``; ``<run_dir>/model`` of tools/train_lm.py)."""
    out: str = MISSING
    """Report directory (required): metrics.json, metrics.md, reports.jsonl, reports.png."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ..."""
    progress_bar: bool = True
    """Rich progress bar with ETA."""


_registered = False


def register() -> None:
    """Register every schema and preset with Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train_tokenizer", node=TrainTokenizerRun)
    cs.store(group="schema", name="encode_dataset", node=EncodeRun)
    cs.store(group="schema", name="eval_recon", node=EvalReconRun)
    cs.store(group="schema", name="eval_alignment", node=EvalAlignmentRun)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)
    cs.store(group="schema", name="tokenizer", node=TokenizerConfig)
    for name, make in TOKENIZER_PRESETS.items():
        cs.store(group="schema/tokenizer", name=name, node=make())
    cs.store(group="schema", name="train_lm", node=TrainLMRun)
    cs.store(group="schema", name="lm", node=LMConfig)
    for name, make in LM_PRESETS.items():
        cs.store(group="schema/lm", name=name, node=make())
    cs.store(group="schema", name="eval_generation", node=EvalGenerationRun)
    cs.store(group="schema", name="eval_understanding", node=EvalUnderstandingRun)
    _registered = True


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> object:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides into its schema dataclass.

    The same composition the Hydra entry points do, for callers that run a stage from Python (the
    quickstart, tests, notebooks).
    """
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run: ``python -m <module>`` + its overrides (default: ``sys.argv``)."""
    import shlex
    import sys

    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
