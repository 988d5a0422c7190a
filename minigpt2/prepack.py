"""Weights packed once for decoding on a CPU: MKL's packed matrix product for the few rows of a decoding step.

A decoding step multiplies a handful of rows (1 for greedy search, num_beams for beam search, the batch when
sampling) by every weight matrix, so its time is the time to read the weights from memory. MKL's ordinary sgemm
first copies the weight matrix into its internal tile layout, on every call; with a few rows that copy is most of the
work, and 4 rows take about twice as long as 1 (gpt2's head on the 2-core CI machine: 17 ms for 4 rows, 8 ms for 1).
MKL can instead pack a matrix once (`cblas_sgemm_pack`) and then multiply by the packed copy (`cblas_sgemm_compute`);
torch exposes the pair as `torch.ops.mkl._mkl_reorder_linear_weight` and `torch.ops.mkl._mkl_linear`, the ops its
compiler uses for frozen CPU models. With packed weights, 4 and 8 rows cost little more than 1 (the head: 10 ms).

`prepacked(model, rows)` is the context in which `generate` decodes several rows: every fp32 `nn.Linear` of a CPU
model multiplies inputs of exactly `rows` rows by its packed weight, and anything else (the prompt's prefill) the
ordinary way. The result is the same product, summed in another order (float rounding, about 1e-7 relative).

Packing costs a pass over the weights (about 0.15 s for gpt2) and, while decoding, memory about the size of the
weights; the copies are freed on leaving the context, so nothing can go stale when the weights later change. A single
row gains nothing (MKL's matrix-vector product reads the plain layout at full speed), so `generate` packs only for
two rows or more. Elsewhere (bf16, a GPU, a torch without MKL) nothing changes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def supported(linear: nn.Linear) -> bool:
    """Whether `linear` can multiply by packed weights: an fp32 CPU weight and a torch built with MKL."""
    weight = linear.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


def pack(linear: nn.Linear, rows: int) -> torch.Tensor:
    """MKL's packed copy of `linear.weight` (out, in), for products with exactly `rows` rows."""
    with torch.no_grad():
        return torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach().contiguous(), rows)


def _packed_forward(linear: nn.Linear, packed: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` through the packed weight when x has `rows` rows; otherwise the ordinary product."""
    if x.numel() != rows * linear.in_features:
        return F.linear(x, linear.weight, linear.bias)
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, linear.in_features), packed, linear.weight, linear.bias, rows)
    return out.view(*x.shape[:-1], linear.out_features)  # (rows, out) -> (..., out)


@contextlib.contextmanager
def prepacked(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, the model's supported nn.Linear layers multiply `rows`-row inputs by packed weights.

    For inference only (the packed product has no gradient): `generate` enters it under torch.inference_mode. On
    exit, whatever happens inside, the layers' own `forward` is back and the packed copies are freed.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and supported(m)]
    try:
        for linear in linears:
            # An instance attribute shadows the class's forward for this module alone; nn.Module.__call__ finds it.
            linear.forward = functools.partial(_packed_forward, linear, pack(linear, rows), rows)
        yield
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)

