"""Causal flash attention in Triton: forward and backward, never materialising the (T, T) score matrix.

Naive attention writes softmax(q k^T / sqrt(hs)) to memory: T^2 numbers per head, read and written several times.
Flash attention instead walks over tiles. One program owns BLOCK_M query rows and streams the keys/values past them
BLOCK_N at a time, keeping a running ("online") softmax in registers, so memory traffic is O(T hs) per head and the
matmuls run on tensor cores. The backward recomputes the probabilities tile by tile from the per-row logsumexp
saved by the forward, instead of storing them.

Layout: q, k, v, o are (B, nh, T, hs) with a unit stride on hs (any other strides are fine, e.g. the transposed
views the model makes). Program grid: axis 0 = a tile of rows, axis 1 = one (batch, head) pair.

Masking rule, shared with the model's naive/SDPA paths: query i may see key j when j <= i (causal) and
(key j is a real token or j == i). Letting every query see itself keeps rows of padding finite: such a row has no
other key, and an all-masked softmax would be 0/0.

Numerics: loads are cast to DOT_DTYPE (the input dtype on a GPU, so the matmuls use fp16/bf16 tensor cores;
fp32 under the CPU interpreter, whose bf16 arithmetic is wrong), every matmul accumulates in fp32 and the softmax
is computed in fp32. Scores are kept in base 2 (scaled by log2(e)) because exp2 is the cheap hardware instruction.

TRITON_INTERPRET=1 must be set before this module is imported for the kernels to run on the CPU.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only where triton is missing
    raise ImportError("kernels.flash_attention needs triton: pip install 'minigpt2[kernels]' (or pip install triton); "
                      "use attn_impl='sdpa' otherwise") from error

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
"""Whether the kernels below were defined for Triton's CPU interpreter (decided once, at import)."""

_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
_HEAD_DIMS = (16, 32, 64, 128)
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU; one fixed config when interpreting.

    The interpreter rejects autotuning over several configs, and its cost grows with programs x loop steps, so it
    gets big tiles. Tiles stay >= 16: the interpreter would accept smaller, but tl.dot on a GPU would not.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# Configs that do not fit (shared memory, registers) are dropped by the autotuner. Every config keeps
# BLOCK_M % BLOCK_N == 0 (forward, dq) or BLOCK_N % BLOCK_M == 0 (dk/dv), so the diagonal band splits into whole
# tiles. The key T_BUCKET (T rounded up to a power of two) retunes per length class, not per exact length.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)])
_BWD_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3)])
_BWD_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)])
_TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "INPUT_PRECISION"]


# --------------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, HAS_PAD: tl.constexpr,
               DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running softmax state (acc, l_i, m_i) of the query rows offs_m."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION) * qk_scale  # (M, N), base 2
        # Tiles strictly below the diagonal are fully visible, so only the diagonal tiles pay for the causal test.
        # Keys past T only occur in the diagonal tile, and the causal test already hides them from rows < T.
        if DIAGONAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        if HAS_PAD:
            real = tl.load(pad_base + offs_n, mask=in_seq, other=0) != 0
            s = tl.where(real[None, :] | (offs_n[None, :] == offs_m[:, None]), s, float("-inf"))

        # Online softmax. After each tile, m_i is the row max of the scores seen so far, l_i = sum exp2(s - m_i)
        # and acc = sum exp2(s - m_i) v. When a new tile raises the max, the old terms were computed against a
        # max that was too small, so both sums are rescaled by alpha = exp2(m_old - m_new) <= 1 before the new
        # terms are added: everything stays <= 1 (no overflow) and the result equals one softmax over all keys.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # masked scores: exp2(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KEY_REAL,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                n_heads, T, T_BUCKET, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr,
                DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """O = softmax(q k^T * scale, causal) v for BLOCK_M query rows of one (batch, head); also LSE, the base-2
    logsumexp of each row's scaled scores, which is all the backward needs to rebuild the probabilities."""
    # The last query tiles see the most keys; launching them first shortens the tail of the causal workload.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # int64: offsets into big tensors overflow int32
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_base = KEY_REAL + b * T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(DOT_DTYPE)

    # A finite floor rather than -inf for the running max: with padding, a row can meet a whole tile of masked
    # keys before its first visible one, and exp2(-inf - -inf) would be NaN. The floor gives exp2(-inf) = 0 for
    # masked scores and alpha = 0 as soon as a real score arrives.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys [0, start_m) lie at or before every row of this tile: causally visible, no mask needed.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m,
                               0, start_m, T, qk_scale, HEAD_DIM, BLOCK_N, False, HAS_PAD, DOT_DTYPE,
                               INPUT_PRECISION)
    # Keys [start_m, start_m + BLOCK_M) straddle the diagonal; keys after it are never visited (half the work).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m,
                               start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True,
                               HAS_PAD, DOT_DTYPE, INPUT_PRECISION)

    # Every row < T sees at least itself, so l_i >= 1 there; only rows past T (never stored) can have l_i == 0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)

