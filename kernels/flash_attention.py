"""Causal flash attention in Triton: forward and backward, never materialising the (T, T) score matrix.

Naive attention writes softmax(q k^T / sqrt(hs)) to memory: T^2 numbers per head, read and written several times.
Flash attention instead walks over tiles. One program owns BLOCK_M query rows and streams the keys/values past them
BLOCK_N at a time, keeping a running ("online") softmax in registers, so nothing of size T^2 ever reaches memory:
the traffic is the keys and values read once per tile of queries, O(T^2 hs / BLOCK_M) per head, and what is stored
beyond the output is one logsumexp per row, O(T). The matmuls run on tensor cores. The backward recomputes the
probabilities tile by tile from that logsumexp, instead of storing them.

Layout: q, k, v, o are (B, nh, T, hs) with a unit stride on hs (any other strides are fine, e.g. the transposed
views the model makes). Program grid: axis 0 = a tile of rows, axis 1 = one (batch, head) pair (a batch of more
pairs than CUDA's grid takes is launched in slices).

Masking rule, shared with the model's naive/SDPA paths: query i may see key j when j <= i (causal) and
(key j is a real token or j == i). Letting every query see itself keeps rows of padding finite: such a row has no
other key, and an all-masked softmax would be 0/0.

Numerics: loads are cast to DOT_DTYPE (the input dtype on a GPU, so the matmuls use fp16/bf16 tensor cores;
fp32 under the CPU interpreter, whose bf16 arithmetic is wrong), every matmul accumulates in fp32 and the softmax
is computed in fp32. Scores are kept in base 2 (scaled by log2(e)) because exp2 is the cheap hardware instruction.

Wrapping: the forward and backward launches are torch operators (`torch.ops.minigpt2.flash_attention_forward` and
`..._backward`), tied together by an autograd.Function, so torch.compile keeps a whole model in one graph.

TRITON_INTERPRET=1 must be set before this module is imported for the kernels to run on the CPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only where triton is missing
    raise ImportError("kernels.flash_attention needs triton: pip install 'minigpt2[kernels]' (or pip install triton); "
                      "use attn_impl='sdpa' otherwise") from error
if not hasattr(triton, "knobs"):  # added in triton 3.4; an ImportError lets the model fall back to sdpa
    raise ImportError(f"kernels.flash_attention needs triton 3.4 or newer, found {triton.__version__}: "
                      "pip install -U 'triton>=3.4'; use attn_impl='sdpa' otherwise")

INTERPRET = bool(triton.knobs.runtime.interpret)
"""Whether the kernels below were defined for Triton's CPU interpreter (decided once, at import, by Triton's own
reading of TRITON_INTERPRET: 1, true, on, yes)."""

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


# Configs that need more shared memory than the GPU has are dropped by the autotuner; the last of each list is
# small enough (< 100 KB even for fp32 and hs=128) to fit everywhere. Every config keeps BLOCK_M % BLOCK_N == 0
# (forward, dq) or BLOCK_N % BLOCK_M == 0 (dk/dv), so the diagonal band splits into whole tiles. The key T_BUCKET
# (T rounded up to a power of two) retunes per length class, not per exact length.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
                         (64, 32, 4, 2)])
_BWD_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 1)])
_BWD_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 1)])
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
        # terms are added. Every exponent is <= 0, so nothing overflows, and the end result is exactly one softmax
        # over all the keys.
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



# -------------------------------------------------------------------------------------------------- backward
#
# With P = softmax(S), S = scale q k^T, O = P v and dO the incoming gradient:
#   dV = P^T dO,   dP = dO v^T,   dS = P * (dP - delta),   dQ = scale dS k,   dK = scale dS^T q,
# where delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id (the softmax Jacobian's rank-one part; the second form needs
# no P). P is rebuilt per tile as exp2(S log2(e) - LSE). dK/dV and dQ are reductions over different axes (over
# queries for a key, over keys for a query), so each gets its own kernel: every program owns the rows it writes
# and accumulates them in registers, with no atomics and a deterministic result.

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                      n_heads, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, for BLOCK_M rows of one (batch, head)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, key_real, stride_qt, stride_dot, offs_n,
                    lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                    HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add the contributions of the query tiles [lo, hi) to dk, dv of the key rows offs_n (all transposed: the
    probabilities are built as P^T, keys x queries, so that dV = P^T dO is a plain matmul)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        q = q.to(DOT_DTYPE)
        # Rows past T get lse = +inf, hence P = exp2(-inf) = 0, and dO = delta = 0: they contribute nothing.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse[None, :])
        if DIAGONAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        if HAS_PAD:
            pT = tl.where(key_real[:, None] | (offs_m[None, :] == offs_n[:, None]), pT, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = do.to(DOT_DTYPE)
        dv = tl.dot(pT.to(DOT_DTYPE), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(DOT_DTYPE), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KEY_REAL,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                     n_heads, T, T_BUCKET, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dK, dV for BLOCK_N key rows of one (batch, head), streaming over the queries that can see them."""
    start_n = tl.program_id(0) * BLOCK_N  # the first key tiles see the most queries and are launched first
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
    key_real = key_ok
    if HAS_PAD:
        key_real = tl.load(KEY_REAL + b * T + offs_n, mask=key_ok, other=0) != 0
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Queries [start_n, start_n + BLOCK_N) straddle the diagonal; queries before start_n never see these keys.
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + pid_bh * T, DELTA + pid_bh * T, key_real,
                             stride_qt, stride_dot, offs_n, start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale,
                             HEAD_DIM, BLOCK_M, True, HAS_PAD, DOT_DTYPE, INPUT_PRECISION)
    # Queries from start_n + BLOCK_N on come after every key of this tile: causally visible, no mask needed.
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + pid_bh * T, DELTA + pid_bh * T, key_real,
                             stride_qt, stride_dot, offs_n, start_n + BLOCK_N, T, T, qk_scale,
                             HEAD_DIM, BLOCK_M, False, HAS_PAD, DOT_DTYPE, INPUT_PRECISION)

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m, lo, hi, T,
                  qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                  HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add the contributions of the key tiles [lo, hi) to dq of the query rows offs_m."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        k = k.to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        v = v.to(DOT_DTYPE)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        if HAS_PAD:
            real = tl.load(pad_base + offs_n, mask=in_seq, other=0) != 0
            p = tl.where(real[None, :] | (offs_n[None, :] == offs_m[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KEY_REAL,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dqb, stride_dqh, stride_dqt,
                   n_heads, T, T_BUCKET, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dQ for BLOCK_M query rows of one (batch, head), streaming over the keys they see (same tiling as forward)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest tiles first, as in the forward
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_base = KEY_REAL + b * T
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m,
                       0, start_m, T, qk_scale, HEAD_DIM, BLOCK_N, False, HAS_PAD, DOT_DTYPE, INPUT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, pad_base, stride_kt, stride_vt, offs_m,
                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True, HAS_PAD,
                       DOT_DTYPE, INPUT_PRECISION)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------ host side

def _bht_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _tf32_allowed() -> bool:
    """Whether torch's own fp32 matmuls on CUDA may use TF32. Newer torch sets this with
    torch.backends.cuda.matmul.fp32_precision (which also reflects the older settings), and once it is set there,
    reading the older allow_tf32 flag raises a RuntimeError about mixing the two APIs."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # absent from older torch
    return torch.backends.cuda.matmul.allow_tf32 if precision is None else precision == "tf32"


def _launch_options(q: torch.Tensor, T: int) -> dict:
    """Kernel arguments shared by the forward, dk/dv and dq launches (the delta kernel takes its own): sizes, and
    the constexprs that pick the matmul precision."""
    # fp32 inputs get exact fp32 matmuls unless torch itself allows TF32 (as torch's own matmuls do).
    tf32 = q.dtype != torch.float32 or _tf32_allowed()
    return dict(n_heads=q.shape[1], T=T, T_BUCKET=triton.next_power_of_2(T), HEAD_DIM=q.shape[3],
                DOT_DTYPE=tl.float32 if INTERPRET else _DOT_DTYPES[q.dtype],
                INPUT_PRECISION="tf32" if tf32 else "ieee")


MAX_GRID_PAIRS = 65535  # CUDA's limit on a grid's axis 1, which holds the (batch, head) pairs


def _batch_chunks(B: int, H: int) -> list[slice]:
    """The batch in slices of at most MAX_GRID_PAIRS (batch, head) pairs, one launch each: a prefill of thousands
    of rows would not fit one grid. A slice of a tensor's batch is a view with the same strides."""
    step = max(1, MAX_GRID_PAIRS // H)
    return [slice(start, min(start + step, B)) for start in range(0, B, step)]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_real: torch.Tensor | None,
             sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    for rows in _batch_chunks(B, H):
        pairs = (rows.stop - rows.start) * H
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), pairs)  # noqa: E731
        pad = key_real[rows] if key_real is not None else lse  # placeholder, never read without padding
        _fwd_kernel[grid](q[rows], k[rows], v[rows], o[rows], lse[rows], pad,
                          *_bht_strides(q), *_bht_strides(k), *_bht_strides(v), *_bht_strides(o),
                          qk_scale=sm_scale * _LOG2E, HAS_PAD=key_real is not None, **_launch_options(q, T))
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, key_real: torch.Tensor | None,
              sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, hs = q.shape
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    options = dict(qk_scale=sm_scale * _LOG2E, sm_scale=sm_scale, HAS_PAD=key_real is not None,
                   **_launch_options(q, T))
    for rows in _batch_chunks(B, H):
        pairs = (rows.stop - rows.start) * H
        q_, k_, v_, o_, do_, lse_, delta_ = (t[rows] for t in (q, k, v, o, do, lse, delta))
        pad = key_real[rows] if key_real is not None else lse_  # placeholder, never read without padding
        _bwd_delta_kernel[(triton.cdiv(T, 64), pairs)](o_, do_, delta_, *_bht_strides(o), *_bht_strides(do), H, T,
                                                        HEAD_DIM=hs, BLOCK_M=64)
        grid_n = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), pairs)  # noqa: E731
        _bwd_dkdv_kernel[grid_n](q_, k_, v_, do_, dk[rows], dv[rows], lse_, delta_, pad, *_bht_strides(q),
                                 *_bht_strides(k), *_bht_strides(v), *_bht_strides(do), *_bht_strides(dk),
                                 *_bht_strides(dv), **options)
        grid_m = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), pairs)  # noqa: E731
        _bwd_dq_kernel[grid_m](q_, k_, v_, do_, dq[rows], lse_, delta_, pad, *_bht_strides(q), *_bht_strides(k),
                               *_bht_strides(v), *_bht_strides(do), *_bht_strides(dq), **options)
    return dq, dk, dv


