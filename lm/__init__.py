"""The unified LM over interleaved text and image tokens: create, load, train and generate (DESIGN §5)."""

from lm.api import UnifiedModel, create_model, describe_image, generate, generate_image, load_model
from lm.config import LMConfig
from lm.generate import SamplingConfig
from lm.vocab import Vocab

__all__ = [
    "LMConfig",
    "SamplingConfig",
    "UnifiedModel",
    "Vocab",
    "create_model",
    "describe_image",
    "generate",
    "generate_image",
    "load_model",
]
