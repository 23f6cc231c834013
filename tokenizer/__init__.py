"""MedTok image tokenizer: medical images <-> K sub-codebook token grids.

from tokenizer import create_tokenizer, load_tokenizer, tokenize_image, detokenize
"""

from tokenizer.api import create_tokenizer, detokenize, tokenize_image
from tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tokenizer.config import PRESETS, TokenizerConfig, create_config
from tokenizer.errors import InputError
from tokenizer.model import ImageTokenizer

__all__ = [
    "PRESETS",
    "ImageTokenizer",
    "InputError",
    "TokenizerConfig",
    "create_config",
    "create_tokenizer",
    "detokenize",
    "load_tokenizer",
    "save_tokenizer",
    "tokenize_image",
]
