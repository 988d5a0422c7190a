"""minigpt2: a from-scratch, readable GPT-2."""

from .config import GPTConfig
from .errors import CheckpointError, ConfigError, DataError, MiniGPT2Error
from .model import GPT
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "Tokenizer", "MiniGPT2Error", "CheckpointError", "ConfigError", "DataError"]
__version__ = "0.1.0"
