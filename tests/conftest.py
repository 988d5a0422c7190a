"""Shared fixtures: random-weight GPT-2 checkpoints written by transformers itself, the oracle of every test."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# Without a GPU the Triton kernel runs in Triton's interpreter, which must be switched on before `kernels` is first
# imported (the model imports it to check availability), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: a second thread mostly waits for a core shared with others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SavedForBackward:
    """Counts the bytes that autograd keeps from the forward pass for backward, inside the block: the activation
    memory that gradient checkpointing is there to cut (what it recomputes is not kept)."""

    def __enter__(self):
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@pytest.fixture
def saved_for_backward() -> type[SavedForBackward]:
    """`with saved_for_backward() as saved: ...`, then `saved.bytes` (see SavedForBackward)."""
    return SavedForBackward


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(**GPT2Config fields, seed=0) -> Path` of a directory saved by GPT2LMHeadModel.save_pretrained.

    Checkpoints are cached per configuration for the whole session. Defaults: a small, fast model with peaked
    next-token distributions (initializer_range=0.2), so that rounding never decides an argmax.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cache: dict[tuple, Path] = {}

    def make(seed: int = 0, **fields) -> Path:
        settings = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=128, initializer_range=0.2)
        settings.update(fields)
        key = (seed, *sorted(settings.items()))
        if key not in cache:
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(GPT2Config(**settings)).eval()
            path = tmp_path_factory.mktemp("hf_checkpoint")
            model.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _gpt2_cached() -> bool:
    """Whether the real gpt2 weights are in the local Hugging Face cache (downloaded earlier by either library)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache("openai-community/gpt2", "model.safetensors"), str)


def pytest_collection_modifyitems(config, items):
    """Run `@pytest.mark.hub` tests (they need the real gpt2 weights) where the Hub answers or the weights are
    cached; else skip them, saying why. With MINIGPT2_HUB_TESTS=1 they always run: a machine that should reach the
    Hub and does not then fails them instead of skipping."""
    hub_items = [item for item in items if "hub" in item.keywords]
    if not hub_items or os.environ.get("MINIGPT2_HUB_TESTS") == "1" or _gpt2_cached() or _hub_reachable():
        return
    skip = pytest.mark.skip(reason="huggingface.co is unreachable and gpt2 is not in the local cache: the "
                                   "real-weights test needs one of them (MINIGPT2_HUB_TESTS=1 makes this a failure)")
    for item in hub_items:
        item.add_marker(skip)
