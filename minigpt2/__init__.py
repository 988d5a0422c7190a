"""minigpt2: a from-scratch, readable GPT-2.

The public names below are imported on first use, so that command-line tools that never touch the model (data
preparation, say) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, ConfigError, DataError, MiniGPT2Error

_LAZY = {
    "GPT": "model",
    "GPTConfig": "config",
    "GenerationConfig": "generation_config",
    "KVCache": "kv_cache",
    "Tokenizer": "tokenizer",
    "PreparedDataset": "dataset",
    "BatchLoader": "dataset",
    "prepare_dataset": "prepare",
    "ensure_prepared": "prepare",
}

__all__ = [*_LAZY, "MiniGPT2Error", "CheckpointError", "ConfigError", "DataError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minigpt2' has no attribute {name!r}")