# The launches are registered as torch operators so that torch.compile treats each as one opaque call (shapes from
# the fake versions below) instead of tracing into Triton's launcher, and graphs do not break at every attention.
_forward_op = torch.library.custom_op("minigpt2::flash_attention_forward", _forward, mutates_args=(),
                                      schema="(Tensor q, Tensor k, Tensor v, Tensor? key_real, float sm_scale) "
                                             "-> (Tensor, Tensor)")
_backward_op = torch.library.custom_op("minigpt2::flash_attention_backward", _backward, mutates_args=(),
                                       schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
                                              "Tensor? key_real, float sm_scale) -> (Tensor, Tensor, Tensor)")


@_forward_op.register_fake
def _forward_shapes(q, k, v, key_real, sm_scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


@_backward_op.register_fake
def _backward_shapes(do, q, k, v, o, lse, key_real, sm_scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_real: torch.Tensor | None) -> torch.Tensor:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        o, lse = _forward_op(q, k, v, key_real, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, key_real)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, o, lse, key_real = ctx.saved_tensors
        dq, dk, dv = _backward_op(do, q, k, v, o, lse, key_real, ctx.sm_scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention softmax(q k^T / sqrt(hs) + mask) v, fused in Triton, with gradients for q, k and v.

    Args:
        q, k, v: (B, nh, T, hs) tensors of one dtype (float16, bfloat16 or float32) on a CUDA GPU (or on the CPU
            when TRITON_INTERPRET=1 was set before `kernels` was imported). hs must be 16, 32, 64 or 128; any T.
            Any strides with a unit stride on hs are used as they are (others are copied).
        key_padding_mask: optional (B, T) bool, True for real tokens and False for padding (e.g. a left-padded
            batch). Query i sees key j when j <= i and (key j is real or j == i): padding keys are ignored, and a
            padding query, with nothing else to see, attends to itself, so its output is finite (and meaningless).
            No gradient flows into the mask.

    Returns:
        (B, nh, T, hs) attention output in the dtype of q.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, nh, T, hs); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DOT_DTYPES:
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    B, _, T, hs = q.shape
    if hs not in _HEAD_DIMS:
        raise ValueError(f"head size {hs} is not supported: flash_attention needs one of {_HEAD_DIMS}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"flash_attention needs CUDA tensors, got {q.device}; to run Triton's CPU interpreter "
                           "instead, set TRITON_INTERPRET=1 before importing kernels")
    key_real = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a ({B}, {T}) bool tensor; got "
                             f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")
        key_real = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, key_real)
