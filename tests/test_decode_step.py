"""The module-free decoding step (decode_step.py): transformers' logits, the module forward's to the bit, and the
module forward wherever the step would not compute the same."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

import minigpt2.prepack as prepack
from minigpt2 import GPT, GPTConfig
from minigpt2.decode_step import DecodeStep, decoding_step, supports
from minigpt2.kv_cache import KVCache
from minigpt2.model import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

# On a GPU the step is checked there too (benchmarks/gpu.sh runs this file): cuBLAS may pick another kernel for
# addmm into a buffer than for F.linear, so there the module forward is the tolerance-bounded reference, not the bits.
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    path = hf_checkpoint(seed=3)
    return GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()


def batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Three prompts of 7 tokens (left-padded to lengths 7, 4 and 6 when `padded`) and 5 tokens to feed after them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (3, 7), generator=g)
    mask = None
    if padded:
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, :3] = 0
        mask[2, :1] = 0
        ids[mask == 0] = 50256
    return ids, mask, torch.randint(0, 50257, (3, 5), generator=g)


def step_both_ways(model: GPT, ids, mask, new) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of each new token, (rows, vocab), from DecodeStep and from the module forward, each on its own cache."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    ids, new = ids.to(device), new.to(device)
    mask = None if mask is None else mask.to(device)
    caches = [KVCache(model.config, ids.shape[0], ids.shape[1] + new.shape[1], dtype=dtype, device=device)
              for _ in range(2)]
    fast, module = [], []
    with torch.inference_mode():
        for cache in caches:
            model(ids, attention_mask=mask, kv_cache=cache)
        step = DecodeStep(model, caches[0])
        for t in range(new.shape[1]):
            grown = None if mask is None else torch.cat([mask, mask.new_ones(3, t + 1)], 1)
            fast.append(step(new[:, t], grown))
            module.append(model(new[:, t:t + 1], attention_mask=grown, kv_cache=caches[1])[:, -1])
    return fast, module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True])
def test_step_equals_transformers_and_the_module_forward(pair, padded, device):
    ours, theirs = pair
    if device != "cpu":
        ours, theirs = copy.deepcopy(ours).to(device), copy.deepcopy(theirs).to(device)
    ids, mask, new = batch(padded)
    fast, module = step_both_ways(ours, ids, mask, new)
    for t in range(new.shape[1]):
        if device == "cpu":
            assert torch.equal(fast[t], module[t])  # the same operations in the same order: the same bits
        else:
            torch.testing.assert_close(fast[t], module[t], rtol=1e-5, atol=1e-5)
        seqs = torch.cat([ids, new[:, :t + 1]], 1).to(device)
        full_mask = None if mask is None else torch.cat([mask, torch.ones(3, t + 1, dtype=torch.long)], 1).to(device)
        positions = None if full_mask is None else (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            expected = theirs(seqs, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(fast[t], expected, rtol=1e-5, atol=1e-4)


def test_step_equals_the_module_forward_in_bf16_and_falls_back_under_autocast(pair):
    ids, mask, new = batch(padded=True)
    model = GPT(pair[0].config).eval()
    model.load_state_dict(pair[0].state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not supports(model)  # autocast's products run in bf16 on fp32 weights: the module forward does that
        with pytest.raises(ValueError, match="autocast"):
            step_both_ways(model, ids, mask, new)
        with torch.inference_mode():
            cache, second_cache = KVCache(model.config, 3, 8), KVCache(model.config, 3, 8)
            model(ids, attention_mask=mask, kv_cache=cache)
            model(ids, attention_mask=mask, kv_cache=second_cache)
            grown = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            step = decoding_step(model, cache)
            assert not isinstance(step, DecodeStep)
            fallback = step(new[:, 0], grown)
            module = model(new[:, :1], attention_mask=grown, kv_cache=second_cache)[:, -1]
    assert fallback.dtype == torch.bfloat16
    # The fallback is the module forward, under the same autocast: the same operations, so the same bits.
    assert torch.equal(fallback, module)
    assert torch.equal(cache.kv, second_cache.kv)  # both full: 7 + 1 of 8 positions
    model.to(torch.bfloat16)
    fast, module = step_both_ways(model, ids, mask, new)
    assert fast[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(fast, module))


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch is built without MKL")
def test_step_multiplies_through_packed_weights(pair):
    ours, _ = pair
    ids, _, new = batch(padded=False)
    caches = [KVCache(ours.config, 3, ids.shape[1] + 1) for _ in range(2)]
    with torch.inference_mode(), prepack.prepacked(ours, rows=3):
        for cache in caches:
            ours(ids, kv_cache=cache)
        step = DecodeStep(ours, caches[0])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast = step(new[:, 0])
        module = ours(new[:, :1], kv_cache=caches[1])[:, -1]
    assert any(event.name == "mkl::_mkl_linear" for event in prof.events())
    assert torch.equal(fast, module)


def test_a_full_cache_is_a_clear_error(pair):
    ours, _ = pair
    cache = KVCache(ours.config, 1, 4)
    with torch.inference_mode():
        ours(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            DecodeStep(ours, cache)(torch.tensor([5]))


def test_the_module_forward_runs_where_the_step_would_differ():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = GPT(config).eval()
    assert supports(model)
    assert not supports(model.train())  # dropout
    model.eval()
    model.transformer.h[1].mlp.dropout.train()  # e.g. Monte Carlo dropout: one module in training mode is enough
    assert not supports(model)
    model.eval()
    model.head = lambda hidden: -GPT.head(model, hidden)  # replaced on the instance: the step would not see it
    assert not supports(model)
    del model.head
    assert not supports(GPT(dataclasses.replace(config, attn_impl="naive")).eval())

    class Adapter(nn.Module):  # e.g. a fine-tuning adapter put in place of a block's MLP
        def __init__(self, mlp: nn.Module) -> None:
            super().__init__()
            self.mlp = mlp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.mlp(x)

    swapped = GPT(config).eval()
    swapped.transformer.h[1].mlp = Adapter(swapped.transformer.h[1].mlp)
    assert not supports(swapped)
    class_forward = MLP.forward
    MLP.forward = lambda self, x: 2 * class_forward(self, x)  # patched on the class, after import
    try:
        assert not supports(model)
    finally:
        MLP.forward = class_forward
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert not supports(model)
    finally:
        handle.remove()
    assert supports(model)

    # A hook on a block sees every decoding step: the prompt's forward and then one call per new token.
    calls = []
    model.transformer.h[0].register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
    assert not isinstance(decoding_step(model, KVCache(config, 1, 8)), DecodeStep)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    assert calls == [3, 1, 1, 1, 1]


def test_generate_uses_the_step_and_matches_the_module_forward(pair, monkeypatch):
    """generate() runs DecodeStep for a plain model, and its tokens are those of the module forward's steps."""
    ours, _ = pair
    ids, mask, _ = batch(padded=True)
    calls = []
    real_call = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    settings = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=50256)
    fast = ours.generate(ids, **settings)
    assert len(calls) == 5
    monkeypatch.setattr("minigpt2.decode_step.supports", lambda model: False)
    assert torch.equal(fast, ours.generate(ids, **settings))
    assert len(calls) == 5


@pytest.mark.parametrize("rows", [1, 3])
def test_step_equals_the_module_forward_for_widths_that_leave_outputs_unaligned(rows):
    # Widths of 200 put most projections' outputs at offsets that are not multiples of 16 floats in a packed
    # buffer; MKL's one-row product (input-major weights, as generate() holds them for one row) then rounds
    # differently. Each output's place in DecodeStep's buffer must start on a 64-byte boundary, like a fresh tensor.
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=200, vocab_size=500, n_positions=32)
    model = GPT(config).eval()
    prepack.use_decoding_layout(model)
    ids = torch.randint(0, 500, (rows, 5))
    caches = [KVCache(config, rows, 8) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(ids, kv_cache=cache)
        step = DecodeStep(model, caches[0])
        with pytest.raises(ValueError, match="one token for each of the cache's"):
            step(torch.tensor([1] * (rows + 1)))
        for token in (7, 11, 13):
            fast = step(torch.full((rows,), token))
            module = model(torch.full((rows, 1), token), kv_cache=caches[1])[:, -1]
            assert torch.equal(fast, module)
    assert torch.equal(caches[0].kv, caches[1].kv)
