"""MKL-packed weights for decoding several rows on a CPU (prepack.py), against plain float64 products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minigpt2.prepack as prepack
from minigpt2 import GPT, GPTConfig

# torch's x86 wheels (CI's) are built with MKL; a build without it (e.g. on ARM) leaves the weights as they are.
pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch is built without MKL")


def exact(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = linear.bias.double() if linear.bias is not None else None
    return F.linear(x.double(), linear.weight.double(), bias)


def ran_packed_op(fn) -> bool:
    """Whether calling fn() runs MKL's packed product (rather than falling back to F.linear)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == "mkl::_mkl_linear" for event in prof.events())


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_equals_the_linear_layer(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 1, 96)  # a decoding step's (rows, 1 token, C)
    out = []
    with torch.inference_mode(), prepack.prepacked(linear, rows):
        assert ran_packed_op(lambda: out.append(linear(x)))
    y = out[0]
    assert y.shape == (rows, 1, 200)
    torch.testing.assert_close(y.double(), exact(linear, x), rtol=1e-5, atol=1e-5)


def test_autograd_and_autocast_take_the_ordinary_product(monkeypatch):
    """The packed op has no gradient and takes fp32 only: with grad on, or bf16 inputs, the layer multiplies as
    usual (correct gradients, no dtype error, autocast's own product)."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(4, 16, requires_grad=True)
    with prepack.prepacked(linear, 4):
        assert not ran_packed_op(lambda: linear(x).sum().backward())
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = []
            assert not ran_packed_op(lambda: out.append(linear(x.detach())))
            assert out[0].dtype == torch.bfloat16
            assert torch.equal(out[0], F.linear(x.detach(), linear.weight, linear.bias))  # autocast's bf16 product
    torch.testing.assert_close(linear.weight.grad, x.detach().sum(0).expand(24, 16))

    # eval: no dropout, so that two calls compute the same; initializer_range=0.2: peaked distributions, so that
    # the beams take several different tokens (with the default init all ten are one token)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32, initializer_range=0.2)
    model = GPT(config).eval()
    logits = []  # every step's logits, (rows, 1, vocab), as the head computes them
    model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out.clone()))

    def beams(packed_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens and step logits of generate() under bf16 autocast, inside prepacked(model, 4): generate itself
        does not pack under autocast, so this makes the packed layers meet autocast; with packed_layers=False,
        packing is switched off (`supported`) and every layer is the plain nn.Linear, the reference."""
        logits.clear()
        with monkeypatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
            if not packed_layers:
                patch.setattr(prepack, "supported", lambda linear: False)
            with torch.inference_mode(), prepack.prepacked(model, 4):
                assert all("forward" in vars(m) for m in (model.lm_head, model.transformer.h[0].attn.c_attn)) \
                    == packed_layers
                out = model.generate(torch.tensor([[1, 2, 3]]), num_beams=4, max_new_tokens=10, eos_token_id=None,
                                     pad_token_id=0)
        return out, list(logits)

    out, steps = beams(packed_layers=True)
    expected, expected_steps = beams(packed_layers=False)
    assert out.shape == (1, 13)
    assert torch.equal(out, expected)
    assert len(steps) == len(expected_steps) == 10 and all(step.dtype == torch.bfloat16 for step in steps)
    assert all(torch.equal(a, b) for a, b in zip(steps, expected_steps))


def test_subclasses_and_replaced_forwards_are_left_alone():
    class Scaled(nn.Linear):  # e.g. an adapter that computes more than x W^T + b
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(8, 8), nn.Linear(8, 8))
    x = torch.randn(2, 8)
    expected = model(x)
    with torch.inference_mode(), prepack.prepacked(model, 2):
        assert "forward" not in vars(model[0]) and "forward" in vars(model[1])
        with prepack.prepacked(model, 2):  # nested: the outer packing stays in place
            pass
        assert "forward" in vars(model[1])
        torch.testing.assert_close(model(x), expected)


def test_other_row_counts_take_the_ordinary_product():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    prefill = torch.randn(2, 7, 32)  # 14 rows, not the 4 that were packed for
    with torch.inference_mode(), prepack.prepacked(linear, 4):
        y = linear(prefill)
    assert torch.equal(y, F.linear(prefill, linear.weight, linear.bias))


def test_layers_get_their_forward_back_even_after_an_error():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with pytest.raises(RuntimeError, match="inside"):
        with torch.inference_mode(), prepack.prepacked(model, 2):
            assert all("forward" in vars(m) for m in linears)
            raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in linears)


def test_only_fp32_cpu_weights_are_packed():
    assert prepack.supported(nn.Linear(8, 8))
    assert not prepack.supported(nn.Linear(8, 8).to(torch.bfloat16))
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.inference_mode(), prepack.prepacked(layer, 2):
        assert "forward" not in vars(layer)


def test_generate_packs_for_several_rows_only(monkeypatch):
    """Beams and batches decode with packed weights; one row, or a handful of steps, is not worth the packing."""
    packed_rows = []
    real_pack = prepack.pack
    monkeypatch.setattr(prepack, "pack", lambda linear, rows: packed_rows.append(rows) or real_pack(linear, rows))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    prompt = torch.tensor([[1, 2, 3]])
    ids = dict(eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=10, **ids)
    model.generate(prompt, num_beams=4, max_new_tokens=2, **ids)
    assert packed_rows == []
    model.generate(prompt, num_beams=4, max_new_tokens=10, **ids)
    assert set(packed_rows) == {4} and len(packed_rows) == 5  # the 4 projections of the block and the head
    packed_rows.clear()
    model.generate(prompt.repeat(3, 1), do_sample=True, num_return_sequences=2, max_new_tokens=10, **ids)
    assert set(packed_rows) == {6}
