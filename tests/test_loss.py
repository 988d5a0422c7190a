"""lm_loss's sliced cross-entropy against torch's F.cross_entropy: the loss and the gradient of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt2.loss import ROWS_PER_SLICE, lm_loss


def loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets)
    (loss * 3.0).backward()  # an upstream gradient other than 1
    return loss.detach(), leaf.grad


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_loss_and_gradient_equal_torch_cross_entropy(dtype, tol):
    torch.manual_seed(0)
    B, T, V = 3, ROWS_PER_SLICE + 5, 1000  # rows = 3 slices and a part: slice edges are crossed
    logits = (torch.randn(B, T, V) * 4).to(dtype)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = -100  # padding-like positions are not scored
    ours, ours_grad = loss_and_grad(lm_loss, logits, targets)
    theirs, theirs_grad = loss_and_grad(reference, logits, targets)
    assert ours.dtype == torch.float32 and ours_grad.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad.float(), theirs_grad.float(), rtol=tol, atol=tol * 1e-3)
    assert torch.all(ours_grad[0, :3] == 0)


def test_autocast_bf16_head_and_loss_match_fp32_reference():
    """Under autocast the logits arrive in bf16; the loss is still computed in fp32 from them."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 32), torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (2, 9))
    grads = []
    for fn in (lm_loss, reference):
        weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(F.linear(hidden, weight), targets)
        loss.backward()
        grads.append((loss.detach(), weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-2, atol=1e-2)


def test_nothing_scored_is_a_nan_loss_with_zero_gradient_like_torch():
    logits, targets = torch.randn(1, 4, 10), torch.full((1, 4), -100)
    (ours, ours_grad), (theirs, theirs_grad) = (loss_and_grad(fn, logits, targets) for fn in (lm_loss, reference))
    assert torch.isnan(ours) and torch.isnan(theirs)
    assert torch.equal(ours_grad, theirs_grad) and not ours_grad.any()


def test_misaligned_targets_are_an_error():
    with pytest.raises(ValueError, match="do not line up"):
        lm_loss(torch.randn(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))
