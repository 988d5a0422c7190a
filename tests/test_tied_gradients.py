"""The tied table's gradient accumulated by hand (tied_gradients.py) against autograd's own."""

from __future__ import annotations

import pytest
import torch

from minigpt2 import GPT, GPTConfig
from minigpt2.loss import lm_loss
from minigpt2.tied_gradients import TiedGradient


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16)).eval()


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # Few distinct tokens, so that rows repeat: index_add_ must sum a token's positions.
    return [(torch.randint(0, 20, (2, 8), generator=g), torch.randint(0, 100, (2, 8), generator=g))
            for _ in range(count)]


def gradients(model: GPT, data, tied: TiedGradient | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the summed loss of `data` (accumulated over several backward passes), then set to None."""
    for x, y in data:
        if tied is None:
            lm_loss(model(x), y).backward()
        else:
            with tied.active():
                lm_loss(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_the_table_gradient_equals_autograds_over_accumulated_steps(model):
    data = batches(3)
    expected = gradients(model, data)
    tied = TiedGradient(model)
    for _ in range(2):  # the second time round, the kept buffer is zeroed and reused
        got = gradients(model, data, tied)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert tied.storage is not None
    storage = tied.storage.data_ptr()
    gradients(model, data, tied)
    assert tied.storage.data_ptr() == storage  # no new vocab x n_embd matrix per step


def test_outside_its_block_or_without_gradients_the_model_is_unchanged(model):
    x, _ = batches(1)[0]
    with torch.no_grad():
        plain = model(x)
    tied = TiedGradient(model)
    with tied.active():
        with torch.no_grad():
            assert torch.equal(model(x), plain)
        assert torch.equal(model(x).detach(), plain)
    assert "forward" not in vars(model.lm_head) and "forward" not in vars(model.transformer.wte)
    with pytest.raises(ValueError, match="tied"):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        TiedGradient(model)


def test_under_bf16_autocast_the_gradients_are_autocasts(model, monkeypatch):
    """Under autocast the head's product runs in bf16, as autocast runs it, and is summed into the fp32 buffer a block
    of rows at a time (vocab 100 in blocks of 32 here): every gradient equals autograd's under the same autocast (to
    fp32 summation order), and they are the bf16 ones, not fp32's."""
    monkeypatch.setattr("minigpt2.tied_gradients.PRODUCT_ROWS", 32)
    data = batches(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = gradients(model, data)
        tied = TiedGradient(model)
        got = gradients(model, data, tied)
        with tied.active():
            logits = model(data[0][0])
    assert logits.dtype == torch.bfloat16
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    fp32 = gradients(model, data)
    assert not torch.allclose(fp32["transformer.wte.weight"], got["transformer.wte.weight"], rtol=1e-5, atol=1e-7)
    assert tied.storage.dtype == torch.float32


def test_the_kept_bf16_table_cannot_be_overwritten_under_a_pending_backward(model):
    """The head's bf16 copy of the table lives in one kept buffer: a second forward before the first one's backward
    rewrites it, and autograd refuses that backward rather than use the wrong copy."""
    (x, y), (x2, y2) = batches(2)
    tied = TiedGradient(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), tied.active():
        first = lm_loss(model(x), y)
        model.transformer.wte.weight.data.mul_(1.5)  # the table changes, as after an update
        second = lm_loss(model(x2), y2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            first.backward()
        second.backward()
    assert tied.storage.abs().sum() > 0
