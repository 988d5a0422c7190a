"""How decoding holds the weights on a CPU: input-major for one row, packed by MKL for several.

A decoding step multiplies a handful of rows (1 for greedy search, num_beams for beam search, the batch when
sampling) by every weight matrix, so its time is the time to read the weights. How fast MKL reads them depends on
their layout in memory and on the number of rows:

- One row: a matrix-vector product. MKL reads an input-major matrix, (in, out) in memory as OpenAI's Conv1D stored
  it, faster than nn.Linear's output-major (out, in): gpt2's head takes 4.5 ms instead of 6.2 ms on the 2-core CI
  machine. `use_decoding_layout` gives each fp32 projection that layout in place, once: same values, shapes and
  Parameter objects, only the strides change, and the model trains and saves as before.
- Several rows: MKL's ordinary sgemm copies the weight matrix into its internal tile layout on every call, and with
  a few rows that copy is most of the work: 4 rows take about twice as long as 1 (the head: 17 ms against 8 ms).
  MKL can instead pack a matrix once (`cblas_sgemm_pack`) and multiply by the packed copy (`cblas_sgemm_compute`);
  torch exposes the pair as `torch.ops.mkl._mkl_reorder_linear_weight` and `torch.ops.mkl._mkl_linear`, the ops its
  compiler uses for frozen CPU models. With packed weights 4 and 8 rows cost little more than 1 (the head: 10 ms).
  `prepacked(model, rows)` is the context for that: every fp32 nn.Linear multiplies fp32 inputs of exactly `rows`
  rows by its packed weight, and anything else (the prompt's prefill, autocast's bf16) the ordinary way. Packing
  costs a pass over the weights (about 0.15 s for gpt2) and, while decoding, memory about the size of the weights;
  the copies are freed on leaving the context, so they cannot go stale when the weights change after decoding
  (they must not change during it). Packing reads nn.Linear's output-major layout: from input-major weights it
  would first need a transposed copy, 2-3 times the cost of the packing itself (0.3 s for gpt2) at every call. So
  a call that packs first puts the weights back in that layout, in place, with `use_decoding_layout(model,
  input_major=False)`: the layout follows the kind of call, and a run of calls of one kind changes it once.

Either way the product is the same, summed in another order (float rounding, about 1e-7 relative). Elsewhere (bf16,
which oneDNN multiplies fastest output-major; a GPU; a torch without MKL) the weights are left as they are.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def use_decoding_layout(model: nn.Module, input_major: bool = True) -> None:
    """Lay out each fp32 CPU projection weight input-major (or, with input_major=False, output-major as nn.Linear
    makes it, the layout packing reads), and any other CPU weight back to nn.Linear's layout.

    In place and kept (a second call finds nothing to do). The tied head is included: as the embedding table it is
    then read by strided rows, a negligible cost for the handful of tokens a step embeds.
    """
    # Parameter data must not be made inside inference mode (generate's), or it could never be trained again.
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                continue
            weight = module.weight
            if weight.dtype == torch.float32 and input_major:
                if not weight.t().is_contiguous():
                    weight.data = weight.data.t().contiguous().t()  # (out, in) view of (in, out) storage
            elif not weight.is_contiguous():
                weight.data = weight.data.contiguous()


def supported(linear: nn.Linear) -> bool:
    """Whether `linear` can multiply by packed weights: an fp32 CPU weight and a torch built with MKL."""
    weight = linear.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


def pack(linear: nn.Linear, rows: int) -> torch.Tensor:
    """MKL's packed copy of `linear.weight` (out, in), for products with exactly `rows` rows.

    The op reads an output-major matrix: an input-major weight is copied contiguous first, one layer at a time.
    """
    with torch.no_grad():
        return torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach().contiguous(), rows)


def _packed_forward(linear: nn.Linear, packed: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` through the packed weight for an fp32 input of `rows` rows outside autograd; else the usual way."""
    if (x.dtype != torch.float32 or x.shape[-1] != linear.in_features or x.numel() != rows * linear.in_features
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, linear.weight, linear.bias)  # the packed op has no gradient and no autocast rule
    # (..., in) -> (rows, in): the packed op takes a matrix of exactly the rows it was packed for
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, linear.in_features), packed, linear.weight, linear.bias, rows)
    return out.view(*x.shape[:-1], linear.out_features)  # (rows, out) -> (..., out)


@contextlib.contextmanager
def prepacked(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, the model's plain nn.Linear layers multiply `rows`-row inputs by packed weights.

    For inference: with gradients enabled the layers multiply as usual (`generate` enters it under
    torch.inference_mode). The packed copies are taken on entry, so the weights must not change inside the block.
    Subclasses of nn.Linear (which may compute more than x W^T + b) and layers whose forward is already replaced
    are left alone. On exit, whatever happens inside, the layers' own forward is back and the copies are freed.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m) and supported(m)]
    try:
        for linear in linears:
            # An instance attribute shadows the class's forward for this module alone; nn.Module.__call__ finds it.
            linear.forward = functools.partial(_packed_forward, linear, pack(linear, rows), rows)
        yield
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)
