"""The language-modelling loss: mean next-token cross-entropy over GPT-2's 50,257-way softmax, sliced by rows.

For one position with logits z (V,) and target t:

    loss = logsumexp(z) - z[t]                       d loss / d z = softmax(z) - onehot(t)

The logits are the largest tensor of a training step (batch x tokens x 50,257: 100 MB in fp32 for 2 x 256 tokens).
F.cross_entropy on them writes a full fp32 copy (under bf16 autocast), a full log-softmax, a zero-filled gradient and
then the softmax's gradient, each a pass through memory. Here the forward keeps only one number per row (its
logsumexp), and the backward forms softmax(z) - onehot(t) slice by slice, each slice in fp32 while it sits in the
cache, and writes the gradient once, in the logits' own dtype. Every slice is worked out in one fp32 buffer, made
once per pass (or, for fp32 logits, in the gradient itself): a fresh 3 MB buffer per operation and slice would cost
its page faults each time, which in a bf16 gpt2 step on a CPU made each slice's conversion take 1.3-1.7 ms instead
of 0.05. The result equals F.cross_entropy to fp32 rounding (tests/test_loss.py). The slices are sized for a CPU's
cache; on a GPU, where F.cross_entropy is a few fused kernels and a Python loop of small ones would only add
launches, lm_loss uses it, and so it does under torch.compile, which fuses the upcast, the log-softmax and its
gradient by itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ROWS_PER_SLICE = 16  # 16 x 50,257 fp32 values = 3 MB: a slice stays in cache between its few operations


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), ignoring targets equal to ignore_index."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        scored = targets != ignore_index
        safe_targets = torch.where(scored, targets, 0)  # any valid column; these rows are zeroed below
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        work = _slice_buffer(logits)
        for start in range(0, logits.shape[0], ROWS_PER_SLICE):
            rows = slice(start, start + ROWS_PER_SLICE)
            z = work[:logits[rows].shape[0]].copy_(logits[rows])  # (rows, V) in fp32
            # logsumexp(z) = m + log(sum(exp(z - m))), m the row's largest value (0 if infinite), so exp cannot
            # overflow
            top = z.amax(dim=-1, keepdim=True)
            top = torch.where(top.isinf(), 0.0, top)
            lse[rows] = z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))  # top: (rows, 1) -> (rows,)
        picked = logits.gather(1, safe_targets[:, None]).squeeze(1).float()  # (N,) -> (N, 1) -> (N,)
        count = scored.sum()
        ctx.save_for_backward(logits, safe_targets, scored, lse, count)
        # 0 / 0 = nan when nothing is scored, as F.cross_entropy gives.
        return torch.where(scored, lse - picked, 0.0).sum() / count

    @staticmethod
    @once_differentiable  # the backward below is not itself differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, scored, lse, count = ctx.saved_tensors
        # Each scored row's gradient is (softmax - onehot) * grad / count; unscored rows get zero, also when no row
        # is scored at all (count 0), as with F.cross_entropy.
        row_scale = torch.where(scored, grad_loss / count.clamp(min=1), 0.0)  # (N,) fp32
        grad = torch.empty_like(logits)
        fp32 = grad.dtype == torch.float32  # then each slice is worked out in place, in the gradient itself
        work = None if fp32 else _slice_buffer(logits)
        for start in range(0, logits.shape[0], ROWS_PER_SLICE):
            rows = slice(start, start + ROWS_PER_SLICE)
            # softmax from the saved logsumexp: exp(z - lse)
            if fp32:
                z = torch.sub(logits[rows], lse[rows, None], out=grad[rows])
            else:
                z = work[:logits[rows].shape[0]].copy_(logits[rows]).sub_(lse[rows, None])
            probs = z.exp_()
            probs.scatter_add_(1, targets[rows, None], -torch.ones_like(lse[rows, None]))
            probs.mul_(row_scale[rows, None])
            if not fp32:
                grad[rows] = probs
        return grad, None, None


def _slice_buffer(logits: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer for one slice of rows of `logits` (N, V)."""
    return torch.empty(min(ROWS_PER_SLICE, logits.shape[0]), logits.shape[1], dtype=torch.float32,
                       device=logits.device)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of aligned logits (B, T, V) and targets (B, T), in fp32, averaged over scored positions.

    Targets equal to `ignore_index` are not scored (nan if none is, as F.cross_entropy gives).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not line up: targets "
                         "need the logits' shape without the vocabulary dimension")
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (B, T, V) -> (B*T, V)
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    return _CrossEntropy.apply(logits, targets, ignore_index)
