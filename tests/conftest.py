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


def pytest_collection_modifyitems(config, items):
    """Run `@pytest.mark.hub` tests only where the Hub answers (they need the real gpt2 weights)."""
    hub_items = [item for item in items if "hub" in item.keywords]
    if hub_items and not _hub_reachable():
        skip = pytest.mark.skip(reason="huggingface.co is unreachable: the real-weights integration test needs it")
        for item in hub_items:
            item.add_marker(skip)
